//! `bench heartbeats`: many simulated members heartbeating against one real coordinator process
//! on 127.0.0.1. Reports the coordinator's own latency percentiles (time in the core's step per
//! heartbeat, and from frame received to handled), its CPU time and peak memory read from
//! `/proc/<pid>`, and the join round trip as the members saw it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use forge_coordinator::latency::Histogram;
use forge_coordinator::{ClientOptions, CoordinatorClient, fetch_status};
use tokio::sync::Semaphore;

use crate::commands::runtime;
use crate::sim_member::capabilities;

#[derive(Debug, Subcommand)]
pub(crate) enum Bench {
    /// Simulated members heartbeating at 1 Hz against one coordinator on 127.0.0.1.
    Heartbeats {
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Length of the measured window, after every member has joined.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Members sharing one client UDP socket (each member still has its own QUIC
        /// connection, handshake and stream).
        #[arg(long, default_value_t = 250)]
        members_per_socket: usize,
    },
}

pub(crate) fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Heartbeats {
            members,
            seconds,
            members_per_socket,
        } => heartbeats(members, seconds, members_per_socket.max(1)),
    }
}

/// The coordinator child process; killed if the benchmark fails half-way.
struct ServerProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start(state_dir: &Path) -> anyhow::Result<(ServerProcess, SocketAddr, String)> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let log = std::fs::File::create(state_dir.join("serve.log"))?;
        let mut child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(state_dir.join("run.toml"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start forge-coordinator serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut server = ServerProcess { child, lines };
        let line = server.wait_for("  forge-node join ", Duration::from_secs(30))?;
        let mut words = line.split_whitespace().skip(2);
        let addr: SocketAddr = words.next().context("no address")?.parse()?;
        let token = words.nth(1).context("no token")?.to_string();
        Ok((server, addr, token))
    }

    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    bail!("coordinator printed no line starting with {prefix:?} in {timeout:?}")
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `kB` field of `/proc/<pid>/status` (VmHWM: peak resident memory; VmRSS: current).
fn memory_kib(pid: &str, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("odd status line")?
        .parse()?)
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

fn heartbeats(members: usize, seconds: u64, per_socket: usize) -> anyhow::Result<()> {
    let state_dir: PathBuf =
        std::env::temp_dir().join(format!("forge-bench-heartbeats-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)?;
    // Rounds never open (min_replicas above the member count), so only heartbeats are measured;
    // the other tables are a complete run config because `serve` validates every table. Every
    // simulated member connects from 127.0.0.1, so the per-address limits are lifted.
    let shards = members + 1;
    std::fs::write(
        state_dir.join("run.toml"),
        format!(
            "{}\n[coordinator]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 10000\nmin_replicas = {shards}\ndata_shards = {shards}\ncheckpoint_every_rounds = 0\nmax_members = {shards}\nmax_connections_per_ip = {shards}\njoins_per_ip_per_s = {shards}\n",
            include_str!("../../configs/tiny-cpu.toml")
        ),
    )?;
    let result = measure(&state_dir, members, seconds, per_socket);
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

fn measure(
    state_dir: &Path,
    members: usize,
    seconds: u64,
    per_socket: usize,
) -> anyhow::Result<()> {
    let (mut server, addr, token) = ServerProcess::start(state_dir)?;
    let pid = server.pid().to_string();
    let runtime = runtime()?;
    let started = Instant::now();
    let (clients, joins) = runtime.block_on(async {
        let sockets = members.div_ceil(per_socket);
        let endpoints = (0..sockets)
            .map(|_| {
                forge_coordinator_client::tls::endpoint(
                    (std::net::Ipv4Addr::LOCALHOST, 0).into(),
                    None,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Joins are fsynced one batch at a time; a bounded number in flight keeps handshakes
        // from timing out while they queue.
        let gate = Arc::new(Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..members {
            let options = ClientOptions {
                endpoint: Some(endpoints[index / per_socket].clone()),
                connect_timeout: Duration::from_secs(30),
                ..ClientOptions::default()
            };
            let token = token.clone();
            let gate = gate.clone();
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let start = Instant::now();
                let key = forge_coordinator::identity::named_keypair(&format!("bench-{index}"));
                let caps = capabilities(key.public().to_peer_id().to_string());
                let (client, _, _) =
                    CoordinatorClient::connect(addr, &token, key, caps, options).await?;
                anyhow::Ok((client, start.elapsed()))
            });
        }
        let mut clients = Vec::with_capacity(members);
        let mut joins = Histogram::default();
        while let Some(joined) = tasks.join_next().await {
            let (client, took) = joined??;
            joins.record(took);
            clients.push(client);
        }
        anyhow::Ok((clients, joins))
    })?;
    let joined_in = started.elapsed();
    println!(
        "{members} members joined in {:.1} s",
        joined_in.as_secs_f64()
    );

    // The join phase's statistics are printed and reset, so the final line covers the window.
    Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .context("cannot signal the coordinator")?;
    let join_stats = server.wait_for("stats ", Duration::from_secs(30))?;
    println!("join phase: {join_stats}");
    let server_cpu_0 = cpu_seconds(&pid)?;
    let own_cpu_0 = cpu_seconds("self")?;
    let window = Instant::now();
    // The benchmark's measured window: members heartbeat on their own timers meanwhile.
    std::thread::sleep(Duration::from_secs(seconds));
    let elapsed = window.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(&pid)? - server_cpu_0;
    let own_cpu = cpu_seconds("self")? - own_cpu_0;
    let hwm = memory_kib(&pid, "VmHWM:")?;
    let rss = memory_kib(&pid, "VmRSS:")?;

    let status_start = Instant::now();
    let status = runtime.block_on(fetch_status(addr, &token, Duration::from_secs(30)))?;
    let status_rtt = status_start.elapsed();
    let alive = status.members.len();
    let stalest = status
        .members
        .iter()
        .map(|m| m.last_heartbeat_ms_ago)
        .max()
        .unwrap_or(0);

    Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .context("cannot signal the coordinator")?;
    let stats = server.wait_for("stats ", Duration::from_secs(30))?;
    drop(clients);
    drop(runtime);

    let field = |name: &str| {
        stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .to_string()
    };
    println!("members alive at the end: {alive} of {members} (stalest heartbeat {stalest} ms ago)");
    println!(
        "client sockets: {} ({} members each), one QUIC connection per member",
        members.div_ceil(per_socket),
        per_socket
    );
    println!(
        "heartbeats handled by the coordinator in the window: {}",
        field("heartbeats")
    );
    println!(
        "core step per heartbeat: p50 {} us, p99 {} us, max {} us",
        field("heartbeat_step_p50_us"),
        field("heartbeat_step_p99_us"),
        field("heartbeat_step_max_us")
    );
    println!(
        "heartbeat received → handled (queue + batch + step): p50 {} us, p99 {} us",
        field("heartbeat_handling_p50_us"),
        field("heartbeat_handling_p99_us")
    );
    println!(
        "database commits: {} (p50 {} us, p99 {} us)",
        field("commits"),
        field("commit_p50_us"),
        field("commit_p99_us")
    );
    println!(
        "join round trip as members saw it (handshake + token + fsynced join): p50 {}, p99 {}",
        ms(joins.quantile(0.5)),
        ms(joins.quantile(0.99))
    );
    println!("status query with {alive} members: {}", ms(status_rtt));
    println!(
        "coordinator CPU over the {elapsed:.1} s window: {server_cpu:.2} s ({:.1}% of one core)",
        100.0 * server_cpu / elapsed
    );
    println!(
        "benchmark process (the simulated members) CPU: {own_cpu:.2} s ({:.1}% of one core)",
        100.0 * own_cpu / elapsed
    );
    println!(
        "coordinator memory: peak {:.1} MiB (VmHWM), {:.1} MiB now (VmRSS)",
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!("{stats}");
    if alive != members {
        bail!(
            "{} members were declared dead during the benchmark",
            members - alive
        );
    }
    Ok(())
}
