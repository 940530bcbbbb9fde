//! The global state as the node moves it: resumed from its own checkpoint shard, served to
//! peers that join or fell behind, and fetched from the round's participants and checked
//! against the coordinator's hashes. The format and the checks live in
//! `forge_trainer::outer_state`; this is the I/O around them.

use super::peers_of;
use crate::p2p::{PeerNet, StateSnapshot, all_reduce_timeout};
use anyhow::{Result, bail};
use forge_protocol::digest::tensor_digest;
use forge_protocol::messages::{GlobalState, MemberId, RoundOpened};
use forge_protocol::messages::{TensorHash, TensorKey};
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::diloco::OuterOptimizer;
use forge_trainer::outer_state::{self, FlatState, Resumed};
use forge_trainer::train::Trainer;
use libp2p::PeerId;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Takes global state `global` from this node's checkpoint shards if one holds it: the state
/// of a new run (version 0), of a whole-cluster restart, or of the checkpoint the run went back
/// to when every holder of some layers was lost. `mine` are the committed hashes of the tensors
/// this node trains (a pipeline stage's own). Returns the version it then holds and the round
/// that made it; None when the node must fetch it from its peers. A shard of that version with
/// other layers (this node's stage changed since it wrote it) is served to the nodes that hold
/// those layers now. `position` is the run's (inner step, tokens) at that version: the node
/// continues there, whatever step the shard's writer had reached (paced replicas step at their
/// own speed), as a node that fetches the state does.
pub(super) fn resume(
    checkpoints: &CheckpointDir,
    global: &GlobalState,
    mine: Vec<TensorHash>,
    position: (u64, u64),
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    net: &PeerNet,
) -> Result<Option<(u64, u64)>> {
    if global.version == 0 {
        return Ok(Some((0, 0)));
    }
    let own = GlobalState {
        tensor_hashes: mine,
        ..global.clone()
    };
    let resumed =
        tokio::task::block_in_place(|| outer_state::resume(checkpoints, &own, trainer, outer));
    match resumed {
        Ok(Resumed::Shard(dir)) => {
            let round = outer_state::read_meta(&dir)?.round;
            trainer.set_progress(position.0, position.1);
            publish_state(net, outer, trainer, global.version, round)?;
            println!(
                "resumed global state v{} from {} (inner step {})",
                global.version,
                dir.display(),
                trainer.step()
            );
            return Ok(Some((global.version, round)));
        }
        Ok(Resumed::OtherVersion { dir, version }) => {
            println!(
                "the local checkpoint {} holds global version {version}, the run is at {}",
                dir.display(),
                global.version
            );
        }
        Ok(Resumed::NoCheckpoint) => {}
        Err(e) => {
            println!("not resuming from the local checkpoint: {e:#}; fetching from peers");
            serve_shard(checkpoints, global, position, net);
        }
    }
    Ok(None)
}

/// Serves the local checkpoint shard of `global`'s version, whatever layers it holds, if a
/// valid one matches the committed hashes.
fn serve_shard(
    checkpoints: &CheckpointDir,
    global: &GlobalState,
    position: (u64, u64),
    net: &PeerNet,
) {
    let read = tokio::task::block_in_place(|| outer_state::read_committed(checkpoints, global));
    match read {
        Ok(Some((dir, round, tensors))) => {
            println!(
                "serving the local checkpoint {} of global version {} ({} tensors, of other \
                 layers than this node trains now) to the nodes that hold those layers",
                dir.display(),
                global.version,
                tensors.len()
            );
            net.publish_state(Some(Arc::new(StateSnapshot {
                version: global.version,
                round,
                step: position.0,
                tokens: position.1,
                tensors,
            })));
        }
        Ok(None) => {}
        Err(e) => println!(
            "the local checkpoint of global version {} cannot be served: {e:#}",
            global.version
        ),
    }
}

/// Serves this node's committed global state (`version`) to peers that join or fell behind.
/// What it served so far at the same version and no longer trains (its layers before a re-cut,
/// a checkpoint shard of other layers) stays served beside it, for the nodes that hold those
/// layers now.
pub(super) fn publish_state(
    net: &PeerNet,
    outer: &OuterOptimizer,
    trainer: &Trainer,
    version: u64,
    round: u64,
) -> Result<()> {
    let mut state = outer_state::snapshot(trainer, outer)?;
    if let Some(served) = net.published().filter(|s| s.version == version) {
        let own: HashSet<TensorKey> = state.tensors.iter().map(|(key, _)| key.clone()).collect();
        state.tensors.extend(
            served
                .tensors
                .iter()
                .filter(|(key, _)| !own.contains(key))
                .cloned(),
        );
    }
    net.publish_state(Some(Arc::new(StateSnapshot {
        version,
        round,
        step: state.step,
        tokens: state.tokens,
        tensors: state.tensors,
    })));
    Ok(())
}

