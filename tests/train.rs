//! `forge-node train` as a user runs it: Ctrl-C saves a checkpoint and the same command
//! resumes; a full disk while saving fails with a clear message and keeps the last checkpoint;
//! `sample` reads a checkpoint.

use forge_integration_tests::{binary, run, tiny_run_config};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

/// configs/tiny-cpu.toml, shrunk for a test and pointed at `out_dir`.
fn write_config(dir: &Path, out_dir: &Path, max_steps: u64, checkpoint_every: u64) -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("forge-data-cache");
    tiny_run_config(dir, out_dir, &cache, max_steps, checkpoint_every)
}

fn checkpoints(out_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out_dir.join("checkpoints"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_same_command_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let long = write_config(tmp.path(), &out, 100_000, 1000);
    let mut child = Command::new(binary("forge-node"))
        .args(["train", "--config", long.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has trained a few steps (metrics lines), then press Ctrl-C.
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            start.elapsed() < LIMIT,
            "no training progress within {LIMIT:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "forge-node exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let step: u64 = stdout
        .split("interrupted at step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at step N' in: {stdout}"));
    assert!(step >= 3);
    assert_eq!(checkpoints(&out), vec![format!("step-{step:08}")]);

    // The same run with a budget two steps further resumes and finishes there.
    let more = write_config(tmp.path(), &out, step + 2, 1000);
    let r = run(
        "forge-node",
        &["train", "--config", more.to_str().unwrap()],
        LIMIT,
    );
    assert!(r.success(), "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!("finished at step {}", step + 2)),
        "{}",
        r.stdout
    );
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], step + 2);

    let sample = run(
        "forge-node",
        &[
            "sample",
            "--checkpoint",
            out.to_str().unwrap(),
            "--max-tokens",
            "20",
            "--prompt",
            "Once upon a time",
        ],
        LIMIT,
    );
    assert!(sample.success(), "{}", sample.stderr);
    assert!(
        sample.stdout.starts_with("Once upon a time"),
        "{}",
        sample.stdout
    );
}

