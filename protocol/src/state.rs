//! Wire types of the peer-to-peer state transfer (`/forge/state/1`): how a node that joins
//! mid-run (or missed a commit) asks a member for the committed DiLoCo state, and the answers.
//!
//! The fetcher opens one stream per serving peer and keeps it for all its requests to that
//! peer; it may send the next request before the previous answer has arrived, and the server
//! answers in order, one request at a time. Requests and answers are
//! [`Channel::State`](crate::codec::Channel::State) frames; a reader takes the first
//! [`HEADER_LEN`](crate::codec::HEADER_LEN) bytes, gets the frame's length from [`frame_len`]
//! (which checks the channel's limits before anything is allocated), reads the rest and
//! decodes it with [`Request::from_frame`] or [`Response::from_frame`].
//!
//! - [`Request::Manifest`] `{ version }` is answered with [`Response::Manifest`] (version,
//!   round, step, tokens, and each tensor's key and length in values, in the server's order),
//!   or with [`Response::OtherVersion`] `{ held }` when the server holds another version (or
//!   none).
//! - [`Request::Chunk`] `{ version, tensor, offset, values }`, at most [`CHUNK_VALUES`] values
//!   (4 MiB) of the tensor at that index of the manifest, is answered with [`Response::Chunk`]
//!   echoing the request and followed by exactly `4 * values` raw bytes, the values as f32
//!   little-endian; or with `OtherVersion` (the server has published another version since), or
//!   with [`Response::Refused`] for a request outside the manifest.
//!
//! A fetcher checks each fetched tensor against the coordinator's committed
//! [`tensor_digest`](crate::digest::tensor_digest) before it uses anything.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::{Error, Result};
use crate::messages::TensorKey;

/// Protocol id of the state-transfer stream, in the libp2p style.
pub const STATE_PROTOCOL: &str = "/forge/state/1";

/// Most values one chunk request may ask for: 4 MiB of f32.
pub const CHUNK_VALUES: usize = 1 << 20;

/// Largest state a manifest may describe (4 TiB of f32); a bigger one is a broken peer.
pub const MAX_STATE_VALUES: u64 = 1 << 40;

/// What a fetcher asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Manifest {
        version: u64,
    },
    Chunk {
        version: u64,
        /// Index into the manifest's tensors.
        tensor: u32,
        /// First value, within the tensor.
        offset: u64,
        values: u32,
    },
}

/// What a state is made of, without the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Global state version (the coordinator's `GlobalState.version`).
    pub version: u64,
    /// The round that produced it.
    pub round: u64,
    /// The run's schedule position (inner steps).
    pub step: u64,
    pub tokens: u64,
    /// Key and length in values of each tensor, in the server's order.
    pub tensors: Vec<(TensorKey, u64)>,
}

/// A server's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Manifest(Manifest),
    /// The server holds another version (`None`: it publishes no state).
    OtherVersion {
        held: Option<u64>,
    },
    /// Echoes the request; exactly `4 * values` raw bytes follow the frame.
    Chunk {
        version: u64,
        tensor: u32,
        offset: u64,
        values: u32,
    },
    /// The request does not fit the manifest.
    Refused {
        reason: String,
    },
}

/// The length of the whole state frame (header included) that starts with `header`, its first
/// [`HEADER_LEN`](crate::codec::HEADER_LEN) bytes; the channel's limits are checked here, before
/// the caller allocates the frame.
pub fn frame_len(header: &[u8]) -> Result<usize> {
    codec::parse_header(Channel::State, header).map(|header| header.frame_len())
}

impl Request {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::State, self)
    }

    /// Decodes a request frame. A chunk request that does not fit the served state is not an
    /// error here: the server answers it with [`Response::Refused`].
    pub fn from_frame(frame: &[u8]) -> Result<Request> {
        codec::decode(Channel::State, frame)
    }
}

impl Response {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::State, self)
    }

    /// Decodes and checks an answer frame: a manifest within the limits, a chunk no larger than
    /// a request may ask for.
    pub fn from_frame(frame: &[u8]) -> Result<Response> {
        let response: Response = codec::decode(Channel::State, frame)?;
        match &response {
            Response::Manifest(manifest) => manifest.check()?,
            Response::Chunk { values, .. } if *values as usize > CHUNK_VALUES => {
                return Err(invalid(format!(
                    "a chunk of {values} values, more than the {CHUNK_VALUES} a request may ask for"
                )));
            }
            _ => {}
        }
        Ok(response)
    }

    /// What kind of answer this is, for messages about unexpected ones.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Manifest(_) => "a manifest",
            Response::OtherVersion { .. } => "another version",
            Response::Chunk { .. } => "a chunk",
            Response::Refused { .. } => "a refusal",
        }
    }
}

