//! The all-reduce of a round's outer gradients: reduce-scatter, then all-gather, directly between
//! all members, ending with bit-identical weighted averages on every member.
//!
//! The flattened vector is split into one range per member. Member `i` sends its contribution to
//! range `c` to the owner `c` (reduce-scatter). The owner sums the contributions in member order
//! (never arrival order) in f64, divides by the total weight, encodes the result once, sends
//! those bytes to every member (all-gather), and keeps the decoding of the same bytes for itself.
//! It does so chunk by chunk: a reduced chunk goes out while the next is being summed, so the
//! two phases overlap and a member's upload does not sit idle between them.
//! Every member therefore decodes identical bytes for every range: the results are bit-identical
//! even with lossy codecs. A sparse codec's owner relays the members' encoded contributions
//! instead of encoding their sum ([`super::relay`]); members then sum the same parts in the same
//! order, with the same result. Each member uploads `2(K-1)/K` of the payload, the ring bound, with
//! one hop of latency instead of `K-1`.
//!
//! Ranges move in wire chunks of at most `chunk_values` values (see [`super::wire`]); a stream
//! per (sender, receiver, phase) carries them in offset order, and QUIC flow control holds
//! senders back while a receiver is busy, so memory stays bounded by one owned range.
//!
//! The round allocates nothing of the payload's size once the node has run one: every member
//! decodes straight into the averaged vector it returns, the owner sums one chunk at a time, and
//! the buffers for sums, stream payloads and encoded chunks are kept in the node's [`Scratch`]
//! for the next round, as is the averaged vector when the caller hands it back
//! ([`PeerNet::recycle_average`]). Fresh allocations of the payload's size cost a page fault per
//! 4 KiB page every round: without them an fp32 all-reduce of the `15m` preset between two
//! loopback peers takes a quarter to a third less CPU (docs/benchmarks/diloco-tiny-cpu.md).

// `AllReduceError` carries peer ids (80 bytes each) by value so callers can match on them; it
// is built at most once per all-reduce, so its size costs nothing measurable.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forge_protocol::RoundId;
use forge_protocol::quant::squares;
use forge_protocol::sync::{MAX_SYNC_CHUNK_BYTES, SyncChunkHeader, SyncCodec, SyncPhase};
use futures::AsyncWriteExt;
use futures::future::{join_all, try_join_all};
use libp2p::{PeerId, Stream};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::error::{AllReduceError, RejectReason};
use super::inbox::Incoming;
use super::net::{PeerEvent, PeerNet};
use super::relay;
use super::wire::{self, OpenError, ReadError};

type Result<T> = std::result::Result<T, AllReduceError>;

/// A contribution whose norm per unit of weight exceeds this multiple of the median is rejected.
const OUTLIER_RATIO: f64 = 10.0;
/// The median means little with fewer contributors, so the outlier check needs at least this many.
const OUTLIER_MIN_MEMBERS: usize = 3;
/// With two members, a declared whole-vector norm per unit of weight above `OUTLIER_RATIO` times
/// the other's is rejected, once the vector holds this many values (the norms of shorter
/// vectors vary too much from member to member to compare).
const PAIR_MIN_VALUES: usize = 4096;
/// Room for the codecs between a declared norm (of the raw contribution) and what is decoded:
/// error feedback adds the last round's residual to a contribution, and block quantization
/// rounds each value by at most half a step (at most `sqrt(block) / (2 * qmax)` of a block's
/// norm: 0.57 for int4 in blocks of 64).
const NORM_SLACK: f64 = 2.0;

/// [`all_reduce_timeout`]: multiple of the ring bound, and the fixed margin for connection setup
/// and the codec's CPU time.
const TIMEOUT_FACTOR: f64 = 4.0;
const TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// How long a failed member spends telling the others, and how long a receiver waits for the
/// reason; an abort's reason is cut to this many bytes.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_ABORT_REASON: usize = 1024;
/// How long a member whose peer broke a stream waits for that peer's abort, and how long a
/// member that hears an abort goes on reading for a verdict of its own.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// How long a member that lost its connection has to come back before the all-reduce fails.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// How the outer gradient is encoded on the wire. Implemented by the node's compression (fp32,
/// bf16, int8, int4, topk, optionally zstd); every member of an all-reduce must use the same
/// codec.
pub(crate) trait ChunkCodec: Send {
    /// Encodes this member's contribution to the values starting at element `offset` into
    /// `out`, replacing what it held (the all-reduce reuses its buffers from round to round).
    /// Lossy codecs keep their error feedback here, keyed by `offset` (the same ranges every
    /// round). What the bytes decode to should have an L2 norm of at most `max_norm` (what the
    /// receivers accept of this member: a codec whose error feedback could send more scales it
    /// down and keeps the rest). Returns the sum of squares of what the bytes decode to.
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64>;

