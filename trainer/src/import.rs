//! Hugging Face import: `[model] init_from = "DIR"` starts a run from a folder that
//! transformers' `save_pretrained` wrote (GPT-2 and Llama families), the reverse of
//! [`crate::export`].
//!
//! The folder's `config.json` is read with the run config ([`RunConfig::read_init`]: the
//! architecture, checked against `[model]`), its `tokenizer.json` by the data pipeline (unless
//! `[data] tokenizer` names another), and its weights here: `model.safetensors` or the shards of
//! `model.safetensors.index.json`, in any float dtype, under the names Forge's models already
//! use. Before that, the files the run reads are checked against `[model] init_sha256` when the
//! run pins them (a DiLoCo node's config always does: the coordinator's copy decides).

use crate::error::{Error, Result};
use crate::models::ModelConfig;
use crate::models::weights::{self, Shard};
use forge_protocol::model::hf;
use forge_protocol::run_config::{InitFolder, RunConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

/// Reads the `config.json` of the run's `[model] init_from` folder, if it has one and it is not
/// read yet ([`RunConfig::read_init`] from the file system); `path` is the run config's.
pub fn read_init(cfg: &mut RunConfig, path: &Path) -> Result<()> {
    Ok(cfg.read_init(path, |p| std::fs::read_to_string(p))?)
}

/// SHA-256 (hex) of every file the run reads from the folder, by name.
pub fn digests(init: &InitFolder) -> Result<BTreeMap<String, String>> {
    hf::folder_digests(&init.dir, init.tokenizer, |p| std::fs::File::open(p)).map_err(|why| {
        Error::InitFrom {
            dir: init.dir.clone(),
            why,
        }
    })
}

/// Checks the folder's files against the digests the run pinned (`[model] init_sha256`).
pub fn check_pinned(init: &InitFolder, pinned: &BTreeMap<String, String>) -> Result<()> {
    let found = digests(init)?;
    hf::check_digests(&init.dir, pinned, &found).map_err(|why| Error::InitFrom {
        dir: init.dir.clone(),
        why: format!(
            "{why}. Every node must start from the same folder as the coordinator: copy it \
             again (a download that differs, or another revision, gives other weights)"
        ),
    })
}

/// Loads the folder's weights into `vs`, a var store of the whole model `cfg` (the folder's
/// architecture): every parameter present with its shape, nothing else but buffers and a tied
/// head equal to the embedding, converted to fp32.
pub fn load_weights(vs: &mut VarStore, cfg: &ModelConfig, dir: &Path) -> Result<()> {
    let (source, shards) = weight_files(dir)?;
    weights::load_shards(vs, cfg, &source, &shards)
}

/// The folder's weight files: `model.safetensors.index.json`'s shards, each with the tensors the
/// index puts in it, or else `model.safetensors` alone; and the path that names them in errors.
fn weight_files(dir: &Path) -> Result<(PathBuf, Vec<Shard>)> {
    let fail = |why: String| Error::InitFrom {
        dir: dir.to_path_buf(),
        why,
    };
    let index_path = dir.join(hf::WEIGHTS_INDEX);
    let index = match std::fs::read_to_string(&index_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let single = dir.join(hf::WEIGHTS);
            if !single.is_file() {
                return Err(fail(format!(
                    "it has neither {} nor {}: a folder from save_pretrained holds one of them",
                    hf::WEIGHTS,
                    hf::WEIGHTS_INDEX
                )));
            }
            let shard = Shard {
                path: single.clone(),
                tensors: Vec::new(),
            };
            return Ok((single, vec![shard]));
        }
        Err(e) => return Err(fail(format!("cannot read {}: {e}", index_path.display()))),
    };
    let map =
        hf::weight_map(&index).map_err(|why| fail(format!("{}: {why}", hf::WEIGHTS_INDEX)))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in map {
        shards.entry(shard).or_default().push(tensor);
    }
    let shards = shards
        .into_iter()
        .map(|(shard, tensors)| Shard {
            path: dir.join(shard),
            tensors,
        })
        .collect();
    Ok((index_path, shards))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Family, Model};
    use tch::{Device, Kind, Tensor};

    fn tiny(family: Family) -> ModelConfig {
        ModelConfig {
            n_layer: 2,
            d_model: 64,
            d_ff: 96,
            vocab_size: 300,
            max_seq_len: 64,
            ..ModelConfig::preset("tiny", Some(family)).unwrap()
        }
    }

    fn built(cfg: &ModelConfig) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _rng = crate::rng();
        Model::new(&vs.root(), cfg).unwrap();
        vs
    }

    fn named(vs: &VarStore, kind: Kind) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().to_kind(kind)))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Writes `tensors` as shards of two tensors each with an index, as `max_shard_size` does.
    fn write_sharded(dir: &Path, tensors: &[(String, Tensor)]) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let chunks: Vec<_> = tensors.chunks(2).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let shard = format!("model-{:05}-of-{:05}.safetensors", i + 1, chunks.len());
            Tensor::write_safetensors(chunk, dir.join(&shard)).unwrap();
            for (name, _) in *chunk {
                map.insert(name.clone(), shard.clone());
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
        std::fs::write(dir.join(hf::WEIGHTS_INDEX), index.to_string()).unwrap();
        map
    }

    fn equal(a: &VarStore, b: &VarStore) -> bool {
        let b = b.variables();
        a.variables().iter().all(|(k, t)| t.equal(&b[k]))
    }

    #[test]
    fn a_sharded_bf16_folder_loads_as_fp32() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(Family::Llama);
        let source = built(&cfg);
        let map = write_sharded(dir.path(), &named(&source, Kind::BFloat16));
        assert!(
            map.values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 3
        );
        let mut vs = built(&cfg);
        load_weights(&mut vs, &cfg, dir.path()).unwrap();
        let rounded = built(&cfg);
        tch::no_grad(|| {
            for (name, mut var) in rounded.variables() {
                var.copy_(&source.variables()[&name].to_kind(Kind::BFloat16));
            }
        });
        assert!(equal(&vs, &rounded), "bf16 values, held in fp32");
        assert!(vs.variables().values().all(|t| t.kind() == Kind::Float));
        assert!(!equal(&vs, &source), "the comparison can fail");
    }

    #[test]
    fn missing_misplaced_and_cut_short_tensors_are_named() {
        let cfg = tiny(Family::Gpt2);
        let source = built(&cfg);
        let all = named(&source, Kind::Float);
        let shard = |i: usize| format!("model-{i:05}-of-{:05}.safetensors", all.len().div_ceil(2));
        let err = |tensors: &[(String, Tensor)], edit: &dyn Fn(&Path)| {
            let dir = tempfile::tempdir().unwrap();
            write_sharded(dir.path(), tensors);
            edit(dir.path());
            let mut vs = built(&cfg);
            load_weights(&mut vs, &cfg, dir.path())
                .unwrap_err()
                .to_string()
        };
        // A parameter left out is named.
        let without: Vec<_> = all
            .iter()
            .filter(|(k, _)| k != "transformer.h.1.mlp.c_fc.weight")
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        let e = err(&without, &|_| {});
        assert!(
            e.contains("1 parameter(s) missing") && e.contains("transformer.h.1.mlp.c_fc.weight"),
            "{e}"
        );
        // An index that puts a tensor in a shard that does not hold it.
        let e = err(&all, &|dir| {
            let path = dir.join(hf::WEIGHTS_INDEX);
            let text = std::fs::read_to_string(&path).unwrap();
            let key = "\"transformer.h.0.attn.c_attn.bias\":";
            let at = text.find(key).unwrap() + key.len();
            let moved = format!("{}\"{}\"{}", &text[..at], shard(2), {
                let rest = &text[at + 1..];
                &rest[rest.find('"').unwrap() + 1..]
            });
            assert_ne!(moved, text);
            std::fs::write(&path, moved).unwrap();
        });
        assert!(
            e.contains("the index puts transformer.h.0.attn.c_attn.bias in")
                && e.contains(&shard(2)),
            "{e}"
        );
        // A shard cut short.
        let e = err(&all, &|dir| {
            let path = dir.join(shard(3));
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        });
        assert!(e.contains(&shard(3)) && e.contains("truncated"), "{e}");
        // A shard the index names that is not there; an empty folder.
        let e = err(&all, &|dir| {
            std::fs::remove_file(dir.join(shard(2))).unwrap()
        });
        assert!(e.contains(&shard(2)), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let mut vs = built(&cfg);
        let e = load_weights(&mut vs, &cfg, empty.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither model.safetensors nor model.safetensors.index.json"),
            "{e}"
        );
    }

    #[test]
    fn a_tied_head_may_be_written_out_only_as_the_embedding() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(Family::Llama);
        let cfg = ModelConfig {
            tie_embeddings: true,
            ..cfg
        };
        let source = built(&cfg);
        let mut tensors = named(&source, Kind::Float);
        let embed = source.variables()["model.embed_tokens.weight"].detach();
        tensors.push(("lm_head.weight".into(), embed.copy()));
        Tensor::write_safetensors(&tensors, dir.path().join(hf::WEIGHTS)).unwrap();
        let mut vs = built(&cfg);
        load_weights(&mut vs, &cfg, dir.path()).unwrap();
        assert!(equal(&vs, &source));
        tensors.pop();
        tensors.push(("lm_head.weight".into(), embed + 1.0));
        Tensor::write_safetensors(&tensors, dir.path().join(hf::WEIGHTS)).unwrap();
        let e = load_weights(&mut vs, &cfg, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head.weight that differs"), "{e}");
    }
}
