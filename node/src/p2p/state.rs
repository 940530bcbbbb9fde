//! State transfer to nodes that join mid-run, over `/forge/state/1` streams.
//!
//! Every member publishes its committed DiLoCo state ([`StateSnapshot`]: global parameters and
//! outer momentum as f32 tensors by [`TensorKey`], plus a few counters) with
//! [`PeerNet::publish_state`]. A joiner fetches one version of it from several members at once
//! with [`PeerNet::fetch_state`] and checks every tensor against the coordinator's digests
//! ([`tensor_digest`]) before it uses anything.
//!
//! The requests and answers, their limits and their decoding are [`forge_protocol::state`]'s;
//! this module does the I/O: serving streams, and fetching from several peers at once.
//!
//! # Fetching
//!
//! A worker task per peer asks for the manifest, then pulls chunk requests from the fetch's
//! dispatcher. The dispatcher picks the manifest most peers serve (waiting for a majority, or
//! for every answer), hands chunks to idle peers (two in flight per peer), and hashes each
//! tensor on the blocking pool once all its chunks are in. A peer whose request fails (broken
//! stream, timeout, another version, malformed answer) or that disconnects is dropped and its
//! chunks go to the others. A tensor whose digest differs is fetched again, from then on all
//! from one peer at a time, so that a peer whose whole copy is wrong is identified and skipped.
//! The fetch fails only when no peer is left that could supply some tensor.

// `StateError` carries peer ids by value so callers can match on them; it is built at most once
// per fetch.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forge_protocol::codec::HEADER_LEN;
use forge_protocol::digest::{TensorHasher, tensor_digest};
use forge_protocol::messages::TensorKey;
use forge_protocol::state::{CHUNK_VALUES, Manifest, Request, Response, STATE_PROTOCOL, frame_len};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::net::{PeerEvent, PeerNet};
use super::wire::{UploadLimiter, write_paced};

/// The state-transfer stream protocol as libp2p names it.
pub(crate) const STATE: StreamProtocol = StreamProtocol::new(STATE_PROTOCOL);

/// Chunk requests in flight per peer, so the next answer is under way while one is handled.
const PIPELINE: usize = 2;

/// Incoming state streams served at once; more are dropped (their fetcher tries other peers).
const MAX_SERVED_STREAMS: usize = 64;

/// How long a served stream may sit without a request, and how long one answer may take.
const SERVE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const SERVE_ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Values converted to or from bytes at a time, so no chunk is held twice in memory.
const IO_SLICE_VALUES: usize = 16 << 10;

/// Tensors listed at most in a message about missing or unexpected ones.
const MAX_LISTED: usize = 5;

/// A node's committed DiLoCo state, served to joiners. Tensors in a fixed order (the serving
/// node's order: each parameter, then its momentum), f32 values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StateSnapshot {
    /// Global state version (the coordinator's `GlobalState.version`).
    pub(crate) version: u64,
    /// The round that produced it.
    pub(crate) round: u64,
    /// The run's schedule position (inner steps).
    pub(crate) step: u64,
    pub(crate) tokens: u64,
    pub(crate) tensors: Vec<(TensorKey, Arc<Vec<f32>>)>,
}

impl StateSnapshot {
    /// Each tensor's [`tensor_digest`], the map [`PeerNet::fetch_state`] checks against.
    #[cfg(test)]
    pub(crate) fn digests(&self) -> BTreeMap<TensorKey, [u8; 32]> {
        self.tensors
            .iter()
            .map(|(key, values)| (key.clone(), tensor_digest(values)))
            .collect()
    }

    pub(crate) fn manifest(&self) -> Manifest {
        Manifest {
            version: self.version,
            round: self.round,
            step: self.step,
            tokens: self.tokens,
            tensors: self
                .tensors
                .iter()
                .map(|(key, values)| (key.clone(), values.len() as u64))
                .collect(),
        }
    }
}

fn le_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// What a fetch cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FetchStats {
    /// Bytes received, frame headers included.
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    /// Bytes received from each peer asked, in the order they were given.
    pub(crate) per_peer_bytes: Vec<(PeerId, u64)>,
    /// Chunks requested again: the peer that had them failed, or their tensor's digest differed.
    pub(crate) refetched_chunks: u64,
}

/// A fetch that failed; each variant lists what every peer asked did or said.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error(
        "cannot fetch state version {version}: no peers to fetch it from (this node does not count); fetch from the members the coordinator lists"
    )]
    NoPeers { version: u64 },

    #[error(
        "no peer serves state version {version}: {}; the run has moved on or the peers have not committed it yet: ask the coordinator for the current version and fetch that",
        describe(.peers)
    )]
    VersionUnavailable {
        version: u64,
        /// The version each peer that answered holds (`None`: it publishes no state).
        held: Vec<(PeerId, Option<u64>)>,
        peers: Vec<(PeerId, String)>,
    },

    #[error(
        "no peer served a usable manifest of state version {version}: {}; check that these peers are up, reachable and run the same Forge release, then fetch again",
        describe(.peers)
    )]
    NoManifest {
        version: u64,
        peers: Vec<(PeerId, String)>,
    },

    #[error(
        "no peer can supply a good copy of tensor `{tensor}` of state version {version}: {}; fetch again from other members, and report the peers whose copies differ to the coordinator",
        describe(.peers)
    )]
    TensorUnavailable {
        version: u64,
        tensor: TensorKey,
        peers: Vec<(PeerId, String)>,
    },
}

fn describe(peers: &[(PeerId, String)]) -> String {
    peers
        .iter()
        .map(|(peer, what)| format!("peer {peer} {what}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn held_phrase(held: Option<u64>) -> String {
    match held {
        Some(version) => format!("holds version {version}"),
        None => "publishes no state".to_string(),
    }
}

/// A frame that could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The stream ended cleanly before the frame started.
    Closed,
    Io(io::Error),
    Protocol(forge_protocol::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed => f.write_str("the stream was closed"),
            FrameError::Io(err) => write!(f, "{err}"),
            FrameError::Protocol(err) => write!(f, "{err}"),
        }
    }
}

