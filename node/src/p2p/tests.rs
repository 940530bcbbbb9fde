//! End-to-end tests of the peer-to-peer layer: several nodes in this process on 127.0.0.1.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use forge_protocol::quant::squares;
use forge_protocol::sync::SyncCodec;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use super::all_reduce::{
    AllReduceOutput, AllReduceRequest, ChunkCodec, Layout, all_reduce_timeout,
};
use super::bench::{Fp32Codec, local_cluster};
use super::error::{AllReduceError, RejectReason};
use super::net::{self, PeerNet, PeerNetConfig};
use super::wire::SYNC;

/// No test waits longer than this for anything.
const BOUND: Duration = Duration::from_secs(60);

/// Small wire chunks, so short vectors still span several chunks per range.
pub(crate) const CHUNK_VALUES: usize = 64;

/// bf16 by truncation (the top 16 bits of each f32), with error feedback keyed by offset: a
/// deliberately lossy codec.
#[derive(Debug, Default)]
struct Bf16Truncate {
    residual: HashMap<usize, Vec<f32>>,
}

fn bf16_bits(x: f32) -> [u8; 2] {
    ((x.to_bits() >> 16) as u16).to_le_bytes()
}

impl ChunkCodec for Bf16Truncate {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        _max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        let residual = self.residual.entry(offset).or_default();
        residual.resize(x.len(), 0.0);
        out.clear();
        for (r, &v) in residual.iter_mut().zip(x) {
            let wanted = v + *r;
            let bits = bf16_bits(wanted);
            out.extend_from_slice(&bits);
            *r = wanted - f32::from_bits(u32::from(u16::from_le_bytes(bits)) << 16);
        }
        Ok(squares(x))
    }

    fn encode_result(
        &mut self,
        _offset: usize,
        x: &[f32],
        _max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        out.clear();
        out.extend(x.iter().flat_map(|&v| bf16_bits(v)));
        Ok(squares(x))
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        if bytes.len() != 2 * out.len() {
            return Err(forge_protocol::Error::LengthMismatch {
                declared: 2 * out.len() as u64,
                actual: bytes.len() as u64,
            });
        }
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
        }
        Ok(())
    }

    fn id(&self) -> (SyncCodec, bool) {
        (SyncCodec::Bf16, false)
    }
}

/// Sends a signal on its first encode, so a test can act while the all-reduce is under way.
struct SignalOnEncode {
    started: Option<oneshot::Sender<()>>,
}

impl ChunkCodec for SignalOnEncode {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        if let Some(started) = self.started.take() {
            let _ = started.send(());
        }
        Fp32Codec.encode_contribution(offset, x, max_norm, out)
    }

    fn encode_result(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        Fp32Codec.encode_result(offset, x, max_norm, out)
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        Fp32Codec.decode_into(bytes, out)
    }

    fn id(&self) -> (SyncCodec, bool) {
        Fp32Codec.id()
    }
}

/// fp32, but what this member sends is scaled: its reduced range (`results`, a hostile owner)
/// or its contributions (`contributions`, a member sending more than it declared).
struct Scaled {
    results: f32,
    contributions: f32,
}

impl ChunkCodec for Scaled {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        let scaled: Vec<f32> = x.iter().map(|v| v * self.contributions).collect();
        Fp32Codec.encode_contribution(offset, &scaled, max_norm, out)
    }

    fn encode_result(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        let scaled: Vec<f32> = x.iter().map(|v| v * self.results).collect();
        Fp32Codec.encode_result(offset, &scaled, max_norm, out)
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        Fp32Codec.decode_into(bytes, out)
    }

    fn id(&self) -> (SyncCodec, bool) {
        Fp32Codec.id()
    }
}

/// Whether `err` is this member's own rejection, for a reason `is_reason` accepts (a member
/// that hears another's abort while it tells, or is about to reach, its own verdict reports its
/// own: the coordinator counts first-hand rejections).
fn rejected_for(err: &AllReduceError, is_reason: impl Fn(&RejectReason) -> bool) -> bool {
    matches!(err, AllReduceError::Rejected { reason, .. } if is_reason(reason))
}

