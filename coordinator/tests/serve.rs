//! The real `forge-coordinator` on 127.0.0.1: members join and heartbeat, a SIGKILLed member is
//! declared dead within the timeout while rounds go on, a SIGKILLed coordinator restarts from
//! its state directory with members and round history intact, a wrong token is refused, and a
//! run config with a typo in any table stops `serve` before it listens.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_forge-coordinator");
const HEARTBEAT_TIMEOUT_MS: u64 = 2_000;
/// A complete run config with no `[coordinator]` table: `serve` validates every table.
const TINY_RUN: &str = include_str!("../../configs/tiny-cpu.toml");

/// A child process whose stdout lines arrive on a channel; killed when dropped.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start<S: AsRef<std::ffi::OsStr>>(args: &[S], stderr: &Path) -> anyhow::Result<Proc> {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr)?)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Proc {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// The first stdout line containing `needle`, waiting at most `timeout`.
    fn line_with(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).with_context(|| {
                format!(
                    "no line containing {needle:?} within {timeout:?}; saw {:?}",
                    self.seen
                )
            })?;
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// SIGKILL: no chance to say goodbye.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(BIN).args(args).output()?)
}

fn status(addr: &str, token: &str) -> anyhow::Result<Value> {
    let out = run(&[
        "status",
        addr,
        "--token",
        token,
        "--json",
        "--timeout-s",
        "5",
    ])?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Polls the status until `check` returns `Some`, failing with the last status after `timeout`.
fn wait_for<T>(
    addr: &str,
    token: &str,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&Value) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        // A status call can fail while the coordinator restarts; keep polling until the deadline.
        if let Ok(status) = status(addr, token) {
            if let Some(found) = check(&status) {
                return Ok(found);
            }
            last = status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}; last status: {last:#}")
}

fn member_ids(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m["member"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// The member id of the sim-member named `name` (its peer id stands for the name).
fn member_of(status: &Value, name: &str) -> Option<u64> {
    let peer_id = forge_coordinator::identity::named_peer_id(name);
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["peer_id"] == peer_id)?["member"]
        .as_u64()
}

fn committed(status: &Value) -> u64 {
    status["rounds_committed"].as_u64().unwrap_or(0)
}

/// `(round, committed)` of the recent round history.
fn history(status: &Value) -> Vec<(u64, bool)> {
    status["recent_rounds"]
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .map(|r| {
                    (
                        r["round"].as_u64().unwrap_or(0),
                        r["committed"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn members_fail_and_the_coordinator_restarts_without_losing_state() -> anyhow::Result<()> {
    let test_start = Instant::now();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{TINY_RUN}\n[coordinator]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = {HEARTBEAT_TIMEOUT_MS}\nround_deadline_ms = 4000\nmin_replicas = 2\ndata_shards = 8\ncheckpoint_every_rounds = 2\n"
        ),
    )?;
    let state = dir.path().join("state");
    let config = config.to_str().context("path")?;
    let state = state.to_str().context("path")?;
    let serve_log = dir.path().join("serve-1.log");
    let mut coordinator = Proc::start(
        &[
            "serve",
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
        ],
        &serve_log,
    )?;
    let join = coordinator.line_with("forge-node join ", Duration::from_secs(20))?;
    let words: Vec<&str> = join.split_whitespace().collect();
    let (addr, token) = (words[2].to_string(), words[4].to_string());
    assert_eq!(words[3], "--token", "{join}");
    let printed = coordinator.line_with("cluster token: ", Duration::from_secs(1))?;
    assert!(printed.ends_with(&token), "{printed}");

    // A wrong secret is refused with a clear message, by the status client and by a member.
    let fingerprint = token.split_once('.').context("token")?.1;
    let wrong = format!("{}.{fingerprint}", "0".repeat(32));
    let out = run(&["status", &addr, "--token", &wrong])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong cluster token"), "{stderr}");
    let out = run(&["sim-member", &addr, "--token", &wrong, "--seconds", "1"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong cluster token"));
    // A token pinning another certificate fails before any secret is sent.
    let other = format!(
        "{}.{}",
        token.split_once('.').context("token")?.0,
        "ab".repeat(32)
    );
    let out = run(&["status", &addr, "--token", &other])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fingerprint"),
        "{stderr}"
    );

    // Three members in one process, and one in its own process that will be SIGKILLed.
    let member_args = |prefix: &'static str, count: &'static str| {
        vec![
            "sim-member".to_string(),
            addr.clone(),
            "--token".to_string(),
            token.clone(),
            "--count".to_string(),
            count.to_string(),
            "--peer-prefix".to_string(),
            prefix.to_string(),
            "--train-ms".to_string(),
            "50".to_string(),
            "--idle-timeout-ms".to_string(),
            "800".to_string(),
        ]
    };
    let mut steady = Proc::start(&member_args("steady", "3"), &dir.path().join("steady.log"))?;
    let mut victim = Proc::start(&member_args("victim", "1"), &dir.path().join("victim.log"))?;

    // Everyone joins and heartbeats; a round commits with the victim in it.
    let victim_id = wait_for(
        &addr,
        &token,
        Duration::from_secs(15),
        "4 members and a round with the victim",
        |s| {
            let victim = member_of(s, "victim-0")?;
            let with_victim = s["recent_rounds"].as_array()?.iter().any(|r| {
                r["committed"] == true
                    && r["included"]
                        .as_array()
                        .is_some_and(|i| i.iter().any(|m| m.as_u64() == Some(victim)))
            });
            (member_ids(s).len() == 4 && with_victim).then_some(victim)
        },
    )?;

    // The run's model is planned: every member fits it and is a whole replica whose predicted
    // time per micro-batch the status shows.
    let planned = status(&addr, &token)?;
    let replicas = planned["replicas"].as_array().context("replicas")?;
    assert_eq!(replicas.len(), 4, "{planned:#}");
    for replica in replicas {
        assert!(
            replica["predicted_us_per_micro_batch"].as_u64() > Some(0),
            "{replica:#}"
        );
        let stages = replica["stages"].as_array().context("stages")?;
        assert_eq!(stages.len(), 1, "{replica:#}");
        assert!(stages[0]["stage"].is_null(), "{replica:#}");
        assert!(
            stages[0]["predicted"]["memory_bytes"].as_u64() > Some(0),
            "{replica:#}"
        );
    }

    victim.kill();
    let killed = Instant::now();
    let after_death = wait_for(
        &addr,
        &token,
        Duration::from_secs(10),
        "the victim declared dead",
        |s| (member_of(s, "victim-0").is_none()).then(|| s.clone()),
    )?;
    let detected = killed.elapsed();
    assert!(
        detected <= Duration::from_millis(HEARTBEAT_TIMEOUT_MS + 1_000),
        "victim declared dead after {detected:?}; the timeout is {HEARTBEAT_TIMEOUT_MS} ms"
    );
    assert_eq!(member_ids(&after_death).len(), 3);
    assert!(!member_ids(&after_death).contains(&victim_id));
    // Rounds go on without it, committed by the three others.
    let base = committed(&after_death);
    let before_restart = wait_for(
        &addr,
        &token,
        Duration::from_secs(10),
        "two more committed rounds",
        |s| {
            let last = s["recent_rounds"].as_array()?.last()?;
            let three = last["included"].as_array()?.len() == 3;
            (committed(s) >= base + 2 && three && last["committed"] == true).then(|| s.clone())
        },
    )?;

    // SIGKILL the coordinator mid-run and restart it on the same address and state directory.
    coordinator.kill();
    let mut coordinator = Proc::start(
        &[
            "serve",
            "--config",
            config,
            "--listen",
            &addr,
            "--state-dir",
            state,
        ],
        &dir.path().join("serve-2.log"),
    )?;
    let restarted = coordinator.line_with("forge-node join ", Duration::from_secs(20))?;
    assert_eq!(
        restarted, join,
        "the address and token must survive a restart"
    );
    assert!(
        coordinator
            .line_with("restored the previous run", Duration::from_secs(1))
            .is_ok()
    );

    let members_before = member_ids(&before_restart);
    let history_before = history(&before_restart);
    let restored = status(&addr, &token)?;
    assert_eq!(
        member_ids(&restored),
        members_before,
        "members lost in the restart"
    );
    let history_after = history(&restored);
    assert!(
        history_after.starts_with(&history_before)
            || history_before.iter().all(|r| history_after.contains(r)),
        "round history changed: before {history_before:?}, after {history_after:?}"
    );
    assert!(committed(&restored) >= committed(&before_restart));
    assert!(restored["global_version"].as_u64() >= before_restart["global_version"].as_u64());
    assert!(
        restored["last_checkpoint"].as_u64().is_some(),
        "{restored:#}"
    );

    // The members reconnect keeping their ids, and rounds commit again.
    let resumed_base = committed(&restored);
    let resumed = wait_for(
        &addr,
        &token,
        Duration::from_secs(15),
        "rounds committing after the restart",
        |s| {
            let connected = s["members"]
                .as_array()?
                .iter()
                .all(|m| m["connected"] == true);
            (committed(s) >= resumed_base + 2 && connected).then(|| s.clone())
        },
    )?;
    assert_eq!(
        member_ids(&resumed),
        members_before,
        "members changed ids after the restart"
    );
    steady.line_with("(kept its id)", Duration::from_secs(5))?;

    // The refused clients were logged with their address.
    let log = std::fs::read_to_string(&serve_log)?;
    assert!(
        log.lines()
            .any(|l| l.contains("wrong cluster token") && l.contains("127.0.0.1:")),
        "{log}"
    );
    assert!(test_start.elapsed() < Duration::from_secs(60));
    println!(
        "victim declared dead after {detected:?}; {} rounds committed in {:?}",
        committed(&resumed),
        test_start.elapsed()
    );
    Ok(())
}

#[test]
fn serve_refuses_a_typo_in_the_train_table_before_it_listens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("run.toml");
    assert!(TINY_RUN.contains("[train]\n"));
    std::fs::write(
        &config,
        TINY_RUN.replacen("[train]\n", "[train]\nlr_typo = 1\n", 1),
    )?;
    let state = dir.path().join("state");
    let serve_log = dir.path().join("serve.log");
    let config = config.to_str().context("path")?;
    let mut serve = Proc::start(
        &[
            "serve",
            "--config",
            config,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().context("path")?,
        ],
        &serve_log,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("serve still runs 30 s after start with `lr_typo` under [train]");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&serve_log)?;
    assert!(!status.success(), "serve accepted the typo: {stderr}");
    assert!(
        stderr.contains("lr_typo") && stderr.contains(config),
        "the error names neither the key nor the file: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // It stopped before opening its state, so it never listened nor printed the join line.
    let printed: Vec<String> = serve.lines.iter().collect();
    assert!(
        !printed.iter().any(|line| line.contains("forge-node join")),
        "{printed:?}"
    );
    assert!(!state.exists(), "serve opened its state directory");
    Ok(())
}
