//! Errors of the coordinator library: invalid configs, profiles and node files.

use std::path::PathBuf;

/// Everything that can go wrong in `forge-coordinator`'s library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown model preset {name:?}; use one of {known}, or a path ending in .toml")]
    UnknownPreset { name: String, known: String },

    #[error("model profile {name:?} is invalid: {reason}")]
    InvalidProfile { name: String, reason: String },

    #[error("node {name:?} is invalid: {reason}")]
    InvalidNode { name: String, reason: String },

    #[error("coordinator config is invalid: {reason}")]
    InvalidConfig { reason: String },

    #[error("coordinator snapshot: {0}")]
    Snapshot(forge_protocol::Error),

    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path} is not valid TOML for this file: {cause}")]
    Toml {
        path: PathBuf,
        cause: toml::de::Error,
    },
}

/// Result alias used across `forge-coordinator`.
pub type Result<T> = std::result::Result<T, Error>;
