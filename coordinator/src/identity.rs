//! Peer identities: the check a join's peer id must pass, and stable ids for simulated members.

use libp2p_identity::{Keypair, PeerId};
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

/// A valid peer id that stands for `name` (the same one every time), for simulated members
/// and tests: the id of an ed25519 key derived from the name.
pub fn named_peer_id(name: &str) -> String {
    let seed: [u8; 32] = Sha256::digest(format!("forge simulated member {name}")).into();
    let key = Keypair::ed25519_from_bytes(seed).expect("any 32 bytes are an ed25519 secret key");
    key.public().to_peer_id().to_string()
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
}
