//! Reading and writing length-prefixed control frames on a QUIC stream, for both ends of a
//! control connection.
//!
//! A control connection uses one bidirectional stream for its whole life rather than one stream
//! per message: control messages must arrive in order (Hello before Join, a report before a
//! Leave), which a single stream guarantees and separate streams would not, and a node sends a
//! handful of small messages a second, so per-message streams would buy no parallelism.

use forge_protocol::codec::{self, Channel, HEADER_LEN};

use crate::error::{Error, Result};

fn broke(err: impl std::fmt::Display) -> Error {
    Error::Stream {
        reason: err.to_string(),
    }
}

/// [`broke`] with the causes of `err` too: "connection lost" alone hides the reason the peer
/// gave when it closed the connection.
fn lost(err: impl std::error::Error) -> Error {
    let mut reason = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::Stream { reason }
}

/// Reads one whole frame; `None` when the peer finished the stream cleanly between frames. The
/// header's size limits are checked before the payload is read.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>> {
    read_frame_within(recv, usize::MAX).await
}

/// [`read_frame`] of a frame of at most `max_len` bytes, refused from its header before anything
/// is allocated for it: what a server reads from a client it has not yet authenticated.
pub async fn read_frame_within(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<Vec<u8>>> {
    let mut frame = vec![0u8; HEADER_LEN];
    match recv.read_exact(&mut frame).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(err) => return Err(lost(err)),
    }
    let len = frame_len_within(&frame, max_len)?;
    frame.resize(len, 0);
    recv.read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(lost)?;
    Ok(Some(frame))
}

/// The whole length of the frame `header` starts, if the codec's limits and `max_len` allow it.
fn frame_len_within(header: &[u8], max_len: usize) -> Result<usize> {
    let header = codec::parse_header(Channel::Control, header).map_err(Error::Protocol)?;
    let len = header.frame_len();
    if len > max_len {
        return Err(broke(format!(
            "a frame of {len} bytes where at most {max_len} are allowed"
        )));
    }
    Ok(len)
}

/// Writes one whole frame (header and payload, as the codec made it).
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<()> {
    send.write_all(frame).await.map_err(lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forge_protocol::messages::{Leave, NodeMessage};

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_header() {
        let frame = NodeMessage::Leave(Leave {
            reason: "x".repeat(300),
        })
        .to_frame()
        .unwrap();
        let header = &frame[..HEADER_LEN];
        assert_eq!(frame_len_within(header, usize::MAX).unwrap(), frame.len());
        let err = frame_len_within(header, 64).unwrap_err().to_string();
        assert!(err.contains("at most 64 are allowed"), "{err}");
    }
}
