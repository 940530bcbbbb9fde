//! Errors of the coordinator client: malformed cluster tokens, TLS setup and the control
//! connection.

use std::net::SocketAddr;

/// Everything that can go wrong in `forge-coordinator-client`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `shown` is the token with its secret masked: errors end up in logs and terminals.
    #[error(
        "cluster token {shown} is malformed ({reason}); pass the token `forge-coordinator serve` printed, SECRET.FINGERPRINT"
    )]
    BadToken { shown: String, reason: String },

    #[error("TLS setup failed: {0}")]
    Tls(String),

    #[error(
        "cannot open a UDP socket on {addr} for the control connection: {cause}; check that this machine allows outgoing UDP"
    )]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },

    #[error(
        "cannot connect to the coordinator at {addr}: {reason}; check that `forge-coordinator serve` runs there, that UDP port {port} is reachable, and that the token is from that coordinator",
        port = addr.port()
    )]
    Connect { addr: SocketAddr, reason: String },

    #[error("the coordinator at {addr} refused this client: {message}")]
    Refused {
        addr: SocketAddr,
        code: forge_protocol::ErrorCode,
        message: String,
    },

    #[error(
        "the join's peer id {claimed} is not the id of the key this node signs with ({key}); join with the peer id of your own key"
    )]
    IdentityMismatch { claimed: String, key: String },

    #[error("control stream broke: {reason}")]
    Stream { reason: String },

    #[error("control message: {0}")]
    Protocol(forge_protocol::Error),

    #[error("expected {expected} from the coordinator, got {got}")]
    UnexpectedMessage { expected: &'static str, got: String },

    #[error(
        "the coordinator client has stopped ({reason}); connect again with CoordinatorClient::connect"
    )]
    ClientStopped { reason: String },
}

/// Result alias used across `forge-coordinator-client`.
pub type Result<T> = std::result::Result<T, Error>;