impl Manifest {
    /// Every tensor listed once, and no more values in all than [`MAX_STATE_VALUES`], so a
    /// fetcher may plan (and allocate) the transfer the manifest describes.
    pub fn check(&self) -> Result<()> {
        let mut keys = HashSet::with_capacity(self.tensors.len());
        let mut total = 0u64;
        for (key, len) in &self.tensors {
            if !keys.insert(key) {
                return Err(invalid(format!(
                    "a manifest that lists tensor `{key}` twice"
                )));
            }
            total = total.saturating_add(*len);
        }
        if total > MAX_STATE_VALUES {
            return Err(invalid(format!(
                "a manifest of {total} values, more than the {MAX_STATE_VALUES} a state may hold"
            )));
        }
        Ok(())
    }
}

fn invalid(what: String) -> Error {
    Error::InvalidStateAnswer { what }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::HEADER_LEN;

    fn manifest(tensors: Vec<(TensorKey, u64)>) -> Manifest {
        Manifest {
            version: 3,
            round: 4,
            step: 500,
            tokens: 64_000,
            tensors,
        }
    }

    fn param(name: &str) -> TensorKey {
        TensorKey::Param(name.to_string())
    }

    #[test]
    fn requests_and_answers_round_trip_on_the_state_channel() {
        let request = Request::Chunk {
            version: 7,
            tensor: 3,
            offset: 1 << 20,
            values: 12,
        };
        let frame = request.to_frame().unwrap();
        assert_eq!(&frame[..4], b"FGST");
        assert_eq!(frame_len(&frame[..HEADER_LEN]).unwrap(), frame.len());
        assert_eq!(Request::from_frame(&frame).unwrap(), request);
        // A sync frame is refused at the magic.
        assert!(codec::decode::<Request>(Channel::Sync, &frame).is_err());

        let answer = Response::Manifest(manifest(vec![
            (param("w"), 10),
            (TensorKey::Momentum("w".to_string()), 10),
        ]));
        let frame = answer.to_frame().unwrap();
        assert_eq!(Response::from_frame(&frame).unwrap(), answer);
    }

    #[test]
    fn a_frame_too_large_for_the_channel_is_refused_from_its_header() {
        let mut header =
            Request::Manifest { version: 1 }.to_frame().unwrap()[..HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = frame_len(&header).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    }

    #[test]
    fn a_manifest_listing_a_tensor_twice_or_too_many_values_is_refused() {
        let twice = Response::Manifest(manifest(vec![(param("a"), 4), (param("a"), 4)]));
        let err = Response::from_frame(&twice.to_frame().unwrap()).unwrap_err();
        assert!(err.to_string().contains("`a` twice"), "{err}");

        // The same name as a parameter and as its momentum is two tensors.
        let both = manifest(vec![(param("a"), 4), (TensorKey::Momentum("a".into()), 4)]);
        assert!(both.check().is_ok());

        let huge = manifest(vec![(param("a"), MAX_STATE_VALUES), (param("b"), 1)]);
        let err = Response::from_frame(&Response::Manifest(huge).to_frame().unwrap()).unwrap_err();
        assert!(err.to_string().contains("more than the"), "{err}");
        let overflow = manifest(vec![(param("a"), u64::MAX), (param("b"), u64::MAX)]);
        assert!(overflow.check().is_err());
    }

    #[test]
    fn a_chunk_answer_larger_than_a_request_may_ask_is_refused() {
        let chunk = |values: u32| Response::Chunk {
            version: 1,
            tensor: 0,
            offset: 0,
            values,
        };
        let ok = chunk(CHUNK_VALUES as u32);
        assert_eq!(Response::from_frame(&ok.to_frame().unwrap()).unwrap(), ok);
        let big = chunk(CHUNK_VALUES as u32 + 1);
        assert!(Response::from_frame(&big.to_frame().unwrap()).is_err());
        // Requests are not refused here: the server answers an oversized one with Refused.
        let request = Request::Chunk {
            version: 1,
            tensor: 0,
            offset: 0,
            values: u32::MAX,
        };
        assert!(Request::from_frame(&request.to_frame().unwrap()).is_ok());
    }
}