/// [`rejected_for`], or another member's abort telling such a rejection (its reason contains
/// `told`): a member that reads the culprit's data only after a peer that has already rejected
/// it and stopped sending, or whose culprit stopped sending on hearing that abort, cannot reach
/// a verdict of its own.
fn rejected_or_told(
    err: &AllReduceError,
    told: &str,
    is_reason: impl Fn(&RejectReason) -> bool,
) -> bool {
    match err {
        AllReduceError::Aborted { reason, .. } => {
            reason.contains("rejected") && reason.contains(told)
        }
        err => rejected_for(err, is_reason),
    }
}

pub(super) async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

pub(crate) async fn cluster(
    peers: usize,
    configure: impl Fn(PeerNetConfig) -> PeerNetConfig,
) -> Vec<PeerNet> {
    bounded("starting the cluster", local_cluster(peers, configure))
        .await
        .unwrap()
        .into_iter()
        .map(|(net, _)| net)
        .collect()
}

pub(crate) fn small_chunks(config: PeerNetConfig) -> PeerNetConfig {
    PeerNetConfig {
        chunk_values: CHUNK_VALUES,
        ..config
    }
}

fn ids(nets: &[PeerNet]) -> Vec<PeerId> {
    nets.iter().map(PeerNet::peer_id).collect()
}

/// Random contributions (already multiplied by their weights) and weights.
pub(crate) fn contributions(members: usize, len: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let weights: Vec<f64> = (0..members)
        .map(|_| rng.gen_range(100.0..5000.0f64).round())
        .collect();
    let data = weights
        .iter()
        .map(|&w| {
            (0..len)
                .map(|_| rng.gen_range(-1.0f32..1.0) * w as f32)
                .collect()
        })
        .collect();
    (data, weights)
}

/// The same arithmetic as the owners: f64 sums in member order, divided by the total weight.
pub(crate) fn reference_average(data: &[Vec<f32>], weights: &[f64]) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    (0..data[0].len())
        .map(|e| {
            let mut sum = 0.0f64;
            for member in data {
                sum += f64::from(member[e]);
            }
            (sum / total) as f32
        })
        .collect()
}

/// Runs one all-reduce on every net at once, each with its own codec.
pub(crate) async fn all_reduce_everywhere(
    nets: &[PeerNet],
    round: u64,
    data: &[Vec<f32>],
    weights: &[f64],
    max_weights: &[f64],
    codecs: &mut [Box<dyn ChunkCodec>],
    timeout: Duration,
) -> Vec<Result<AllReduceOutput, AllReduceError>> {
    let members = ids(nets);
    let runs = nets
        .iter()
        .zip(codecs.iter_mut())
        .enumerate()
        .map(|(i, (net, codec))| {
            let request = AllReduceRequest {
                round,
                members: members.clone(),
                data: data[i].clone(),
                weight: weights[i],
                max_weights: max_weights.to_vec(),
                timeout,
            };
            net.all_reduce(request, codec.as_mut())
        });
    bounded("the all-reduce", futures::future::join_all(runs)).await
}

fn fp32_codecs(n: usize) -> Vec<Box<dyn ChunkCodec>> {
    (0..n)
        .map(|_| Box::new(Fp32Codec) as Box<dyn ChunkCodec>)
        .collect()
}

pub(crate) fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn layout_gives_every_element_to_exactly_one_chunk() {
    for members in 1..=5 {
        for len in [0, 1, 3, 4, 5, 63, 64, 65, 200, 1001] {
            let layout = Layout {
                len,
                members,
                chunk_values: 16,
            };
            let mut next = 0;
            for owner in 0..members {
                let owned = layout.owned(owner);
                assert_eq!(owned.start, next, "len {len}, {members} members");
                let chunks = layout.chunks(owner);
                assert!(!chunks.is_empty());
                let mut at = owned.start;
                for chunk in chunks {
                    assert_eq!(chunk.start, at);
                    assert!(chunk.len() <= 16);
                    at = chunk.end;
                }
                assert_eq!(at, owned.end);
                next = owned.end;
            }
            assert_eq!(next, len);
        }
    }
}