/// Reads one frame and decodes it with `decode` ([`Request::from_frame`] or
/// [`Response::from_frame`]); returns the message and the bytes it occupied.
pub(crate) async fn read_frame<T>(
    reader: &mut (impl AsyncRead + Unpin),
    decode: fn(&[u8]) -> forge_protocol::Result<T>,
) -> Result<(T, u64), FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let first = reader.read(&mut header).await.map_err(FrameError::Io)?;
    if first == 0 {
        return Err(FrameError::Closed);
    }
    reader
        .read_exact(&mut header[first..])
        .await
        .map_err(FrameError::Io)?;
    // Checked against the state channel's limits before the frame is allocated.
    let len = frame_len(&header).map_err(FrameError::Protocol)?;
    let mut frame = vec![0u8; len];
    frame[..HEADER_LEN].copy_from_slice(&header);
    reader
        .read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(FrameError::Io)?;
    let message = decode(&frame).map_err(FrameError::Protocol)?;
    Ok((message, len as u64))
}

/// A frame to send, or the reason it cannot be encoded as an I/O error of the stream.
fn frame(encoded: forge_protocol::Result<Vec<u8>>) -> io::Result<Vec<u8>> {
    encoded.map_err(|err| io::Error::other(err.to_string()))
}

async fn write_frame(
    writer: &mut (impl AsyncWrite + Unpin),
    encoded: forge_protocol::Result<Vec<u8>>,
) -> io::Result<()> {
    writer.write_all(&frame(encoded)?).await?;
    writer.flush().await
}

/// Reads `len` f32 little-endian values, a slice at a time.
async fn read_values(reader: &mut (impl AsyncRead + Unpin), len: usize) -> io::Result<Vec<f32>> {
    let mut values = Vec::with_capacity(len);
    let mut bytes = vec![0u8; 4 * IO_SLICE_VALUES.min(len)];
    while values.len() < len {
        let take = (len - values.len()).min(IO_SLICE_VALUES);
        let slice = &mut bytes[..4 * take];
        reader.read_exact(slice).await?;
        values.extend(
            slice
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(values)
}

/// The serving side: the published snapshot and the tasks that serve it.
#[derive(Debug)]
pub(crate) struct StateServer {
    published: Mutex<Option<Arc<StateSnapshot>>>,
    /// The node's upload cap, shared with the all-reduce.
    limiter: Option<Arc<UploadLimiter>>,
    streams: Arc<Semaphore>,
    /// Closed when the event loop stops, which ends every stream being served: a served stream
    /// would otherwise keep its QUIC connection open after the node has shut down.
    running: watch::Receiver<()>,
}

impl StateServer {
    /// The server, and the guard the event loop holds: dropping it stops all serving.
    pub(crate) fn new(limiter: Option<Arc<UploadLimiter>>) -> (StateServer, watch::Sender<()>) {
        let (guard, running) = watch::channel(());
        let server = StateServer {
            published: Mutex::new(None),
            limiter,
            streams: Arc::new(Semaphore::new(MAX_SERVED_STREAMS)),
            running,
        };
        (server, guard)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<StateSnapshot>>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<StateSnapshot>> {
        self.lock().clone()
    }

    /// Serves a new incoming stream in its own task, so the swarm loop never waits for it. Only
    /// members reach this: the allowlist refuses connections from anyone else.
    pub(crate) fn accept(self: &Arc<Self>, peer: PeerId, stream: Stream) {
        match Arc::clone(&self.streams).try_acquire_owned() {
            Ok(permit) => {
                let mut running = self.running.clone();
                let serve = Arc::clone(self).serve(peer, stream, permit);
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve => {}
                        // Only fails: the sender never sends.
                        _ = running.changed() => {}
                    }
                });
            }
            Err(_) => {
                tracing::debug!(%peer, "serving {MAX_SERVED_STREAMS} state streams; dropping one");
            }
        }
    }

    async fn serve(self: Arc<Self>, peer: PeerId, mut stream: Stream, _slot: OwnedSemaphorePermit) {
        loop {
            let read = tokio::time::timeout(
                SERVE_IDLE_TIMEOUT,
                read_frame(&mut stream, Request::from_frame),
            );
            let request = match read.await {
                Ok(Ok((request, _))) => request,
                Ok(Err(FrameError::Closed)) => return,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "dropping a state stream with an unreadable request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "closing an idle state stream");
                    return;
                }
            };
            let answered =
                tokio::time::timeout(SERVE_ANSWER_TIMEOUT, self.answer(&mut stream, request));
            match answered.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(%peer, %err, "state stream broke while answering");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "state stream too slow; dropping it");
                    return;
                }
            }
        }
    }

    async fn answer(&self, stream: &mut Stream, request: Request) -> io::Result<()> {
        let snapshot = self.current();
        let held = snapshot.as_ref().map(|snapshot| snapshot.version);
        let (version, tensor, offset, values) = match request {
            Request::Manifest { version } => {
                let response = match &snapshot {
                    Some(snapshot) if snapshot.version == version => {
                        Response::Manifest(snapshot.manifest())
                    }
                    _ => Response::OtherVersion { held },
                };
                return write_frame(stream, response.to_frame()).await;
            }
            Request::Chunk {
                version,
                tensor,
                offset,
                values,
            } => (version, tensor, offset, values),
        };
        let Some(snapshot) = snapshot.filter(|snapshot| snapshot.version == version) else {
            return write_frame(stream, Response::OtherVersion { held }.to_frame()).await;
        };
        let slice = match chunk_of(&snapshot, tensor, offset, values) {
            Ok(slice) => slice,
            Err(reason) => {
                return write_frame(stream, Response::Refused { reason }.to_frame()).await;
            }
        };
        let limiter = self.limiter.as_deref();
        let header = Response::Chunk {
            version,
            tensor,
            offset,
            values,
        };
        write_paced(stream, &frame(header.to_frame())?, limiter).await?;
        let mut bytes = Vec::with_capacity(4 * IO_SLICE_VALUES.min(slice.len()));
        for part in slice.chunks(IO_SLICE_VALUES) {
            le_bytes(part, &mut bytes);
            write_paced(stream, &bytes, limiter).await?;
        }
        stream.flush().await
    }
}

