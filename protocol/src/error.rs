//! Errors raised while framing, encoding or decoding protocol messages.

/// Everything that can go wrong in `forge-protocol`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "frame has {got} bytes but its header needs {needed}; the peer closed mid-frame or the data is truncated"
    )]
    Truncated { needed: usize, got: usize },

    #[error(
        "frame magic is {found:02x?}, expected {expected:02x?} ({kind}); the peer is not speaking this Forge channel or the data is corrupt"
    )]
    BadMagic {
        kind: &'static str,
        expected: [u8; 4],
        found: [u8; 4],
    },

    #[error(
        "frame format version {found} is not supported (this build reads version {supported}); run the same Forge release on every machine"
    )]
    UnsupportedFormat { found: u16, supported: u16 },

    #[error("frame header has unknown flag bits {flags:#04x}; the peer runs a newer Forge release")]
    UnknownFlags { flags: u8 },

    #[error(
        "frame payload of {len} bytes exceeds the {max}-byte limit for {kind} frames; the peer is misbehaving or the limit is too small"
    )]
    PayloadTooLarge {
        kind: &'static str,
        len: u64,
        max: u64,
    },

    #[error("frame declares {declared} payload bytes but {actual} follow the header")]
    LengthMismatch { declared: u64, actual: u64 },

    #[error("uncompressed frame declares a decoded size of {declared} but carries {payload} bytes")]
    SizeFieldMismatch { declared: u64, payload: u64 },

    #[error("zstd payload inflates to {actual} bytes, header promised {declared}")]
    DecompressedSize { declared: u64, actual: u64 },

    #[error("zstd payload is corrupt: {0}")]
    Zstd(std::io::Error),

    #[error("cannot encode {what}: {cause}")]
    Encode {
        what: &'static str,
        cause: bincode::error::EncodeError,
    },

    #[error("cannot decode {what}: {cause}")]
    Decode {
        what: &'static str,
        cause: bincode::error::DecodeError,
    },

    #[error(
        "{what} decoded from {used} of {len} payload bytes; the trailing bytes mean the peer uses a different message layout"
    )]
    TrailingBytes {
        what: &'static str,
        used: usize,
        len: usize,
    },

    #[error("invalid sync chunk header: {reason}; the sending peer is misbehaving")]
    InvalidSyncHeader { reason: String },

    #[error("invalid pipeline message header: {reason}; the neighbouring stage is misbehaving")]
    InvalidStageHeader { reason: String },

    #[error(
        "invalid state-transfer answer: the serving peer sent {what}; it is misbehaving, fetch from other members"
    )]
    InvalidStateAnswer { what: String },

    #[error(
        "incompatible peer: it speaks protocol version {theirs} (forge {their_software}), this process speaks {ours} (forge {our_software}); install the same Forge release on every machine"
    )]
    IncompatibleVersion {
        ours: u16,
        theirs: u16,
        our_software: String,
        their_software: String,
    },

    #[error("invalid compression setting: {reason}")]
    InvalidCompression { reason: String },

    #[error(
        "value {value} at index {index} is not finite; refusing to encode a poisoned update (the local training diverged: lower the learning rate or check the data)"
    )]
    NonFinite { index: usize, value: f32 },

    #[error(
        "value {value} at index {index} is too large for {codec}: it would overflow to infinity"
    )]
    OutOfRange {
        index: usize,
        value: f32,
        codec: &'static str,
    },

    #[error("{len} values do not fit one encoded tensor (at most {max}); encode it in chunks")]
    TooManyValues { len: usize, max: usize },

    #[error(
        "encoded tensor uses {found} but this node expects {expected}; every node must run with the same [diloco] compression"
    )]
    CodecMismatch { expected: String, found: String },

    #[error(
        "encoded tensor holds {found} values but {expected} were expected; sender and receiver disagree on the chunk layout"
    )]
    ValueCountMismatch { expected: usize, found: u64 },

    #[error("encoded tensor is corrupt: {reason}; the sending peer is misbehaving")]
    CorruptTensor { reason: String },
}

/// Result alias used across `forge-protocol`.
pub type Result<T> = std::result::Result<T, Error>;
