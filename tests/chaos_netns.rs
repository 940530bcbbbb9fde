//! The chaos run in Linux network namespaces, CI-sized and seeded: scripts/chaos.py --netns with
//! four nodes of the tiny model. Besides node kills, stops and a coordinator restart, it takes
//! links down: a node cut off from its peers (but not the coordinator) longer than an
//! all-reduce's timeout, a node cut off from the coordinator (but not its peers) longer than the
//! heartbeat timeout, and a node cut off from both. The script checks that rounds keep
//! completing, that no round is committed with two different states (no split update), that
//! every checkpoint shard matches its hashes, and that the final loss is within 3% of a
//! fault-free run.
//!
//! Also here, as it needs root too: a run with one node's workdir on a tmpfs too small for a
//! checkpoint shard (scripts/chaos.py --full-disk).
//!
//! Network namespaces and mounts need root; elsewhere the tests say so and pass without running
//! (the 127.0.0.1 chaos test in chaos.rs still runs).

use forge_integration_tests::chaos;
use std::process::Command;
use std::sync::Mutex;

/// The two runs take turns: side by side on a 2-core machine, each starves the other, and the
/// partition run's loss check compares against a fault-free run made without that contention.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn can_make_namespaces() -> bool {
    is_root()
        && Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success())
}

#[test]
fn chaos_with_partitions_in_network_namespaces() {
    if !can_make_namespaces() {
        println!("SKIPPED: network namespaces need root and iproute2");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let stdout = chaos(
        &[
            "--netns",
            "--small",
            "--nodes",
            "4",
            "--duration",
            "60",
            "--steps",
            "300",
            "--seed",
            "7",
            "--finish-timeout",
            "300",
        ],
        work.path(),
    );
    for fault in [
        "coordinator restart",
        "cut from peers",
        "cut from coordinator",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(fault))
            .unwrap_or_else(|| panic!("no {fault} in the summary:\n{stdout}"));
        assert!(
            line.contains("recovered in"),
            "{fault} did not recover:\n{stdout}"
        );
    }
}

/// Node 0's disk fills when it writes its first checkpoint shard: it says so, tells the
/// coordinator and trains to the end; the others keep committing rounds and another node writes
/// the later checkpoints.
#[test]
fn a_full_disk_on_one_node_loses_no_round_and_no_checkpoint() {
    if !is_root() {
        println!("SKIPPED: a tmpfs workdir needs root");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let stdout = chaos(
        &[
            "--full-disk",
            "4",
            "--small",
            "--nodes",
            "3",
            "--duration",
            "0",
            "--steps",
            "100",
            "--no-reference",
            "--finish-timeout",
            "300",
        ],
        work.path(),
    );
    assert!(
        stdout.contains("node 0 could not write its checkpoint shard"),
        "{stdout}"
    );
}