/// The values a chunk request asks for, if it fits the snapshot.
pub(crate) fn chunk_of(
    snapshot: &StateSnapshot,
    tensor: u32,
    offset: u64,
    values: u32,
) -> Result<&[f32], String> {
    let Some((key, data)) = snapshot.tensors.get(tensor as usize) else {
        return Err(format!(
            "there is no tensor {tensor}, the state has {}",
            snapshot.tensors.len()
        ));
    };
    if values as usize > CHUNK_VALUES {
        return Err(format!(
            "{values} values is more than the {CHUNK_VALUES} a chunk may hold"
        ));
    }
    let len = data.len() as u64;
    match offset.checked_add(u64::from(values)) {
        Some(end) if end <= len => Ok(&data[offset as usize..end as usize]),
        _ => Err(format!(
            "values {offset}..+{values} are outside `{key}`, which has {len}"
        )),
    }
}

impl PeerNet {
    /// Serves `snapshot` to members that ask, replacing the previous one (None: serve nothing).
    /// Streams already being served answer their next request from the new one.
    pub(crate) fn publish_state(&self, snapshot: Option<Arc<StateSnapshot>>) {
        *self.state.lock() = snapshot;
    }

    /// The snapshot served now, if any.
    pub(crate) fn published(&self) -> Option<Arc<StateSnapshot>> {
        self.state.lock().clone()
    }

    /// Fetches state `version` from `peers`, spreading chunks over them (several at once), and
    /// checks every tensor against `expected` (tensor key -> [`tensor_digest`] of its values).
    /// The served manifest must list exactly the keys in `expected`. A chunk that fails (peer
    /// gone, timeout, wrong version) or a tensor whose digest differs is fetched again from
    /// another peer; the fetch fails only when no peer can supply a good copy, naming the peers
    /// and the tensor.
    ///
    /// `timeout` bounds each exchange with one peer (opening the stream and getting the
    /// manifest, or one chunk); a peer that exceeds it is dropped from the fetch. The whole
    /// fetch ends when every tensor is verified or cannot be: there is no overall deadline, so
    /// wrap the call in one if needed (dropping the future stops everything).
    pub(crate) async fn fetch_state(
        &self,
        peers: &[PeerId],
        version: u64,
        expected: &BTreeMap<TensorKey, [u8; 32]>,
        timeout: Duration,
    ) -> Result<(StateSnapshot, FetchStats), StateError> {
        self.fetch_state_sized(peers, version, expected, &BTreeMap::new(), timeout)
            .await
    }

    /// [`PeerNet::fetch_state`] that also refuses, before downloading anything, a manifest whose
    /// tensor lengths differ from `lengths` (values per key: the model's shapes).
    pub(crate) async fn fetch_state_sized(
        &self,
        peers: &[PeerId],
        version: u64,
        expected: &BTreeMap<TensorKey, [u8; 32]>,
        lengths: &BTreeMap<TensorKey, u64>,
        timeout: Duration,
    ) -> Result<(StateSnapshot, FetchStats), StateError> {
        let started = Instant::now();
        let mut asked: Vec<PeerId> = Vec::with_capacity(peers.len());
        for peer in peers {
            if *peer != self.local_peer_id && !asked.contains(peer) {
                asked.push(*peer);
            }
        }
        if asked.is_empty() {
            return Err(StateError::NoPeers { version });
        }
        let mut peer_events = self.peer_events.subscribe();
        let (events_sender, mut events) = mpsc::unbounded_channel();
        // Dropped on return, which aborts every worker still running.
        let mut workers = JoinSet::new();
        let mut slots = Vec::with_capacity(asked.len());
        for (index, peer) in asked.iter().enumerate() {
            let (jobs_sender, jobs) = mpsc::channel(PIPELINE);
            let worker = Worker {
                control: self.control.clone(),
                peer: *peer,
                index,
                version,
                timeout,
                events: events_sender.clone(),
            };
            workers.spawn(worker.run(jobs));
            slots.push(PeerSlot {
                id: *peer,
                status: Status::Asking,
                jobs: Some(jobs_sender),
                in_flight: Vec::new(),
                bytes: 0,
                serves: HashMap::new(),
            });
        }
        let mut fetch = Fetch {
            version,
            expected,
            lengths,
            peers: slots,
            settled: None,
            tensors: Vec::new(),
            pending: VecDeque::new(),
            verifying: 0,
            events: events_sender,
            refetched: 0,
        };
        loop {
            if let Some(snapshot) = fetch.finished() {
                let stats = FetchStats {
                    bytes: fetch.peers.iter().map(|slot| slot.bytes).sum(),
                    elapsed: started.elapsed(),
                    per_peer_bytes: fetch
                        .peers
                        .iter()
                        .map(|slot| (slot.id, slot.bytes))
                        .collect(),
                    refetched_chunks: fetch.refetched,
                };
                return Ok((snapshot, stats));
            }
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => fetch.handle(event),
                    None => unreachable!("the fetch holds a sender of its own events"),
                },
                event = peer_events.recv() => {
                    if let Ok(PeerEvent::Disconnected(peer)) = event {
                        fetch.disconnected(peer);
                    }
                }
            }
            fetch.progress()?;
        }
    }
}

/// One chunk request, as the dispatcher hands it to a peer's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    tensor: usize,
    /// The tensor's index in the manifest of the peer the job goes to.
    remote: u32,
    /// Chunk index within the tensor.
    chunk: usize,
    offset: u64,
    values: u32,
    /// The tensor's attempt the chunk belongs to; answers to earlier attempts are ignored.
    attempt: u32,
}

#[derive(Debug)]
enum ManifestOutcome {
    Served(Manifest),
    Held(Option<u64>),
    Failed(String),
}

