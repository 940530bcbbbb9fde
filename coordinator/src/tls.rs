//! Trust without a certificate authority: the coordinator's self-signed certificate, the cluster
//! token that carries its fingerprint, and the QUIC endpoint configs on both sides.
//!
//! The token is `SECRET.FINGERPRINT`: 16 random bytes and the SHA-256 of the coordinator's
//! certificate (DER), both hex. A client pins the certificate by that fingerprint (so it needs no
//! CA and cannot be talked to by an impostor), then proves it belongs to the cluster by sending
//! the secret inside the encrypted connection ([`forge_protocol::session::Open`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forge_protocol::session::CONTROL_ALPN;
use rand::RngCore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The name in the certificate and the name clients ask for; only the fingerprint is checked.
pub(crate) const SERVER_NAME: &str = "forge-coordinator";

/// The coordinator's long-lived identity, created at first start and kept in the state database.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) token_secret: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret and the key never reach a log.
        f.debug_struct("Identity")
            .field("fingerprint", &fingerprint(&self.cert_der))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh certificate and token secret from the OS random number generator.
    pub(crate) fn generate() -> Result<Identity> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(Error::Certificate)?;
        let mut secret = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        Ok(Identity {
            token_secret: hex::encode(secret),
            cert_der: certified.cert.der().to_vec(),
            key_der: certified.signing_key.serialize_der(),
        })
    }

    pub(crate) fn token(&self) -> ClusterToken {
        ClusterToken {
            secret: self.token_secret.clone(),
            fingerprint: fingerprint(&self.cert_der),
        }
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub(crate) fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A parsed cluster token, `SECRET.FINGERPRINT`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    pub(crate) secret: String,
    pub(crate) fingerprint: String,
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
            token: token.to_string(),
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

/// Compares token secrets through their hashes, so the time taken says nothing about how many
/// leading characters a guess got right.
pub(crate) fn secret_matches(expected: &str, given: &str) -> bool {
    Sha256::digest(expected.as_bytes()) == Sha256::digest(given.to_ascii_lowercase().as_bytes())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(err: impl std::fmt::Display) -> Error {
    Error::Tls(err.to_string())
}

/// Transport settings shared by both sides: connections of a vanished peer end after
/// `idle_timeout`; keep-alives stop a healthy but quiet connection from idling out.
fn transport(idle_timeout: Duration, keep_alive: Duration) -> Result<Arc<quinn::TransportConfig>> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().map_err(tls_error)?))
        .keep_alive_interval(Some(keep_alive));
    Ok(Arc::new(transport))
}

/// The coordinator's QUIC endpoint, bound to `listen`.
pub(crate) fn server_endpoint(
    listen: SocketAddr,
    identity: &Identity,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(identity.cert_der.clone())], key)
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(idle_timeout, idle_timeout / 3)?);
    quinn::Endpoint::server(config, listen).map_err(|cause| Error::Listen {
        addr: listen,
        cause,
    })
}

/// A client config that trusts exactly the certificate whose fingerprint `token` carries.
pub(crate) fn client_config(
    token: &ClusterToken,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig> {
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

    #[test]
    fn token_round_trips_and_malformed_tokens_say_why() {
        let identity = Identity::generate().unwrap();
        let token = identity.token();
        assert_eq!(token.secret.len(), 32);
        let parsed: ClusterToken = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        let err = "abc".parse::<ClusterToken>().unwrap_err().to_string();
        assert!(err.contains("no `.`"), "{err}");
        let err = format!("{}.1234", token.secret)
            .parse::<ClusterToken>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        // The secret never appears in debug output.
        assert!(!format!("{token:?} {identity:?}").contains(&token.secret));
    }

    #[test]
    fn two_identities_differ_and_secrets_compare_case_insensitively() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        assert_ne!(a.token_secret, b.token_secret);
        assert_ne!(fingerprint(&a.cert_der), fingerprint(&b.cert_der));
        assert!(secret_matches(
            &a.token_secret,
            &a.token_secret.to_uppercase()
        ));
        assert!(!secret_matches(&a.token_secret, &b.token_secret));
        assert!(!secret_matches(&a.token_secret, ""));
    }
}
