//! Trust without a certificate authority, the client's half: the cluster token that carries the
//! coordinator's certificate fingerprint, the verifier that pins that certificate, and the QUIC
//! client config. The coordinator's half (its self-signed certificate and server endpoint) lives
//! in `forge-coordinator`, and uses the fingerprint, server name and transport settings here.
//!
//! The token is `SECRET.FINGERPRINT`: 16 random bytes and the SHA-256 of the coordinator's
//! certificate (DER), both hex. A client pins the certificate by that fingerprint (so it needs no
//! CA and cannot be talked to by an impostor), then proves it belongs to the cluster by sending
//! the secret inside the encrypted connection ([`forge_protocol::session::Open`]).

use std::sync::Arc;
use std::time::Duration;

use forge_protocol::session::CONTROL_ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The receive buffer asked for on every control-plane UDP socket. At Linux's default (208 KiB)
/// a coordinator answering a burst of joins, or a client socket many connections share, drops
/// datagrams, and QUIC waits out a retransmission timeout for each (seconds, in a burst of a
/// thousand joins). The kernel caps it at `net.core.rmem_max`.
pub const UDP_RECV_BUFFER: usize = 4 << 20;

/// A QUIC endpoint on a UDP socket bound to `addr` with [`UDP_RECV_BUFFER`]: a server if
/// `server` is given, else a client.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        // Both families on an unspecified IPv6 address, as std's bind does not promise.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer only costs retransmissions.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    socket.bind(&addr.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC (quinn needs tokio)"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        runtime,
    )
}

/// The name in the certificate and the name clients ask for; only the fingerprint is checked.
pub const SERVER_NAME: &str = "forge-coordinator";

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A parsed cluster token, `SECRET.FINGERPRINT`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    pub(crate) secret: String,
    pub(crate) fingerprint: String,
}

impl ClusterToken {
    /// The token of a coordinator whose secret is `secret` (lowercase hex) and whose
    /// certificate is `cert_der`.
    pub fn for_certificate(secret: &str, cert_der: &[u8]) -> ClusterToken {
        ClusterToken {
            secret: secret.to_string(),
            fingerprint: fingerprint(cert_der),
        }
    }

    /// The secret half, which a client shows in its `Open`.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterToken")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.secret, self.fingerprint)
    }
}

impl std::str::FromStr for ClusterToken {
    type Err = Error;

    fn from_str(token: &str) -> Result<ClusterToken> {
        let bad = |reason: &str| Error::BadToken {
            shown: masked(token),
            reason: reason.to_string(),
        };
        let (secret, fingerprint) = token
            .trim()
            .split_once('.')
            .ok_or_else(|| bad("no `.` between the secret and the fingerprint"))?;
        let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
        if secret.is_empty() || !is_hex(secret) {
            return Err(bad("the secret must be hex digits"));
        }
        if fingerprint.len() != 64 || !is_hex(fingerprint) {
            return Err(bad("the fingerprint must be 64 hex digits (a SHA-256)"));
        }
        Ok(ClusterToken {
            secret: secret.to_ascii_lowercase(),
            fingerprint: fingerprint.to_ascii_lowercase(),
        })
    }
}

/// `token` as an error may show it: its length and at most its last 4 characters (enough to tell
/// which token it was, not enough to use it).
fn masked(token: &str) -> String {
    let chars: Vec<char> = token.trim().chars().collect();
    let tail: String = if chars.len() >= 16 {
        chars[chars.len() - 4..].iter().collect()
    } else {
        String::new()
    };
    format!("({} characters, ending \"…{tail}\")", chars.len())
}

/// The crypto provider of both sides: ring, so the build needs no cmake (aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(err: impl std::fmt::Display) -> Error {
    Error::Tls(err.to_string())
}

/// Transport settings shared by both sides: connections of a vanished peer end after
/// `idle_timeout`; keep-alives stop a healthy but quiet connection from idling out.
pub fn transport(
    idle_timeout: Duration,
    keep_alive: Duration,
) -> Result<Arc<quinn::TransportConfig>> {
    let mut transport = quinn::TransportConfig::default();
    // A control connection is one stream the client opens. Allowing the peer no more keeps a
    // client from opening others, and quinn from allocating state for 100 streams of each kind
    // per connection (6 KB; 6 MB of the coordinator's memory at 1,000 members). Control messages
    // are small: without segmentation offload a connection's transmit buffer holds one datagram
    // (~1.5 KB) rather than ten (12 MB at 1,000 members).
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().map_err(tls_error)?))
        .keep_alive_interval(Some(keep_alive))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .enable_segmentation_offload(false);
    Ok(Arc::new(transport))
}

/// A client config that trusts exactly the certificate whose fingerprint `token` carries.
pub fn client_config(token: &ClusterToken, idle_timeout: Duration) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinnedCertificate {
        fingerprint: token.fingerprint.clone(),
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(idle_timeout, idle_timeout / 3)?);
    Ok(config)
}

/// Accepts the server certificate only if its SHA-256 equals the token's fingerprint; the
/// handshake signatures are still verified, so the server must hold the matching private key.
#[derive(Debug)]
struct PinnedCertificate {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let found = fingerprint(end_entity);
        if found == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "the coordinator's certificate has fingerprint {found}, but the token pins {}; the token is from another coordinator (or its state directory was replaced): copy the token it prints now",
            self.fingerprint
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn token_round_trips_and_malformed_tokens_say_why() {
        let token = ClusterToken::for_certificate(SECRET, b"a certificate");
        assert_eq!(token.fingerprint, fingerprint(b"a certificate"));
        let parsed: ClusterToken = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        let shouted: ClusterToken = token.to_string().to_uppercase().parse().unwrap();
        assert_eq!(shouted, token);
        let err = "abc".parse::<ClusterToken>().unwrap_err().to_string();
        assert!(err.contains("no `.`"), "{err}");
        let err = format!("{SECRET}.1234")
            .parse::<ClusterToken>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        // A malformed token is not echoed: only its length and last characters.
        assert!(!err.contains(SECRET), "{err}");
        assert!(err.contains("(37 characters, ending \"…1234\")"), "{err}");
        let err = format!("not-hex.{}", token.fingerprint)
            .parse::<ClusterToken>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("secret must be hex"), "{err}");
        // The secret never appears in debug output.
        assert!(!format!("{token:?}").contains(SECRET));
    }

    #[test]
    fn the_verifier_accepts_only_the_pinned_certificate() {
        let pinned = b"the coordinator's certificate".to_vec();
        let verifier = PinnedCertificate {
            fingerprint: fingerprint(&pinned),
            provider: provider(),
        };
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let verify = |cert: &[u8]| {
            verifier.verify_server_cert(
                &CertificateDer::from(cert.to_vec()),
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
        };
        assert!(verify(&pinned).is_ok());
        let err = verify(b"an impostor's certificate")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&fingerprint(&pinned)), "{err}");
        assert!(
            err.contains(&fingerprint(b"an impostor's certificate")),
            "{err}"
        );
    }
}