#[derive(Debug)]
enum Event {
    Manifest {
        peer: usize,
        outcome: ManifestOutcome,
        bytes: u64,
    },
    Chunk {
        peer: usize,
        job: Job,
        values: Vec<f32>,
        bytes: u64,
    },
    PeerFailed {
        peer: usize,
        reason: String,
    },
    /// A tensor's hash is done; `values` is the whole tensor when its digest matched.
    Verified {
        tensor: usize,
        attempt: u32,
        values: Option<Vec<f32>>,
    },
}

/// Talks to one peer for the fetch: the manifest, then the chunks the dispatcher hands it.
struct Worker {
    control: libp2p_stream::Control,
    peer: PeerId,
    index: usize,
    version: u64,
    timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
}

impl Worker {
    async fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let Some(stream) = self.manifest().await else {
            return;
        };
        if let Some(reason) = self.chunks(stream, jobs).await {
            let _ = self.events.send(Event::PeerFailed {
                peer: self.index,
                reason,
            });
        }
    }

    /// Asks for the manifest and reports the answer; returns the stream if it was served.
    async fn manifest(&mut self) -> Option<Stream> {
        let (peer, version) = (self.peer, self.version);
        let control = &mut self.control;
        let asked = tokio::time::timeout(self.timeout, async move {
            let mut stream = control
                .open_stream(peer, STATE)
                .await
                .map_err(|err| format!("cannot be reached: {err}"))?;
            write_frame(&mut stream, Request::Manifest { version }.to_frame())
                .await
                .map_err(|err| format!("broke off the manifest request: {err}"))?;
            let (response, bytes) = read_frame(&mut stream, Response::from_frame)
                .await
                .map_err(|err| format!("sent no manifest: {err}"))?;
            Ok::<_, String>((stream, response, bytes))
        });
        let (outcome, bytes, stream) = match asked.await {
            Err(_) => (
                ManifestOutcome::Failed(format!("sent no manifest within {:?}", self.timeout)),
                0,
                None,
            ),
            Ok(Err(reason)) => (ManifestOutcome::Failed(reason), 0, None),
            Ok(Ok((stream, Response::Manifest(manifest), bytes))) => {
                (ManifestOutcome::Served(manifest), bytes, Some(stream))
            }
            Ok(Ok((_, Response::OtherVersion { held }, bytes))) => {
                (ManifestOutcome::Held(held), bytes, None)
            }
            Ok(Ok((_, other, bytes))) => (
                ManifestOutcome::Failed(format!(
                    "answered the manifest request with {}",
                    other.kind()
                )),
                bytes,
                None,
            ),
        };
        let _ = self.events.send(Event::Manifest {
            peer: self.index,
            outcome,
            bytes,
        });
        stream
    }

    /// Sends chunk requests as they come and reads the answers in order, on the same stream.
    /// Returns why the peer failed, or `None` when the dispatcher has no more work for it.
    async fn chunks(&self, stream: Stream, mut jobs: mpsc::Receiver<Job>) -> Option<String> {
        let (mut reader, mut writer) = stream.split();
        let (sent_sender, mut sent) = mpsc::channel::<Job>(PIPELINE);
        let send = async {
            while let Some(job) = jobs.recv().await {
                let request = Request::Chunk {
                    version: self.version,
                    tensor: job.remote,
                    offset: job.offset,
                    values: job.values,
                };
                if let Err(err) = write_frame(&mut writer, request.to_frame()).await {
                    return Some(format!("broke off the transfer: {err}"));
                }
                if sent_sender.send(job).await.is_err() {
                    return None;
                }
            }
            None
        };
        let receive = async {
            while let Some(job) = sent.recv().await {
                let read = tokio::time::timeout(self.timeout, self.read_chunk(&mut reader, &job));
                match read.await {
                    Ok(Ok((values, bytes))) => {
                        let event = Event::Chunk {
                            peer: self.index,
                            job,
                            values,
                            bytes,
                        };
                        if self.events.send(event).is_err() {
                            return None;
                        }
                    }
                    Ok(Err(reason)) => return Some(reason),
                    Err(_) => {
                        return Some(format!("sent no chunk within {:?}", self.timeout));
                    }
                }
            }
            None
        };
        tokio::select! {
            reason = send => reason,
            reason = receive => reason,
        }
    }

    async fn read_chunk(
        &self,
        reader: &mut (impl AsyncRead + Unpin),
        job: &Job,
    ) -> Result<(Vec<f32>, u64), String> {
        let (response, header_bytes) = read_frame(reader, Response::from_frame)
            .await
            .map_err(|err| format!("broke off the transfer: {err}"))?;
        let asked = Response::Chunk {
            version: self.version,
            tensor: job.remote,
            offset: job.offset,
            values: job.values,
        };
        match response {
            response if response == asked => {}
            Response::OtherVersion { held } => {
                return Err(format!("now {}", held_phrase(held)));
            }
            Response::Refused { reason } => {
                return Err(format!("refused a chunk request: {reason}"));
            }
            other => {
                return Err(format!(
                    "answered a chunk request with {} that was not asked for",
                    other.kind()
                ));
            }
        }
        let values = read_values(reader, job.values as usize)
            .await
            .map_err(|err| format!("broke off a chunk: {err}"))?;
        Ok((values, header_bytes + 4 * u64::from(job.values)))
    }
}

#[derive(Debug)]
enum Status {
    /// Its manifest has not arrived yet.
    Asking,
    /// Served a usable manifest before the fetch settled on one.
    Answered(Manifest),
    /// Serves the manifest the fetch settled on: chunks go to it.
    Source,
    /// Holds another version.
    Held(Option<u64>),
    /// Out of the fetch, for this reason.
    Failed(String),
}

#[derive(Debug)]
struct PeerSlot {
    id: PeerId,
    status: Status,
    /// Dropped when the peer is out, which stops its worker.
    jobs: Option<mpsc::Sender<Job>>,
    in_flight: Vec<Job>,
    bytes: u64,
    /// Once a source: the tensors of the fetch it serves, each with its index in its manifest.
    serves: HashMap<usize, u32>,
}

