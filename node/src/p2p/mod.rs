//! The node's peer-to-peer layer: its ed25519 identity, a libp2p swarm over QUIC that only
//! admits the run's members, the all-reduce of outer gradients over `/forge/sync/1` streams, and
//! the verified transfer of the DiLoCo state to nodes that join mid-run over `/forge/state/1`.
//!
//! ```text
//! let keypair = p2p::load_or_create_keypair(&workdir)?;
//! let (net, event_loop) = p2p::new(PeerNetConfig::new(keypair))?;
//! tokio::spawn(event_loop.run());
//! let addr = net.start_listening("/ip4/0.0.0.0/udp/0/quic-v1".parse()?).await?;
//! // register net.peer_id() and addr with the coordinator, then per round:
//! net.set_members(members_with_addrs).await?;
//! let out = net.all_reduce(AllReduceRequest { .. }, &mut codec).await?;
//! // after each committed round, serve the new state to joiners:
//! net.publish_state(Some(Arc::new(StateSnapshot { version, .. })));
//! // a joiner, with outer_state::expected_tensors(&committed_tensor_hashes) as `expected`:
//! let (state, stats) = net.fetch_state(&peers, version, &expected, timeout).await?;
//! ```

mod all_reduce;
mod bench;
mod error;
mod identity;
mod inbox;
mod net;
mod pipeline;
mod pipeline_bench;
pub(crate) mod relay;
mod state;
mod wire;

#[cfg(test)]
mod state_tests;
#[cfg(test)]
pub(crate) mod tests;

pub(crate) use all_reduce::{AllReduceOutput, AllReduceRequest, ChunkCodec, all_reduce_timeout};
pub(crate) use bench::{bench_local, bench_member, bench_state_member};
pub(crate) use error::AllReduceError;
pub(crate) use identity::load_or_create_keypair;
pub(crate) use net::{PeerNet, PeerNetConfig, new, quic_multiaddr};
pub(crate) use pipeline_bench::{
    PipelineBench, bench_pipeline_local, bench_pipeline_member, median,
};
pub(crate) use state::StateSnapshot;
// The stream decoders and manifest checks, for the fuzz tests.
#[cfg(test)]
pub(crate) use state::{check_manifest, chunk_of, read_frame};
#[cfg(test)]
pub(crate) use wire::{read_header, read_payload};
