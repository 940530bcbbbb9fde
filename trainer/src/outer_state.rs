//! The DiLoCo outer state (global parameters and their outer momentum) as a node checkpoints
//! it, serves it to peers, and checks it against the coordinator's committed hashes.
//!
//! # Checkpoint shard files
//!
//! Beside the trainer's own files, a node's checkpoint shard holds:
//!
//! - `outer.safetensors`: fp32 tensors named `global.<param>` (each global parameter) and
//!   `momentum.<param>` (its outer momentum);
//! - `outer.json`: `{ "version", "round", "tensor_hashes": [{ "name", "digest" }] }`, the global
//!   state version the shard holds, the round that made it and the hashes the coordinator
//!   committed for it, a parameter's named `<param>` and a momentum's `momentum.<param>`.
//!
//! Those names are the files' format, kept so that shards written by earlier builds still
//! resume; everywhere else the state is keyed by [`TensorKey`].

use crate::checkpoint::CheckpointDir;
use crate::diloco::{OuterOptimizer, tensor_digest};
use crate::error::{Error, Result};
use crate::train::Trainer;
use forge_protocol::messages::{Digest, GlobalState, TensorHash, TensorKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Tensor, nn::VarStore};

const OUTER_STATE: &str = "outer.safetensors";
const OUTER_META: &str = "outer.json";

/// What a checkpoint shard holds besides the trainer's files: the global state's version, the
/// round that made it, and the hashes the coordinator committed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OuterCheckpoint {
    pub version: u64,
    pub round: u64,
    pub tensor_hashes: Vec<TensorHash>,
}

/// `outer.json` as stored.
#[derive(Serialize, Deserialize)]
struct MetaFile {
    version: u64,
    round: u64,
    tensor_hashes: Vec<NamedHash>,
}

#[derive(Serialize, Deserialize)]
struct NamedHash {
    name: String,
    digest: Digest,
}

/// What [`resume`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// The newest valid shard held the committed state, and the node now holds it too.
    Shard(PathBuf),
    /// The newest valid shard holds another global version; nothing was loaded.
    OtherVersion { dir: PathBuf, version: u64 },
    /// There is no valid shard.
    NoCheckpoint,
}

/// The outer state flattened for serving to peers (each tensor's f32 values, in
/// [`OuterOptimizer::state_tensors`] order) with the run's schedule position.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatState {
    /// Inner steps the run has taken.
    pub step: u64,
    pub tokens: u64,
    pub tensors: Vec<(TensorKey, Arc<Vec<f32>>)>,
}

/// Writes a checkpoint shard into `ckpts` atomically: the trainer's files (model, inner
/// optimizer, data positions, step) and the outer state with `meta`.
pub fn write(
    ckpts: &CheckpointDir,
    trainer: &Trainer,
    outer: &OuterOptimizer,
    meta: &OuterCheckpoint,
) -> Result<PathBuf> {
    trainer.save_checkpoint_with(ckpts, trainer.step(), |dir| {
        write_outer_files(dir, outer, meta)
    })
}