impl PeerSlot {
    /// Whether the peer may still serve chunks of `tensor` (now, or once its manifest arrives).
    fn may_serve(&self, tensor: usize) -> bool {
        match self.status {
            Status::Asking => true,
            Status::Source => self.serves.contains_key(&tensor),
            _ => false,
        }
    }

    /// Drops the peer; returns its chunks in flight.
    fn fail(&mut self, reason: String) -> Vec<Job> {
        self.status = Status::Failed(reason);
        self.jobs = None;
        std::mem::take(&mut self.in_flight)
    }
}

#[derive(Debug)]
enum Phase {
    Fetching,
    Verifying,
    Done(Vec<f32>),
}

#[derive(Debug)]
struct TensorState {
    key: TensorKey,
    len: u64,
    digest: [u8; 32],
    attempt: u32,
    phase: Phase,
    /// Per chunk: its values and the peer that sent them, this attempt.
    received: Vec<Option<(Vec<f32>, usize)>>,
    received_count: usize,
    /// After a digest mismatch, every chunk of an attempt comes from one peer (`pin`, chosen
    /// by the first chunk handed out), so a peer whose copy is wrong can be named.
    pinned: bool,
    pin: Option<usize>,
    /// Peers whose whole copy of this tensor failed the digest.
    condemned: HashSet<usize>,
}

impl TensorState {
    fn chunks(&self) -> usize {
        self.received.len()
    }

    fn job(&self, tensor: usize, remote: u32, chunk: usize) -> Job {
        let offset = (chunk * CHUNK_VALUES) as u64;
        let values = (self.len - offset).min(CHUNK_VALUES as u64) as u32;
        Job {
            tensor,
            remote,
            chunk,
            offset,
            values,
            attempt: self.attempt,
        }
    }

    fn eligible(&self, peer: usize) -> bool {
        matches!(self.phase, Phase::Fetching)
            && !self.condemned.contains(&peer)
            && (!self.pinned || self.pin.is_none_or(|pin| pin == peer))
    }
}

/// The dispatcher's state: which peer serves what, and what has arrived.
struct Fetch<'a> {
    version: u64,
    expected: &'a BTreeMap<TensorKey, [u8; 32]>,
    /// Values per tensor, where known: a manifest that says otherwise is refused.
    lengths: &'a BTreeMap<TensorKey, u64>,
    peers: Vec<PeerSlot>,
    /// The schedule position (round, step, tokens) the fetch settled on: its sources state it.
    settled: Option<Position>,
    /// The expected tensors, in `expected`'s order, once settled.
    tensors: Vec<TensorState>,
    /// Chunks waiting for a peer: (tensor, chunk within it).
    pending: VecDeque<(usize, usize)>,
    verifying: usize,
    events: mpsc::UnboundedSender<Event>,
    refetched: u64,
}

