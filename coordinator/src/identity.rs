//! Peer identities: the check a join's peer id must pass, the proof that a joiner holds its key,
//! and stable keys for simulated members.

use forge_protocol::session::{IDENTITY_CHALLENGE_LEN, IdentityProof, identity_proof_message};
use forge_protocol::{Capabilities, Device, DeviceKind};
use libp2p_identity::{Keypair, PeerId, PublicKey};
use sha2::{Digest, Sha256};

/// Why `peer_id` is not a libp2p peer id (base-58 multihash of a public key), if it is not:
/// every node dials and admits its peers by that id, so one that does not parse would be
/// unreachable for every other member.
pub fn check_peer_id(peer_id: &str) -> Result<(), String> {
    peer_id.parse::<PeerId>().map(|_| ()).map_err(|e| {
        let shown: String = peer_id.chars().take(64).collect();
        format!(
            "the peer id {shown:?} is not a libp2p peer id ({e}); forge-node sends the id of the \
             ed25519 key in its --workdir"
        )
    })
}

/// The peer id whose key signed `proof` on the connection whose join challenge is `challenge`,
/// or why the proof does not hold.
pub fn verify_proof(
    proof: &IdentityProof,
    challenge: &[u8; IDENTITY_CHALLENGE_LEN],
) -> Result<PeerId, String> {
    let key = PublicKey::try_decode_protobuf(&proof.public_key)
        .map_err(|e| format!("its public key does not decode ({e})"))?;
    if !key.verify(&identity_proof_message(challenge), &proof.signature) {
        return Err(format!(
            "its signature does not verify with the key of {} on this connection (a proof \
             made for another connection, or by another key)",
            key.to_peer_id()
        ));
    }
    Ok(key.to_peer_id())
}

/// The ed25519 key that stands for `name` (the same one every time), for simulated members and
/// tests.
pub fn named_keypair(name: &str) -> Keypair {
    let seed: [u8; 32] = Sha256::digest(format!("forge simulated member {name}")).into();
    Keypair::ed25519_from_bytes(seed).expect("any 32 bytes are an ed25519 secret key")
}

/// What a simulated member (`sim-member`, the heartbeat benchmark, tests) says it brings: one
/// 8 GiB CPU, a 1 Gbit/s link, no listen address.
pub fn simulated_capabilities(peer_id: String) -> Capabilities {
    Capabilities {
        devices: vec![Device {
            kind: DeviceKind::Cpu,
            name: "simulated CPU".to_string(),
            memory_bytes: 8 << 30,
        }],
        tokens_per_s: 1_000.0,
        upload_bytes_per_s: 125_000_000,
        download_bytes_per_s: 125_000_000,
        peer_id,
        listen_addrs: Vec::new(),
    }
}

/// The peer id of [`named_keypair`].
pub fn named_peer_id(name: &str) -> String {
    named_keypair(name).public().to_peer_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_ids_are_valid_stable_and_distinct() {
        let a = named_peer_id("sim-0");
        assert!(check_peer_id(&a).is_ok(), "{a}");
        assert_eq!(a, named_peer_id("sim-0"));
        assert_ne!(a, named_peer_id("sim-1"));
        let err = check_peer_id("sim-0").unwrap_err();
        assert!(err.contains("\"sim-0\" is not a libp2p peer id"), "{err}");
        assert!(check_peer_id("").is_err());
    }

    #[test]
    fn a_proof_holds_for_its_key_and_connection_only() {
        let key = named_keypair("a");
        let challenge = [7u8; IDENTITY_CHALLENGE_LEN];
        let proof = forge_coordinator_client::prove_identity(&key, &challenge);
        assert_eq!(
            verify_proof(&proof, &challenge).unwrap(),
            key.public().to_peer_id()
        );
        // Replayed on another connection (another exporter value).
        let err = verify_proof(&proof, &[8u8; IDENTITY_CHALLENGE_LEN]).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // Another key's public key with this signature: the thief's claim of a victim's id.
        let victim = named_keypair("victim");
        let stolen = IdentityProof {
            public_key: victim.public().encode_protobuf(),
            signature: proof.signature.clone(),
        };
        let err = verify_proof(&stolen, &challenge).unwrap_err();
        assert!(
            err.contains(&victim.public().to_peer_id().to_string()),
            "{err}"
        );
        let garbage = IdentityProof {
            public_key: vec![1, 2, 3],
            signature: Vec::new(),
        };
        let err = verify_proof(&garbage, &challenge).unwrap_err();
        assert!(err.contains("does not decode"), "{err}");
    }
}