    /// Encodes an owner's reduced values, starting at element `offset`, into `out`, replacing
    /// what it held; every member decodes these bytes. What they decode to should stay within
    /// `max_norm`. Returns the sum of squares of what the bytes decode to. Not called for a
    /// codec that [`relays`](ChunkCodec::relays).
    fn encode_result(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64>;

    /// Decodes `out.len()` values into `out`. Must be deterministic: members compare results
    /// bit for bit. On error `out` may be partly written.
    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()>;

    /// The codec as the chunk header names it, and whether zstd follows it.
    fn id(&self) -> (SyncCodec, bool);

    /// Whether owners relay the members' encoded contributions instead of encoding their
    /// average ([`super::relay`]): a sparse codec's. Such a codec encodes each contribution
    /// once, before the round starts, and declares the norm of what it sends.
    fn relays(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AllReduceRequest {
    pub(crate) round: u64,
    /// The round's members, in the same order on every member (the coordinator's order).
    pub(crate) members: Vec<PeerId>,
    /// This member's contribution, already multiplied by its weight.
    pub(crate) data: Vec<f32>,
    /// This member's weight, e.g. tokens processed; positive.
    pub(crate) weight: f64,
    /// The most weight each member may claim, in `members`' order (the tokens its replica's data
    /// lease holds); a member claiming more is rejected. Empty: no cap.
    pub(crate) max_weights: Vec<f64>,
    /// The whole all-reduce fails after this long (see [`all_reduce_timeout`]).
    pub(crate) timeout: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct AllReduceOutput {
    /// `sum(data_i) / sum(weight_i)`, bit-identical on every member.
    pub(crate) average: Vec<f32>,
    pub(crate) total_weight: f64,
    /// The members' pseudo-gradient norm, the root mean square over members weighted as the
    /// average is: `sqrt(sum(|data_i|² / weight_i) / sum(weight_i))`, from the contributions
    /// the owners reduced (each owner's share in its last all-gather header), the same bits on
    /// every member. Against the average's norm, how far the members' progress disagrees.
    pub(crate) member_norm: f64,
    /// Sync traffic of this member, headers included.
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) elapsed: Duration,
}

/// A timeout for an all-reduce of `payload_bytes` (encoded) among `members` over links of
/// `bandwidth_bytes_per_s`: a few times the ring bound `2(K-1)/K × payload / bandwidth`, plus a
/// fixed margin for connection setup and encoding.
pub(crate) fn all_reduce_timeout(
    payload_bytes: u64,
    members: usize,
    bandwidth_bytes_per_s: f64,
) -> Duration {
    if members <= 1 {
        return TIMEOUT_MARGIN;
    }
    let k = members as f64;
    let ring_bound_s = 2.0 * (k - 1.0) / k * payload_bytes as f64 / bandwidth_bytes_per_s.max(1.0);
    Duration::from_secs_f64((TIMEOUT_FACTOR * ring_bound_s).min(86_400.0)) + TIMEOUT_MARGIN
}

/// Which elements each member owns, and how the owned ranges are cut into wire chunks. Every
/// member derives the same layout from the vector length, the member count and `chunk_values`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) len: usize,
    pub(crate) members: usize,
    pub(crate) chunk_values: usize,
}

impl Layout {
    /// The range member `owner` reduces: sizes differ by at most one, larger ones first.
    pub(crate) fn owned(&self, owner: usize) -> Range<usize> {
        let base = self.len / self.members;
        let extra = self.len % self.members;
        let start = owner * base + owner.min(extra);
        start..start + base + usize::from(owner < extra)
    }

    /// The wire chunks of `owner`'s range, in offset order; at least one, possibly empty, so
    /// every owner still learns every member's weight when the vector is shorter than K.
    pub(crate) fn chunks(&self, owner: usize) -> Vec<Range<usize>> {
        let owned = self.owned(owner);
        if owned.is_empty() {
            return vec![owned];
        }
        (owned.start..owned.end)
            .step_by(self.chunk_values)
            .map(|start| start..(start + self.chunk_values).min(owned.end))
            .collect()
    }
}

impl PeerNet {
    /// Averages `request.data` with the other members' (see the module docs). On error nothing
    /// is averaged: the caller keeps its parameters and reports the named peer.
    pub(crate) async fn all_reduce(
        &self,
        request: AllReduceRequest,
        codec: &mut dyn ChunkCodec,
    ) -> Result<AllReduceOutput> {
        let started = Instant::now();
        let me = check_request(&request, self.local_peer_id)?;
        let layout = Layout {
            len: request.data.len(),
            members: request.members.len(),
            chunk_values: self.chunk_values,
        };
        if layout.members == 1 {
            return Ok(AllReduceOutput {
                average: request
                    .data
                    .iter()
                    .map(|&x| (f64::from(x) / request.weight) as f32)
                    .collect(),
                total_weight: request.weight,
                member_norm: declared_norm(&request.data) / request.weight,
                bytes_sent: 0,
                bytes_received: 0,
                elapsed: started.elapsed(),
            });
        }
        let group = group_digest(&request.members);
        // Every stream one all-reduce expects, plus an abort from each member.
        let capacity = 3 * layout.members;
        let (arrivals, _finished_on_drop) = self.inbox.open_round((request.round, group), capacity);
        let peer_events = self.peer_events.subscribe();
        let codec_id = codec.id();
        let encoded = match codec.relays() {
            true => Some(Encoded::new(&layout, &request.data, codec).map_err(|err| {
                AllReduceError::Codec {
                    round: request.round,
                    reason: err.to_string(),
                }
            })?),
            false => None,
        };
        let round = Round {
            net: self,
            round: request.round,
            group,
            members: &request.members,
            me,
            layout,
            data: &request.data,
            weight: request.weight,
            norm: encoded
                .as_ref()
                .map_or_else(|| declared_norm(&request.data), |e| e.norm),
            encoded,
            max_weights: &request.max_weights,
            codec: Mutex::new(codec),
            codec_id,
            progress: Mutex::new(Progress::new(layout.members)),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            abort_sent: AtomicBool::new(false),
        };
        let (average, total_weight, weighted_squares) =
            round.run(arrivals, peer_events, request.timeout).await?;
        Ok(AllReduceOutput {
            average,
            total_weight,
            member_norm: (weighted_squares / total_weight).sqrt(),
            bytes_sent: round.sent.load(Ordering::Relaxed),
            bytes_received: round.received.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
        })
    }

    /// Keeps `average` (an [`AllReduceOutput::average`] the caller is done with) for the next
    /// all-reduce's output, sparing it the page faults of a fresh vector.
    pub(crate) fn recycle_average(&self, average: Vec<f32>) {
        self.scratch().average = average;
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Returns this node's position in the member list.
fn check_request(request: &AllReduceRequest, local: PeerId) -> Result<usize> {
    let invalid = |reason: String| Err(AllReduceError::InvalidRequest(reason));
    if !(request.weight.is_finite() && request.weight > 0.0) {
        return invalid(format!(
            "weight {} must be positive and finite",
            request.weight
        ));
    }
    if !request.max_weights.is_empty() && request.max_weights.len() != request.members.len() {
        return invalid(format!(
            "{} weight caps for {} members",
            request.max_weights.len(),
            request.members.len()
        ));
    }
    for (i, peer) in request.members.iter().enumerate() {
        if request.members[..i].contains(peer) {
            return invalid(format!("{peer} is listed twice among the members"));
        }
    }
    if request.members.len() > u32::MAX as usize {
        return invalid(format!("{} members", request.members.len()));
    }
    match request.members.iter().position(|peer| *peer == local) {
        Some(me) => Ok(me),
        None => invalid(format!(
            "this node ({local}) is not among the round's members"
        )),
    }
}

/// Identifies the member list (and its order) in chunk headers.
fn group_digest(members: &[PeerId]) -> u64 {
    let mut hash = Sha256::new();
    for peer in members {
        let bytes = peer.to_bytes();
        hash.update((bytes.len() as u32).to_le_bytes());
        hash.update(bytes);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Hands a reduced chunk to every member's sender. One whose sender has stopped is skipped: the
/// sender's error is already ending the all-reduce.
fn publish(outboxes: &[Outbox], chunk: &Arc<ReducedChunk>) {
    for outbox in outboxes {
        let _ = outbox.send(Arc::clone(chunk));
    }
}

fn first_non_finite(values: &[f32]) -> Option<usize> {
    values.iter().position(|x| !x.is_finite())
}

/// Buffers one all-reduce leaves for the next, so that a node's rounds after its first allocate
/// nothing of the payload's size. They stay as large as the largest round needed: for an fp32
/// payload `P` among `K` members, about `P / K` of encoded chunks plus the averaged vector `P`.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The averaged vector of a finished round, handed back by its caller.
    average: Vec<f32>,
    /// The owner's per-chunk sums, decoded contribution and mean.
    sum: Vec<f64>,
    decoded: Vec<f32>,
    mean: Vec<f32>,
    /// Stream payloads and encoded chunks.
    bytes: Vec<Vec<u8>>,
}

/// `v` with at least `n` elements, its first `n` as they were (callers overwrite what they use).
fn at_least<T: Copy + Default>(mut v: Vec<T>, n: usize) -> Vec<T> {
    if v.len() < n {
        v.resize(n, T::default());
    }
    v
}

/// The state of one all-reduce on this member. Everything runs inside the caller's task, so
/// cancelling or timing out drops every stream at once and leaves no task behind.
struct Round<'a> {
    net: &'a PeerNet,
    round: u64,
    group: u64,
    members: &'a [PeerId],
    me: usize,
    layout: Layout,
    data: &'a [f32],
    weight: f64,
    /// The norm of `data` (of `encoded` when the codec relays), declared in this member's
    /// contribution headers.
    norm: f64,
    /// This member's contribution encoded before the round, when the codec relays.
    encoded: Option<Encoded>,
    max_weights: &'a [f64],
    /// Locked only around the synchronous encode/decode calls, never across an await.
    codec: Mutex<&'a mut dyn ChunkCodec>,
    codec_id: (SyncCodec, bool),
    progress: Mutex<Progress>,
    sent: AtomicU64,
    received: AtomicU64,
    abort_sent: AtomicBool,
}

/// What the all-reduce is waiting for, to name the peer to blame when it times out.
#[derive(Debug)]
struct Progress {
    /// The member whose contribution the reduction is reading now.
    reducing_waits_on: Option<usize>,
    contribution_read: Vec<bool>,
    gathered: Vec<bool>,
    contribution_sent: Vec<bool>,
    result_sent: Vec<bool>,
    /// Last reason a stream to the member could not be opened.
    open_error: Vec<Option<String>>,
}

impl Progress {
    fn done_with(&self, m: usize) -> bool {
        self.contribution_read[m]
            && self.gathered[m]
            && self.contribution_sent[m]
            && self.result_sent[m]
    }

    fn new(members: usize) -> Progress {
        Progress {
            reducing_waits_on: None,
            contribution_read: vec![false; members],
            gathered: vec![false; members],
            contribution_sent: vec![false; members],
            result_sent: vec![false; members],
            open_error: vec![None; members],
        }
    }
}

/// Where the streams that arrive for a round go: each member's contribution to this member's
/// range and its reduced range, one stream each (a sender is used once).
struct Routes {
    arrivals: mpsc::Receiver<Incoming>,
    contributions: Vec<Option<oneshot::Sender<Incoming>>>,
    results: Vec<Option<oneshot::Sender<Incoming>>>,
}

/// What the next header on a stream must say.
struct Expect {
    phase: SyncPhase,
    owner: usize,
    range: Range<usize>,
}

/// A stream whose first header was read by the inbox, and the buffer its payloads are read into.
struct Reader {
    first: Option<SyncChunkHeader>,
    stream: Stream,
    payload: Vec<u8>,
}

/// A chunk of the owner's reduced range: the bytes every member receives (their decoding is
/// already in this member's output).
struct ReducedChunk {
    range: Range<usize>,
    bytes: Vec<u8>,
    total_weight: f64,
    /// In the owner's last chunk its range's [`Reduced::weighted_squares`]; 0 in the others.
    weighted_squares: f64,
}

/// The norm a member declares for its contribution `data`. A vector holding NaN or infinity
/// declares the largest finite norm, so its headers stay valid and the owners reject the values
/// themselves, naming the element.
fn declared_norm(data: &[f32]) -> f64 {
    let norm = squares(data).sqrt();
    if norm.is_finite() { norm } else { f64::MAX }
}

/// [`Reduced::weighted_squares`] of the members' sums of squares over a range and their
/// weights, summed in member order; kept finite for the all-gather header that carries it.
fn weighted_squares_of(sum_of_squares: &[f64], weights: &[f64]) -> f64 {
    let sum: f64 = sum_of_squares.iter().zip(weights).map(|(s, w)| s / w).sum();
    sum.min(f64::MAX)
}

/// A relaying codec's encoding of this member's whole contribution, per owner and wire chunk
/// in layout order, and the norm of what it decodes to.
struct Encoded {
    chunks: Vec<Vec<Vec<u8>>>,
    norm: f64,
}

impl Encoded {
    /// Encodes `data` chunk by chunk, every owner's range, with the codec's error feedback.
    fn new(
        layout: &Layout,
        data: &[f32],
        codec: &mut dyn ChunkCodec,
    ) -> forge_protocol::Result<Encoded> {
        let mut squares = 0.0;
        let mut chunks = Vec::with_capacity(layout.members);
        for owner in 0..layout.members {
            let mut owned = Vec::new();
            for range in layout.chunks(owner) {
                let mut bytes = Vec::new();
                squares += codec.encode_contribution(
                    range.start,
                    &data[range],
                    f64::INFINITY,
                    &mut bytes,
                )?;
                owned.push(bytes);
            }
            chunks.push(owned);
        }
        let norm = squares.sqrt();
        Ok(Encoded {
            chunks,
            norm: if norm.is_finite() { norm } else { f64::MAX },
        })
    }
}

/// What the reduction of this member's range learnt of every member.
struct Reduced {
    total_weight: f64,
    /// Over the members, the squares of each one's contribution to this owner's range divided
    /// by its weight: this range's share of [`AllReduceOutput::member_norm`].
    weighted_squares: f64,
    weights: Vec<f64>,
    /// The norm of each member's whole contribution, as its headers declared it.
    declared: Vec<f64>,
}

/// One owner's reduced range as this member received it.
struct Gathered {
    owner: usize,
    /// The total weight the owner divided by.
    weight: f64,
    /// The owner's [`Reduced::weighted_squares`], as its last header said.
    weighted_squares: f64,
    sum_of_squares: f64,
}

/// Where the reduction hands each reduced chunk to the sender of one member's results.
type Outbox = mpsc::UnboundedSender<Arc<ReducedChunk>>;

type Slot = oneshot::Receiver<Incoming>;

impl<'a> Round<'a> {
    /// The all-reduce, its dispatcher, the watch on members' connections and the deadline.
    /// Whatever fails first is told to the other members before this member's streams close,
    /// so they learn the reason (and whom to blame) instead of seeing a broken stream.
    async fn run(
        &self,
        arrivals: mpsc::Receiver<Incoming>,
        peer_events: broadcast::Receiver<PeerEvent>,
        timeout: Duration,
    ) -> Result<(Vec<f32>, f64, f64)> {
        let k = self.layout.members;
        let (mut contribution_senders, mut contribution_slots) = (Vec::new(), Vec::new());
        let (mut result_senders, mut result_slots) = (Vec::new(), Vec::new());
        for m in 0..k {
            let (sender, slot) = oneshot::channel();
            contribution_senders.push((m != self.me).then_some(sender));
            contribution_slots.push((m != self.me).then_some(slot));
            let (sender, slot) = oneshot::channel();
            result_senders.push((m != self.me).then_some(sender));
            result_slots.push((m != self.me).then_some(slot));
        }
        let core = async {
            // Every value is overwritten: each range is decoded into by its owner or a gather.
            let mut average = std::mem::take(&mut self.scratch().average);
            average.resize(self.layout.len, 0.0);
            let mut parts = self.split_by_owner(&mut average);
            let mine = parts[self.me].take().ok_or(AllReduceError::Stopped)?;
            let contribute = self.or_abort(try_join_all(
                self.others().map(|j| self.send_contribution(j)),
            ));
            // Each reduced chunk goes out as soon as it is encoded, while the reduction reads the
            // next: a member's upload is not idle between the two phases.
            let reduce = self.or_abort(async {
                let (outboxes, inboxes): (Vec<Outbox>, Vec<_>) = self
                    .others()
                    .map(|j| {
                        let (outbox, inbox) = mpsc::unbounded_channel();
                        (outbox, (j, inbox))
                    })
                    .unzip();
                let send = try_join_all(
                    inboxes
                        .into_iter()
                        .map(|(j, inbox)| self.send_result(j, inbox)),
                );
                let reduce = self.reduce(contribution_slots, mine, outboxes);
                let (reduced, _) = tokio::try_join!(reduce, send)?;
                Ok(reduced)
            });
            let gather = self.or_abort(try_join_all(
                result_slots
                    .into_iter()
                    .zip(parts)
                    .enumerate()
                    .filter_map(|(j, (slot, part))| Some(self.gather(j, slot?, part?))),
            ));
            let (_, reduced, gathered) = tokio::try_join!(contribute, reduce, gather)?;
            let total_weight = reduced.total_weight;
            self.check_weights(total_weight, &gathered)?;
            self.check_results(&reduced, &gathered)?;
            // Summed in owner order, so every member gets the same bits.
            let mut shares = vec![0.0; k];
            shares[self.me] = reduced.weighted_squares;
            for g in &gathered {
                shares[g.owner] = g.weighted_squares;
            }
            let weighted_squares = shares.iter().sum::<f64>();
            Ok((average, total_weight, weighted_squares))
        };
        tokio::pin!(core);
        let mut routes = Routes {
            arrivals,
            contributions: contribution_senders,
            results: result_senders,
        };
        let told = tokio::select! {
            result = &mut core => match result {
                Ok(average) => return Ok(average),
                Err(err) => return self.fail(err).await,
            },
            err = self.dispatch(&mut routes) => err,
            err = self.watch_connections(peer_events) => err,
            () = tokio::time::sleep(timeout) => self.timed_out(timeout),
        };
        let failure = match told {
            // Another member's abort may arrive while this member's own verdict on a
            // contribution is being told, or moments before it reaches one: the first-hand
            // rejection is what the coordinator needs from every honest member that can see it,
            // or two members rejecting the same contribution would report each other's abort
            // and the culprit would stay. So the streams keep arriving and the reduction keeps
            // reading for a moment; the round is over either way, and whatever else fails now
            // is not told to the others.
            aborted @ AllReduceError::Aborted { .. } => {
                self.abort_sent.store(true, Ordering::Relaxed);
                let own = async {
                    loop {
                        tokio::select! {
                            result = &mut core => return result.err(),
                            err = self.dispatch(&mut routes) => match err {
                                AllReduceError::Aborted { .. } => continue,
                                err => return Some(err),
                            },
                        }
                    }
                };
                match tokio::time::timeout(ABORT_GRACE, own).await {
                    Ok(Some(own @ AllReduceError::Rejected { .. })) => own,
                    _ => aborted,
                }
            }
            failure => failure,
        };
        // `core` is still alive here, so its streams are still open.
        self.fail(failure).await
    }

    /// Ends the all-reduce with `failure`, told to the other members first.
    async fn fail<T>(&self, failure: AllReduceError) -> Result<T> {
        self.send_aborts(&failure).await;
        Err(failure)
    }

    /// Tells the others why `work` failed before its error ends the all-reduce.
    async fn or_abort<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let err = match work.await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if matches!(err, AllReduceError::PeerFailed { .. }) {
            // The peer that broke the stream may have given up on someone else and be telling us
            // whom: its abort ends the all-reduce through the dispatcher during this wait.
            tokio::time::sleep(ABORT_GRACE).await;
        }
        self.send_aborts(&err).await;
        Err(err)
    }

    /// `average` cut into each member's owned range (the ranges are consecutive, in member
    /// order), so the reduction and the gathers write into it side by side.
    fn split_by_owner<'v>(&self, average: &'v mut [f32]) -> Vec<Option<&'v mut [f32]>> {
        let mut rest = average;
        let mut parts = Vec::with_capacity(self.layout.members);
        for owner in 0..self.layout.members {
            let (part, tail) =
                std::mem::take(&mut rest).split_at_mut(self.layout.owned(owner).len());
            parts.push(Some(part));
            rest = tail;
        }
        parts
    }

    /// Every owner must have divided by the same total weight as this member.
    fn check_weights(&self, total_weight: f64, gathered: &[Gathered]) -> Result<()> {
        for &Gathered {
            owner: j, weight, ..
        } in gathered
        {
            if weight.to_bits() != total_weight.to_bits() {
                return Err(self.reject(
                    j,
                    RejectReason::Header(format!(
                        "it divided by a total weight of {weight}, this member by {total_weight}"
                    )),
                ));
            }
        }
        Ok(())
    }

    /// An owner may write anything into its reduced range, and every member decodes the same
    /// bits, so agreement proves nothing about them. What each member declared bounds them: a
    /// weighted average's range has at most the norm `sum(declared) / total_weight` (the
    /// triangle inequality), and a declared norm far above the others' per unit of weight is
    /// rejected like an outlier contribution, the owner's own included. The owner that wrote
    /// more than its inputs allow is rejected by every member alike.
    fn check_results(&self, reduced: &Reduced, gathered: &[Gathered]) -> Result<()> {
        let per_weight: Vec<f64> = reduced
            .declared
            .iter()
            .zip(&reduced.weights)
            .map(|(norm, weight)| norm / weight)
            .collect();
        if per_weight.len() >= OUTLIER_MIN_MEMBERS {
            self.check_outliers(&per_weight)?;
        } else if let &[a, b] = per_weight.as_slice()
            && self.layout.len >= PAIR_MIN_VALUES
        {
            let (m, high, low) = if a >= b { (0, a, b) } else { (1, b, a) };
            // A member that changed nothing leaves no scale to compare with.
            if low > 0.0 && high > OUTLIER_RATIO * low {
                return Err(self.reject(
                    m,
                    RejectReason::Outlier {
                        norm: high,
                        median: low,
                        ratio: OUTLIER_RATIO,
                    },
                ));
            }
        }
        let bound = NORM_SLACK * reduced.declared.iter().sum::<f64>() / reduced.total_weight;
        for result in gathered {
            let norm = result.sum_of_squares.sqrt();
            if norm > bound {
                return Err(self.reject(
                    result.owner,
                    RejectReason::ResultAboveInputs {
                        norm,
                        bound,
                        slack: NORM_SLACK,
                    },
                ));
            }
        }
        Ok(())
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.layout.members).filter(move |&m| m != self.me)
    }

