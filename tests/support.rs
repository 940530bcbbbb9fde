//! Helpers for the integration tests: locate the workspace's binaries, the shared sample data
//! and the virtualenv's Python, write a tiny run config, and run programs with a bounded time,
//! returning what a user would see.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the test executable (target/<profile>/NAME).
/// `scripts/test.sh` builds them before `cargo test`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found; build the binaries first: `cargo build --workspace --bins` \
         (scripts/test.sh does this)",
        path.display()
    );
    path
}

/// What a finished command showed.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `bin args...` with no `LD_LIBRARY_PATH` (the binaries must find libtorch by rpath),
/// killing it after `limit`.
pub fn run(bin: &str, args: &[&str], limit: Duration) -> Run {
    let mut command = Command::new(binary(bin));
    command
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "warn");
    run_command(command, limit)
}

/// Runs `command` to the end, killing it after `limit`, with its output captured.
pub fn run_command(mut command: Command, limit: Duration) -> Run {
    let name = format!("{:?}", command.get_program());
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{command:?} ran past {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("output");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The shared sample data (`gpt2/`, `tinystories/`): `$FORGE_DATA_DIR`, or `../shared/data`
/// next to the repository.
pub fn shared_data() -> PathBuf {
    std::env::var_os("FORGE_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
        PathBuf::from,
    )
}

/// The Python of the project's virtualenv (`scripts/setup.sh` makes it): `$FORGE_VENV`, else
/// the active `$VIRTUAL_ENV` (`scripts/env.sh` sets it), else `.venv` in the repository.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("FORGE_VENV")
        .or_else(|| std::env::var_os("VIRTUAL_ENV"))
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"),
            PathBuf::from,
        );
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "{} not found; run scripts/setup.sh (or set FORGE_VENV to the virtualenv)",
        python.display()
    );
    python
}

/// Small random Hugging Face model folders that the virtualenv's transformers saves with
/// `save_pretrained` (`tests/hf_import.py` says which), made under `dir` from the shared
/// TinyStories sample; `dir/reference.json` holds what transformers computes from each folder
/// (logits of fixed ids, the token ids of `prompt`). Returns `dir`.
pub fn hf_folders(dir: &Path, prompt: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hf_import.py");
    let corpus = shared_data().join("tinystories/train-sample.txt");
    let mut python = Command::new(venv_python());
    python
        .arg(&script)
        .arg(dir)
        .arg(&corpus)
        .arg(prompt)
        .env("TOKENIZERS_PARALLELISM", "false");
    let r = run_command(python, Duration::from_secs(180));
    assert!(
        r.success(),
        "tests/hf_import.py failed: {}\n{}",
        r.stdout,
        r.stderr
    );
    dir.to_path_buf()
}

/// Largest |a - b| over two (T, vocab) tables of logits of the same shape (Forge's, and
/// transformers' as read from JSON).
pub fn max_abs_diff(forge: &[Vec<f32>], hf: &[Vec<f64>]) -> f64 {
    assert_eq!(hf.len(), forge.len(), "sequence length");
    let mut max = 0.0f64;
    for (ours, theirs) in forge.iter().zip(hf) {
        assert_eq!(theirs.len(), ours.len(), "vocabulary size");
        for (a, b) in ours.iter().zip(theirs) {
            max = max.max((*a as f64 - b).abs());
        }
    }
    max
}

/// configs/tiny-cpu.toml, shrunk for a test (8 x 32-token sequences per step, 2 eval batches,
/// no eval before the end, a checkpoint every `checkpoint_every` steps and at the end) and
/// pointed at the shared data, `cache_dir` and `out_dir`; written into `dir`.
pub fn tiny_run_config(
    dir: &Path,
    out_dir: &Path,
    cache_dir: &Path,
    max_steps: u64,
    checkpoint_every: u64,
) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"),
    )
    .unwrap();
    let data = shared_data().join("tinystories");
    let replacements = [
        (
            "\"../shared/data/tinystories/train-sample.txt\"",
            format!("{:?}", data.join("train-sample.txt")),
        ),
        (
            "\"../shared/data/tinystories/valid-sample.txt\"",
            format!("{:?}", data.join("valid-sample.txt")),
        ),
        (
            "cache_dir = \".forge-cache/data\"",
            format!("cache_dir = {cache_dir:?}"),
        ),
        (
            "out_dir = \"runs/tiny-cpu\"",
            format!("out_dir = {out_dir:?}"),
        ),
        ("max_steps = 500", format!("max_steps = {max_steps}")),
        ("seq_len = 128", "seq_len = 32".into()),
        ("batch_size = 16", "batch_size = 8".into()),
        ("micro_batch = 16", "micro_batch = 8".into()),
        ("warmup_steps = 30", "warmup_steps = 2".into()),
        (
            "every = 100\n# Validation",
            "every = 1000\n# Validation".into(),
        ),
        ("batches = 0", "batches = 2".into()),
    ];
    let mut text = text;
    for (from, to) in replacements {
        assert!(text.contains(from), "tiny-cpu.toml no longer has {from}");
        text = text.replacen(from, &to, 1);
    }
    let marker = "# Save every this many steps (and at the end, and on Ctrl-C).\nevery = 100";
    assert!(text.contains(marker));
    text = text.replace(
        marker,
        &format!("# Save every.\nevery = {checkpoint_every}"),
    );
    let path = dir.join(format!("run-{max_steps}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `scripts/chaos.py` with `args` against the binaries under test, in the work directory
/// `work`, and returns its stdout after checking that it passed every check.
pub fn chaos(args: &[&str], work: &std::path::Path) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = binary("forge-node").parent().unwrap().to_path_buf();
    let output = Command::new("python3")
        .arg(root.join("scripts/chaos.py"))
        .args(args)
        .arg("--work")
        .arg(work)
        .env("FORGE_BIN", &bin_dir)
        .output()
        .expect("python3 runs scripts/chaos.py");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    assert!(
        output.status.success(),
        "chaos run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}
