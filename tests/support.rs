//! Helpers for the integration tests: locate the workspace's binaries and run them with a
//! bounded time, returning what a user would see.

use std::path::PathBuf;
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
    let mut child = Command::new(binary(bin))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{bin} {args:?} ran past {limit:?}; stderr: {}",
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