    /// Hands each incoming stream to the part of the all-reduce that reads it, and turns a
    /// member's abort or a protocol violation into this all-reduce's error. Never returns
    /// otherwise: it keeps listening for aborts until the all-reduce ends.
    async fn dispatch(&self, routes: &mut Routes) -> AllReduceError {
        loop {
            let Some(mut incoming) = routes.arrivals.recv().await else {
                return AllReduceError::Stopped;
            };
            let Some(m) = self.members.iter().position(|peer| *peer == incoming.peer) else {
                // Allowed on the network but not in this round: its stream is dropped.
                tracing::debug!(peer = %incoming.peer, round = self.round, "stream from a non-member");
                continue;
            };
            let header = incoming.header;
            let bad = |reason: String| self.reject(m, RejectReason::Header(reason));
            if header.sender as usize != m || header.members as usize != self.layout.members {
                return bad(format!(
                    "it claims to be member {} of {}, but is member {m} of {}",
                    header.sender, header.members, self.layout.members
                ));
            }
            let (slot, owner) = match header.phase {
                SyncPhase::ReduceScatter => {
                    if let Err(err) = self.check_claims(m, &header) {
                        return err;
                    }
                    (&mut routes.contributions[m], self.me)
                }
                SyncPhase::AllGather => (&mut routes.results[m], m),
                SyncPhase::Abort => return self.aborted(m, &mut incoming).await,
            };
            if header.owner as usize != owner {
                return bad(format!(
                    "its {:?} stream carries range {} instead of {owner}",
                    header.phase, header.owner
                ));
            }
            self.received
                .fetch_add(incoming.header_bytes, Ordering::Relaxed);
            match slot.take() {
                Some(sender) => {
                    let _ = sender.send(incoming);
                }
                None => return bad(format!("it opened a second {:?} stream", header.phase)),
            }
        }
    }

