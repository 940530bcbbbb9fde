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

/// Reads one whole frame; `None` when the peer finished the stream cleanly between frames. The
/// header's size limits are checked before the payload is read.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>> {
    let mut frame = vec![0u8; HEADER_LEN];
    match recv.read_exact(&mut frame).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(err) => return Err(broke(err)),
    }
    let header = codec::parse_header(Channel::Control, &frame).map_err(Error::Protocol)?;
    frame.resize(header.frame_len(), 0);
    recv.read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(broke)?;
    Ok(Some(frame))
}

/// Writes one whole frame (header and payload, as the codec made it).
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<()> {
    send.write_all(frame).await.map_err(broke)
}
