//! All-reduce speed, reported against the ring bound: among real nodes (each runs
//! [`bench_all_reduce`] with the same arguments, e.g. in network namespaces), or among peers in
//! this process on 127.0.0.1 ([`bench_local`]). Also the plain fp32 codec these use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use forge_protocol::digest::tensor_digest;
use forge_protocol::messages::TensorKey;
use forge_protocol::sync::SyncCodec;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

use super::all_reduce::{AllReduceRequest, ChunkCodec, all_reduce_timeout};
use super::error::AllReduceError;
use super::net::{self, PeerNet, PeerNetConfig};
use super::state::StateSnapshot;

/// fp32 little-endian, lossless: the reference codec and the baseline of the bytes benchmark.
#[derive(Debug, Default)]
pub(crate) struct Fp32Codec;

impl ChunkCodec for Fp32Codec {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        self.encode_result(offset, x, max_norm, out)
    }

    /// Lossless: sends `x` whatever `max_norm` (the receivers check it).
    fn encode_result(
        &mut self,
        _offset: usize,
        x: &[f32],
        _max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        // As the fp32 kernel of `forge_protocol::quant` encodes: one store per value, no
        // length check per value.
        out.clear();
        out.resize(4 * x.len(), 0);
        for (bytes, v) in out.chunks_exact_mut(4).zip(x) {
            bytes.copy_from_slice(&v.to_le_bytes());
        }
        Ok(forge_protocol::quant::squares(x))
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        if bytes.len() != 4 * out.len() {
            return Err(forge_protocol::Error::LengthMismatch {
                declared: 4 * out.len() as u64,
                actual: bytes.len() as u64,
            });
        }
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    fn id(&self) -> (SyncCodec, bool) {
        (SyncCodec::F32, false)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct BenchReport {
    pub(crate) peers: usize,
    /// fp32 bytes of the vector averaged.
    pub(crate) payload_bytes: u64,
    /// Wall time of each round on this node.
    pub(crate) rounds: Vec<Duration>,
    /// What this node sent in the last round.
    pub(crate) bytes_sent: u64,
    /// CPU time (user + system, all threads) this process used during each round: one member's
    /// in a benchmark among processes, all the peers' in [`bench_local`].
    pub(crate) cpu: Vec<Duration>,
}

/// The middle of `times` (the upper one of an even count); zero for none.
fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// CPU time this process has used so far, all its threads, user and system.
fn process_cpu_time() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    // The process CPU clock exists on every Linux; zero would only make the report read 0.
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

impl BenchReport {
    pub(crate) fn median(&self) -> Duration {
        median(&self.rounds)
    }

    /// CPU time per round, the median over the measured rounds.
    pub(crate) fn cpu_per_round(&self) -> Duration {
        median(&self.cpu)
    }

    /// Cores this process would keep busy if every round took the ring bound: its CPU per round
    /// over the bound. Members that share a machine need the sum of theirs; past the machine's
    /// cores, the bound cannot be reached there whatever the protocol does.
    pub(crate) fn cores_at_bound(&self, bandwidth_bytes_per_s: f64) -> f64 {
        self.cpu_per_round().as_secs_f64() / self.ring_bound(bandwidth_bytes_per_s).as_secs_f64()
    }

    /// The ring bound `2(K-1)/K × payload / bandwidth`: no all-reduce can move its bytes faster.
    pub(crate) fn ring_bound(&self, bandwidth_bytes_per_s: f64) -> Duration {
        let k = self.peers as f64;
        Duration::from_secs_f64(
            2.0 * (k - 1.0) / k * self.payload_bytes as f64 / bandwidth_bytes_per_s,
        )
    }

    /// Median round time over the ring bound; 1.0 is perfect, the target is at most 1.2.
    pub(crate) fn ring_bound_ratio(&self, bandwidth_bytes_per_s: f64) -> f64 {
        self.median().as_secs_f64() / self.ring_bound(bandwidth_bytes_per_s).as_secs_f64()
    }

    /// Payload averaged per second of median round time.
    pub(crate) fn payload_bytes_per_s(&self) -> f64 {
        self.payload_bytes as f64 / self.median().as_secs_f64()
    }
}

/// Runs `rounds` fp32 all-reduces of `values` values among `members`, numbered from
/// `first_round`, each given `timeout`. Every member calls this with the same arguments at about
/// the same time.
pub(crate) async fn bench_all_reduce(
    net: &PeerNet,
    members: Vec<PeerId>,
    values: usize,
    first_round: u64,
    rounds: u64,
    timeout: Duration,
) -> Result<BenchReport, AllReduceError> {
    bench_rounds(net, members, values, first_round, rounds, timeout, None).await
}

/// [`bench_all_reduce`]; peers in one process pass a `barrier` of all of them: they start each
/// round together and the CPU time counted is the process's between two barriers, so every
/// peer's all-reduce is in it and no peer's preparation of its next round is.
async fn bench_rounds(
    net: &PeerNet,
    members: Vec<PeerId>,
    values: usize,
    first_round: u64,
    rounds: u64,
    timeout: Duration,
    barrier: Option<&tokio::sync::Barrier>,
) -> Result<BenchReport, AllReduceError> {
    let payload_bytes = 4 * values as u64;
    let data: Vec<f32> = (0..values).map(|i| (i as f32 * 0.618).sin()).collect();
    let mut report = BenchReport {
        peers: members.len(),
        payload_bytes,
        rounds: Vec::new(),
        bytes_sent: 0,
        cpu: Vec::new(),
    };
    for round in first_round..first_round + rounds {
        let request = AllReduceRequest {
            round,
            members: members.clone(),
            data: data.clone(),
            weight: 1.0,
            max_weights: Vec::new(),
            timeout,
        };
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        let cpu_before = process_cpu_time();
        let output = net.all_reduce(request, &mut Fp32Codec).await?;
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        report
            .cpu
            .push(process_cpu_time().saturating_sub(cpu_before));
        report.rounds.push(output.elapsed);
        report.bytes_sent = output.bytes_sent;
        // As a node's rounds do.
        net.recycle_average(output.average);
    }
    Ok(report)
}

/// Starts `peers` nodes in this process, listening on 127.0.0.1, each allowing all the others;
/// returns them with their addresses.
pub(crate) async fn local_cluster(
    peers: usize,
    configure: impl Fn(PeerNetConfig) -> PeerNetConfig,
) -> anyhow::Result<Vec<(PeerNet, Multiaddr)>> {
    let mut nets = Vec::with_capacity(peers);
    let mut members: Vec<(PeerId, Vec<Multiaddr>)> = Vec::with_capacity(peers);
    for _ in 0..peers {
        let config = configure(PeerNetConfig::new(Keypair::generate_ed25519()));
        let (net, event_loop) = net::new(config)?;
        tokio::spawn(event_loop.run());
        let addr = net
            .start_listening("/ip4/127.0.0.1/udp/0/quic-v1".parse()?)
            .await
            .context("listening on 127.0.0.1")?;
        members.push((net.peer_id(), vec![addr.clone()]));
        nets.push((net, addr));
    }
    for (net, _) in &nets {
        net.set_members(members.clone()).await?;
    }
    Ok(nets)
}

/// The all-reduce among `peers` in-process peers on 127.0.0.1 (loopback, so this measures the
/// stack's CPU cost, not a network).
pub(crate) async fn bench_local(
    peers: usize,
    values: usize,
    rounds: u64,
) -> anyhow::Result<BenchReport> {
    let nets = local_cluster(peers, |config| config).await?;
    let members: Vec<PeerId> = nets.iter().map(|(net, _)| net.peer_id()).collect();
    // Loopback is fast; 100 MB/s only sizes the timeout.
    let timeout = all_reduce_timeout(4 * values as u64, peers, 100e6);
    let barrier = tokio::sync::Barrier::new(peers);
    let runs = nets.iter().map(|(net, _)| {
        bench_rounds(
            net,
            members.clone(),
            values,
            1,
            rounds,
            timeout,
            Some(&barrier),
        )
    });
    let mut reports = futures::future::try_join_all(runs).await?;
    Ok(reports.swap_remove(0))
}

/// The identity of benchmark member `rank`, derived from the rank so that every process knows
/// every member's peer id without exchanging them. Benchmarks only: a node's identity is random
/// and kept in its workdir.
fn bench_keypair(rank: usize) -> Keypair {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&(rank as u64 + 1).to_le_bytes());
    secret[8..].copy_from_slice(b"forge all-reduce bench  ");
    Keypair::ed25519_from_bytes(secret).expect("an ed25519 secret is any 32 bytes")
}

/// How long the members of a benchmark have to start and connect to each other.
const CONNECT_DEADLINE: Duration = Duration::from_secs(120);

/// One member of an all-reduce benchmark among processes (for example one per network
/// namespace): member `rank` of `addrs` listens on `addrs[rank]`, waits until it is connected to
/// every other member, then runs one warm-up round (not reported) and `rounds` measured rounds.
/// The timeout of a round is four times a node's (derived from `bandwidth_bytes_per_s`): a
/// benchmark measures slow rounds rather than failing them. `max_upload_bytes_per_s` caps the
/// member's upload as a node's `--max-upload-mbps` does.
pub(crate) async fn bench_member(
    rank: usize,
    addrs: &[SocketAddr],
    values: usize,
    rounds: u64,
    bandwidth_bytes_per_s: f64,
    max_upload_bytes_per_s: Option<u64>,
) -> anyhow::Result<BenchReport> {
    let (net, ids) = connect_members(rank, addrs, max_upload_bytes_per_s).await?;
    let payload_bytes = 4 * values as u64;
    let timeout = 4 * all_reduce_timeout(payload_bytes, addrs.len(), bandwidth_bytes_per_s);
    let mut report = bench_all_reduce(&net, ids.clone(), values, 1, rounds + 1, timeout).await?;
    report.rounds.remove(0);
    report.cpu.remove(0);
    // A last small round is a barrier: no member leaves while another still reads from it.
    let barrier = all_reduce_timeout(4 * addrs.len() as u64, addrs.len(), bandwidth_bytes_per_s);
    bench_all_reduce(&net, ids, addrs.len(), rounds + 2, 1, timeout.max(barrier)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(report)
}

/// Starts benchmark member `rank` on `addrs[rank]` and waits until it is connected to every
/// other member; returns its handle and every member's peer id, in rank order.
pub(super) async fn connect_members(
    rank: usize,
    addrs: &[SocketAddr],
    max_upload_bytes_per_s: Option<u64>,
) -> anyhow::Result<(PeerNet, Vec<PeerId>)> {
    anyhow::ensure!(
        rank < addrs.len(),
        "--rank {rank} is not an index into the {} --addrs",
        addrs.len()
    );
    let config = PeerNetConfig {
        max_upload_bytes_per_s,
        ..PeerNetConfig::new(bench_keypair(rank))
    };
    let (net, event_loop) = net::new(config)?;
    tokio::spawn(event_loop.run());
    net.start_listening(super::net::quic_multiaddr(addrs[rank]))
        .await
        .with_context(|| {
            format!(
                "listening on {} (is it an address of this host?)",
                addrs[rank]
            )
        })?;
    let members: Vec<(PeerId, Vec<Multiaddr>)> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            (
                bench_keypair(i).public().to_peer_id(),
                vec![super::net::quic_multiaddr(*addr)],
            )
        })
        .collect();
    let ids: Vec<PeerId> = members.iter().map(|(id, _)| *id).collect();
    let started = Instant::now();
    loop {
        net.set_members(members.clone()).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let connected = net.connected_peers().await?;
        let missing: Vec<String> = addrs
            .iter()
            .zip(&ids)
            .enumerate()
            .filter(|(i, (_, id))| *i != rank && !connected.contains(id))
            .map(|(_, (addr, _))| addr.to_string())
            .collect();
        if missing.is_empty() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < CONNECT_DEADLINE,
            "member {rank} could not connect to {} within {:?}: start every member with the same \
             --addrs, each with its own --rank",
            missing.join(", "),
            CONNECT_DEADLINE
        );
    }
    Ok((net, ids))
}