impl Fetch<'_> {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Manifest {
                peer,
                outcome,
                bytes,
            } => {
                self.peers[peer].bytes += bytes;
                self.manifest_arrived(peer, outcome);
            }
            Event::Chunk {
                peer,
                job,
                values,
                bytes,
            } => {
                let slot = &mut self.peers[peer];
                slot.bytes += bytes;
                let Some(at) = slot.in_flight.iter().position(|j| *j == job) else {
                    // The peer was dropped and its chunks handed to others meanwhile.
                    return;
                };
                slot.in_flight.swap_remove(at);
                let tensor = &mut self.tensors[job.tensor];
                if tensor.attempt != job.attempt || !matches!(tensor.phase, Phase::Fetching) {
                    return;
                }
                let slot = &mut tensor.received[job.chunk];
                if slot.is_none() {
                    *slot = Some((values, peer));
                    tensor.received_count += 1;
                    if tensor.received_count == tensor.chunks() {
                        self.verify(job.tensor);
                    }
                }
            }
            Event::PeerFailed { peer, reason } => self.fail_peer(peer, reason),
            Event::Verified {
                tensor,
                attempt,
                values,
            } => {
                self.verifying -= 1;
                let state = &mut self.tensors[tensor];
                debug_assert_eq!(state.attempt, attempt);
                match values {
                    Some(values) => state.phase = Phase::Done(values),
                    None => self.mismatch(tensor),
                }
            }
        }
    }

    fn manifest_arrived(&mut self, peer: usize, outcome: ManifestOutcome) {
        let slot = &mut self.peers[peer];
        if !matches!(slot.status, Status::Asking) {
            // Dropped meanwhile (it disconnected).
            return;
        }
        let manifest = match outcome {
            ManifestOutcome::Served(manifest) if manifest.version != self.version => {
                slot.fail(String::new());
                slot.status = Status::Held(Some(manifest.version));
                return;
            }
            ManifestOutcome::Served(manifest) => manifest,
            ManifestOutcome::Held(held) => {
                slot.fail(String::new());
                slot.status = Status::Held(held);
                return;
            }
            ManifestOutcome::Failed(reason) => {
                slot.fail(reason);
                return;
            }
        };
        if let Err(reason) = check_manifest(&manifest, self.expected, self.lengths) {
            slot.fail(reason);
            return;
        }
        match self.settled {
            None => slot.status = Status::Answered(manifest),
            Some(chosen) if position(&manifest) == chosen => self.make_source(peer, &manifest),
            Some(chosen) => {
                let reason = differs(&manifest, chosen);
                slot.fail(reason);
            }
        }
    }

    /// Makes the peer, which serves `manifest` at the settled position, a source of the
    /// tensors it lists at their settled lengths (a peer holding other layers serves some).
    fn make_source(&mut self, peer: usize, manifest: &Manifest) {
        let serves: HashMap<usize, u32> = manifest
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(remote, (key, len))| {
                let tensor = self.tensors.iter().position(|t| t.key == *key)?;
                (self.tensors[tensor].len == *len).then_some((tensor, remote as u32))
            })
            .collect();
        let slot = &mut self.peers[peer];
        if serves.is_empty() {
            slot.fail("serves none of these tensors at the lengths the others serve".to_string());
            return;
        }
        slot.status = Status::Source;
        slot.serves = serves;
    }

    /// The peer's connection closed: its stream is gone with it.
    fn disconnected(&mut self, peer: PeerId) {
        let index = self.peers.iter().position(|slot| slot.id == peer);
        if let Some(index) = index
            && matches!(
                self.peers[index].status,
                Status::Asking | Status::Answered(_) | Status::Source
            )
        {
            self.fail_peer(index, "disconnected".to_string());
        }
    }

    fn fail_peer(&mut self, peer: usize, reason: String) {
        if matches!(self.peers[peer].status, Status::Failed(_) | Status::Held(_)) {
            return;
        }
        tracing::debug!(peer = %self.peers[peer].id, %reason, "dropping a peer from the state fetch");
        let in_flight = self.peers[peer].fail(reason);
        // Tensors being fetched from this peer alone start over with another one.
        for tensor in 0..self.tensors.len() {
            let state = &self.tensors[tensor];
            if state.pinned && state.pin == Some(peer) && matches!(state.phase, Phase::Fetching) {
                self.restart(tensor);
            }
        }
        for job in in_flight.into_iter().rev() {
            let state = &self.tensors[job.tensor];
            if state.attempt == job.attempt && matches!(state.phase, Phase::Fetching) {
                self.pending.push_front((job.tensor, job.chunk));
                self.refetched += 1;
            }
        }
    }

    /// Settles on a schedule position once a majority of the peers state it and, together,
    /// serve every expected tensor (peers holding other pipeline stages serve some each), or
    /// once every peer has answered (then on the position most state among those that serve
    /// every tensor); fails when none can.
    fn settle(&mut self) -> Result<(), StateError> {
        if self.settled.is_some() {
            return Ok(());
        }
        // Per position: how many peers state it, and the expected tensors they serve.
        let mut votes: Vec<(Position, usize, HashSet<&TensorKey>)> = Vec::new();
        for slot in &self.peers {
            if let Status::Answered(manifest) = &slot.status {
                let at = position(manifest);
                let index = match votes.iter().position(|(p, _, _)| *p == at) {
                    Some(index) => index,
                    None => {
                        votes.push((at, 0, HashSet::new()));
                        votes.len() - 1
                    }
                };
                votes[index].1 += 1;
                votes[index].2.extend(
                    manifest
                        .tensors
                        .iter()
                        .map(|(key, _)| key)
                        .filter(|key| self.expected.contains_key(*key)),
                );
            }
        }
        let asking = self
            .peers
            .iter()
            .any(|slot| matches!(slot.status, Status::Asking));
        let mut best: Option<(Position, usize)> = None;
        for (at, count, served) in &votes {
            let covers = served.len() == self.expected.len();
            if covers && best.is_none_or(|(_, most)| *count > most) {
                best = Some((*at, *count));
            }
        }
        match best {
            Some((at, count)) if 2 * count > self.peers.len() || !asking => {
                self.start(at);
                Ok(())
            }
            _ if asking => Ok(()),
            None if votes.is_empty() => Err(self.no_manifest()),
            None => {
                // Every peer answered and no position has every tensor: name the first
                // tensor the most-stated position lacks.
                let (_, _, served) = votes
                    .iter()
                    .max_by_key(|(_, count, _)| *count)
                    .expect("votes is not empty");
                let key = self
                    .expected
                    .keys()
                    .find(|key| !served.contains(key))
                    .expect("no position serves every tensor");
                Err(StateError::TensorUnavailable {
                    version: self.version,
                    tensor: key.clone(),
                    peers: self.reasons_for(key),
                })
            }
            Some(_) => unreachable!("a covering position when no peer is asking starts"),
        }
    }

    fn no_manifest(&self) -> StateError {
        let held: Vec<(PeerId, Option<u64>)> = self
            .peers
            .iter()
            .filter_map(|slot| match slot.status {
                Status::Held(held) => Some((slot.id, held)),
                _ => None,
            })
            .collect();
        let peers = self.reasons(None);
        if held.is_empty() {
            StateError::NoManifest {
                version: self.version,
                peers,
            }
        } else {
            StateError::VersionUnavailable {
                version: self.version,
                held,
                peers,
            }
        }
    }

    /// Plans the chunks of every expected tensor at the lengths the peers stating `at` serve
    /// (the model's, where known), and makes those peers sources.
    fn start(&mut self, at: Position) {
        // In the order the peers list them (the model's), each at the first length served.
        let mut listed: Vec<(TensorKey, u64)> = Vec::with_capacity(self.expected.len());
        for slot in &self.peers {
            if let Status::Answered(manifest) = &slot.status
                && position(manifest) == at
            {
                for (key, len) in &manifest.tensors {
                    if self.expected.contains_key(key) && !listed.iter().any(|(k, _)| k == key) {
                        listed.push((key.clone(), *len));
                    }
                }
            }
        }
        debug_assert_eq!(listed.len(), self.expected.len());
        for (key, served) in listed {
            let digest = self.expected[&key];
            let len = self.lengths.get(&key).copied().unwrap_or(served);
            let chunks = len.div_ceil(CHUNK_VALUES as u64) as usize;
            let index = self.tensors.len();
            let mut state = TensorState {
                key,
                len,
                digest,
                attempt: 0,
                phase: Phase::Fetching,
                received: (0..chunks).map(|_| None).collect(),
                received_count: 0,
                pinned: false,
                pin: None,
                condemned: HashSet::new(),
            };
            if chunks == 0 {
                if tensor_digest(&[]) == digest {
                    state.phase = Phase::Done(Vec::new());
                } else {
                    // Every peer serving it has it empty, and empty is wrong.
                    state.condemned = (0..self.peers.len()).collect();
                }
            }
            self.pending.extend((0..chunks).map(|chunk| (index, chunk)));
            self.tensors.push(state);
        }
        self.settled = Some(at);
        for peer in 0..self.peers.len() {
            let answered = std::mem::replace(&mut self.peers[peer].status, Status::Asking);
            match answered {
                Status::Answered(manifest) if position(&manifest) == at => {
                    self.make_source(peer, &manifest)
                }
                Status::Answered(manifest) => {
                    let reason = differs(&manifest, at);
                    self.peers[peer].fail(reason);
                }
                other => self.peers[peer].status = other,
            }
        }
    }

    /// Hashes a tensor whose chunks are all in, on the blocking pool.
    fn verify(&mut self, tensor: usize) {
        let state = &mut self.tensors[tensor];
        state.phase = Phase::Verifying;
        let parts: Vec<Vec<f32>> = state
            .received
            .iter_mut()
            .map(|slot| slot.as_mut().map(|(values, _)| std::mem::take(values)))
            .collect::<Option<_>>()
            .expect("every chunk has arrived");
        let (digest, attempt, len) = (state.digest, state.attempt, state.len as usize);
        let events = self.events.clone();
        self.verifying += 1;
        tokio::task::spawn_blocking(move || {
            let mut hasher = TensorHasher::new();
            for part in &parts {
                hasher.update(part);
            }
            let matches = hasher.finish() == digest;
            let values = matches.then(|| join(parts, len));
            let _ = events.send(Event::Verified {
                tensor,
                attempt,
                values,
            });
        });
    }

    /// A tensor's digest differed: fetch it again, all from one peer at a time.
    fn mismatch(&mut self, tensor: usize) {
        let state = &mut self.tensors[tensor];
        let sources: BTreeSet<usize> = state
            .received
            .iter()
            .filter_map(|slot| slot.as_ref().map(|(_, peer)| *peer))
            .collect();
        let names: Vec<String> = sources
            .iter()
            .map(|&peer| self.peers[peer].id.to_string())
            .collect();
        tracing::warn!(
            tensor = %state.key,
            peers = %names.join(", "),
            "a fetched tensor does not match the coordinator's digest; fetching it again"
        );
        if let [only] = sources.iter().copied().collect::<Vec<_>>()[..] {
            state.condemned.insert(only);
        }
        state.pinned = true;
        self.restart(tensor);
    }

    /// Starts a tensor over: a new attempt, every chunk pending again.
    fn restart(&mut self, tensor: usize) {
        let state = &mut self.tensors[tensor];
        let already = self.pending.iter().filter(|(t, _)| *t == tensor).count();
        self.pending.retain(|(t, _)| *t != tensor);
        state.attempt += 1;
        state.phase = Phase::Fetching;
        state.pin = None;
        state.received_count = 0;
        for slot in &mut state.received {
            *slot = None;
        }
        let chunks = state.chunks();
        self.refetched += (chunks - already) as u64;
        self.pending
            .extend((0..chunks).map(|chunk| (tensor, chunk)));
    }

    /// Settles on a manifest, hands chunks to idle peers, and fails when some tensor can no
    /// longer be fetched.
    fn progress(&mut self) -> Result<(), StateError> {
        self.settle()?;
        if self.settled.is_none() {
            return Ok(());
        }
        self.assign();
        for (index, tensor) in self.tensors.iter().enumerate() {
            if matches!(tensor.phase, Phase::Fetching)
                && !self
                    .peers
                    .iter()
                    .enumerate()
                    .any(|(peer, slot)| slot.may_serve(index) && tensor.eligible(peer))
            {
                return Err(self.tensor_unavailable(index));
            }
        }
        let busy = self.verifying > 0
            || self
                .peers
                .iter()
                .any(|slot| !slot.in_flight.is_empty() || matches!(slot.status, Status::Asking));
        let unfinished = self
            .tensors
            .iter()
            .position(|tensor| !matches!(tensor.phase, Phase::Done(_)));
        match unfinished {
            // Cannot happen with the checks above; fail rather than wait forever.
            Some(index) if !busy => Err(self.tensor_unavailable(index)),
            _ => Ok(()),
        }
    }

    fn assign(&mut self) {
        for peer in 0..self.peers.len() {
            while matches!(self.peers[peer].status, Status::Source)
                && self.peers[peer].in_flight.len() < PIPELINE
            {
                let (tensors, serves) = (&self.tensors, &self.peers[peer].serves);
                let Some(at) = self.pending.iter().position(|&(tensor, _)| {
                    serves.contains_key(&tensor) && tensors[tensor].eligible(peer)
                }) else {
                    break;
                };
                let (tensor, chunk) = self.pending.remove(at).expect("found above");
                let remote = self.peers[peer].serves[&tensor];
                let state = &mut self.tensors[tensor];
                if state.pinned && state.pin.is_none() {
                    state.pin = Some(peer);
                }
                let job = state.job(tensor, remote, chunk);
                let slot = &mut self.peers[peer];
                match slot.jobs.as_ref().map(|jobs| jobs.try_send(job)) {
                    Some(Ok(())) => slot.in_flight.push(job),
                    _ => {
                        self.pending.push_front((tensor, chunk));
                        self.fail_peer(peer, "stopped answering".to_string());
                    }
                }
            }
        }
    }

    fn tensor_unavailable(&self, tensor: usize) -> StateError {
        StateError::TensorUnavailable {
            version: self.version,
            tensor: self.tensors[tensor].key.clone(),
            peers: self.reasons(Some(tensor)),
        }
    }

    /// What each peer did, for an error about `key` before the fetch settled.
    fn reasons_for(&self, key: &TensorKey) -> Vec<(PeerId, String)> {
        let mut reasons = self.reasons(None);
        for (slot, (_, what)) in self.peers.iter().zip(&mut reasons) {
            if let Status::Answered(manifest) = &slot.status
                && !manifest.tensors.iter().any(|(served, _)| served == key)
            {
                *what = "does not hold it (it holds other layers)".to_string();
            }
        }
        reasons
    }

    /// What each peer did, for an error.
    fn reasons(&self, tensor: Option<usize>) -> Vec<(PeerId, String)> {
        self.peers
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                let condemned =
                    tensor.is_some_and(|tensor| self.tensors[tensor].condemned.contains(&index));
                let what = match &slot.status {
                    _ if condemned => {
                        "served a copy whose SHA-256 differs from the coordinator's".to_string()
                    }
                    Status::Held(held) => held_phrase(*held),
                    Status::Failed(reason) => reason.clone(),
                    Status::Asking => "has not answered".to_string(),
                    Status::Source
                        if tensor.is_some_and(|tensor| !slot.serves.contains_key(&tensor)) =>
                    {
                        "does not hold it (it holds other layers)".to_string()
                    }
                    Status::Answered(_) | Status::Source => "was not asked for it".to_string(),
                };
                (slot.id, what)
            })
            .collect()
    }

    /// The fetched state, once every tensor is verified.
    fn finished(&mut self) -> Option<StateSnapshot> {
        let (round, step, tokens) = self.settled?;
        if !self
            .tensors
            .iter()
            .all(|tensor| matches!(tensor.phase, Phase::Done(_)))
        {
            return None;
        }
        let tensors = self
            .tensors
            .iter_mut()
            .map(|tensor| {
                let values = match std::mem::replace(&mut tensor.phase, Phase::Verifying) {
                    Phase::Done(values) => values,
                    _ => unreachable!("checked above"),
                };
                (tensor.key.clone(), Arc::new(values))
            })
            .collect();
        Some(StateSnapshot {
            version: self.version,
            round,
            step,
            tokens,
            tensors,
        })
    }
}

