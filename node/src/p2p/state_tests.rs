//! End-to-end tests of the state transfer (`/forge/state/1`): nodes in this process on 127.0.0.1.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use forge_protocol::messages::TensorKey;
use forge_protocol::state::CHUNK_VALUES;
use libp2p::PeerId;
use libp2p::identity::Keypair;

use super::net::{self, PeerNet, PeerNetConfig};
use super::state::{StateError, StateSnapshot};
use super::tests::{bounded, cluster};

/// Per-exchange timeout of the fetches.
const TIMEOUT: Duration = Duration::from_secs(5);

/// More than a manifest of the test states takes: a peer that sent more served chunks.
const MANIFEST_BYTES: u64 = 1000;

/// A state whose large tensors span several chunks (the last one partial), plus small and
/// empty ones, parameters then momenta.
fn snapshot(version: u64) -> StateSnapshot {
    let big = 2 * CHUNK_VALUES + 12_345;
    let values = |len: usize, seed: f32| -> Arc<Vec<f32>> {
        Arc::new(
            (0..len)
                .map(|i| ((i as f32) * 0.001 + seed).sin())
                .collect(),
        )
    };
    StateSnapshot {
        version,
        round: version + 2,
        step: 500 * version,
        tokens: 1_000_000 * version,
        tensors: vec![
            (param("embed"), values(big, 0.1)),
            (param("norm"), values(1000, 0.2)),
            (param("empty"), values(0, 0.0)),
            (momentum("embed"), values(big, 0.3)),
            (momentum("norm"), values(1000, 0.4)),
            (momentum("empty"), values(0, 0.0)),
        ],
    }
}

fn param(name: &str) -> TensorKey {
    TensorKey::Param(name.to_string())
}

fn momentum(name: &str) -> TensorKey {
    TensorKey::Momentum(name.to_string())
}

/// `good` with one value changed at the start of every chunk of every non-empty tensor, so
/// whatever a peer serving it sends fails the digest.
fn corrupted(good: &StateSnapshot) -> StateSnapshot {
    let mut bad = good.clone();
    for (_, values) in &mut bad.tensors {
        let values = Arc::make_mut(values);
        for at in (0..values.len()).step_by(CHUNK_VALUES) {
            values[at] += 1.0;
        }
    }
    bad
}

fn ids(nets: &[PeerNet]) -> Vec<PeerId> {
    nets.iter().map(PeerNet::peer_id).collect()
}

fn assert_same_state(got: &StateSnapshot, want: &StateSnapshot) {
    assert_eq!(
        (got.version, got.round, got.step, got.tokens),
        (want.version, want.round, want.step, want.tokens)
    );
    let names = |s: &StateSnapshot| s.tensors.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want));
    for ((name, got), (_, want)) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(
            got.iter()
                .zip(want.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} differs"
        );
    }
}