/// What a state-transfer benchmark measured on the fetching member.
#[derive(Debug, Clone)]
pub(crate) struct StateBenchReport {
    pub(crate) servers: usize,
    /// Bytes of state (global parameters and momentum, fp32).
    pub(crate) state_bytes: u64,
    pub(crate) fetches: Vec<Duration>,
}

impl StateBenchReport {
    pub(crate) fn median(&self) -> Duration {
        median(&self.fetches)
    }

    /// The state's bytes over the joiner's link: no fetch can be faster.
    pub(crate) fn link_bound(&self, bandwidth_bytes_per_s: f64) -> Duration {
        Duration::from_secs_f64(self.state_bytes as f64 / bandwidth_bytes_per_s)
    }
}

/// The state of a model with `values` parameters as a joiner fetches it: 8 parameter tensors
/// and their momentum, fp32.
fn bench_state(values: usize) -> StateSnapshot {
    let parts = 8;
    let mut tensors = Vec::with_capacity(2 * parts);
    for key in [TensorKey::Param, TensorKey::Momentum] {
        for part in 0..parts {
            let n = values / parts + usize::from(part < values % parts);
            let data: Vec<f32> = (0..n).map(|i| ((i + part) as f32 * 0.618).sin()).collect();
            tensors.push((key(format!("w{part}")), Arc::new(data)));
        }
    }
    StateSnapshot {
        version: 1,
        round: 1,
        step: 0,
        tokens: 0,
        tensors,
    }
}

