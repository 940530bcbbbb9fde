//! The chaos run, CI-sized and seeded: scripts/chaos.py with four nodes of the tiny model on
//! 127.0.0.1, a fault-free reference run, then 40 s of faults (node SIGKILL + restart,
//! SIGSTOP/SIGCONT past the heartbeat timeout, one coordinator restart). The script checks that
//! rounds keep completing, that committed hashes agree across nodes, that every checkpoint shard
//! matches its hashes, and that the final loss is within 3% of the reference.

use forge_integration_tests::binary;
use std::path::Path;
use std::process::Command;

#[test]
fn chaos_run_keeps_training_and_loses_nothing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = binary("forge-node").parent().unwrap().to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let output = Command::new("python3")
        .arg(root.join("scripts/chaos.py"))
        .args([
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
            "--work",
        ])
        .arg(work.path())
        .env("FORGE_BIN", &bin_dir)
        .output()
        .expect("python3 runs scripts/chaos.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "chaos run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("coordinator restart"), "{stdout}");
}
