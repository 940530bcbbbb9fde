//! The one module that turns values into bytes and back: frame header, size limits, bincode, zstd.
//!
//! A frame is a 16-byte header followed by the payload:
//!
//! | bytes  | field                                                        |
//! |--------|--------------------------------------------------------------|
//! | 0..4   | magic, one per [`Channel`]                                   |
//! | 4..6   | format version, u16 little-endian ([`FORMAT_VERSION`])       |
//! | 6      | flags: bit 0 = payload is zstd-compressed; other bits zero   |
//! | 7      | reserved, zero                                               |
//! | 8..12  | payload length in bytes, u32 little-endian                   |
//! | 12..16 | decoded (uncompressed) payload length, u32 little-endian     |
//!
//! Both lengths are checked against the channel's limits before anything is allocated, and the
//! zstd decoder is cut off at the declared decoded length, so a hostile peer cannot make us
//! allocate more than the limits. Stored blobs (coordinator snapshots) use the same format.

use std::io::Read;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Version of the frame layout and of the bincode encoding inside it.
pub const FORMAT_VERSION: u16 = 1;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 16;

/// Payloads at least this large are zstd-compressed when that makes them smaller.
pub const COMPRESS_THRESHOLD: usize = 4 * 1024;

const FLAG_ZSTD: u8 = 0b0000_0001;
const ZSTD_LEVEL: i32 = 3;

const CONTROL_MAX_PAYLOAD: u32 = 4 << 20;
const CONTROL_MAX_DECODED: usize = 16 << 20;
const SYNC_MAX_PAYLOAD: u32 = 64 << 10;
const SYNC_MAX_DECODED: usize = 64 << 10;
const SNAPSHOT_MAX_PAYLOAD: u32 = 256 << 20;
const SNAPSHOT_MAX_DECODED: usize = 1 << 30;
const STATE_MAX_PAYLOAD: u32 = 4 << 20;
const STATE_MAX_DECODED: usize = 16 << 20;
const PIPELINE_MAX_PAYLOAD: u32 = 4 << 10;
const PIPELINE_MAX_DECODED: usize = 4 << 10;

/// What a frame carries; each channel has its own magic and size limits, so a frame sent on the
/// wrong stream is rejected at the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Node ↔ coordinator control messages.
    Control,
    /// Headers of peer-to-peer DiLoCo sync chunks (the chunk bytes follow the frame raw).
    Sync,
    /// Stored blobs such as the coordinator's state snapshot.
    Snapshot,
    /// Requests and answers of the peer-to-peer state transfer to joining nodes (tensor bytes
    /// follow a chunk answer's frame raw).
    State,
    /// Headers of the messages between pipeline stages (the tensor bytes follow raw).
    Pipeline,
}

impl Channel {
    /// The 4-byte magic that starts every frame of this channel.
    pub const fn magic(self) -> [u8; 4] {
        match self {
            Channel::Control => *b"FGCT",
            Channel::Sync => *b"FGSY",
            Channel::Snapshot => *b"FGSN",
            Channel::State => *b"FGST",
            Channel::Pipeline => *b"FGPL",
        }
    }

    /// Largest payload (as sent, possibly compressed) accepted on this channel.
    pub const fn max_payload_bytes(self) -> u32 {
        match self {
            Channel::Control => CONTROL_MAX_PAYLOAD,
            Channel::Sync => SYNC_MAX_PAYLOAD,
            Channel::Snapshot => SNAPSHOT_MAX_PAYLOAD,
            Channel::State => STATE_MAX_PAYLOAD,
            Channel::Pipeline => PIPELINE_MAX_PAYLOAD,
        }
    }

    /// Largest decoded payload accepted on this channel; also bincode's allocation budget.
    pub const fn max_decoded_bytes(self) -> usize {
        match self {
            Channel::Control => CONTROL_MAX_DECODED,
            Channel::Sync => SYNC_MAX_DECODED,
            Channel::Snapshot => SNAPSHOT_MAX_DECODED,
            Channel::State => STATE_MAX_DECODED,
            Channel::Pipeline => PIPELINE_MAX_DECODED,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Sync => "sync",
            Channel::Snapshot => "snapshot",
            Channel::State => "state",
            Channel::Pipeline => "pipeline",
        }
    }
}

/// A validated frame header: the lengths are within the channel's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub channel: Channel,
    pub compressed: bool,
    pub payload_len: u32,
    pub decoded_len: u32,
}

impl FrameHeader {
    /// Header plus payload: how many bytes the whole frame occupies.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.channel.magic());
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6] = if self.compressed { FLAG_ZSTD } else { 0 };
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.decoded_len.to_le_bytes());
        out
    }
}

