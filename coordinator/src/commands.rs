//! `serve`, `status` and `control`: the coordinator as a user runs it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use forge_coordinator::server::{Server, ServerStats, Startup};
use forge_coordinator::{fetch_status, run_config, send_control};
use forge_protocol::session::{
    ControlAction, ControlReply, ControlRequest, PendingControl, Status,
};
use forge_protocol::{Assignment, DeviceKind, RoundId};

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the lines a user or script reads.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub(crate) fn serve(
    config: &Path,
    sets: &[String],
    listen: SocketAddr,
    state_dir: &Path,
    http: Option<SocketAddr>,
) -> anyhow::Result<()> {
    init_logging();
    let config = run_config::load_with(config, sets)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut server = Server::bind(config, listen, state_dir)?;
        let dashboard = http.map(|addr| server.serve_http(addr)).transpose()?;
        let addr = server.local_addr()?;
        let token = server.token();
        let how = match server.startup() {
            Startup::FirstStart => "new cluster: token and certificate generated",
            Startup::NoRunState => "no run yet",
            Startup::Restored => "restored the previous run",
        };
        println!(
            "forge-coordinator listening on {addr} ({how}; state in {})",
            server.state_file().display()
        );
        println!("cluster token: {token}");
        println!("to add a machine, run on it:");
        println!("  forge-node join {addr} --token {token}");
        if addr.ip().is_unspecified() {
            println!("  (replace {} with this machine's LAN address)", addr.ip());
        }
        if let Some((at, needs_token)) = dashboard {
            let host = if at.ip().is_unspecified() {
                "THIS-MACHINE".to_string()
            } else {
                at.ip().to_string()
            };
            let query = if needs_token {
                format!("?token={token}")
            } else {
                String::new()
            };
            println!(
                "dashboard: http://{host}:{}/{query} (metrics for Prometheus at /metrics)",
                at.port()
            );
        }
        let stats = server.stats();
        let on_signal = stats.clone();
        // SIGUSR1 prints the statistics since the last print and starts a new window.
        if let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    let window = std::mem::take(&mut *lock(&on_signal));
                    println!("{}", stats_line(&window));
                }
            });
        }
        let result = server.run(shutdown_signal()).await;
        println!("{}", stats_line(&lock(&stats)));
        result
    })?;
    Ok(())
}

fn lock(stats: &Mutex<ServerStats>) -> std::sync::MutexGuard<'_, ServerStats> {
    stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match &mut term {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn us(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1e6)
}

/// One machine-readable line, read by `bench heartbeats`.
pub(crate) fn stats_line(stats: &ServerStats) -> String {
    format!(
        "stats heartbeats={} heartbeat_step_p50_us={} heartbeat_step_p99_us={} heartbeat_step_max_us={} heartbeat_handling_p50_us={} heartbeat_handling_p99_us={} other_messages={} other_step_p50_us={} other_step_p99_us={} commits={} commit_p50_us={} commit_p99_us={}",
        stats.heartbeat_step.count(),
        us(stats.heartbeat_step.quantile(0.5)),
        us(stats.heartbeat_step.quantile(0.99)),
        us(stats.heartbeat_step.max()),
        us(stats.heartbeat_handling.quantile(0.5)),
        us(stats.heartbeat_handling.quantile(0.99)),
        stats.other_step.count(),
        us(stats.other_step.quantile(0.5)),
        us(stats.other_step.quantile(0.99)),
        stats.commits.count(),
        us(stats.commits.quantile(0.5)),
        us(stats.commits.quantile(0.99)),
    )
}

pub(crate) fn status(
    addr: SocketAddr,
    token: &str,
    json: bool,
    timeout_s: u64,
) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let status = runtime.block_on(fetch_status(addr, token, Duration::from_secs(timeout_s)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", describe(addr, &status));
    }
    Ok(())
}

