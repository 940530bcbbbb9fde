//! The chaos run, CI-sized and seeded: scripts/chaos.py with four nodes of the tiny model on
//! 127.0.0.1, a fault-free reference run, then 40 s of faults (node SIGKILL + restart,
//! SIGSTOP/SIGCONT past the heartbeat timeout, one coordinator restart). The script checks that
//! rounds keep completing, that committed hashes agree across nodes, that every checkpoint shard
//! matches its hashes, and that the final loss is within 3% of the reference.

use forge_integration_tests::chaos;

#[test]
fn chaos_run_keeps_training_and_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let stdout = chaos(
        &[
            "--small",
            "--nodes",
            "4",
            "--duration",
            "40",
            "--steps",
            "200",
            "--seed",
            "7",
            "--finish-timeout",
            "300",
        ],
        work.path(),
    );
    assert!(stdout.contains("coordinator restart"), "{stdout}");
}
