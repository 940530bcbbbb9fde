//! Errors of the coordinator library: invalid configs, profiles and node files, the state
//! database, the server's TLS and endpoint, and (wrapped) the shared client crate's errors.

use std::net::SocketAddr;
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

    #[error("{0}")]
    Http(String),

    #[error("coordinator snapshot: {0}")]
    Snapshot(forge_protocol::Error),

    #[error(
        "the coordinator snapshot in the state directory does not decode ({0}): it is damaged, or another Forge build wrote it (the format follows the protocol version); run the build that wrote it, or start a new run with an empty --state-dir"
    )]
    SnapshotDecode(forge_protocol::Error),

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

    /// A run config the shared schema refuses (it names the file and the key).
    #[error(transparent)]
    InvalidRunConfig(forge_protocol::ConfigError),

    #[error("[coordinator] table of {path}: {reason}")]
    RunConfig { path: PathBuf, reason: String },

    #[error("cannot create the state directory {path}: {cause}")]
    StateDir {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("state database {path}: {cause}{hint}")]
    Store {
        path: PathBuf,
        /// Boxed: redb's error is large and would bloat every `Result` of the crate.
        cause: Box<redb::Error>,
        hint: &'static str,
    },

    #[error(
        "state database {path} holds a damaged {what}: {cause}; restore the state directory from a backup or start a new run with an empty --state-dir"
    )]
    CorruptStore {
        path: PathBuf,
        what: &'static str,
        cause: String,
    },

    #[error("cannot generate the coordinator's TLS certificate: {0}")]
    Certificate(rcgen::Error),

    #[error("TLS setup failed: {0}")]
    Tls(String),

    #[error("cannot listen on {addr}: {cause}; pick another --listen address or port")]
    Listen {
        addr: SocketAddr,
        cause: std::io::Error,
    },

    /// Token, transport settings and control frames, shared with the client.
    #[error(transparent)]
    Client(#[from] forge_coordinator_client::Error),
}

impl Error {
    pub(crate) fn store(path: &std::path::Path, cause: impl Into<redb::Error>) -> Error {
        let cause = cause.into();
        let hint = if matches!(cause, redb::Error::DatabaseAlreadyOpen) {
            "; another forge-coordinator is running on this state directory"
        } else {
            ""
        };
        Error::Store {
            path: path.to_path_buf(),
            cause: Box::new(cause),
            hint,
        }
    }
}

/// Result alias used across `forge-coordinator`.
pub type Result<T> = std::result::Result<T, Error>;
