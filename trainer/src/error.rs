//! Errors of the trainer crate. Messages carry the values that went wrong and, where a user can
//! fix the cause, what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid run config or model description (its schema lives in forge-protocol).
    #[error(transparent)]
    RunConfig(#[from] forge_protocol::ConfigError),

    #[error("invalid device '{spec}': {why}")]
    InvalidDevice { spec: String, why: String },

    #[error("config file {path}: {why}")]
    Config { path: PathBuf, why: String },

    #[error(
        "weights file {path} does not match the model: {why} \
         (was it written for another family or preset?)"
    )]
    WeightsMismatch { path: PathBuf, why: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("libtorch error while {context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },

    #[error("checkpoint {path}: {why}")]
    Checkpoint { path: PathBuf, why: String },

    #[error("[model] init_from {dir}: {why}")]
    InitFrom { dir: PathBuf, why: String },

    #[error("cannot export to {out}: {why}")]
    Export { out: PathBuf, why: String },

    #[error(
        "the global state served by peers does not fit this model: {0}; every node must build \
         its model from the coordinator's run config"
    )]
    StateMismatch(String),

    #[error("training diverged: {0}")]
    Diverged(String),

    #[error("invalid [train] settings: {0}")]
    InvalidTrainConfig(String),

    #[error("{0}")]
    Parallel(String),

    #[error("pipeline: {0}")]
    Pipeline(String),

    #[error("invalid benchmark settings: {0}")]
    InvalidBench(String),

    #[error("invalid [data] settings: {0}")]
    Data(String),

    #[error("corpus file {path}: {why}")]
    Corpus { path: PathBuf, why: String },

    #[error("tokenizer {source_name}: {why}")]
    Tokenizer { source_name: String, why: String },

    #[error("token cache {path}: {why}")]
    TokenCache { path: PathBuf, why: String },

    #[error(
        "token cache {path} was built with tokenizer {cached} but this run uses tokenizer {in_use}; \
         its token ids mean other words. Delete the file (it is rebuilt from the corpus) or use \
         the tokenizer it was built with"
    )]
    TokenizerMismatch {
        path: PathBuf,
        cached: String,
        in_use: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> Error {
        let context = context.into();
        move |source| Error::Torch { context, source }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
