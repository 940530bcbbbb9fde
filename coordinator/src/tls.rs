//! Trust without a certificate authority, the coordinator's half: its self-signed certificate
//! and token secret, the server endpoint, and the check of the secret a client sends. The token,
//! the fingerprint and the client's pinning verifier are in `forge-coordinator-client`'s `tls`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forge_coordinator_client::ClusterToken;
use forge_coordinator_client::tls::{SERVER_NAME, fingerprint, provider, transport};
use forge_protocol::session::CONTROL_ALPN;
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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
        ClusterToken::for_certificate(&self.token_secret, &self.cert_der)
    }
}

/// Compares token secrets through their hashes, so the time taken says nothing about how many
/// leading characters a guess got right.
pub(crate) fn secret_matches(expected: &str, given: &str) -> bool {
    Sha256::digest(expected.as_bytes()) == Sha256::digest(given.to_ascii_lowercase().as_bytes())
}

fn tls_error(err: impl std::fmt::Display) -> Error {
    Error::Tls(err.to_string())
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
    forge_coordinator_client::tls::endpoint(listen, Some(config)).map_err(|cause| Error::Listen {
        addr: listen,
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_makes_a_token_that_parses_back_and_hides_its_secret() {
        let identity = Identity::generate().unwrap();
        assert_eq!(identity.token_secret.len(), 32);
        let token = identity.token();
        let text = token.to_string();
        assert_eq!(
            text,
            format!(
                "{}.{}",
                identity.token_secret,
                fingerprint(&identity.cert_der)
            )
        );
        let parsed: ClusterToken = text.parse().unwrap();
        assert_eq!(parsed, token);
        // The secret never appears in debug output.
        assert!(!format!("{token:?} {identity:?}").contains(&identity.token_secret));
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