fn join(mut parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    let mut values = Vec::with_capacity(len);
    for part in parts {
        values.extend_from_slice(&part);
    }
    values
}

/// Whether a peer's manifest can serve this fetch: every tensor it lists that the model knows has
/// the model's length, and it lists at least one of the tensors the coordinator has hashes for
/// (a node holding another pipeline stage serves the layers it shares with this node's, or
/// none). Tensors this node does not need are never asked for. (Decoding the manifest checked
/// that it lists each tensor once and within the limits.)
pub(crate) fn check_manifest(
    manifest: &Manifest,
    expected: &BTreeMap<TensorKey, [u8; 32]>,
    lengths: &BTreeMap<TensorKey, u64>,
) -> Result<(), String> {
    if let Some((key, len, model)) = manifest.tensors.iter().find_map(|(key, len)| {
        lengths
            .get(key)
            .filter(|model| *model != len)
            .map(|model| (key, len, model))
    }) {
        return Err(format!(
            "serves `{key}` with {len} values where this model's has {model}"
        ));
    }
    if !manifest
        .tensors
        .iter()
        .any(|(key, _)| expected.contains_key(key))
    {
        let wanted: Vec<&TensorKey> = expected.keys().collect();
        return Err(format!(
            "holds none of the tensors this node needs ({}): it holds other layers",
            listed(&wanted)
        ));
    }
    Ok(())
}