    /// What every member can check of member `m`'s contribution from its header alone: its
    /// weight against its replica's lease. The reduction checks it again on every chunk.
    fn check_claims(&self, m: usize, header: &SyncChunkHeader) -> Result<()> {
        match self.max_weights.get(m) {
            Some(&cap) if header.weight > cap => Err(self.reject(
                m,
                RejectReason::Overweight {
                    weight: header.weight,
                    cap,
                },
            )),
            _ => Ok(()),
        }
    }

    /// Reads the reason of member `m`'s abort.
    async fn aborted(&self, m: usize, incoming: &mut Incoming) -> AllReduceError {
        let header = incoming.header;
        let reason = if header.payload_len as usize > MAX_ABORT_REASON {
            format!("(a {}-byte reason, not read)", header.payload_len)
        } else {
            let mut bytes = Vec::new();
            let read = tokio::time::timeout(
                ABORT_TIMEOUT,
                wire::read_payload(&mut incoming.stream, &header, &mut bytes),
            );
            match read.await {
                Ok(Ok(())) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => "(reason lost)".to_string(),
            }
        };
        let blamed = self
            .members
            .get(header.owner as usize)
            .copied()
            .unwrap_or(incoming.peer);
        AllReduceError::Aborted {
            round: self.round,
            by: self.members[m],
            blamed,
            reason,
        }
    }