#[test]
fn timeout_grows_with_payload_and_shrinks_with_bandwidth() {
    let small = all_reduce_timeout(1 << 20, 4, 125e6);
    let large = all_reduce_timeout(1 << 30, 4, 125e6);
    let slow = all_reduce_timeout(1 << 30, 4, 12.5e6);
    assert!(
        small < large && large < slow,
        "{small:?} {large:?} {slow:?}"
    );
    // 1 GiB among 4 at 1 Gbit/s: the ring bound is 12.9 s; the timeout is a few times that.
    assert!(
        large > Duration::from_secs(40) && large < Duration::from_secs(120),
        "{large:?}"
    );
}

#[tokio::test]
async fn a_single_member_divides_by_its_weight_without_the_network() {
    let (net, event_loop) = net::new(PeerNetConfig::new(Keypair::generate_ed25519())).unwrap();
    tokio::spawn(event_loop.run());
    let request = AllReduceRequest {
        round: 1,
        members: vec![net.peer_id()],
        data: vec![2.0, -4.0, 1.0],
        weight: 4.0,
        max_weights: Vec::new(),
        timeout: Duration::from_secs(1),
    };
    let output = net.all_reduce(request, &mut Fp32Codec).await.unwrap();
    assert_eq!(output.average, vec![0.5, -1.0, 0.25]);
    assert_eq!(output.total_weight, 4.0);
    assert_eq!(output.member_norm, 21f64.sqrt() / 4.0);
    assert_eq!(output.bytes_sent, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_three_and_four_peers_agree_bit_for_bit_on_the_exact_average() {
    for peers in 2..=4 {
        let nets = cluster(peers, small_chunks).await;
        // Shorter than K, not divisible by K, one chunk per range, several chunks per range.
        let lengths = [1, peers - 1, 7, 3 * CHUNK_VALUES + 5, 1001];
        for (round, len) in lengths.into_iter().enumerate() {
            let round = round as u64 + 1;
            let (data, weights) = contributions(peers, len, 17 * peers as u64 + round);
            let mut codecs = fp32_codecs(peers);
            let timeout = Duration::from_secs(20);
            let outputs =
                all_reduce_everywhere(&nets, round, &data, &weights, &[], &mut codecs, timeout)
                    .await;
            let expected = reference_average(&data, &weights);
            let total: f64 = weights.iter().sum();
            // The members' pseudo-gradients (data / weight), root mean square weighted alike.
            let member_norm = (data
                .iter()
                .zip(&weights)
                .map(|(d, w)| d.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / w)
                .sum::<f64>()
                / total)
                .sqrt();
            let mut norms = Vec::new();
            for (i, output) in outputs.into_iter().enumerate() {
                let output = output
                    .unwrap_or_else(|err| panic!("{peers} peers, len {len}, member {i}: {err}"));
                assert!(
                    (output.member_norm - member_norm).abs() <= 1e-12 * member_norm,
                    "{peers} peers, len {len}, member {i}: {} vs {member_norm}",
                    output.member_norm
                );
                norms.push(output.member_norm.to_bits());
                assert_eq!(
                    bits(&output.average),
                    bits(&expected),
                    "{peers} peers, len {len}, member {i}"
                );
                assert_eq!(output.total_weight.to_bits(), total.to_bits());
                if len > 0 {
                    assert!(output.bytes_sent > 0 && output.bytes_received > 0);
                }
                // As a node does: the next round writes into this vector, longer or shorter
                // than it needs, and into the scratch buffers this round left behind.
                nets[i].recycle_average(output.average);
            }
            assert!(
                norms.iter().all(|&n| n == norms[0]),
                "{peers} peers, len {len}"
            );
        }
        for net in &nets {
            assert_eq!(
                net.inbox.pending_len(),
                0,
                "streams left behind after the rounds"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_codec_still_gives_bit_identical_results() {
    let peers = 3;
    let nets = cluster(peers, small_chunks).await;
    let len = 4 * CHUNK_VALUES + 3;
    let mut codecs: Vec<Box<dyn ChunkCodec>> = (0..peers)
        .map(|_| Box::new(Bf16Truncate::default()) as Box<dyn ChunkCodec>)
        .collect();
    // Two rounds, so the second runs with error feedback carried over.
    let mut previous: Option<Vec<Vec<f32>>> = None;
    for round in 1..=2 {
        let (data, weights) = contributions(peers, len, 99 + round);
        let outputs = all_reduce_everywhere(
            &nets,
            round,
            &data,
            &weights,
            &[],
            &mut codecs,
            Duration::from_secs(20),
        )
        .await;
        let outputs: Vec<AllReduceOutput> = outputs.into_iter().map(Result::unwrap).collect();
        for output in &outputs[1..] {
            assert_eq!(bits(&output.average), bits(&outputs[0].average));
        }
        let exact = reference_average(&data, &weights);
        let total: f64 = weights.iter().sum();
        let mut max_diff = 0.0f32;
        for (e, (&got, &want)) in outputs[0].average.iter().zip(&exact).enumerate() {
            // Truncation to bf16 loses under 2^-7 relatively: on each contribution (plus the
            // previous round's loss, which error feedback adds back now) and on the result.
            let sent: f64 = data
                .iter()
                .chain(previous.iter().flatten())
                .map(|d| f64::from(d[e].abs()))
                .sum();
            let tolerance = ((sent / total) as f32 + want.abs()) / 128.0 * 1.01 + 1e-9;
            assert!(
                (got - want).abs() <= tolerance,
                "round {round}, element {e}: {got} vs {want} (tolerance {tolerance})"
            );
            max_diff = max_diff.max((got - want).abs());
        }
        println!("bf16 round {round}: max |difference| to the exact average {max_diff:.3e}");
        assert!(max_diff > 0.0, "the codec was supposed to be lossy");
        previous = Some(data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_off_the_allowlist_cannot_open_a_sync_stream() {
    let started = bounded("starting the cluster", local_cluster(2, |c| c))
        .await
        .unwrap();
    let (a, a_addr) = &started[0];
    let (b, b_addr) = &started[1];
    let (outsider, event_loop) = net::new(PeerNetConfig::new(Keypair::generate_ed25519())).unwrap();
    tokio::spawn(event_loop.run());
    let outsider_addr = outsider
        .start_listening("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .await
        .unwrap();
    // The outsider allows A and knows its address; A does not list the outsider.
    outsider
        .set_members(vec![(a.peer_id(), vec![a_addr.clone()])])
        .await
        .unwrap();
    let mut control = outsider.control.clone();
    let refused = bounded("a refused stream", control.open_stream(a.peer_id(), SYNC)).await;
    assert!(refused.is_err(), "a non-member opened a sync stream");
    assert!(
        !a.connected_peers()
            .await
            .unwrap()
            .contains(&outsider.peer_id())
    );

    // The same outsider gets through once the coordinator's list includes it, so the refusal
    // above was the allowlist's doing.
    a.set_members(vec![
        (a.peer_id(), vec![a_addr.clone()]),
        (b.peer_id(), vec![b_addr.clone()]),
        (outsider.peer_id(), vec![outsider_addr]),
    ])
    .await
    .unwrap();
    // A's dial to the newly listed outsider and the outsider's own dial can cross; a stream
    // opened on the connection that loses the race fails, so give it a few tries.
    let mut admitted = Err(None);
    for _ in 0..5 {
        match bounded("an admitted stream", control.open_stream(a.peer_id(), SYNC)).await {
            Ok(_) => {
                admitted = Ok(());
                break;
            }
            Err(e) => admitted = Err(Some(e)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(admitted.is_ok(), "{:?}", admitted.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dropping_out_mid_all_reduce_fails_the_others_fast_naming_it() {
    let mut nets = cluster(3, |c| PeerNetConfig {
        chunk_values: 1 << 12,
        ..c
    })
    .await;
    let members = ids(&nets);
    let leaver = nets.pop().unwrap();
    let leaver_id = leaver.peer_id();
    let len = 1 << 20;
    let (data, weights) = contributions(3, len, 5);
    let timeout = Duration::from_secs(45);
    let request = |i: usize| AllReduceRequest {
        round: 1,
        members: members.clone(),
        data: data[i].clone(),
        weight: weights[i],
        max_weights: Vec::new(),
        timeout,
    };
    let (started_tx, started_rx) = oneshot::channel();
    let leaver_request = request(2);
    let leaving = tokio::spawn(async move {
        let mut codec = SignalOnEncode {
            started: Some(started_tx),
        };
        leaver.all_reduce(leaver_request, &mut codec).await
    });
    let started = Instant::now();
    let stayers = nets.iter().enumerate().map(|(i, net)| {
        let request = request(i);
        async move { net.all_reduce(request, &mut Fp32Codec).await }
    });
    let stayers = futures::future::join_all(stayers);
    let kill = async {
        started_rx.await.unwrap();
        // Dropping the leaver's last handle stops its event loop and closes its connections.
        leaving.abort();
        let _ = leaving.await;
    };
    let (outputs, ()) = bounded("the survivors' all-reduce", async {
        tokio::join!(stayers, kill)
    })
    .await;
    for output in outputs {
        let err = output.expect_err("the all-reduce cannot succeed without the leaver");
        assert_eq!(err.peer(), Some(leaver_id), "{err}");
    }
    let waited = started.elapsed();
    assert!(
        waited < timeout / 2,
        "took {waited:?}, the timeout is {timeout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_starts_is_named_when_the_timeout_expires() {
    let nets = cluster(3, small_chunks).await;
    let members = ids(&nets);
    let (data, weights) = contributions(3, 500, 8);
    let timeout = Duration::from_secs(2);
    let runs = nets[..2].iter().enumerate().map(|(i, net)| {
        let request = AllReduceRequest {
            round: 1,
            members: members.clone(),
            data: data[i].clone(),
            weight: weights[i],
            max_weights: Vec::new(),
            timeout,
        };
        async move { net.all_reduce(request, &mut Fp32Codec).await }
    });
    for output in bounded("the all-reduce", futures::future::join_all(runs)).await {
        let err = output.expect_err("the third member never took part");
        assert_eq!(err.peer(), Some(members[2]), "{err}");
    }
}

/// Runs one all-reduce among three members where the third's contribution to the first
/// member's range is bad; returns the errors.
async fn with_bad_contribution(spoil: impl Fn(&mut [f32])) -> (Vec<PeerId>, Vec<AllReduceError>) {
    let nets = cluster(3, small_chunks).await;
    let len = 600;
    let (mut data, weights) = contributions(3, len, 23);
    let first_range = Layout {
        len,
        members: 3,
        chunk_values: CHUNK_VALUES,
    }
    .owned(0);
    spoil(&mut data[2][first_range]);
    let started = Instant::now();
    let timeout = Duration::from_secs(30);
    let outputs =
        all_reduce_everywhere(&nets, 1, &data, &weights, &[], &mut fp32_codecs(3), timeout).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "failing took {waited:?}");
    let errors = outputs
        .into_iter()
        .map(|output| output.expect_err("a bad contribution must fail the all-reduce"))
        .collect();
    (ids(&nets), errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_contribution_is_rejected_naming_its_sender() {
    let (members, errors) = with_bad_contribution(|range| range[10] = f32::NAN).await;
    match &errors[0] {
        AllReduceError::Rejected {
            peer,
            reason: RejectReason::NonFinite { index: 10, .. },
            ..
        } => assert_eq!(*peer, members[2]),
        other => panic!("expected a rejection of member 2's NaN, got {other}"),
    }
    // The others hear it from the owner and name the same peer.
    for err in &errors[1..] {
        assert_eq!(err.peer(), Some(members[2]), "{err}");
    }
}

/// With weight caps (each member's data lease, in tokens), a member claiming more than its cap is
/// rejected and named by everyone, even with its data scaled alike so that its norm per unit of
/// weight looks ordinary; members within their caps average as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overweight_contribution_is_rejected_naming_its_sender() {
    let nets = cluster(3, small_chunks).await;
    let members = ids(&nets);
    let (mut data, mut weights) = contributions(3, 600, 29);
    let caps = weights.clone();
    let timeout = Duration::from_secs(30);
    let honest = all_reduce_everywhere(
        &nets,
        1,
        &data,
        &weights,
        &caps,
        &mut fp32_codecs(3),
        timeout,
    )
    .await;
    for output in honest {
        output.expect("within their caps");
    }
    weights[2] *= 100.0;
    for x in &mut data[2] {
        *x *= 100.0;
    }
    let outputs = all_reduce_everywhere(
        &nets,
        2,
        &data,
        &weights,
        &caps,
        &mut fp32_codecs(3),
        timeout,
    )
    .await;
    let errors: Vec<AllReduceError> = outputs
        .into_iter()
        .map(|output| output.expect_err("an overweight member must fail the all-reduce"))
        .collect();
    for err in &errors {
        assert_eq!(err.peer(), Some(members[2]), "{err}");
    }
    // Both honest members reject it (a weight is checked from the header), first-hand unless
    // the culprit stopped sending on hearing the other's abort.
    let overweight = |reason: &RejectReason| matches!(reason, RejectReason::Overweight { .. });
    assert!(
        errors.iter().any(|err| rejected_for(err, overweight)),
        "{errors:?}"
    );
    for err in &errors[..2] {
        assert!(
            rejected_or_told(err, "its replica's data lease allows", overweight),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlier_contribution_is_rejected_naming_its_sender() {
    let (members, errors) = with_bad_contribution(|range| {
        for x in range {
            *x *= 1000.0;
        }
    })
    .await;
    match &errors[0] {
        AllReduceError::Rejected {
            peer,
            reason: RejectReason::Outlier { norm, median, .. },
            ..
        } => {
            assert_eq!(*peer, members[2]);
            assert!(norm > &(100.0 * median), "norm {norm}, median {median}");
        }
        other => panic!("expected a rejection of member 2's outlier, got {other}"),
    }
    for err in &errors[1..] {
        assert_eq!(err.peer(), Some(members[2]), "{err}");
    }
}

/// The last member misbehaves through `hostile`'s codec; the others' errors.
async fn with_hostile_codec(
    members: usize,
    len: usize,
    hostile: Scaled,
) -> (Vec<PeerId>, Vec<AllReduceError>) {
    let nets = cluster(members, small_chunks).await;
    let (data, weights) = contributions(members, len, 31);
    let mut codecs = fp32_codecs(members - 1);
    codecs.push(Box::new(hostile));
    let timeout = Duration::from_secs(30);
    let outputs = all_reduce_everywhere(&nets, 1, &data, &weights, &[], &mut codecs, timeout).await;
    let errors = outputs
        .into_iter()
        .take(members - 1)
        .map(|output| output.expect_err("an honest member must refuse the hostile result"))
        .collect();
    (ids(&nets), errors)
}

/// An owner writing finite values of any size into its reduced range (all members get the same
/// bits, so they would agree) is rejected by every honest member: the range's norm exceeds what
/// the declared contribution norms allow. Near f32::MAX (where the outer step overflowed), a
/// million times the average, and with two members as with three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_writing_more_than_its_inputs_allow_is_rejected_by_everyone() {
    for (members, len, results) in [(3, 600, 1e6f32), (3, 600, 1e36), (2, 8192, 1e6)] {
        let hostile = Scaled {
            results,
            contributions: 1.0,
        };
        let (ids, errors) = with_hostile_codec(members, len, hostile).await;
        let owner = ids[members - 1];
        for err in &errors {
            assert_eq!(
                err.peer(),
                Some(owner),
                "{members} members, x{results}: {err}"
            );
        }
        // Every honest member gathers the range and rejects it itself.
        assert!(
            errors.iter().all(|err| rejected_for(err, |reason| matches!(
                reason,
                RejectReason::ResultAboveInputs { .. }
            ))),
            "{members} members, x{results}: {errors:?}"
        );
    }
    // Within the bound the honest members cannot tell: a scaled result of 1.5x passes.
    let nets = cluster(3, small_chunks).await;
    let (data, weights) = contributions(3, 600, 31);
    let mut codecs = fp32_codecs(2);
    codecs.push(Box::new(Scaled {
        results: 1.5,
        contributions: 1.0,
    }));
    let outputs = all_reduce_everywhere(
        &nets,
        1,
        &data,
        &weights,
        &[],
        &mut codecs,
        Duration::from_secs(30),
    )
    .await;
    assert!(outputs.iter().all(Result::is_ok), "{outputs:?}");
}

/// A member whose contributions are larger than the norm its headers declare (declaring low to
/// widen no bound and pass the outlier check) is rejected by the owner that sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contribution_above_its_declared_norm_is_rejected() {
    let hostile = Scaled {
        results: 1.0,
        contributions: 50.0,
    };
    let (ids, errors) = with_hostile_codec(3, 600, hostile).await;
    for err in &errors {
        assert_eq!(err.peer(), Some(ids[2]), "{err}");
    }
    // Both honest members own a range of it above the declared norm and reject it as soon as
    // a chunk crosses the bound; one that still waits on the other's chunk when that one stops
    // sending reports the other's abort.
    let above = |reason: &RejectReason| matches!(reason, RejectReason::AboveDeclared { .. });
    assert!(
        errors.iter().any(|err| rejected_for(err, above)),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|err| rejected_or_told(
            err,
            "it declared for its whole contribution",
            above
        )),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_cap_limits_throughput() {
    let cap = 8_000_000;
    let nets = cluster(2, |c| PeerNetConfig {
        max_upload_bytes_per_s: Some(cap),
        ..c
    })
    .await;
    // 4 MB of fp32: each member uploads half its vector twice (reduce-scatter, all-gather).
    let len = 1_000_000;
    let (data, weights) = contributions(2, len, 3);
    let started = Instant::now();
    let outputs = all_reduce_everywhere(
        &nets,
        1,
        &data,
        &weights,
        &[],
        &mut fp32_codecs(2),
        Duration::from_secs(30),
    )
    .await;
    let elapsed = started.elapsed();
    for output in outputs {
        let output = output.unwrap();
        assert!(
            output.bytes_sent >= 4 * len as u64,
            "{} bytes sent",
            output.bytes_sent
        );
    }
    println!("4 MB per member at an 8 MB/s cap took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(300),
        "took only {elapsed:?}"
    );
}

/// `cargo test -p forge-node p2p::tests::bench -- --ignored --nocapture`: 2 peers, 64 MB fp32.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run explicitly"]
async fn bench_two_local_peers_64_mb() {
    let values = 16 << 20;
    let report = bounded("the benchmark", super::bench::bench_local(2, values, 5))
        .await
        .unwrap();
    println!(
        "2 peers on 127.0.0.1, {} MB fp32: median {:?} per all-reduce ({:.0} MB/s of payload, {:.0} MB sent per peer), rounds {:?}",
        report.payload_bytes / 1_000_000,
        report.median(),
        report.payload_bytes_per_s() / 1e6,
        report.bytes_sent as f64 / 1e6,
        report.rounds
    );
}

/// The benchmark's CPU accounting: one reading per round, a positive time (an all-reduce of
/// 1 MB over QUIC costs CPU), and the cores at the bound as CPU per round over the bound.
#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_the_cpu_of_its_rounds() {
    let report = bounded("the benchmark", super::bench::bench_local(2, 1 << 18, 3))
        .await
        .unwrap();
    assert_eq!(report.cpu.len(), 3, "{:?}", report.cpu);
    let cpu = report.cpu_per_round();
    assert!(cpu > Duration::ZERO, "{:?}", report.cpu);
    let bandwidth = 125e6;
    let expected = cpu.as_secs_f64() / report.ring_bound(bandwidth).as_secs_f64();
    assert!((report.cores_at_bound(bandwidth) - expected).abs() < 1e-9);
    let mut sorted = report.cpu.clone();
    sorted.sort();
    assert_eq!(cpu, sorted[1], "the median of three readings");
}
