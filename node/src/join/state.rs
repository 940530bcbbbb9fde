//! The global state as the node moves it: resumed from its own checkpoint shard, served to
//! peers that join or fell behind, and fetched from the round's participants and checked
//! against the coordinator's hashes. The format and the checks live in
//! `forge_trainer::outer_state`; this is the I/O around them.

use super::peers_of;
use crate::p2p::{PeerNet, StateSnapshot, all_reduce_timeout};
use anyhow::{Result, bail};
use forge_protocol::messages::TensorKey;
use forge_protocol::messages::{GlobalState, MemberId, RoundOpened};
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::diloco::OuterOptimizer;
use forge_trainer::outer_state::{self, FlatState, Resumed};
use forge_trainer::train::Trainer;
use libp2p::PeerId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The global version this node holds at start: 0 for a new run; the run's version when a local
/// checkpoint shard holds it, the newest such (every tensor's digest equal to the committed hash;
/// then served to peers that lost theirs); None when the node must fetch it from its peers.
pub(super) fn resume(
    checkpoints: &CheckpointDir,
    global: &GlobalState,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    net: &PeerNet,
) -> Result<Option<u64>> {
    if global.version == 0 {
        return Ok(Some(0));
    }
    let resumed =
        tokio::task::block_in_place(|| outer_state::resume(checkpoints, global, trainer, outer));
    match resumed {
        Ok(Resumed::Shard(dir)) => {
            let round = global.round.map_or(0, |r| r.0);
            publish_state(net, outer, trainer, global.version, round)?;
            println!(
                "resumed global state v{} from {} (inner step {})",
                global.version,
                dir.display(),
                trainer.step()
            );
            Ok(Some(global.version))
        }
        Ok(Resumed::OtherVersion { dir, version }) => {
            println!(
                "the local checkpoint {} holds global version {version}, the run is at {}",
                dir.display(),
                global.version
            );
            Ok(None)
        }
        Ok(Resumed::NoCheckpoint) => Ok(None),
        Err(e) => {
            println!("not resuming from the local checkpoint: {e:#}; fetching from peers");
            Ok(None)
        }
    }
}

/// Serves this node's committed global state (`version`) to peers that join or fell behind.
pub(super) fn publish_state(
    net: &PeerNet,
    outer: &OuterOptimizer,
    trainer: &Trainer,
    version: u64,
    round: u64,
) -> Result<()> {
    let state = outer_state::snapshot(trainer, outer)?;
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
    let expected = outer_state::expected_tensors(&open.tensor_hashes);
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
    let state = FlatState {
        step: progress.0,
        tokens: progress.1,
        tensors: snapshot.tensors,
    };
    tokio::task::block_in_place(|| outer_state::restore(trainer, outer, &state))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "round {}: fetched global state v{} ({:.1} MB from {} peers, {} chunks fetched again) in \
         {seconds:.2} s; continuing at inner step {}",
        open.round.0,
        open.global_version,
        stats.bytes as f64 / 1e6,
        stats.per_peer_bytes.iter().filter(|(_, b)| *b > 0).count(),
        stats.refetched_chunks,
        state.step
    );
    Ok((seconds, snapshot.round))
}