    /// Fails the all-reduce when a member it still needs loses its last connection and does
    /// not get one back within [`DISCONNECT_GRACE`] (a dial that raced the member's allowlist
    /// update is refused once and then succeeds).
    async fn watch_connections(
        &self,
        mut events: broadcast::Receiver<PeerEvent>,
    ) -> AllReduceError {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                // Missed events only delay detection to the timeout.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return AllReduceError::Stopped,
            };
            let PeerEvent::Disconnected(peer) = event else {
                continue;
            };
            let Some(m) = self.members.iter().position(|p| *p == peer) else {
                continue;
            };
            if m == self.me || self.progress().done_with(m) {
                continue;
            }
            let reconnected = tokio::time::timeout(DISCONNECT_GRACE, async {
                loop {
                    match events.recv().await {
                        Ok(PeerEvent::Connected(p)) if p == peer => return true,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return false,
                    }
                }
            });
            if !matches!(reconnected.await, Ok(true)) {
                return self.peer_failed(m, "it disconnected".to_string());
            }
        }
    }

    /// Tells the other members (once, bounded by [`ABORT_TIMEOUT`]) that this all-reduce failed
    /// and whom this member blames, so they fail now rather than at their timeout.
    async fn send_aborts(&self, err: &AllReduceError) {
        if self.abort_sent.swap(true, Ordering::Relaxed) {
            return;
        }
        let blamed = match err {
            AllReduceError::Rejected { peer, .. }
            | AllReduceError::PeerFailed { peer, .. }
            | AllReduceError::Timeout { peer, .. } => self.members.iter().position(|p| p == peer),
            AllReduceError::Codec { .. } => Some(self.me),
            // Another member's abort is not repeated; the rest never reached the network.
            AllReduceError::Aborted { .. }
            | AllReduceError::InvalidRequest(_)
            | AllReduceError::Stopped
            | AllReduceError::GivenUp(_) => None,
        };
        let Some(blamed) = blamed else {
            return;
        };
        // A member that is gone or stalled would only hold the task until its bound.
        let skip_blamed = !matches!(err, AllReduceError::Rejected { .. });
        let recipients: Vec<PeerId> = self
            .others()
            .filter(|&j| !(skip_blamed && j == blamed))
            .map(|j| self.members[j])
            .collect();
        let mut reason = err.to_string();
        if reason.len() > MAX_ABORT_REASON {
            let mut end = MAX_ABORT_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let header = SyncChunkHeader {
            round: RoundId(self.round),
            group: self.group,
            sender: self.me as u32,
            stage: 0,
            phase: SyncPhase::Abort,
            owner: blamed as u32,
            members: self.layout.members as u32,
            offset: 0,
            values: 0,
            total_len: self.layout.len as u64,
            weight: 1.0,
            norm: 0.0,
            codec: self.codec_id.0,
            payload_len: reason.len() as u32,
            zstd: self.codec_id.1,
        };
        let reason = reason.as_bytes();
        let sends = recipients.into_iter().map(|peer| {
            let mut control = self.net.control.clone();
            async move {
                let opened = wire::open_and_send_first(
                    &mut control,
                    peer,
                    &header,
                    reason,
                    self.net.limiter.as_deref(),
                    |_| {},
                );
                if let Ok((mut stream, _)) = opened.await {
                    let _ = stream.close().await;
                }
            }
        });
        let _ = tokio::time::timeout(ABORT_TIMEOUT, join_all(sends)).await;
    }

    /// Reduce-scatter, sending side: this member's contribution to `j`'s range.
    async fn send_contribution(&self, j: usize) -> Result<()> {
        let mut stream = None;
        if let Some(encoded) = &self.encoded {
            for (range, payload) in self.layout.chunks(j).into_iter().zip(&encoded.chunks[j]) {
                let header = self.header(
                    SyncPhase::ReduceScatter,
                    j,
                    &range,
                    (self.weight, self.norm),
                    payload,
                )?;
                self.send_chunk(j, &mut stream, &header, payload).await?;
            }
            self.close(j, stream).await?;
            self.progress().contribution_sent[j] = true;
            return Ok(());
        }
        let mut payload = self.take_bytes();
        // What owner j accepts of this member's contribution to its range, a little inside
        // (see `check_declared`); the chunks share it.
        let mut budget = (0.99 * NORM_SLACK * self.norm).powi(2);
        for range in self.layout.chunks(j) {
            let sent = self
                .lock_codec()
                .encode_contribution(
                    range.start,
                    &self.data[range.clone()],
                    budget.max(0.0).sqrt(),
                    &mut payload,
                )
                .map_err(|err| self.codec_error(err))?;
            budget -= sent;
            let header = self.header(
                SyncPhase::ReduceScatter,
                j,
                &range,
                (self.weight, self.norm),
                &payload,
            )?;
            self.send_chunk(j, &mut stream, &header, &payload).await?;
        }
        self.give_bytes(payload);
        self.close(j, stream).await?;
        self.progress().contribution_sent[j] = true;
        Ok(())
    }

    /// All-gather, sending side: this member's reduced range, the same bytes to everyone, each
    /// chunk as the reduction hands it over.
    async fn send_result(
        &self,
        j: usize,
        mut inbox: mpsc::UnboundedReceiver<Arc<ReducedChunk>>,
    ) -> Result<()> {
        let mut stream = None;
        for _ in self.layout.chunks(self.me) {
            // The reduction stopped early; its own error ends the all-reduce.
            let chunk = inbox.recv().await.ok_or(AllReduceError::Stopped)?;
            let header = self.header(
                SyncPhase::AllGather,
                self.me,
                &chunk.range,
                (chunk.total_weight, chunk.weighted_squares),
                &chunk.bytes,
            )?;
            self.send_chunk(j, &mut stream, &header, &chunk.bytes)
                .await?;
            // The last member's sender to finish with a chunk keeps its buffer.
            if let Some(chunk) = Arc::into_inner(chunk) {
                self.give_bytes(chunk.bytes);
            }
        }
        self.close(j, stream).await?;
        self.progress().result_sent[j] = true;
        Ok(())
    }

    /// Reduce-scatter, owning side: reads every member's contribution chunk by chunk in member
    /// order, validates, sums in f64, divides, encodes the result once, decodes it into `out`
    /// (this member's owned range of its output) and hands the bytes to every member's
    /// `outboxes`. The last chunk waits for the outlier check over the whole range, so no
    /// member can finish with a result this owner rejects. Returns the total weight, and each
    /// member's weight and declared norm.
    async fn reduce(
        &self,
        mut slots: Vec<Option<Slot>>,
        out: &mut [f32],
        outboxes: Vec<Outbox>,
    ) -> Result<Reduced> {
        let k = self.layout.members;
        let owned = self.layout.owned(self.me);
        let chunks = self.layout.chunks(self.me);
        let widest = chunks.iter().map(Range::len).max().unwrap_or(0);
        let mut readers: Vec<Option<Reader>> = (0..k).map(|_| None).collect();
        let (mut sum, mut decoded, mut mean) = {
            let mut scratch = self.scratch();
            (
                at_least(std::mem::take(&mut scratch.sum), widest),
                at_least(std::mem::take(&mut scratch.decoded), widest),
                at_least(std::mem::take(&mut scratch.mean), widest),
            )
        };
        let mut sum_of_squares = vec![0.0f64; k];
        // NaN until a member's first header says its weight (headers carry positive weights).
        let mut weights = vec![f64::NAN; k];
        weights[self.me] = self.weight;
        let mut declared = vec![f64::NAN; k];
        declared[self.me] = self.norm;
        let mut total_weight = f64::NAN;
        // What the members accept of this owner's range (see `check_results`), once the
        // weights and norms are known; the chunks share it.
        let mut result_budget = None;
        let last = chunks.len() - 1;
        let mut held = None;
        // This range's [`Reduced::weighted_squares`], once the last chunk has been read.
        let mut own_share = None;
        for (c, range) in chunks.into_iter().enumerate() {
            let n = range.len();
            let sum = &mut sum[..n];
            sum.fill(0.0);
            for m in 0..k {
                let values: &[f32] = if m == self.me {
                    match &self.encoded {
                        Some(encoded) => {
                            self.lock_codec()
                                .decode_into(&encoded.chunks[self.me][c], &mut decoded[..n])
                                .map_err(|err| self.codec_error(err))?;
                            &decoded[..n]
                        }
                        None => &self.data[range.clone()],
                    }
                } else {
                    self.progress().reducing_waits_on = Some(m);
                    let reader = match &mut readers[m] {
                        Some(reader) => reader,
                        empty => empty.insert(self.accept(slots[m].take()).await?),
                    };
                    let expect = Expect {
                        phase: SyncPhase::ReduceScatter,
                        owner: self.me,
                        range: range.clone(),
                    };
                    let header = self.next_chunk(m, reader, &expect).await?;
                    if weights[m].is_nan() {
                        self.check_claims(m, &header)?;
                        weights[m] = header.weight;
                        declared[m] = header.norm;
                    } else if weights[m].to_bits() != header.weight.to_bits()
                        || declared[m].to_bits() != header.norm.to_bits()
                    {
                        return Err(self.reject(
                            m,
                            RejectReason::Header(format!(
                                "its weight or norm changed from {} and {} to {} and {} within \
                                 the round",
                                weights[m], declared[m], header.weight, header.norm
                            )),
                        ));
                    }
                    self.decode_into(m, &reader.payload, &mut decoded[..n])?;
                    &decoded[..n]
                };
                for (acc, &x) in sum.iter_mut().zip(values) {
                    *acc += f64::from(x);
                }
                let squares = squares(values);
                if !squares.is_finite() {
                    // In f64 the squares of finite f32 values cannot overflow: a value is NaN
                    // or infinite, and this names it.
                    self.check_finite(m, range.start, values)?;
                }
                sum_of_squares[m] += squares;
                self.check_declared(m, sum_of_squares[m], declared[m])?;
            }
            // Every member's first header has been read: the weights are all known. Summed in
            // member order, like the values, so every owner gets the same total.
            total_weight = weights.iter().sum();
            let out = &mut out[range.start - owned.start..range.end - owned.start];
            let mut bytes = self.take_bytes();
            if let Some(encoded) = &self.encoded {
                // Readers exist for every member but this one once the chunk has been read.
                let parts: Vec<&[u8]> = readers
                    .iter()
                    .map(|reader| match reader {
                        Some(reader) => &reader.payload[..],
                        None => &encoded.chunks[self.me][c][..],
                    })
                    .collect();
                relay::pack(&parts, &mut bytes).map_err(|err| self.codec_error(err))?;
                relay::decode(
                    &**self.lock_codec(),
                    &bytes,
                    k,
                    total_weight,
                    out,
                    sum,
                    &mut decoded[..n],
                )
                .map_err(|err| self.codec_error(err))?;
                if crate::hostile::mode() == Some(crate::hostile::Mode::PoisonResults) {
                    crate::hostile::poison_relayed(&mut **self.lock_codec(), &parts, n, &mut bytes)
                        .map_err(|err| self.codec_error(err))?;
                }
            } else {
                let mean = &mut mean[..n];
                for (avg, &s) in mean.iter_mut().zip(sum.iter()) {
                    *avg = (s / total_weight) as f32;
                }
                let budget = result_budget.get_or_insert_with(|| {
                    (0.99 * NORM_SLACK * declared.iter().sum::<f64>() / total_weight).powi(2)
                });
                let mut codec = self.lock_codec();
                let sent = codec
                    .encode_result(range.start, mean, budget.max(0.0).sqrt(), &mut bytes)
                    .map_err(|err| self.codec_error(err))?;
                *budget -= sent;
                codec
                    .decode_into(&bytes, out)
                    .map_err(|err| self.codec_error(err))?;
                drop(codec);
            }
            // Every chunk of every member has been read by the last one.
            let weighted_squares = match c == last {
                true => *own_share.insert(weighted_squares_of(&sum_of_squares, &weights)),
                false => 0.0,
            };
            let chunk = Arc::new(ReducedChunk {
                range,
                bytes,
                total_weight,
                weighted_squares,
            });
            if c == last {
                held = Some(chunk);
            } else {
                publish(&outboxes, &chunk);
            }
        }
        {
            let mut progress = self.progress();
            progress.reducing_waits_on = None;
            progress.contribution_read.fill(true);
        }
        {
            let mut scratch = self.scratch();
            scratch.sum = sum;
            scratch.decoded = decoded;
            scratch.mean = mean;
            let payloads = readers.into_iter().flatten().map(|reader| reader.payload);
            scratch.bytes.extend(payloads);
        }
        let per_weight: Vec<f64> = sum_of_squares
            .iter()
            .zip(&weights)
            .map(|(squares, weight)| squares.sqrt() / weight)
            .collect();
        self.check_outliers(&per_weight)?;
        if let Some(chunk) = held {
            publish(&outboxes, &chunk);
        }
        Ok(Reduced {
            total_weight,
            weighted_squares: own_share.unwrap_or(0.0),
            weights,
            declared,
        })
    }

    /// Rejects member `m` once its contribution to this owner's range so far (`squares`, the
    /// sum of its squares) has a larger norm than it declared for its whole contribution (with
    /// the codecs' slack). Checked as every chunk is read, the verdict comes at the first chunk
    /// that crosses the bound, not after the whole range: an owner that rejects tells the
    /// others while their own checks of the same member are still under way.
    fn check_declared(&self, m: usize, squares: f64, declared: f64) -> Result<()> {
        if m != self.me && squares.sqrt() > NORM_SLACK * declared {
            return Err(self.reject(
                m,
                RejectReason::AboveDeclared {
                    norm: squares.sqrt(),
                    declared,
                },
            ));
        }
        Ok(())
    }

    /// All-gather, receiving side: `j`'s reduced range, decoded into `out`; returns what the
    /// result checks need of it.
    async fn gather(&self, j: usize, slot: Slot, out: &mut [f32]) -> Result<Gathered> {
        let mut reader = self.accept(Some(slot)).await?;
        let owned = self.layout.owned(j);
        let mut weight = f64::NAN;
        let mut weighted_squares = 0.0;
        let mut sum_of_squares = 0.0f64;
        // A relayed chunk's scratch: its running sum and one part.
        let (mut sum, mut part) = match self.encoded {
            Some(_) => {
                let widest = self.layout.chunks(j).iter().map(Range::len).max();
                let n = widest.unwrap_or(0);
                (vec![0.0f64; n], vec![0.0f32; n])
            }
            None => (Vec::new(), Vec::new()),
        };
        for range in self.layout.chunks(j) {
            let expect = Expect {
                phase: SyncPhase::AllGather,
                owner: j,
                range: range.clone(),
            };
            let header = self.next_chunk(j, &mut reader, &expect).await?;
            weight = header.weight;
            // The last chunk's is the owner's.
            weighted_squares = header.norm;
            let values = &mut out[range.start - owned.start..range.end - owned.start];
            if self.encoded.is_some() {
                let codec = self.lock_codec();
                let members = self.layout.members;
                relay::decode(
                    &**codec,
                    &reader.payload,
                    members,
                    weight,
                    values,
                    &mut sum,
                    &mut part,
                )
                .map_err(|err| self.reject(j, RejectReason::Decode(err)))?;
            } else {
                self.decode_into(j, &reader.payload, values)?;
            }
            let squares = squares(values);
            if !squares.is_finite() {
                // Finite f32 values cannot overflow this sum in f64: one is NaN or infinite.
                self.check_finite(j, range.start, values)?;
            }
            sum_of_squares += squares;
        }
        self.give_bytes(reader.payload);
        self.progress().gathered[j] = true;
        Ok(Gathered {
            owner: j,
            weight,
            weighted_squares,
            sum_of_squares,
        })
    }

    /// Rejects member `m` if `values` (starting at element `start`) hold a NaN or infinity.
    fn check_finite(&self, m: usize, start: usize, values: &[f32]) -> Result<()> {
        match first_non_finite(values) {
            Some(i) => Err(self.reject(
                m,
                RejectReason::NonFinite {
                    index: (start + i) as u64,
                    value: values[i],
                },
            )),
            None => Ok(()),
        }
    }

    /// Waits for the stream the dispatcher hands over (the slot is only ever taken once).
    async fn accept(&self, slot: Option<Slot>) -> Result<Reader> {
        let slot = slot.ok_or(AllReduceError::Stopped)?;
        let incoming = slot.await.map_err(|_| AllReduceError::Stopped)?;
        Ok(Reader {
            first: Some(incoming.header),
            stream: incoming.stream,
            payload: self.take_bytes(),
        })
    }

    /// Reads and checks the next chunk header, then its payload into `reader.payload`.
    async fn next_chunk(
        &self,
        m: usize,
        reader: &mut Reader,
        expect: &Expect,
    ) -> Result<SyncChunkHeader> {
        let header = match reader.first.take() {
            Some(header) => header,
            None => {
                let (header, bytes) =
                    wire::read_header(&mut reader.stream)
                        .await
                        .map_err(|err| match err {
                            ReadError::Io(err) => self.peer_failed(m, format!("receiving: {err}")),
                            ReadError::Protocol(err) => {
                                self.reject(m, RejectReason::Header(err.to_string()))
                            }
                        })?;
                self.received.fetch_add(bytes, Ordering::Relaxed);
                header
            }
        };
        self.check_header(m, &header, expect)?;
        wire::read_payload(&mut reader.stream, &header, &mut reader.payload)
            .await
            .map_err(|err| self.peer_failed(m, format!("receiving: {err}")))?;
        self.received
            .fetch_add(reader.payload.len() as u64, Ordering::Relaxed);
        Ok(header)
    }

    fn check_header(&self, m: usize, header: &SyncChunkHeader, expect: &Expect) -> Result<()> {
        let reject = |reason| Err(self.reject(m, reason));
        if header.round.0 != self.round {
            return reject(RejectReason::WrongRound {
                expected: self.round,
                found: header.round.0,
            });
        }
        if header.total_len != self.layout.len as u64 {
            return reject(RejectReason::WrongLength {
                expected: self.layout.len as u64,
                found: header.total_len,
            });
        }
        let codec = (header.codec, header.zstd);
        if codec != self.codec_id {
            return reject(RejectReason::WrongCodec {
                expected: format!("{:?} (zstd {})", self.codec_id.0, self.codec_id.1),
                found: format!("{:?} (zstd {})", codec.0, codec.1),
            });
        }
        let fits = header.group == self.group
            && header.sender as usize == m
            && header.stage == 0
            && header.phase == expect.phase
            && header.members as usize == self.layout.members
            && header.owner as usize == expect.owner
            && header.offset == expect.range.start as u64
            && header.values as usize == expect.range.len();
        if !fits {
            return reject(RejectReason::Header(format!(
                "expected {:?} values {:?} of range {}, got {header:?}",
                expect.phase, expect.range, expect.owner
            )));
        }
        Ok(())
    }

    fn decode_into(&self, m: usize, payload: &[u8], out: &mut [f32]) -> Result<()> {
        self.lock_codec()
            .decode_into(payload, out)
            .map_err(|err| self.reject(m, RejectReason::Decode(err.to_string())))
    }

    /// Rejects the first member (in member order) whose norm per unit of weight is far above
    /// the median of all members'.
    fn check_outliers(&self, norms: &[f64]) -> Result<()> {
        if norms.len() < OUTLIER_MIN_MEMBERS {
            return Ok(());
        }
        let mut sorted = norms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        // With most contributions exactly zero there is no scale to compare against.
        if median <= 0.0 {
            return Ok(());
        }
        match norms.iter().position(|&norm| norm > OUTLIER_RATIO * median) {
            Some(m) => Err(self.reject(
                m,
                RejectReason::Outlier {
                    norm: norms[m],
                    median,
                    ratio: OUTLIER_RATIO,
                },
            )),
            None => Ok(()),
        }
    }

    fn header(
        &self,
        phase: SyncPhase,
        owner: usize,
        range: &Range<usize>,
        (weight, norm): (f64, f64),
        payload: &[u8],
    ) -> Result<SyncChunkHeader> {
        if payload.len() > MAX_SYNC_CHUNK_BYTES as usize {
            return Err(self.codec_error(format!(
                "an encoded chunk of {} bytes exceeds the {MAX_SYNC_CHUNK_BYTES}-byte limit; lower chunk_values",
                payload.len()
            )));
        }
        Ok(SyncChunkHeader {
            round: RoundId(self.round),
            group: self.group,
            sender: self.me as u32,
            stage: 0,
            phase,
            owner: owner as u32,
            members: self.layout.members as u32,
            offset: range.start as u64,
            values: range.len() as u32,
            total_len: self.layout.len as u64,
            weight,
            norm,
            codec: self.codec_id.0,
            payload_len: payload.len() as u32,
            zstd: self.codec_id.1,
        })
    }

    /// Sends one chunk to `j`, opening the stream with the first one.
    async fn send_chunk(
        &self,
        j: usize,
        stream: &mut Option<Stream>,
        header: &SyncChunkHeader,
        payload: &[u8],
    ) -> Result<()> {
        let limiter = self.net.limiter.as_deref();
        let bytes = match stream {
            Some(stream) => wire::write_chunk(stream, header, payload, limiter)
                .await
                .map_err(|err| self.peer_failed(j, format!("sending: {err}")))?,
            None => {
                let mut control = self.net.control.clone();
                let peer = self.members[j];
                let on_retry = |err: String| {
                    tracing::debug!(%peer, round = self.round, %err, "retrying a sync stream");
                    self.progress().open_error[j] = Some(err);
                };
                let (opened, bytes) = wire::open_and_send_first(
                    &mut control,
                    peer,
                    header,
                    payload,
                    limiter,
                    on_retry,
                )
                .await
                .map_err(|err| match err {
                    OpenError::Refused => self.peer_failed(
                        j,
                        "it refused the stream: it has finished or abandoned this round"
                            .to_string(),
                    ),
                    OpenError::Broken(err) => self.peer_failed(j, format!("sending: {err}")),
                    OpenError::Encode(err) => self.codec_error(err),
                })?;
                *stream = Some(opened);
                bytes
            }
        };
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    async fn close(&self, j: usize, stream: Option<Stream>) -> Result<()> {
        if let Some(mut stream) = stream {
            stream
                .close()
                .await
                .map_err(|err| self.peer_failed(j, format!("closing the stream: {err}")))?;
        }
        Ok(())
    }

    fn timed_out(&self, waited: Duration) -> AllReduceError {
        let progress = self.progress();
        let others: Vec<usize> = self.others().collect();
        let (m, detail) = if let Some(m) = progress.reducing_waits_on {
            (m, "its contribution did not arrive")
        } else if let Some(&m) = others.iter().find(|&&m| !progress.gathered[m]) {
            (m, "its reduced range did not arrive")
        } else if let Some(&m) = others
            .iter()
            .find(|&&m| !progress.contribution_sent[m] || !progress.result_sent[m])
        {
            (m, "it did not take what this member sent")
        } else {
            (others[0], "the all-reduce did not finish")
        };
        let detail = match &progress.open_error[m] {
            Some(err) => format!("{detail}; last connection error: {err}"),
            None => detail.to_string(),
        };
        AllReduceError::Timeout {
            round: self.round,
            peer: self.members[m],
            waited,
            detail,
        }
    }

    fn reject(&self, m: usize, reason: RejectReason) -> AllReduceError {
        AllReduceError::Rejected {
            round: self.round,
            peer: self.members[m],
            reason,
        }
    }

    fn peer_failed(&self, m: usize, reason: String) -> AllReduceError {
        AllReduceError::PeerFailed {
            round: self.round,
            peer: self.members[m],
            reason,
        }
    }

    fn codec_error(&self, err: impl std::fmt::Display) -> AllReduceError {
        AllReduceError::Codec {
            round: self.round,
            reason: err.to_string(),
        }
    }

    fn lock_codec(&self) -> MutexGuard<'_, &'a mut dyn ChunkCodec> {
        self.codec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's buffers. Taken out while in use, so a concurrent all-reduce (none in a node's
    /// rounds) finds them missing and allocates its own.
    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.net.scratch()
    }

    /// A byte buffer from the scratch (any length; users overwrite it).
    fn take_bytes(&self) -> Vec<u8> {
        self.scratch().bytes.pop().unwrap_or_default()
    }

    fn give_bytes(&self, bytes: Vec<u8>) {
        self.scratch().bytes.push(bytes);
    }
}
