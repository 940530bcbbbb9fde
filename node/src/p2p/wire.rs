//! Chunks on a `/forge/sync/1` stream, and the node-wide upload cap.
//!
//! A chunk is one [`Channel::Sync`] frame holding a [`SyncChunkHeader`] (16-byte frame header +
//! bincode, at most 64 KiB, checked before it is read), followed by exactly `payload_len` raw
//! bytes of encoded values (at most [`MAX_SYNC_CHUNK_BYTES`], checked by the header). A stream
//! carries the chunks one sender sends one receiver in one phase of one all-reduce, in offset
//! order. The receiver answers the first header with one byte, [`ACCEPTED`] or [`REFUSED`],
//! before the sender writes any payload: a stream the receiver dropped (its accept queue was full)
//! is then retried instead of being written into the void.

use std::io;
use std::time::Duration;

use forge_protocol::codec::{self, Channel, HEADER_LEN};
use forge_protocol::sync::{MAX_SYNC_CHUNK_BYTES, SYNC_PROTOCOL, SyncChunkHeader};
use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::time::Instant;

/// The sync stream protocol as libp2p names it.
pub(crate) const SYNC: StreamProtocol = StreamProtocol::new(SYNC_PROTOCOL);

/// The receiver's answer to a stream's first header: it routed the stream to an all-reduce.
pub(crate) const ACCEPTED: u8 = 1;
/// The receiver's answer to a stream's first header: that round is over on its side.
pub(crate) const REFUSED: u8 = 0;

/// Writes are cut into slices this large so the upload cap paces them smoothly (and see
/// [`write_paced`]).
const WRITE_SLICE: usize = 64 << 10;

/// How long a failed stream open waits before the next try, at first and at most.
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// A header that could not be read: the stream broke, or the peer sent something invalid.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Protocol(forge_protocol::Error),
}

/// Reads one chunk header; returns it and the bytes it occupied on the wire.
pub(crate) async fn read_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<(SyncChunkHeader, u64), ReadError> {
    let mut frame = vec![0u8; HEADER_LEN];
    stream.read_exact(&mut frame).await.map_err(ReadError::Io)?;
    // The frame header's length fields are checked against the sync channel's limits here,
    // before the rest is read or allocated.
    let frame_header = codec::parse_header(Channel::Sync, &frame).map_err(ReadError::Protocol)?;
    frame.resize(frame_header.frame_len(), 0);
    stream
        .read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(ReadError::Io)?;
    let header = SyncChunkHeader::from_frame(&frame).map_err(ReadError::Protocol)?;
    Ok((header, frame.len() as u64))
}

/// Reads the payload announced by a checked header (so at most [`MAX_SYNC_CHUNK_BYTES`]) into
/// `buf`, replacing its contents; `buf` keeps its capacity from one chunk to the next.
pub(crate) async fn read_payload(
    stream: &mut (impl AsyncRead + Unpin),
    header: &SyncChunkHeader,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    debug_assert!(header.payload_len <= MAX_SYNC_CHUNK_BYTES);
    // Every byte is overwritten by the read: only a longer buffer's new bytes are zeroed
    // (clearing first would zero a whole chunk's worth per chunk, 2% of a member's CPU).
    buf.resize(header.payload_len as usize, 0);
    stream.read_exact(buf).await
}

/// Writes a header frame and its payload; returns the bytes written.
pub(crate) async fn write_chunk(
    stream: &mut Stream,
    header: &SyncChunkHeader,
    payload: &[u8],
    limiter: Option<&UploadLimiter>,
) -> io::Result<u64> {
    let frame = header
        .to_frame()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    write_paced(stream, &frame, limiter).await?;
    write_paced(stream, payload, limiter).await?;
    Ok((frame.len() + payload.len()) as u64)
}

/// Why a sync stream could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The peer answered [`REFUSED`]: it has finished or abandoned this all-reduce.
    Refused,
    /// Our own header could not be encoded (a bug, or values past the limits).
    Encode(forge_protocol::Error),
    /// The stream broke after the peer accepted it.
    Broken(io::Error),
}

