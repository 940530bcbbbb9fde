//! The command-line surface as a user meets it: help, model info, the benchmark, and the
//! errors for bad input (exit code 1, a message naming the problem and the fix, no panic).

use forge_integration_tests::{Run, run};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn node(args: &[&str]) -> Run {
    run("forge-node", args, LIMIT)
}

fn assert_clean_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, Some(1), "expected exit 1; stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}: {}", r.stderr);
    }
}

/// A second node on a workdir another node holds is refused at once, naming it.
#[test]
fn a_workdir_serves_one_node_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("node");
    std::fs::create_dir_all(&workdir).unwrap();
    // The lock a running node holds.
    let held = std::fs::File::create(workdir.join("node.lock")).unwrap();
    held.lock().unwrap();
    let args = [
        "join",
        "127.0.0.1:9",
        "--token",
        "00.00",
        "--workdir",
        workdir.to_str().unwrap(),
    ];
    let r = node(&args);
    assert_clean_error(&r, &["another forge-node is running with --workdir"]);
    drop(held);
    // Free again: the node goes on (and fails later, on the malformed token).
    let r = node(&args);
    assert!(!r.stderr.contains("another forge-node"), "{}", r.stderr);
}

#[test]
fn help_lists_only_working_subcommands() {
    let r = node(&["--help"]);
    assert!(r.success());
    for cmd in ["model", "bench"] {
        assert!(r.stdout.contains(cmd), "{}", r.stdout);
    }
    let r = run("forge-coordinator", &["--help"], LIMIT);
    assert!(r.success(), "{}", r.stderr);
}

#[test]
fn model_info_reports_params_and_flops() {
    let r = node(&["model", "info", "--preset", "gpt2-124m", "--json"]);
    assert!(r.success(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let params = v["params"].as_i64().unwrap();
    // GPT-2 small: 124,439,808 parameters with the tied head.
    assert_eq!(params, 124_439_808);
    assert!(v["train_flops_per_token"].as_f64().unwrap() > 6.0 * 85e6);
    // The coordinator's planner preset, counted analytically (never allocated).
    let r = node(&["model", "info", "--preset", "llama-1b", "--json"]);
    assert!(r.success(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["params"].as_i64().unwrap(), 1_235_814_400);
    assert_eq!(v["config"]["n_kv_head"].as_i64().unwrap(), 8);
    let r = node(&["model", "info", "--config", "../configs/tiny-cpu.toml"]);
    assert!(r.success(), "{}", r.stderr);
    assert!(r.stdout.contains("family          llama"), "{}", r.stdout);
}

#[test]
fn bench_train_step_runs_on_cpu() {
    let r = node(&[
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(r.success(), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["implementation"], "forge");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["final_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_input_gets_a_clear_error() {
    assert_clean_error(
        &node(&["model", "info", "--preset", "huge"]),
        &["unknown model preset 'huge'", "gpt2-124m"],
    );
    assert_clean_error(
        &node(&[
            "bench",
            "train-step",
            "--preset",
            "tiny",
            "--device",
            "cuda:7",
        ]),
        &["invalid device 'cuda:7'", "--device cpu"],
    );
    assert_clean_error(
        &node(&[
            "bench",
            "train-step",
            "--preset",
            "tiny",
            "--device",
            "gpu0",
        ]),
        &["'gpu0' is not a device"],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[model]\npreset = \"tiny\"\nlayers = 3\n").unwrap();
    assert_clean_error(
        &node(&["model", "info", "--config", cfg.to_str().unwrap()]),
        &["bad.toml", "unknown field `layers`"],
    );
    assert_clean_error(
        &node(&["model", "info", "--config", "/nonexistent/run.toml"]),
        &["/nonexistent/run.toml", "cannot read it"],
    );
    assert_clean_error(&node(&["model", "info"]), &["--preset", "--config"]);
}
