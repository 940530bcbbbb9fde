//! Routes incoming sync streams to the all-reduce of their round, holds a few that arrive before
//! this node starts that round, and refuses those of rounds it has finished.
//!
//! Only a stream's first header is read here; its payload stays in the peer's send window until
//! the all-reduce reads it, which is the backpressure that bounds memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use forge_protocol::sync::SyncChunkHeader;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};
use tokio::sync::mpsc;

use super::wire::{self, ACCEPTED, REFUSED};

/// Streams of rounds not yet started that are held at most; the oldest are dropped first. A
/// few rounds' worth for 8 members.
const MAX_PENDING: usize = 64;

/// Finished all-reduces remembered, so their late streams are refused rather than held.
const MAX_FINISHED: usize = 16;

/// How long a peer may take to send a stream's first header.
const FIRST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One all-reduce: its round and the digest of its ordered member list.
pub(crate) type RoundKey = (u64, u64);

/// A stream whose first header has been read and answered with [`ACCEPTED`].
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) peer: PeerId,
    pub(crate) header: SyncChunkHeader,
    /// Bytes the first header occupied (plus the answer), for the traffic counters.
    pub(crate) header_bytes: u64,
    pub(crate) stream: Stream,
}

#[derive(Debug, Default)]
pub(crate) struct Inbox {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: HashMap<RoundKey, mpsc::Sender<Incoming>>,
    pending: VecDeque<Incoming>,
    finished: VecDeque<RoundKey>,
    newest_finished_round: Option<u64>,
}

impl State {
    fn is_stale(&self, key: RoundKey) -> bool {
        is_stale(&self.finished, self.newest_finished_round, key)
    }
}

fn is_stale(
    finished: &VecDeque<RoundKey>,
    newest_finished_round: Option<u64>,
    key: RoundKey,
) -> bool {
    finished.contains(&key) || newest_finished_round.is_some_and(|round| key.0 < round)
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an all-reduce: streams already held for it and those that arrive while the
    /// guard lives come out of the receiver. Dropping the guard marks the all-reduce finished.
    pub(crate) fn open_round(
        self: &Arc<Self>,
        key: RoundKey,
        capacity: usize,
    ) -> (mpsc::Receiver<Incoming>, RoundGuard) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let mut state = self.lock();
        let held = std::mem::take(&mut state.pending);
        for incoming in held {
            if key_of(&incoming.header) == key {
                // The channel holds every stream one all-reduce expects; extra ones are
                // duplicates and dropping them fails the sender, as it should.
                let _ = sender.try_send(incoming);
            } else {
                state.pending.push_back(incoming);
            }
        }
        state.open.insert(key, sender);
        let guard = RoundGuard {
            inbox: Arc::clone(self),
            key,
        };
        (receiver, guard)
    }

    /// Whether a stream with this first header is wanted now or may be wanted later.
    fn wants(&self, header: &SyncChunkHeader) -> bool {
        !self.lock().is_stale(key_of(header))
    }

    fn deliver(&self, incoming: Incoming) {
        let key = key_of(&incoming.header);
        let mut state = self.lock();
        if let Some(sender) = state.open.get(&key) {
            let _ = sender.try_send(incoming);
        } else if !state.is_stale(key) {
            if state.pending.len() == MAX_PENDING {
                state.pending.pop_front();
            }
            state.pending.push_back(incoming);
        }
    }

    fn finish(&self, key: RoundKey) {
        let mut state = self.lock();
        state.open.remove(&key);
        if state.finished.len() == MAX_FINISHED {
            state.finished.pop_front();
        }
        state.finished.push_back(key);
        state.newest_finished_round = state.newest_finished_round.max(Some(key.0));
        let State {
            pending,
            finished,
            newest_finished_round,
            ..
        } = &mut *state;
        pending.retain(|incoming| {
            !is_stale(finished, *newest_finished_round, key_of(&incoming.header))
        });
    }

    /// Reads a new stream's first header, answers it, and routes the stream. Runs as its own
    /// task per stream, bounded by [`FIRST_HEADER_TIMEOUT`].
    pub(crate) async fn handshake(self: Arc<Self>, peer: PeerId, mut stream: Stream) {
        let read = tokio::time::timeout(FIRST_HEADER_TIMEOUT, wire::read_header(&mut stream));
        let (header, header_bytes) = match read.await {
            Ok(Ok(read)) => read,
            Ok(Err(err)) => {
                tracing::debug!(%peer, ?err, "dropping a sync stream with an unreadable header");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "dropping a sync stream that sent no header");
                return;
            }
        };
        let wanted = self.wants(&header);
        let answer = if wanted { ACCEPTED } else { REFUSED };
        let answered = tokio::time::timeout(FIRST_HEADER_TIMEOUT, async {
            stream.write_all(&[answer]).await?;
            stream.flush().await
        });
        if !matches!(answered.await, Ok(Ok(()))) || !wanted {
            return;
        }
        self.deliver(Incoming {
            peer,
            header,
            header_bytes: header_bytes + 1,
            stream,
        });
    }

    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }
}

fn key_of(header: &SyncChunkHeader) -> RoundKey {
    (header.round.0, header.group)
}

/// Marks its all-reduce finished when dropped, on success, error, timeout or cancellation alike,
/// so late streams of that round are refused and held ones are freed.
#[derive(Debug)]
pub(crate) struct RoundGuard {
    inbox: Arc<Inbox>,
    key: RoundKey,
}

impl Drop for RoundGuard {
    fn drop(&mut self) {
        self.inbox.finish(self.key);
    }
}