#[test]
fn a_full_disk_while_saving_fails_clearly_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let first = write_config(tmp.path(), &out, 4, 4);
    let r = run(
        "forge-node",
        &["train", "--config", first.to_str().unwrap()],
        LIMIT,
    );
    assert!(r.success(), "{}", r.stderr);
    assert_eq!(checkpoints(&out), vec!["step-00000004".to_string()]);

    // Files may not grow past 1 MiB (the shell's ulimit; SIGXFSZ ignored so writes fail with
    // EFBIG instead of killing the process): the step-8 checkpoint cannot be written.
    let second = write_config(tmp.path(), &out, 8, 4);
    let script = format!(
        "trap '' XFSZ; ulimit -f 1024; exec {:?} train --config {:?}",
        binary("forge-node"),
        second
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("checkpoint") && stderr.contains("the previous checkpoint is intact"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing already saved is lost, and no half-written directory is left.
    assert_eq!(checkpoints(&out), vec!["step-00000004".to_string()]);
    let sample = run(
        "forge-node",
        &[
            "sample",
            "--checkpoint",
            out.join("checkpoints/step-00000004").to_str().unwrap(),
            "--max-tokens",
            "5",
        ],
        LIMIT,
    );
    assert!(sample.success(), "{}", sample.stderr);
}

/// The loss of each step in a run's `metrics.jsonl` (a resumed run's later lines win).
fn losses_by_step(out_dir: &Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}

/// SIGKILL in the middle of a checkpoint written in the background (its model file written,
/// the rest not, while training went on to the next save) leaves the previous checkpoint the
/// newest: the same command resumes from it, clears the half-written one and ends where an
/// uninterrupted run ends.
#[test]
fn a_kill_during_a_background_save_leaves_the_previous_checkpoint_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = write_config(tmp.path(), &out, 8, 2);
    let mut child = Command::new(binary("forge-node"))
        .args(["train", "--config", config.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .env("FORGE_TEST_HOLD_CHECKPOINT_WRITES", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The step-4 save stops halfway; training goes on to step 6, whose save waits for it.
    let half_written = |out: &Path| {
        std::fs::read_dir(out.join("checkpoints"))
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".tmp-step-00000004")
                    && p.join("model.safetensors").exists()
            })
    };
    let start = Instant::now();
    let tmp_dir = loop {
        let steps =
            std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
        if let Some(dir) = half_written(&out).filter(|_| steps >= 6) {
            break dir;
        }
        assert!(
            start.elapsed() < LIMIT,
            "no half-written step-4 checkpoint within {LIMIT:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "forge-node exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(tmp_dir.exists());
    let lines_before = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    let committed: Vec<String> = checkpoints(&out)
        .into_iter()
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(committed, vec!["step-00000002".to_string()]);

    let resumed = run(
        "forge-node",
        &["train", "--config", config.to_str().unwrap()],
        LIMIT,
    );
    assert!(resumed.success(), "{}", resumed.stderr);
    assert!(
        resumed.stdout.contains("finished at step 8"),
        "{}",
        resumed.stdout
    );
    // It went on from step 2: its first metrics line is step 3's.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().nth(lines_before).unwrap()).unwrap();
    assert_eq!(first["step"], 3, "{metrics}");
    assert!(
        !tmp_dir.exists(),
        "the half-written checkpoint is still there"
    );
    assert_eq!(
        checkpoints(&out),
        vec!["step-00000006".to_string(), "step-00000008".to_string()]
    );

    // The same run uninterrupted.
    let straight_dir = tmp.path().join("straight");
    std::fs::create_dir(&straight_dir).unwrap();
    let straight_out = straight_dir.join("run");
    let straight = write_config(&straight_dir, &straight_out, 8, 2);
    let r = run(
        "forge-node",
        &["train", "--config", straight.to_str().unwrap()],
        LIMIT,
    );
    assert!(r.success(), "{}", r.stderr);
    let (a, b) = (losses_by_step(&out), losses_by_step(&straight_out));
    assert_eq!(a.len(), 8);
    for (step, loss) in &b {
        assert!(
            (a[step] - loss).abs() < 1e-6,
            "step {step}: {} vs {loss}",
            a[step]
        );
    }
}

/// `--set` changes the run config like an edit of the file, checked like the file; `--dry-run`
/// prints the resolved config, the size, the budget and an estimated time, and trains nothing
/// in the run's folder.
#[test]
fn set_overrides_keys_and_dry_run_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = write_config(tmp.path(), &out, 40, 1000);
    let config = config.to_str().unwrap();
    let dry = run(
        "forge-node",
        &[
            "train",
            "--config",
            config,
            "--set",
            "train.max_steps=1234",
            "--set",
            "train.lr=0.00125",
            "--dry-run",
        ],
        LIMIT,
    );
    assert!(dry.success(), "{}\n{}", dry.stdout, dry.stderr);
    let text = &dry.stdout;
    for expect in [
        "max_steps = 1234",
        "lr = 0.00125",
        "parameters ",
        "tokens per step ",
        "steps             1234",
        "tokens in all ",
        "estimated time ",
    ] {
        assert!(text.contains(expect), "{expect:?} missing:\n{text}");
    }
    assert!(!out.exists(), "the dry run wrote into the run's folder");
    for (set, names) in [
        ("train.lr_typo=1", "lr_typo"),
        ("train.max_steps=lots", "max_steps"),
        ("train.lr", "give section.key=value"),
    ] {
        let failed = run(
            "forge-node",
            &["train", "--config", config, "--set", set, "--dry-run"],
            LIMIT,
        );
        assert!(!failed.success(), "--set {set} was accepted");
        let err = &failed.stderr;
        assert!(
            err.contains(names) && err.contains(config),
            "--set {set}: {err}"
        );
    }
}

/// [`write_config`] into a folder `name` of `dir`, with samples of 4 tokens (the run's own
/// steps are what the control tests watch); returns the run's out_dir and the config.
fn control_run(dir: &Path, name: &str, edit: Option<(&str, &str)>) -> (PathBuf, PathBuf) {
    let dir = dir.join(name);
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("run");
    let config = write_config(&dir, &out, 100_000, 1000);
    let mut text = std::fs::read_to_string(&config).unwrap();
    for (from, to) in [("max_new_tokens = 80", "max_new_tokens = 4")]
        .into_iter()
        .chain(edit)
    {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&config, text).unwrap();
    (out, config)
}

/// `forge-node train --config CONFIG` in the background, its stdout and stderr captured.
fn spawn_train(config: &Path) -> std::process::Child {
    Command::new(binary("forge-node"))
        .args(["train", "--config", config.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit, checks that it exits 0 and returns its stdout.
fn exits_ok(child: std::process::Child) -> String {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    stdout
}

/// Waits until the run in `out` has logged `steps` metrics lines.
fn wait_for_steps(child: &mut std::process::Child, out: &Path, steps: usize) {
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
        < steps
    {
        assert!(start.elapsed() < LIMIT, "no {steps} steps within {LIMIT:?}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "forge-node exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run's metrics lines.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The number after `word` in `text`.
fn number_after(text: &str, word: &str) -> u64 {
    text.split(word)
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in: {text}"))
}

/// `forge-node control RUN_DIR ...` on a running `forge-node train`: `save` writes a checkpoint
/// while training goes on; `anneal` enters a WSD schedule's decay at the next step, the lr
/// falls to the floor and the run ends with the decay (and a rerun finds it ended); `stop`
/// ends with a final evaluation and checkpoint; `abort` ends without saving. Refusals: no
/// trainer running, a cosine schedule to anneal.
#[test]
fn control_saves_anneals_stops_and_aborts_a_running_train() {
    let tmp = tempfile::tempdir().unwrap();
    let control = |out: &Path, action: &str| {
        run(
            "forge-node",
            &["control", out.to_str().unwrap(), action],
            LIMIT,
        )
    };
    let nobody = control(&tmp.path().join("none"), "stop");
    assert!(!nobody.success());
    assert!(
        nobody.stderr.contains("no forge-node train is running"),
        "{}",
        nobody.stderr
    );

    // WSD over 100,000 steps with 10 decay steps (0.0001 of the run).
    let wsd = (
        "kind = \"cosine\"",
        "kind = \"wsd\"\ndecay_fraction = 0.0001",
    );
    let (out, config) = control_run(tmp.path(), "wsd", Some(wsd));
    let mut child = spawn_train(&config);
    wait_for_steps(&mut child, &out, 3);
    let save = control(&out, "save");
    assert!(save.success(), "{}", save.stderr);
    let saved = number_after(&save.stdout, "checkpoint of step ");
    let start = Instant::now();
    while !checkpoints(&out).contains(&format!("step-{saved:08}")) {
        assert!(start.elapsed() < LIMIT, "no checkpoint of step {saved}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let anneal = control(&out, "anneal");
    assert!(anneal.success(), "{}", anneal.stderr);
    assert!(anneal.stdout.contains("10 steps down"), "{}", anneal.stdout);
    let end = number_after(&anneal.stdout, "the run ends at step ");
    let from = number_after(&anneal.stdout, "anneal at step ");
    assert_eq!(end, from + 10, "{}", anneal.stdout);
    let stdout = exits_ok(child);
    assert!(
        stdout.contains(&format!("finished at step {end}")),
        "{stdout}"
    );
    let lines = metrics(&out);
    let lr = |step: u64| {
        lines.iter().find(|m| m["step"] == step).unwrap()["lr"]
            .as_f64()
            .unwrap()
    };
    let peak = lr(from);
    for step in from + 1..end {
        assert!(lr(step + 1) < lr(step), "step {step}: the lr does not fall");
    }
    assert!((lr(end) / peak - 0.1).abs() < 1e-9, "{} of {peak}", lr(end));
    // The final checkpoint keeps the anneal: the same command resumes into a finished run.
    let state = out.join(format!("checkpoints/step-{end:08}/state.json"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    assert_eq!(state["control"]["anneal"]["start"], from, "{state}");

    // The tiny config's cosine schedule cannot anneal; stop ends with a final checkpoint.
    let (out, config) = control_run(tmp.path(), "stop", None);
    let mut child = spawn_train(&config);
    wait_for_steps(&mut child, &out, 3);
    let refused = control(&out, "anneal");
    assert!(!refused.success());
    assert!(
        refused.stderr.contains("no decay phase"),
        "{}",
        refused.stderr
    );
    let stop = control(&out, "stop");
    assert!(stop.success(), "{}", stop.stderr);
    let at = number_after(&stop.stdout, "the run ends at step ");
    let stdout = exits_ok(child);
    assert!(
        stdout.contains(&format!("finished at step {at}")),
        "{stdout}"
    );
    assert!(stdout.contains("validation loss"), "{stdout}");
    assert_eq!(checkpoints(&out), vec![format!("step-{at:08}")]);

    // Abort: no checkpoint at all (none was due).
    let (out, config) = control_run(tmp.path(), "abort", None);
    let mut child = spawn_train(&config);
    wait_for_steps(&mut child, &out, 3);
    let abort = control(&out, "abort");
    assert!(abort.success(), "{}", abort.stderr);
    let stdout = exits_ok(child);
    let at = number_after(&abort.stdout, "abort at step ");
    assert!(
        stdout.contains(&format!("aborted at step {at}")),
        "{stdout}"
    );
    assert!(checkpoints(&out).is_empty(), "{:?}", checkpoints(&out));
}