fn state_bytes(snapshot: &StateSnapshot) -> u64 {
    snapshot
        .tensors
        .iter()
        .map(|(_, values)| 4 * values.len() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_fetches_identical_tensors_from_three_peers() {
    let nets = cluster(4, |c| c).await;
    let state = Arc::new(snapshot(3));
    for net in &nets[..3] {
        net.publish_state(Some(Arc::clone(&state)));
    }
    let expected = state.digests();
    let started = Instant::now();
    let (fetched, stats) = bounded(
        "the fetch",
        nets[3].fetch_state(&ids(&nets[..3]), 3, &expected, TIMEOUT),
    )
    .await
    .unwrap();
    println!(
        "fetched {} bytes in {:?}: {stats:?}",
        stats.bytes,
        started.elapsed()
    );
    assert_same_state(&fetched, &state);
    assert_eq!(stats.refetched_chunks, 0);
    assert!(stats.bytes >= state_bytes(&state), "{stats:?}");
    assert_eq!(
        stats.per_peer_bytes.iter().map(|(_, b)| b).sum::<u64>(),
        stats.bytes
    );
    let serving = stats
        .per_peer_bytes
        .iter()
        .filter(|(_, bytes)| *bytes > MANIFEST_BYTES)
        .count();
    assert!(
        serving >= 2,
        "chunks came from fewer than two peers: {stats:?}"
    );

    // The fetched copy is servable as is: a fifth node could fetch it from the joiner.
    nets[3].publish_state(Some(Arc::new(fetched)));
    let (again, _) = bounded(
        "the second fetch",
        nets[0].fetch_state(&[nets[3].peer_id()], 3, &expected, TIMEOUT),
    )
    .await
    .unwrap();
    assert_same_state(&again, &state);
}

/// `state` with only the tensors `keep` names (the layers a pipeline stage holds).
fn part(state: &StateSnapshot, keep: &[&str]) -> StateSnapshot {
    let mut part = state.clone();
    part.tensors.retain(|(key, _)| {
        keep.iter()
            .any(|name| *key == param(name) || *key == momentum(name))
    });
    part
}

/// After a pipeline is cut anew, no peer holds exactly a node's new layers: each tensor comes
/// from the peers that hold it (one peer holds `embed` and `empty`, another `norm` and `empty`,
/// a third only tensors this node does not need), checked against the same digests. A tensor
/// that no peer holds fails the fetch, naming it and what each peer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_come_from_the_peers_that_hold_them_after_a_re_cut() {
    let nets = cluster(4, |c| c).await;
    let state = snapshot(3);
    nets[0].publish_state(Some(Arc::new(part(&state, &["embed", "empty"]))));
    nets[1].publish_state(Some(Arc::new(part(&state, &["norm", "empty"]))));
    let mut elsewhere = part(&state, &[]);
    elsewhere
        .tensors
        .push((param("head"), Arc::new(vec![1.0; 10])));
    nets[2].publish_state(Some(Arc::new(elsewhere)));
    let (fetched, stats) = bounded(
        "the fetch",
        nets[3].fetch_state(&ids(&nets[..3]), 3, &state.digests(), TIMEOUT),
    )
    .await
    .unwrap();
    // In the order the peers list them: embed and empty from the first, then norm.
    let mut fetched = fetched;
    let at = |key: &TensorKey| state.tensors.iter().position(|(k, _)| k == key);
    fetched.tensors.sort_by_key(|(key, _)| at(key));
    assert_same_state(&fetched, &state);
    let from = |peer: PeerId| {
        stats
            .per_peer_bytes
            .iter()
            .find(|(p, _)| *p == peer)
            .unwrap()
            .1
    };
    assert!(from(nets[0].peer_id()) > MANIFEST_BYTES, "{stats:?}");
    assert!(from(nets[1].peer_id()) > MANIFEST_BYTES, "{stats:?}");
    assert!(from(nets[2].peer_id()) < MANIFEST_BYTES, "{stats:?}");

    // Nobody holds `norm` now.
    nets[1].publish_state(Some(Arc::new(part(&state, &["embed"]))));
    let err = bounded(
        "the fetch",
        nets[3].fetch_state(&ids(&nets[..3]), 3, &state.digests(), TIMEOUT),
    )
    .await
    .expect_err("no peer holds norm");
    let text = err.to_string();
    println!("{text}");
    assert!(
        matches!(err, StateError::TensorUnavailable { .. }),
        "{text}"
    );
    assert!(
        text.contains("`norm`") || text.contains("`momentum.norm`"),
        "{text}"
    );
    assert!(
        text.contains("does not hold it (it holds other layers)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_copy_is_fetched_again_from_another_peer() {
    let nets = cluster(4, |c| c).await;
    let state = Arc::new(snapshot(2));
    nets[0].publish_state(Some(Arc::new(corrupted(&state))));
    for net in &nets[1..3] {
        net.publish_state(Some(Arc::clone(&state)));
    }
    let (fetched, stats) = bounded(
        "the fetch",
        nets[3].fetch_state(&ids(&nets[..3]), 2, &state.digests(), TIMEOUT),
    )
    .await
    .unwrap();
    println!("{stats:?}");
    assert_same_state(&fetched, &state);
    let bad_bytes = stats.per_peer_bytes[0].1;
    assert!(
        bad_bytes > MANIFEST_BYTES,
        "the corrupted peer served no chunk, so the test proves nothing: {stats:?}"
    );
    assert!(stats.refetched_chunks > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_corrupted_copies_fail_naming_the_tensor_and_the_peer() {
    let nets = cluster(2, |c| c).await;
    let mut bad = snapshot(4);
    // One value changed, in the last tensor with values.
    Arc::make_mut(&mut bad.tensors[4].1)[17] = 123.0;
    let expected = snapshot(4).digests();
    nets[0].publish_state(Some(Arc::new(bad)));
    let err = bounded(
        "the fetch",
        nets[1].fetch_state(&[nets[0].peer_id()], 4, &expected, TIMEOUT),
    )
    .await
    .expect_err("no good copy exists");
    let message = err.to_string();
    println!("{message}");
    match &err {
        StateError::TensorUnavailable { tensor, peers, .. } => {
            assert_eq!(*tensor, momentum("norm"));
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].0, nets[0].peer_id());
        }
        other => panic!("expected TensorUnavailable, got {other}"),
    }
    assert!(message.contains("SHA-256 differs"), "{message}");
    assert!(
        message.contains(&nets[0].peer_id().to_string()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_holding_other_versions_fail_the_fetch_naming_the_versions() {
    let nets = cluster(4, |c| c).await;
    nets[0].publish_state(Some(Arc::new(snapshot(5))));
    nets[1].publish_state(Some(Arc::new(snapshot(7))));
    // nets[2] publishes nothing.
    let expected = snapshot(6).digests();
    let started = Instant::now();
    let err = bounded(
        "the fetch",
        nets[3].fetch_state(&ids(&nets[..3]), 6, &expected, TIMEOUT),
    )
    .await
    .expect_err("nobody holds version 6");
    let message = err.to_string();
    println!("{message}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    match &err {
        StateError::VersionUnavailable { version, held, .. } => {
            assert_eq!(*version, 6);
            let mut held = held.clone();
            held.sort_by_key(|(_, v)| *v);
            let ids = ids(&nets);
            assert_eq!(
                held,
                vec![(ids[2], None), (ids[0], Some(5)), (ids[1], Some(7))]
            );
        }
        other => panic!("expected VersionUnavailable, got {other}"),
    }
    for part in [
        "version 6",
        "holds version 5",
        "holds version 7",
        "publishes no state",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dropped_mid_fetch_is_replaced_by_the_others() {
    // The third node serves slowly, so it is still sending its first chunks when it goes away.
    let nodes = AtomicUsize::new(0);
    let mut nets = cluster(4, |c| {
        if nodes.fetch_add(1, Ordering::Relaxed) == 2 {
            PeerNetConfig {
                max_upload_bytes_per_s: Some(4_000_000),
                ..c
            }
        } else {
            c
        }
    })
    .await;
    // Whole chunks only, so whatever the slow node is handed takes it about a second.
    let values = Arc::new(vec![0.25f32; 4 * CHUNK_VALUES]);
    let state = Arc::new(StateSnapshot {
        version: 9,
        round: 9,
        step: 900,
        tokens: 9000,
        tensors: vec![(param("w"), Arc::clone(&values)), (momentum("w"), values)],
    });
    for net in &nets[..3] {
        net.publish_state(Some(Arc::clone(&state)));
    }
    let peers = ids(&nets[..3]);
    let fetcher = nets.pop().unwrap();
    let leaver = nets.pop().unwrap();
    let expected = state.digests();
    let started = Instant::now();
    let fetch = fetcher.fetch_state(&peers, 9, &expected, TIMEOUT);
    let leave = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Its last handle: the event loop stops and closes every connection.
        drop(leaver);
    };
    let (fetched, ()) = bounded("the fetch", async { tokio::join!(fetch, leave) }).await;
    let (fetched, stats) = fetched.unwrap();
    let elapsed = started.elapsed();
    println!("{stats:?} in {elapsed:?}");
    assert_same_state(&fetched, &state);
    assert!(stats.refetched_chunks >= 1, "{stats:?}");
    assert!(
        stats.per_peer_bytes[2].1 < 2 * 4 * CHUNK_VALUES as u64,
        "the leaver sent its chunks after all: {stats:?}"
    );
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_off_the_allowlist_cannot_fetch() {
    let started = bounded(
        "starting the cluster",
        super::bench::local_cluster(1, |c| c),
    )
    .await
    .unwrap();
    let (member, member_addr) = &started[0];
    member.publish_state(Some(Arc::new(snapshot(1))));
    let (outsider, event_loop) = net::new(PeerNetConfig::new(Keypair::generate_ed25519())).unwrap();
    tokio::spawn(event_loop.run());
    outsider
        .start_listening("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .await
        .unwrap();
    outsider
        .set_members(vec![(member.peer_id(), vec![member_addr.clone()])])
        .await
        .unwrap();
    let expected = snapshot(1).digests();
    let err = bounded(
        "the fetch",
        outsider.fetch_state(&[member.peer_id()], 1, &expected, Duration::from_secs(2)),
    )
    .await
    .expect_err("the member's allowlist does not list the outsider");
    println!("{err}");
    assert!(matches!(err, StateError::NoManifest { .. }), "{err}");
}

#[tokio::test]
async fn fetching_from_nobody_but_itself_is_refused() {
    let (net, event_loop) = net::new(PeerNetConfig::new(Keypair::generate_ed25519())).unwrap();
    tokio::spawn(event_loop.run());
    let err = net
        .fetch_state(&[net.peer_id()], 1, &BTreeMap::new(), TIMEOUT)
        .await
        .expect_err("no peers");
    assert!(matches!(err, StateError::NoPeers { version: 1 }), "{err}");
}