/// One member of a state-transfer benchmark: member 0 joins and fetches the state of a
/// `values`-parameter model from all the others (one warm-up fetch, then `rounds` measured);
/// the others serve it.
pub(crate) async fn bench_state_member(
    rank: usize,
    addrs: &[SocketAddr],
    values: usize,
    rounds: u64,
    bandwidth_bytes_per_s: f64,
) -> anyhow::Result<Option<StateBenchReport>> {
    let state = Arc::new(bench_state(values));
    let (net, ids) = connect_members(rank, addrs, None).await?;
    let barrier = all_reduce_timeout(4 * addrs.len() as u64, addrs.len(), bandwidth_bytes_per_s);
    let state_bytes = 8 * values as u64;
    let timeout = 4 * all_reduce_timeout(state_bytes, 2, bandwidth_bytes_per_s);
    if rank > 0 {
        net.publish_state(Some(Arc::clone(&state)));
    }
    // Every server publishes before the joiner asks.
    bench_all_reduce(&net, ids.clone(), addrs.len(), 1, 1, barrier).await?;
    let report = if rank == 0 {
        let expected: BTreeMap<TensorKey, [u8; 32]> = state
            .tensors
            .iter()
            .map(|(key, v)| (key.clone(), tensor_digest(v)))
            .collect();
        let mut fetches = Vec::new();
        for _ in 0..=rounds {
            let started = Instant::now();
            net.fetch_state(&ids[1..], 1, &expected, timeout).await?;
            fetches.push(started.elapsed());
        }
        fetches.remove(0);
        Some(StateBenchReport {
            servers: addrs.len() - 1,
            state_bytes,
            fetches,
        })
    } else {
        None
    };
    // Everyone stays until the fetcher is done.
    bench_all_reduce(
        &net,
        ids,
        addrs.len(),
        2,
        1,
        timeout.max(barrier) * (rounds as u32 + 1),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(report)
}