/// Opens a sync stream to `peer` and writes the first chunk, retrying while the peer cannot be
/// reached or drops the stream unanswered. The caller bounds the whole attempt with its
/// all-reduce deadline; `on_retry` receives each failure, for the error a timeout reports.
pub(crate) async fn open_and_send_first(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    header: &SyncChunkHeader,
    payload: &[u8],
    limiter: Option<&UploadLimiter>,
    mut on_retry: impl FnMut(String),
) -> Result<(Stream, u64), OpenError> {
    let frame = header.to_frame().map_err(OpenError::Encode)?;
    let mut backoff = RETRY_FIRST;
    loop {
        match try_open(control, peer, &frame, limiter).await {
            Ok(Some(mut stream)) => {
                // Accepted: the stream now belongs to the peer's all-reduce, so a failure from
                // here on is the peer's failure, not a reason to open a second stream.
                write_paced(&mut stream, payload, limiter)
                    .await
                    .map_err(OpenError::Broken)?;
                let sent = frame.len() + 1 + payload.len();
                return Ok((stream, sent as u64));
            }
            Ok(None) => return Err(OpenError::Refused),
            Err(err) => on_retry(err),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// One attempt: open, send the first header, wait for the answer. `Ok(None)` is a refusal.
async fn try_open(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    frame: &[u8],
    limiter: Option<&UploadLimiter>,
) -> Result<Option<Stream>, String> {
    let mut stream = control
        .open_stream(peer, SYNC)
        .await
        .map_err(|err| err.to_string())?;
    write_paced(&mut stream, frame, limiter)
        .await
        .map_err(|err| format!("cannot send the first header: {err}"))?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|err| format!("stream dropped before it was accepted: {err}"))?;
    match answer[0] {
        ACCEPTED => Ok(Some(stream)),
        _ => Ok(None),
    }
}

/// Writes `bytes` in slices of [`WRITE_SLICE`], each paced by the node's upload cap when there
/// is one. Slicing also when there is no cap keeps the QUIC stack's copy of each write small, so
/// the allocator reuses its buffers instead of mapping (and faulting in) fresh pages per chunk.
pub(crate) async fn write_paced(
    stream: &mut Stream,
    bytes: &[u8],
    limiter: Option<&UploadLimiter>,
) -> io::Result<()> {
    for slice in bytes.chunks(WRITE_SLICE) {
        if let Some(limiter) = limiter {
            limiter.acquire(slice.len()).await;
        }
        stream.write_all(slice).await?;
    }
    Ok(())
}

/// Token bucket shared by every sync stream of a node, so `max_upload_bytes_per_s` caps the
/// node's whole upload, not each stream.
///
/// A caller takes its bytes at once, possibly driving the balance negative, and sleeps until
/// the balance would have been paid back: callers are served in order and the long-run rate
/// never exceeds the cap by more than one burst.
#[derive(Debug)]
pub(crate) struct UploadLimiter {
    bytes_per_s: f64,
    burst: f64,
    bucket: std::sync::Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Bytes on the link per byte of stream payload a member uploads during an all-reduce: QUIC
/// packet and frame headers, the AEAD tag, UDP, IP and Ethernet headers, and the acknowledgements
/// a member sends for what it downloads at the same time. Measured with `tc -s qdisc` on the
/// members' shaped uplinks (scripts/bench_allreduce_netns.sh, 15m payload): 256.1 MB on the link
/// for 243.0 MB of payload with 2 peers (1.054), 390 MB for 364.6 MB with 4 peers (1.070).
pub(crate) const LINK_BYTES_PER_PAYLOAD_BYTE: f64 = 1.06;

impl UploadLimiter {
    /// Paces stream payload so that what reaches the link, framing and acknowledgements
    /// included, stays at `link_bytes_per_s` (see [`LINK_BYTES_PER_PAYLOAD_BYTE`]). A node capped
    /// at its uplink's rate then keeps that link busy without building a queue in front of it.
    pub(crate) fn for_link(link_bytes_per_s: u64) -> UploadLimiter {
        UploadLimiter::new((link_bytes_per_s as f64 / LINK_BYTES_PER_PAYLOAD_BYTE) as u64)
    }

    /// Paces stream payload to `bytes_per_s`.
    pub(crate) fn new(bytes_per_s: u64) -> UploadLimiter {
        let bytes_per_s = bytes_per_s.max(1) as f64;
        // 10 ms of traffic, but at least one slice, so a fast cap is not spent in tiny sleeps.
        let burst = (bytes_per_s / 100.0).max(WRITE_SLICE as f64);
        UploadLimiter {
            bytes_per_s,
            burst,
            bucket: std::sync::Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    pub(crate) async fn acquire(&self, bytes: usize) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(bucket.at).as_secs_f64() * self.bytes_per_s;
            bucket.tokens = (bucket.tokens + refill).min(self.burst) - bytes as f64;
            bucket.at = now;
            if bucket.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-bucket.tokens / self.bytes_per_s)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes 64 slices (4 MiB) from `limiter` and checks that they took as long as `bytes_per_s`
    /// of payload allows, less the initial burst of one slice.
    async fn assert_paces_payload_at(limiter: UploadLimiter, bytes_per_s: f64) {
        let start = Instant::now();
        for _ in 0..64 {
            limiter.acquire(WRITE_SLICE).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let expected = (64.0 - 1.0) * WRITE_SLICE as f64 / bytes_per_s;
        assert!(
            (elapsed - expected).abs() < 0.01,
            "took {elapsed:.3} s, expected {expected:.3} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_paces_to_the_cap() {
        // 4 MiB at 8 MB/s: 0.516 s after the free slice.
        assert_paces_payload_at(UploadLimiter::new(8_000_000), 8e6).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_cap_leaves_room_for_framing() {
        // 8 MB/s on the link is 8 / 1.06 MB/s of payload: 0.547 s, not 0.516 s.
        let payload_per_s = 8e6 / LINK_BYTES_PER_PAYLOAD_BYTE;
        assert_paces_payload_at(UploadLimiter::for_link(8_000_000), payload_per_s).await;
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_banks_at_most_one_burst() {
        let limiter = UploadLimiter::new(1_000_000);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        for _ in 0..16 {
            limiter.acquire(WRITE_SLICE).await;
        }
        // Ten idle seconds must not turn into a 10 MB burst: only one slice is free.
        let elapsed = start.elapsed().as_secs_f64();
        let expected = 15.0 * WRITE_SLICE as f64 / 1e6;
        assert!(
            (elapsed - expected).abs() < 0.01,
            "took {elapsed:.3} s, expected {expected:.3} s"
        );
    }
}