/// Fetches global state `open.global_version` (parameters and outer momentum, checked against
/// the coordinator's hashes) from the round's other participants and takes it, continuing at
/// `progress` (inner step and tokens): the run's position at that version, which this node
/// computes rather than take from a peer, since no committed hash covers what a peer says it
/// is. Returns the seconds it took and the round that made that state.
pub(super) async fn fetch_global_state(
    open: &RoundOpened,
    me: MemberId,
    net: &PeerNet,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    bandwidth: f64,
    progress: (u64, u64),
) -> Result<(f64, u64)> {
    let started = Instant::now();
    let peers: Vec<PeerId> = peers_of(&open.participants)
        .into_iter()
        .filter(|(p, _, _)| p.member != me)
        .map(|(_, id, _)| id)
        .collect();
    let mut expected = outer_state::expected_tensors(&open.tensor_hashes);
    // What this node serves itself at that version (a checkpoint shard of other layers, or its
    // layers before a re-cut) is taken from there, checked like a peer's copy.
    let served = net
        .published()
        .filter(|served| served.version == open.global_version);
    let local: Vec<(TensorKey, Arc<Vec<f32>>)> = served
        .as_ref()
        .map(|served| {
            served
                .tensors
                .iter()
                .filter(|(key, values)| expected.get(key) == Some(&tensor_digest(values)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let served_round = served.map_or(0, |served| served.round);
    let wanted = expected.len();
    for (key, _) in &local {
        expected.remove(key);
    }
    if wanted > 0 && expected.is_empty() {
        let state = FlatState {
            step: progress.0,
            tokens: progress.1,
            tensors: local,
        };
        tokio::task::block_in_place(|| outer_state::restore(trainer, outer, &state))?;
        println!(
            "round {}: took global state v{} from what this node serves; continuing at inner \
             step {}",
            open.round.0, open.global_version, state.step
        );
        return Ok((started.elapsed().as_secs_f64(), served_round));
    }
    if expected.is_empty() || peers.is_empty() {
        bail!(
            "round {} starts from global state v{} but there is {} to check it against or fetch \
             it from",
            open.round.0,
            open.global_version,
            if peers.is_empty() {
                "no peer"
            } else {
                "no hash"
            }
        );
    }
    let state_bytes = 8 * outer.numel() as u64;
    let timeout = all_reduce_timeout(state_bytes, 2, bandwidth);
    // Peers publish a version when they process its commit, which can be a moment after this
    // node hears of the round: retry for a while before giving up.
    let give_up = Instant::now() + timeout;
    // The model's shapes: a manifest that disagrees is refused before anything is downloaded.
    let lengths: BTreeMap<TensorKey, u64> = outer
        .state_shapes()
        .into_iter()
        .map(|(key, shape)| (key, shape.iter().product::<i64>().max(0) as u64))
        .collect();
    let (snapshot, stats) = loop {
        match net
            .fetch_state_sized(&peers, open.global_version, &expected, &lengths, timeout)
            .await
        {
            Ok(fetched) => break fetched,
            Err(e) if Instant::now() < give_up => {
                tracing::info!(
                    "fetching global state v{}: {e}; retrying",
                    open.global_version
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if (snapshot.step, snapshot.tokens) != progress {
        tracing::debug!(
            "the peer serving v{} says inner step {} and {} tokens; the run's position at that \
             version is step {} and {} tokens",
            open.global_version,
            snapshot.step,
            snapshot.tokens,
            progress.0,
            progress.1
        );
    }
    let taken_here = local.len();
    let mut tensors = snapshot.tensors;
    tensors.extend(local);
    let state = FlatState {
        step: progress.0,
        tokens: progress.1,
        tensors,
    };
    tokio::task::block_in_place(|| outer_state::restore(trainer, outer, &state))?;
    let seconds = started.elapsed().as_secs_f64();
    let here = if taken_here > 0 {
        format!(", {taken_here} tensors from what this node serves")
    } else {
        String::new()
    };
    println!(
        "round {}: fetched global state v{} ({:.1} MB from {} peers, {} chunks fetched \
         again{here}) in {seconds:.2} s; continuing at inner step {}",
        open.round.0,
        open.global_version,
        stats.bytes as f64 / 1e6,
        stats.per_peer_bytes.iter().filter(|(_, b)| *b > 0).count(),
        stats.refetched_chunks,
        state.step
    );
    Ok((seconds, snapshot.round))
}