/// Serializes `value` into one frame for `channel`, compressing large payloads.
pub fn encode<T: Serialize>(channel: Channel, value: &T) -> Result<Vec<u8>> {
    let what = std::any::type_name::<T>();
    let raw = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|cause| Error::Encode { what, cause })?;
    if raw.len() > channel.max_decoded_bytes() {
        return Err(too_large(channel, raw.len(), channel.max_decoded_bytes()));
    }
    let decoded_len = raw.len() as u32;
    let (compressed, payload) = if raw.len() >= COMPRESS_THRESHOLD {
        // Compressing from an in-memory slice cannot fail except on allocation failure.
        let packed = zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(Error::Zstd)?;
        if packed.len() < raw.len() {
            (true, packed)
        } else {
            (false, raw)
        }
    } else {
        (false, raw)
    };
    if payload.len() > channel.max_payload_bytes() as usize {
        return Err(too_large(
            channel,
            payload.len(),
            channel.max_payload_bytes() as usize,
        ));
    }
    let header = FrameHeader {
        channel,
        compressed,
        payload_len: payload.len() as u32,
        decoded_len,
    };
    let mut frame = Vec::with_capacity(header.frame_len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Validates the header at the start of `bytes` (which may hold more than the header).
///
/// Use it on a stream: read [`HEADER_LEN`] bytes, parse, then read exactly `payload_len` more.
pub fn parse_header(channel: Channel, bytes: &[u8]) -> Result<FrameHeader> {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Err(Error::Truncated {
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    };
    let field = |range: std::ops::Range<usize>| -> [u8; 4] {
        let mut out = [0u8; 4];
        out.copy_from_slice(&head[range]);
        out
    };
    let magic = field(0..4);
    if magic != channel.magic() {
        return Err(Error::BadMagic {
            kind: channel.name(),
            expected: channel.magic(),
            found: magic,
        });
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = head[6];
    if flags & !FLAG_ZSTD != 0 || head[7] != 0 {
        return Err(Error::UnknownFlags {
            flags: flags | head[7],
        });
    }
    let payload_len = u32::from_le_bytes(field(8..12));
    let decoded_len = u32::from_le_bytes(field(12..16));
    if payload_len > channel.max_payload_bytes() {
        return Err(too_large(
            channel,
            payload_len as usize,
            channel.max_payload_bytes() as usize,
        ));
    }
    if decoded_len as usize > channel.max_decoded_bytes() {
        return Err(too_large(
            channel,
            decoded_len as usize,
            channel.max_decoded_bytes(),
        ));
    }
    let compressed = flags & FLAG_ZSTD != 0;
    if !compressed && payload_len != decoded_len {
        return Err(Error::SizeFieldMismatch {
            declared: decoded_len.into(),
            payload: payload_len.into(),
        });
    }
    Ok(FrameHeader {
        channel,
        compressed,
        payload_len,
        decoded_len,
    })
}

/// For a stream buffer: `Ok(None)` while the header is incomplete, else the full frame length
/// (the caller waits until that many bytes are buffered, then calls [`decode`]).
pub fn next_frame_len(channel: Channel, buffered: &[u8]) -> Result<Option<usize>> {
    if buffered.len() < HEADER_LEN {
        return Ok(None);
    }
    parse_header(channel, buffered).map(|header| Some(header.frame_len()))
}

/// Decodes exactly one whole frame; trailing bytes after the declared payload are an error.
pub fn decode<T: DeserializeOwned>(channel: Channel, frame: &[u8]) -> Result<T> {
    let header = parse_header(channel, frame)?;
    decode_payload(&header, &frame[HEADER_LEN..])
}

/// Decodes the payload that follows an already parsed header.
pub fn decode_payload<T: DeserializeOwned>(header: &FrameHeader, payload: &[u8]) -> Result<T> {
    if payload.len() as u64 != u64::from(header.payload_len) {
        return Err(Error::LengthMismatch {
            declared: header.payload_len.into(),
            actual: payload.len() as u64,
        });
    }
    let inflated;
    let raw = if header.compressed {
        inflated = inflate(payload, header.decoded_len)?;
        &inflated[..]
    } else {
        payload
    };
    match header.channel {
        Channel::Control => from_bincode::<T, CONTROL_MAX_DECODED>(raw),
        Channel::Sync => from_bincode::<T, SYNC_MAX_DECODED>(raw),
        Channel::Snapshot => from_bincode::<T, SNAPSHOT_MAX_DECODED>(raw),
        Channel::State => from_bincode::<T, STATE_MAX_DECODED>(raw),
        Channel::Pipeline => from_bincode::<T, PIPELINE_MAX_DECODED>(raw),
    }
}

/// Inflates at most `declared` bytes; the output grows with what zstd really produces, so a
/// header that lies about the size costs nothing up front.
fn inflate(payload: &[u8], declared: u32) -> Result<Vec<u8>> {
    let decoder = zstd::stream::read::Decoder::with_buffer(payload).map_err(Error::Zstd)?;
    let mut out = Vec::new();
    decoder
        .take(u64::from(declared) + 1)
        .read_to_end(&mut out)
        .map_err(Error::Zstd)?;
    if out.len() as u64 != u64::from(declared) {
        return Err(Error::DecompressedSize {
            declared: declared.into(),
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

fn from_bincode<T: DeserializeOwned, const LIMIT: usize>(raw: &[u8]) -> Result<T> {
    let what = std::any::type_name::<T>();
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(raw, config)
        .map_err(|cause| Error::Decode { what, cause })?;
    if used != raw.len() {
        return Err(Error::TrailingBytes {
            what,
            used,
            len: raw.len(),
        });
    }
    Ok(value)
}

fn too_large(channel: Channel, len: usize, max: usize) -> Error {
    Error::PayloadTooLarge {
        kind: channel.name(),
        len: len as u64,
        max: max as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Blob {
        name: String,
        values: Vec<u32>,
    }

    fn blob(len: usize) -> Blob {
        Blob {
            name: "pseudo_grad".to_string(),
            values: (0..len as u32).map(|i| i % 7).collect(),
        }
    }

    #[test]
    fn small_payload_round_trips_uncompressed() {
        let frame = encode(Channel::Control, &blob(10)).unwrap();
        let header = parse_header(Channel::Control, &frame).unwrap();
        assert!(!header.compressed);
        assert_eq!(header.frame_len(), frame.len());
        assert_eq!(decode::<Blob>(Channel::Control, &frame).unwrap(), blob(10));
    }

    #[test]
    fn large_payload_is_compressed_and_round_trips() {
        let frame = encode(Channel::Snapshot, &blob(100_000)).unwrap();
        let header = parse_header(Channel::Snapshot, &frame).unwrap();
        assert!(header.compressed);
        assert!(header.payload_len < header.decoded_len);
        assert_eq!(
            decode::<Blob>(Channel::Snapshot, &frame).unwrap(),
            blob(100_000)
        );
    }

    #[test]
    fn frame_for_another_channel_is_rejected_at_the_magic() {
        let frame = encode(Channel::Control, &blob(3)).unwrap();
        let err = decode::<Blob>(Channel::Sync, &frame).unwrap_err();
        assert!(matches!(err, Error::BadMagic { kind: "sync", .. }), "{err}");
    }

    #[test]
    fn newer_format_version_is_refused_with_both_versions() {
        let mut frame = encode(Channel::Control, &blob(3)).unwrap();
        frame[4..6].copy_from_slice(&7u16.to_le_bytes());
        let err = decode::<Blob>(Channel::Control, &frame).unwrap_err();
        assert!(matches!(
            err,
            Error::UnsupportedFormat {
                found: 7,
                supported: FORMAT_VERSION
            }
        ));
        assert!(err.to_string().contains("version 7"), "{err}");
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut header = encode(Channel::Control, &blob(3)).unwrap()[..HEADER_LEN].to_vec();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        header[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the 16 header bytes exist: the limit must be checked before any payload is read.
        let err = next_frame_len(Channel::Control, &header).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    }

    #[test]
    fn zstd_bomb_is_cut_off_at_the_declared_size() {
        let zeros = vec![0u8; 1 << 20];
        let packed = zstd::bulk::compress(&zeros, 3).unwrap();
        let header = FrameHeader {
            channel: Channel::Control,
            compressed: true,
            payload_len: packed.len() as u32,
            decoded_len: 1024,
        };
        let err = decode_payload::<Vec<u8>>(&header, &packed).unwrap_err();
        assert!(
            matches!(
                err,
                Error::DecompressedSize {
                    declared: 1024,
                    actual: 1025
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn stream_helper_waits_for_a_whole_header() {
        let frame = encode(Channel::Control, &blob(5)).unwrap();
        assert_eq!(
            next_frame_len(Channel::Control, &frame[..HEADER_LEN - 1]).unwrap(),
            None
        );
        assert_eq!(
            next_frame_len(Channel::Control, &frame[..HEADER_LEN]).unwrap(),
            Some(frame.len())
        );
    }

    #[test]
    fn trailing_and_missing_bytes_are_errors() {
        let mut frame = encode(Channel::Control, &blob(5)).unwrap();
        let short = &frame[..frame.len() - 1];
        assert!(matches!(
            decode::<Blob>(Channel::Control, short),
            Err(Error::LengthMismatch { .. })
        ));
        frame.push(0);
        assert!(matches!(
            decode::<Blob>(Channel::Control, &frame),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn bincode_length_prefix_larger_than_the_limit_is_refused_without_allocating() {
        // A Vec<u8> whose varint length prefix claims u64::MAX elements: the bincode limit
        // refuses it before allocating.
        let mut payload = vec![253u8];
        payload.extend_from_slice(&u64::MAX.to_le_bytes());
        let header = FrameHeader {
            channel: Channel::Control,
            compressed: false,
            payload_len: payload.len() as u32,
            decoded_len: payload.len() as u32,
        };
        let err = decode_payload::<Vec<u8>>(&header, &payload).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
    }
}