/// `control`: sends the request and prints the coordinator's answer; a refusal is an error.
pub(crate) fn control(
    addr: SocketAddr,
    token: &str,
    action: ControlAction,
    at_round: Option<u64>,
    json: bool,
    timeout_s: u64,
) -> anyhow::Result<()> {
    let request = ControlRequest {
        action,
        at_round: at_round.map(RoundId),
    };
    let runtime = runtime()?;
    let timeout = Duration::from_secs(timeout_s);
    let reply = runtime.block_on(send_control(addr, token, request, timeout))?;
    match reply {
        ControlReply::Accepted { what, pending } => {
            if json {
                let answer =
                    serde_json::json!({ "action": action, "what": what, "pending": pending });
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!("{action}: {what}");
                if !pending.is_empty() {
                    println!("pending: {}", pending_list(&pending));
                }
            }
            Ok(())
        }
        ControlReply::Refused(refused) => {
            anyhow::bail!(
                "the coordinator at {addr} refused {action}: {}",
                refused.message
            )
        }
    }
}

/// Pending control actions as a person reads them.
fn pending_list(pending: &[PendingControl]) -> String {
    pending
        .iter()
        .map(|p| format!("{} as round {} closes", p.action, p.at_round.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

fn place(assignment: Option<&Assignment>) -> String {
    match assignment {
        None => "standby".to_string(),
        Some(a) => {
            let mut s = format!(
                "replica {}, data shard {}/{}",
                a.replica.0, a.data_shard.index, a.data_shard.count
            );
            if let Some(stage) = a.stage {
                let _ = write!(
                    s,
                    ", stage {}/{} (layers {}..{})",
                    stage.stage, stage.stages, stage.layers.start, stage.layers.end
                );
            }
            s
        }
    }
}

/// The status as a person reads it.
fn describe(addr: SocketAddr, status: &Status) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "coordinator {addr} (forge {}): {} member(s)",
        status.software_version,
        status.members.len()
    );
    for m in &status.members {
        let cuda = m
            .devices
            .iter()
            .filter(|d| d.kind == DeviceKind::Cuda)
            .count();
        let memory: u64 = m.devices.iter().map(|d| d.memory_bytes).sum();
        let devices = if cuda > 0 {
            format!("{cuda}× GPU, {}", gb(memory))
        } else {
            format!("CPU, {}", gb(memory))
        };
        let _ = writeln!(
            s,
            "  member {:<4} {:<20} {:<18} {:>10.0} tokens/s  up {:.0} / down {:.0} Mbit/s  heartbeat {} ms ago{}  {}",
            m.member.0,
            m.peer_id,
            devices,
            m.tokens_per_s,
            m.upload_bytes_per_s as f64 * 8.0 / 1e6,
            m.download_bytes_per_s as f64 * 8.0 / 1e6,
            m.last_heartbeat_ms_ago,
            if m.connected { "" } else { " (disconnected)" },
            place(m.assignment.as_ref()),
        );
    }
    let _ = writeln!(s, "stage plan: {} replica(s)", status.replicas.len());
    for replica in &status.replicas {
        let stages: Vec<String> = replica
            .stages
            .iter()
            .map(|stage| {
                let layers = match stage.stage {
                    None => "whole model".to_string(),
                    Some(st) => format!("layers {}..{}", st.layers.start, st.layers.end),
                };
                let predicted = stage.predicted.map_or(String::new(), |p| {
                    format!(
                        ", {}, {} compute + {} transfer",
                        gb(p.memory_bytes),
                        ms(p.compute_us),
                        ms(p.transfer_us)
                    )
                });
                format!("member {} ({layers}{predicted})", stage.member.0)
            })
            .collect();
        let predicted = replica
            .predicted_us_per_micro_batch
            .map_or(String::new(), |us| {
                format!("; predicted {} per micro-batch", ms(us))
            });
        let _ = writeln!(
            s,
            "  replica {} (data shard {}): {}{predicted}",
            replica.replica.0,
            replica.data_shard.index,
            stages.join(" → ")
        );
    }
    if !status.standby.is_empty() {
        let ids: Vec<String> = status.standby.iter().map(|m| m.0.to_string()).collect();
        let _ = writeln!(s, "  standby: members {}", ids.join(", "));
    }
    match &status.open_round {
        Some(round) => {
            let _ = writeln!(
                s,
                "current round: {} open, {} of {} participants reported, deadline in {} ms",
                round.round.0,
                round.reported.len(),
                round.participants.len(),
                round.deadline_in_ms
            );
        }
        None => {
            let _ = writeln!(
                s,
                "current round: none open (newest: {})",
                status
                    .last_round
                    .map_or("none yet".to_string(), |r| r.0.to_string())
            );
        }
    }
    let _ = write!(
        s,
        "rounds: {} committed, {} abandoned",
        status.rounds_committed, status.rounds_abandoned
    );
    if let Some(last) = status.recent_rounds.last() {
        let _ = write!(
            s,
            "; last closed: round {} {} with {} member(s)",
            last.round.0,
            if last.committed {
                "committed"
            } else {
                "abandoned"
            },
            last.included.len()
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "global state version: {}", status.global_version);
    let mut run = match status.plan.final_version {
        0 => "no end (until stopped)".to_string(),
        version => format!("ends at global version {version}"),
    };
    if let Some(from) = status.plan.anneal_from {
        let _ = write!(run, ", decay phase since version {from} (annealed)");
    }
    if status.aborted {
        run = "aborted by the operator; no round opens again".to_string();
    }
    let _ = writeln!(s, "run: {run}");
    if !status.pending_control.is_empty() {
        let _ = writeln!(
            s,
            "pending control: {}",
            pending_list(&status.pending_control)
        );
    }
    if let Some(data) = &status.data {
        let _ = writeln!(
            s,
            "data: {} sequences read ({:.2} epochs of {} windows); {} leased again next",
            data.consumed,
            data.consumed as f64 / data.windows.max(1) as f64,
            data.windows,
            data.returned
        );
    }
    let _ = writeln!(
        s,
        "last committed checkpoint: {}",
        status
            .last_checkpoint
            .map_or("none yet".to_string(), |r| format!("round {}", r.0))
    );
    s
}

#[cfg(test)]
mod tests {
    use forge_protocol::session::{ReplicaStatus, StagePrediction, StageStatus};
    use forge_protocol::{DataShard, LayerRange, MemberId, ReplicaId, StageAssignment};

    use super::*;

    #[test]
    fn status_shows_each_stage_with_the_planners_prediction() {
        let stage = |member: u64, index: u32, layers: (u32, u32), compute_us: u64| StageStatus {
            member: MemberId(member),
            stage: Some(StageAssignment {
                stage: index,
                stages: 2,
                layers: LayerRange {
                    start: layers.0,
                    end: layers.1,
                },
            }),
            predicted: Some(StagePrediction {
                memory_bytes: 2_500_000_000,
                compute_us,
                transfer_us: 1_500,
            }),
        };
        let status = Status {
            software_version: "0.1.0".to_string(),
            members: Vec::new(),
            replicas: vec![ReplicaStatus {
                replica: ReplicaId(3),
                data_shard: DataShard { index: 1, count: 4 },
                stages: vec![stage(4, 0, (0, 3), 12_000), stage(7, 1, (3, 6), 20_250)],
                predicted_us_per_micro_batch: Some(21_750),
            }],
            standby: vec![MemberId(9)],
            open_round: None,
            last_round: None,
            rounds_committed: 0,
            rounds_abandoned: 0,
            recent_rounds: Vec::new(),
            global_version: 0,
            last_checkpoint: None,
            data: None,
            plan: Default::default(),
            pending_control: Vec::new(),
            aborted: false,
        };
        let text = describe("127.0.0.1:7000".parse().unwrap(), &status);
        assert!(
            text.contains(
                "  replica 3 (data shard 1): member 4 (layers 0..3, 2.5 GB, 12.0 ms compute + 1.5 ms \
                 transfer) → member 7 (layers 3..6, 2.5 GB, 20.2 ms compute + 1.5 ms transfer); \
                 predicted 21.8 ms per micro-batch\n"
            ),
            "{text}"
        );
        assert!(text.contains("  standby: members 9\n"), "{text}");
        assert!(text.contains("run: no end (until stopped)\n"), "{text}");
        let pending = Status {
            pending_control: vec![PendingControl {
                action: ControlAction::Stop,
                at_round: RoundId(7),
            }],
            plan: forge_protocol::RunPlan {
                final_version: 14,
                anneal_from: Some(2),
            },
            ..status
        };
        let text = describe("127.0.0.1:7000".parse().unwrap(), &pending);
        assert!(
            text.contains("run: ends at global version 14, decay phase since version 2"),
            "{text}"
        );
        assert!(
            text.contains("pending control: stop as round 7 closes\n"),
            "{text}"
        );
    }
}