/// [`write`] on a thread of its own: the state is copied out now (the trainer's and the outer
/// state), and the shard is written, hashed, synced and committed by rename while the node
/// trains on. The thread's result says where the shard was committed, or why it was not;
/// `done` runs on that thread as it ends.
pub fn write_in_background(
    ckpts: &CheckpointDir,
    trainer: &Trainer,
    outer: &OuterOptimizer,
    meta: OuterCheckpoint,
    done: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<PathBuf>>> {
    let state: Vec<(TensorKey, Tensor)> = outer
        .state_tensors()
        .into_iter()
        .map(|(key, t)| (key, t.copy()))
        .collect();
    trainer.save_checkpoint_in_background(
        ckpts,
        trainer.step(),
        move |dir| write_state_files(dir, state, &meta),
        done,
    )
}

/// Takes the newest valid shard in `ckpts` that holds `global`'s version, if every tensor's
/// digest equals the committed hash (an error otherwise): the outer state, then the trainer's files,
/// then the global parameters into the model on every worker.
pub fn resume(
    ckpts: &CheckpointDir,
    global: &GlobalState,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
) -> Result<Resumed> {
    let resumed = load_committed(ckpts, global, outer)?;
    if let Resumed::Shard(dir) = &resumed {
        trainer.resume_from(dir)?;
        outer.load_into(trainer.var_store());
        trainer.broadcast_params()?;
    }
    Ok(resumed)
}

/// The committed state as this node serves it to peers.
pub fn snapshot(trainer: &Trainer, outer: &OuterOptimizer) -> Result<FlatState> {
    Ok(FlatState {
        step: trainer.step(),
        tokens: trainer.tokens(),
        tensors: flat_tensors(outer)?,
    })
}

/// Takes a state fetched from peers (already checked against [`expected_tensors`]): the outer
/// state, the global parameters into the model on every worker, and the schedule position.
pub fn restore(trainer: &mut Trainer, outer: &mut OuterOptimizer, state: &FlatState) -> Result<()> {
    load_flat(outer, trainer.var_store(), &state.tensors)?;
    trainer.broadcast_params()?;
    trainer.set_progress(state.step, state.tokens);
    Ok(())
}

/// The digest each tensor of a served state must have, by key: the coordinator's committed
/// hashes less its whole-stage parameter hashes, which are not tensors.
pub fn expected_tensors(committed: &[TensorHash]) -> BTreeMap<TensorKey, [u8; 32]> {
    committed
        .iter()
        .filter(|hash| hash.key.is_tensor())
        .map(|hash| (hash.key.clone(), hash.digest.0))
        .collect()
}

fn ckpt_err(path: PathBuf, why: impl Into<String>) -> Error {
    Error::Checkpoint {
        path,
        why: why.into(),
    }
}

/// A tensor's name in `outer.safetensors` (`None`: the key is not of a tensor).
fn state_file_name(key: &TensorKey) -> Option<String> {
    match key {
        TensorKey::Param(name) => Some(format!("global.{name}")),
        TensorKey::Momentum(name) => Some(format!("momentum.{name}")),
        TensorKey::StageParams { .. } => None,
    }
}

fn state_file_key(name: &str) -> Option<TensorKey> {
    if let Some(param) = name.strip_prefix("global.") {
        Some(TensorKey::Param(param.to_string()))
    } else {
        name.strip_prefix("momentum.")
            .map(|param| TensorKey::Momentum(param.to_string()))
    }
}

/// A hash's name in `outer.json` (`None`: the key is not of a tensor).
fn meta_name(key: &TensorKey) -> Option<String> {
    match key {
        TensorKey::Param(name) => Some(name.clone()),
        TensorKey::Momentum(name) => Some(format!("momentum.{name}")),
        TensorKey::StageParams { .. } => None,
    }
}

fn meta_key(name: &str) -> TensorKey {
    match name.strip_prefix("momentum.") {
        Some(param) => TensorKey::Momentum(param.to_string()),
        None => TensorKey::Param(name.to_string()),
    }
}

fn not_a_tensor(path: PathBuf, key: &TensorKey) -> Error {
    ckpt_err(
        path,
        format!("cannot store the {key}: the outer state holds tensors only"),
    )
}

/// Writes `outer.safetensors` and `outer.json` into `dir`.
pub(crate) fn write_outer_files(
    dir: &Path,
    outer: &OuterOptimizer,
    meta: &OuterCheckpoint,
) -> Result<()> {
    write_state_files(dir, outer.state_tensors(), meta)
}

/// `outer.safetensors` with `state` ([`OuterOptimizer::state_tensors`]) and `outer.json`.
fn write_state_files(
    dir: &Path,
    state: Vec<(TensorKey, Tensor)>,
    meta: &OuterCheckpoint,
) -> Result<()> {
    let path = dir.join(OUTER_STATE);
    let state = state
        .into_iter()
        .map(|(key, t)| match state_file_name(&key) {
            Some(name) => Ok((name, t)),
            None => Err(not_a_tensor(path.clone(), &key)),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::write_safetensors(&state, &path)
        .map_err(|e| ckpt_err(path, format!("writing the outer state failed: {e}")))?;
    let path = dir.join(OUTER_META);
    let file = MetaFile {
        version: meta.version,
        round: meta.round,
        tensor_hashes: meta
            .tensor_hashes
            .iter()
            .map(|hash| match meta_name(&hash.key) {
                Some(name) => Ok(NamedHash {
                    name,
                    digest: hash.digest,
                }),
                None => Err(not_a_tensor(path.clone(), &hash.key)),
            })
            .collect::<Result<_>>()?,
    };
    let text = serde_json::to_vec_pretty(&file).expect("serializes");
    std::fs::write(&path, text).map_err(|e| ckpt_err(path, format!("writing failed: {e}")))
}

/// Reads `outer.json` of a shard.
/// A shard's `outer.json`: the global version it holds, the round that made it and the
/// committed hashes.
pub fn read_meta(dir: &Path) -> Result<OuterCheckpoint> {
    let path = dir.join(OUTER_META);
    let text =
        std::fs::read(&path).map_err(|e| ckpt_err(path.clone(), format!("cannot read it: {e}")))?;
    let file: MetaFile = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(path, format!("not a valid outer state description: {e}")))?;
    Ok(OuterCheckpoint {
        version: file.version,
        round: file.round,
        tensor_hashes: file
            .tensor_hashes
            .into_iter()
            .map(|hash| TensorHash {
                key: meta_key(&hash.name),
                digest: hash.digest,
            })
            .collect(),
    })
}

/// Reads `outer.safetensors` of a shard, checking each tensor against `committed`.
fn read_verified_state(dir: &Path, committed: &[TensorHash]) -> Result<HashMap<TensorKey, Tensor>> {
    let path = dir.join(OUTER_STATE);
    let named = Tensor::read_safetensors(&path)
        .map_err(|e| ckpt_err(path.clone(), format!("cannot read the outer state: {e}")))?;
    let committed: HashMap<&TensorKey, &Digest> =
        committed.iter().map(|t| (&t.key, &t.digest)).collect();
    let mut tensors = HashMap::with_capacity(named.len());
    for (name, tensor) in named {
        let Some(key) = state_file_key(&name) else {
            return Err(ckpt_err(
                path,
                format!("holds a tensor {name}, which is no part of the outer state"),
            ));
        };
        let digest = Digest(tensor_digest(&tensor));
        match committed.get(&key) {
            Some(&&want) if want == digest => {}
            want => {
                let want = want.map_or("none".to_string(), |d| d.to_string());
                return Err(ckpt_err(
                    path,
                    format!(
                        "holds {name} with digest {digest}, not the committed one ({want}); \
                         this shard is not the committed state"
                    ),
                ));
            }
        }
        tensors.insert(key, tensor);
    }
    Ok(tensors)
}

/// The part of [`resume`] that needs no trainer: finds the newest valid shard, checks it
/// against `global` and loads its outer state into `outer`.
pub(crate) fn load_committed(
    ckpts: &CheckpointDir,
    global: &GlobalState,
    outer: &mut OuterOptimizer,
) -> Result<Resumed> {
    // Newest first: the newest shard may hold a version whose checkpoint was never committed
    // (the cluster went down between the write and the commit) while an older one holds the
    // committed version the run went back to.
    let mut newest = None;
    for (_, dir) in ckpts.valid() {
        let meta = read_meta(&dir)?;
        if meta.version != global.version {
            newest.get_or_insert(Resumed::OtherVersion {
                dir,
                version: meta.version,
            });
            continue;
        }
        let tensors = read_verified_state(&dir, &global.tensor_hashes)?;
        outer.load_state_tensors(&tensors)?;
        return Ok(Resumed::Shard(dir));
    }
    Ok(newest.unwrap_or(Resumed::NoCheckpoint))
}

/// The newest valid shard in `ckpts` that holds `global`'s version, read without a trainer,
/// whatever layers it holds (a node whose stage changed since it wrote the shard serves it to
/// the nodes that hold those layers now): its path, the round that made it, and its tensors,
/// each checked against the committed hashes. None when no valid shard holds that version.
#[allow(clippy::type_complexity)]
pub fn read_committed(
    ckpts: &CheckpointDir,
    global: &GlobalState,
) -> Result<Option<(PathBuf, u64, Vec<(TensorKey, Arc<Vec<f32>>)>)>> {
    for (_, dir) in ckpts.valid() {
        let meta = read_meta(&dir)?;
        if meta.version != global.version {
            continue;
        }
        let mut tensors: Vec<(TensorKey, Arc<Vec<f32>>)> =
            read_verified_state(&dir, &global.tensor_hashes)?
                .into_iter()
                .map(|(key, t)| flat(key, &t))
                .collect::<Result<_>>()?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(Some((dir, meta.round, tensors)));
    }
    Ok(None)
}

fn flat_tensors(outer: &OuterOptimizer) -> Result<Vec<(TensorKey, Arc<Vec<f32>>)>> {
    outer
        .state_tensors()
        .into_iter()
        .map(|(key, t)| flat(key, &t))
        .collect()
}

/// One tensor's f32 values, flattened, as they are served.
fn flat(key: TensorKey, t: &Tensor) -> Result<(TensorKey, Arc<Vec<f32>>)> {
    let values = Vec::<f32>::try_from(t.reshape([-1]))
        .map_err(Error::torch(format!("reading outer state tensor {key}")))?;
    Ok((key, Arc::new(values)))
}

/// Loads flat tensors into the outer state (shapes from the model's) and the global parameters
/// into `vs`.
fn load_flat(
    outer: &mut OuterOptimizer,
    vs: &VarStore,
    flat: &[(TensorKey, Arc<Vec<f32>>)],
) -> Result<()> {
    let shapes: HashMap<TensorKey, Vec<i64>> = outer.state_shapes().into_iter().collect();
    let mut tensors = HashMap::with_capacity(flat.len());
    for (key, values) in flat {
        let Some(shape) = shapes.get(key) else {
            return Err(Error::StateMismatch(format!(
                "peers served a tensor {key} this model does not have"
            )));
        };
        let numel: i64 = shape.iter().product();
        if values.len() as i64 != numel {
            return Err(Error::StateMismatch(format!(
                "peers served {} values of {key}, this model's is of shape {shape:?}",
                values.len()
            )));
        }
        tensors.insert(
            key.clone(),
            Tensor::from_slice(values).reshape(shape.as_slice()),
        );
    }
    outer.load_state_tensors(&tensors)?;
    outer.load_into(vs);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::diloco::DilocoConfig;
    use crate::models::trainable_by_name;
    use tch::{Device, nn};

    /// Outer SGD with Nesterov momentum (the default has none), so that a state whose
    /// momentum differs proposes a different next step.
    pub(crate) fn with_momentum() -> DilocoConfig {
        DilocoConfig {
            outer_lr: 0.7,
            outer_momentum: 0.9,
            nesterov: true,
            ..DilocoConfig::default()
        }
    }

    /// A var store with two parameters, and its outer state after one committed outer step
    /// (so the momentum is not zero).
    pub(crate) fn trained() -> (VarStore, OuterOptimizer, Vec<TensorHash>) {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = root.var("w", &[2, 3], nn::Init::Const(0.5));
        let b = root.var("b", &[3], nn::Init::Const(-1.0));
        tch::no_grad(|| {
            w.shallow_clone()
                .copy_(&Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]));
            b.shallow_clone()
                .copy_(&Tensor::from_slice(&[0.25f32, -0.5, 0.75]));
        });
        let mut outer = OuterOptimizer::new(&vs, with_momentum()).unwrap();
        let step: Vec<f32> = (0..9).map(|i| 0.1 * i as f32 - 0.3).collect();
        let proposal = outer.propose(&step, 1, 0.0).unwrap();
        let committed = proposal
            .tensor_hashes
            .iter()
            .map(|(key, digest)| TensorHash {
                key: key.clone(),
                digest: Digest(*digest),
            })
            .collect();
        outer.commit(proposal, &vs);
        (vs, outer, committed)
    }

    /// A model of the same shapes with other values, as a fresh node has it.
    fn fresh() -> (VarStore, OuterOptimizer) {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root.var("w", &[2, 3], nn::Init::Const(9.0));
        let _ = root.var("b", &[3], nn::Init::Const(9.0));
        let outer = OuterOptimizer::new(&vs, with_momentum()).unwrap();
        (vs, outer)
    }

    fn global(version: u64, committed: &[TensorHash]) -> GlobalState {
        GlobalState {
            version,
            round: Some(forge_protocol::RoundId(version + 1)),
            tensor_hashes: committed.to_vec(),
        }
    }

    fn write_shard(
        ckpts: &CheckpointDir,
        step: u64,
        outer: &OuterOptimizer,
        meta: &OuterCheckpoint,
    ) -> PathBuf {
        ckpts
            .save(step, |dir| write_outer_files(dir, outer, meta))
            .unwrap()
    }

    fn meta(version: u64, committed: &[TensorHash]) -> OuterCheckpoint {
        OuterCheckpoint {
            version,
            round: version + 1,
            tensor_hashes: committed.to_vec(),
        }
    }

    /// Same global parameters and momentum: equal hashes now and after one more outer step.
    fn assert_same_state(got: &OuterOptimizer, want: &OuterOptimizer) {
        assert_eq!(got.global_hash(), want.global_hash());
        let step = [0.01f32; 9];
        assert_eq!(
            got.propose(&step, 1, 0.0).unwrap().tensor_hashes,
            want.propose(&step, 1, 0.0).unwrap().tensor_hashes,
            "momentum differs"
        );
    }

    #[test]
    fn write_then_resume_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 2);
        let (_, outer, committed) = trained();
        let dir = write_shard(&ckpts, 40, &outer, &meta(3, &committed));
        assert_eq!(read_meta(&dir).unwrap(), meta(3, &committed));

        let (vs, mut node) = fresh();
        let resumed = load_committed(&ckpts, &global(3, &committed), &mut node).unwrap();
        assert_eq!(resumed, Resumed::Shard(dir));
        assert_same_state(&node, &outer);
        // The model is the trainer's to load on resume, so it is untouched here.
        let w = &trainable_by_name(&vs)[1].1;
        assert_eq!(Vec::<f32>::try_from(w.reshape([-1])).unwrap(), vec![9.0; 6]);
    }

    /// The newest shard holds a version that was never committed (the whole cluster went down
    /// between the write and the commit); the run went back to the older committed one, still
    /// on disk, and the node resumes from that.
    #[test]
    fn an_older_shard_holding_the_committed_version_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 2);
        let (_, outer, committed) = trained();
        let older = write_shard(&ckpts, 40, &outer, &meta(3, &committed));
        let (_, newer_outer) = fresh();
        write_shard(&ckpts, 50, &newer_outer, &meta(4, &[]));
        let (_, mut node) = fresh();
        let resumed = load_committed(&ckpts, &global(3, &committed), &mut node).unwrap();
        assert_eq!(resumed, Resumed::Shard(older));
        assert_same_state(&node, &outer);
        // A version no shard holds: the newest is named.
        let resumed = load_committed(&ckpts, &global(7, &committed), &mut node).unwrap();
        assert!(
            matches!(resumed, Resumed::OtherVersion { version: 4, .. }),
            "{resumed:?}"
        );
    }

    #[test]
    fn a_shard_in_the_existing_file_layout_resumes() {
        // Files as a node writes them: tensors `global.<param>` / `momentum.<param>`, hashes
        // named `<param>` / `momentum.<param>`, digests as 32 numbers.
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 2);
        let (_, outer, committed) = trained();
        let by_key: HashMap<TensorKey, Tensor> = outer.state_tensors().into_iter().collect();
        let hashes: Vec<String> = committed
            .iter()
            .map(|hash| {
                let name = match &hash.key {
                    TensorKey::Param(name) => name.clone(),
                    TensorKey::Momentum(name) => format!("momentum.{name}"),
                    TensorKey::StageParams { .. } => unreachable!("not committed"),
                };
                let digest: Vec<String> = hash.digest.0.iter().map(u8::to_string).collect();
                format!(r#"{{"name": "{name}", "digest": [{}]}}"#, digest.join(", "))
            })
            .collect();
        let json = format!(
            r#"{{"version": 5, "round": 6, "tensor_hashes": [{}]}}"#,
            hashes.join(", ")
        );
        ckpts
            .save(12, |dir| {
                let tensors: Vec<(String, Tensor)> = ["w", "b"]
                    .iter()
                    .flat_map(|name| {
                        [
                            (
                                format!("global.{name}"),
                                &by_key[&TensorKey::Param(name.to_string())],
                            ),
                            (
                                format!("momentum.{name}"),
                                &by_key[&TensorKey::Momentum(name.to_string())],
                            ),
                        ]
                    })
                    .map(|(name, t)| (name, t.shallow_clone()))
                    .collect();
                Tensor::write_safetensors(&tensors, dir.join("outer.safetensors")).unwrap();
                std::fs::write(dir.join("outer.json"), &json).unwrap();
                Ok(())
            })
            .unwrap();
        let (_, mut node) = fresh();
        let resumed = load_committed(&ckpts, &global(5, &committed), &mut node).unwrap();
        assert!(matches!(resumed, Resumed::Shard(_)), "{resumed:?}");
        assert_same_state(&node, &outer);

        // And this build writes the same layout.
        let dir = write_shard(&ckpts, 13, &outer, &meta(5, &committed));
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("outer.json")).unwrap()).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(written, expected);
        let names: Vec<String> = Tensor::read_safetensors(dir.join("outer.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, ["global.b", "global.w", "momentum.b", "momentum.w"]);
    }

    #[test]
    fn a_shard_whose_digest_differs_from_the_committed_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 2);
        let (_, outer, committed) = trained();
        write_shard(&ckpts, 40, &outer, &meta(3, &committed));
        let mut other = committed.clone();
        let momentum_b = other
            .iter_mut()
            .find(|hash| hash.key == TensorKey::Momentum("b".into()))
            .unwrap();
        momentum_b.digest.0[0] ^= 1;
        let (_, mut node) = fresh();
        let before = node.global_hash();
        let err = load_committed(&ckpts, &global(3, &other), &mut node).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("momentum.b with digest"), "{message}");
        assert!(message.contains("not the committed one"), "{message}");
        assert!(message.contains("outer.safetensors"), "{message}");
        assert_eq!(node.global_hash(), before, "nothing was loaded");
    }

    #[test]
    fn a_shard_of_another_version_is_not_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 2);
        let (_, outer, committed) = trained();
        let dir = write_shard(&ckpts, 40, &outer, &meta(3, &committed));
        let (_, mut node) = fresh();
        let before = node.global_hash();
        let resumed = load_committed(&ckpts, &global(4, &committed), &mut node).unwrap();
        assert_eq!(resumed, Resumed::OtherVersion { dir, version: 3 });
        assert_eq!(node.global_hash(), before);
        let empty = CheckpointDir::new(tmp.path().join("none"), 2);
        let resumed = load_committed(&empty, &global(4, &committed), &mut node).unwrap();
        assert_eq!(resumed, Resumed::NoCheckpoint);
    }

    #[test]
    fn a_truncated_outer_state_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpts = CheckpointDir::new(tmp.path(), 3);
        let (_, outer, committed) = trained();
        write_shard(&ckpts, 10, &outer, &meta(2, &committed));
        let newest = write_shard(&ckpts, 20, &outer, &meta(3, &committed));
        let path = newest.join("outer.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

        // The file alone: a clear error naming it.
        let err = read_verified_state(&newest, &committed).unwrap_err();
        assert!(
            err.to_string()
                .contains("outer.safetensors: cannot read the outer state"),
            "{err}"
        );
        // The checkpoint's manifest no longer matches, so the shard is skipped for the older
        // one, which holds another version: nothing is resumed.
        let (_, mut node) = fresh();
        let resumed = load_committed(&ckpts, &global(3, &committed), &mut node).unwrap();
        assert!(
            matches!(resumed, Resumed::OtherVersion { version: 2, .. }),
            "{resumed:?}"
        );
    }

    #[test]
    fn snapshot_then_restore_round_trips() {
        let (_, outer, committed) = trained();
        let flat = flat_tensors(&outer).unwrap();
        let keys: Vec<String> = flat.iter().map(|(key, _)| key.to_string()).collect();
        assert_eq!(keys, ["b", "momentum.b", "w", "momentum.w"]);
        // Served tensors hash to what the coordinator committed.
        let expected = expected_tensors(&committed);
        for (key, values) in &flat {
            assert_eq!(
                forge_protocol::digest::tensor_digest(values),
                expected[key],
                "{key}"
            );
        }

        let (vs, mut node) = fresh();
        load_flat(&mut node, &vs, &flat).unwrap();
        assert_same_state(&node, &outer);
        assert_eq!(flat_tensors(&node).unwrap(), flat);
        // The global parameters are in the model.
        let w = &trainable_by_name(&vs)[1].1;
        assert_eq!(Vec::<f32>::try_from(w.reshape([-1])).unwrap(), *flat[2].1);
    }

    #[test]
    fn a_served_tensor_of_another_shape_or_key_is_refused() {
        let (_, outer, _) = trained();
        let flat = flat_tensors(&outer).unwrap();
        let (vs, mut node) = fresh();
        let before = node.global_hash();

        let mut short = flat.clone();
        short[2].1 = Arc::new(vec![1.0; 5]);
        let err = load_flat(&mut node, &vs, &short).unwrap_err();
        assert!(err.to_string().contains("5 values of w"), "{err}");

        let mut unknown = flat.clone();
        unknown[0].0 = TensorKey::Param("c".into());
        let err = load_flat(&mut node, &vs, &unknown).unwrap_err();
        assert!(err.to_string().contains("tensor c this model"), "{err}");

        let missing = &flat[1..];
        let err = load_flat(&mut node, &vs, missing).unwrap_err();
        assert!(err.to_string().contains("no tensor b"), "{err}");
        assert_eq!(node.global_hash(), before);
    }

    #[test]
    fn expected_tensors_leave_out_stage_hashes() {
        let hash = |key: TensorKey| TensorHash {
            key,
            digest: Digest([7; 32]),
        };
        let committed = [
            hash(TensorKey::StageParams { layers: None }),
            hash(TensorKey::Param("w".into())),
            hash(TensorKey::Momentum("w".into())),
        ];
        let keys: Vec<TensorKey> = expected_tensors(&committed).into_keys().collect();
        assert_eq!(
            keys,
            [
                TensorKey::Param("w".into()),
                TensorKey::Momentum("w".into())
            ]
        );
    }
}