fn listed(keys: &[&TensorKey]) -> String {
    let mut out: Vec<String> = keys
        .iter()
        .take(MAX_LISTED)
        .map(|key| format!("`{key}`"))
        .collect();
    if keys.len() > MAX_LISTED {
        out.push(format!("{} more", keys.len() - MAX_LISTED));
    }
    out.join(", ")
}

/// The schedule position a manifest states (round, inner step, tokens): a fetch takes every
/// tensor from peers that agree on it.
type Position = (u64, u64, u64);

fn position(manifest: &Manifest) -> Position {
    (manifest.round, manifest.step, manifest.tokens)
}

/// Why a peer's manifest is not one the fetch takes tensors from.
fn differs(served: &Manifest, chosen: Position) -> String {
    format!(
        "serves a different manifest of this version: round {}, step {}, tokens {} where most \
         peers serve round {}, step {}, tokens {}",
        served.round, served.step, served.tokens, chosen.0, chosen.1, chosen.2
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_requests_outside_the_snapshot_are_refused() {
        let snapshot = StateSnapshot {
            version: 1,
            round: 1,
            step: 10,
            tokens: 100,
            tensors: vec![(TensorKey::Param("a".into()), Arc::new(vec![1.0; 10]))],
        };
        assert_eq!(chunk_of(&snapshot, 0, 2, 8).unwrap().len(), 8);
        assert!(chunk_of(&snapshot, 0, 3, 8).is_err());
        assert!(chunk_of(&snapshot, 0, u64::MAX, 2).is_err());
        assert!(chunk_of(&snapshot, 1, 0, 1).is_err());
    }

    #[test]
    fn a_manifest_serves_some_of_the_expected_keys_at_the_model_lengths() {
        let a = TensorKey::Param("a".into());
        let b = TensorKey::Momentum("a".into());
        let expected: BTreeMap<TensorKey, [u8; 32]> =
            [(a.clone(), [0; 32]), (b.clone(), [0; 32])].into();
        let manifest = |keys: &[&TensorKey]| Manifest {
            version: 1,
            round: 1,
            step: 0,
            tokens: 0,
            tensors: keys.iter().map(|key| ((*key).clone(), 4)).collect(),
        };
        let none = BTreeMap::new();
        assert!(check_manifest(&manifest(&[&b, &a]), &expected, &none).is_ok());
        // Part of them (a peer holding other layers too), and tensors not needed here.
        let c = TensorKey::Param("c".into());
        assert!(check_manifest(&manifest(&[&a]), &expected, &none).is_ok());
        assert!(check_manifest(&manifest(&[&a, &b, &c]), &expected, &none).is_ok());
        let err = check_manifest(&manifest(&[&c]), &expected, &none).unwrap_err();
        assert!(
            err.contains("holds none of the tensors this node needs"),
            "{err}"
        );
        // Lengths other than the model's are refused before any chunk is fetched.
        let lengths: BTreeMap<TensorKey, u64> = [(a.clone(), 4), (b.clone(), 5)].into();
        let err = check_manifest(&manifest(&[&b, &a]), &expected, &lengths).unwrap_err();
        assert!(
            err.contains("serves `momentum.a` with 4 values where this model's has 5"),
            "{err}"
        );
        let lengths: BTreeMap<TensorKey, u64> = [(a.clone(), 4), (b.clone(), 4)].into();
        assert!(check_manifest(&manifest(&[&b, &a]), &expected, &lengths).is_ok());
    }
}
