//! `forge-coordinator`: command-line entry point of the Forge coordinator.

mod bench;
mod commands;
mod sim_member;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forge_coordinator::planner::{ModelProfile, NodeProfile, Plan, plan};
use forge_coordinator::profile::{USABLE_MEMORY_FRACTION, load_model, load_nodes};
use forge_protocol::session::ControlAction;

#[derive(Debug, Parser)]
#[command(name = "forge-coordinator", version, about = "The Forge coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: QUIC on --listen, state (token, members, rounds) in --state-dir.
    Serve {
        /// The run config handed to every node: checked whole at start (unknown keys and bad
        /// values are refused); its [coordinator] table configures the coordinator.
        #[arg(long)]
        config: PathBuf,
        /// Address to listen on (UDP), e.g. 0.0.0.0:7400; port 0 picks a free port.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory for the state database; reuse it to continue a run after a restart.
        #[arg(long)]
        state_dir: PathBuf,
        /// Change one key of the run config, checked like the file: --set section.key=value
        /// (repeatable, the last wins; a value is TOML or else a string). Nodes get the
        /// config with the changes.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        /// Also serve the live dashboard (open it in a browser), its JSON at /api/status and
        /// Prometheus metrics at /metrics over HTTP on this address: a port alone listens on
        /// 127.0.0.1; any other than a loopback address requires the cluster token
        /// (`?token=TOKEN` in the page's address, or `Authorization: Bearer TOKEN`).
        #[arg(long, value_name = "[IP:]PORT", value_parser = http_addr)]
        http: Option<SocketAddr>,
    },
    /// Show a running coordinator's members, stage plan, rounds, last checkpoint, where the run
    /// ends and the control actions pending.
    Status {
        /// The coordinator's address, as printed by `serve`.
        addr: SocketAddr,
        /// The cluster token printed by `serve` (or FORGE_TOKEN, which `ps` does not show).
        #[arg(long, env = "FORGE_TOKEN", hide_env_values = true)]
        token: String,
        /// Print JSON for scripts instead of text.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
    /// Control a running cluster: `save` (a committed checkpoint as the round under way
    /// commits), `stop` (save, then every node ends on that final model and exits 0), `abort`
    /// (end now without saving; nodes exit 0 saying so) or `anneal` (the schedule's decay
    /// phase starts with the next round, on every node; the run ends with it). The answer says
    /// what will happen and when; `status` shows what is pending.
    Control {
        /// The coordinator's address, as printed by `serve`.
        addr: SocketAddr,
        /// save, stop, abort or anneal.
        #[arg(value_parser = control_action())]
        action: ControlAction,
        /// The cluster token printed by `serve` (or FORGE_TOKEN).
        #[arg(long, env = "FORGE_TOKEN", hide_env_values = true)]
        token: String,
        /// Act as round R closes instead of the round under way (a round in the past is
        /// refused). Without it an abort is immediate: the round under way is abandoned.
        #[arg(long, value_name = "R")]
        at_round: Option<u64>,
        /// Print the answer as JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
    /// Simulated members for tests and demos: join, heartbeat, and report agreeing hashes for
    /// every round and checkpoint, without training anything.
    SimMember {
        /// The coordinator's address.
        addr: SocketAddr,
        /// The cluster token (or FORGE_TOKEN).
        #[arg(long, env = "FORGE_TOKEN", hide_env_values = true)]
        token: String,
        /// How many members this process simulates (one connection each).
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Peer ids are PREFIX-0, PREFIX-1, ...
        #[arg(long, default_value = "sim")]
        peer_prefix: String,
        /// Leave gracefully after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<u64>,
        /// How long a silent coordinator counts as gone before reconnecting, in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        idle_timeout_ms: u64,
        /// Simulated training time per round before reporting, in milliseconds.
        #[arg(long, default_value_t = 500)]
        train_ms: u64,
    },
    /// Benchmarks (not tests): `bench heartbeats` measures the coordinator under many members.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Print the replicas × pipeline stages the planner would choose for a model on some nodes.
    Plan {
        /// A preset (tiny, 4m, 15m, gpt2-124m, llama-1b) or a model profile file ending in .toml.
        #[arg(long)]
        model: String,
        /// TOML file with one [[node]] per machine (name, memory_gib, tflops, upload_mbit_s,
        /// download_mbit_s).
        #[arg(long)]
        nodes: PathBuf,
        /// Sequences per micro-batch (overrides the preset's).
        #[arg(long)]
        micro_batch: Option<u64>,
        /// Tokens per sequence (overrides the preset's).
        #[arg(long)]
        seq_len: Option<u64>,
        /// Replicas the run's rounds need ([coordinator] min_replicas, or start_replicas if
        /// more): a plan with that many wins over a faster one with fewer.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            state_dir,
            sets,
            http,
        } => commands::serve(&config, &sets, listen, &state_dir, http)?,
        Command::Status {
            addr,
            token,
            json,
            timeout_s,
        } => commands::status(addr, &token, json, timeout_s)?,
        Command::Control {
            addr,
            action,
            token,
            at_round,
            json,
            timeout_s,
        } => commands::control(addr, &token, action, at_round, json, timeout_s)?,
        Command::SimMember {
            addr,
            token,
            count,
            peer_prefix,
            seconds,
            idle_timeout_ms,
            train_ms,
        } => sim_member::run(
            addr,
            &token,
            count,
            &peer_prefix,
            seconds,
            idle_timeout_ms,
            train_ms,
        )?,
        Command::Bench { bench } => bench::run(bench)?,
        Command::Plan {
            model,
            nodes,
            micro_batch,
            seq_len,
            replicas,
        } => {
            let profile = load_model(&model, micro_batch, seq_len)
                .with_context(|| format!("cannot load model {model:?}"))?;
            let nodes = load_nodes(&nodes)
                .with_context(|| format!("cannot load nodes file {}", nodes.display()))?;
            print!(
                "{}",
                describe(&profile, &nodes, &plan(&profile, &nodes, replicas))
            );
        }
    }
    Ok(())
}

/// The control actions, listed in `--help`.
fn control_action() -> impl clap::builder::TypedValueParser<Value = ControlAction> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(ControlAction::ALL.map(ControlAction::name))
        .map(|name| name.parse().expect("a listed action"))
}

/// `--http`: `IP:PORT`, or a port alone for 127.0.0.1.
fn http_addr(given: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = given.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    given.parse().map_err(|_| {
        format!("{given:?} is neither a port nor IP:PORT (e.g. 8080, 127.0.0.1:8080, 0.0.0.0:8080)")
    })
}

fn gb(bytes: u64) -> String {
    format!("{:>4.1} GB", bytes as f64 / 1e9)
}

fn ms(seconds: f64) -> String {
    format!("{:>3.0} ms", seconds * 1e3)
}

fn layer_names(profile: &ModelProfile, start: usize, end: usize) -> String {
    let first = &profile.layers[start].name;
    let last = &profile.layers[end - 1].name;
    if end - start == 1 {
        first.clone()
    } else {
        format!("{first} … {last}")
    }
}

/// The plan as a person reads it.
fn describe(profile: &ModelProfile, nodes: &[NodeProfile], plan: &Plan) -> String {
    use std::fmt::Write;
    let name = |id: u64| {
        nodes
            .iter()
            .find(|node| node.id == id)
            .map_or("?", |node| node.name.as_str())
    };
    let width = nodes.iter().map(|node| node.name.len()).max().unwrap_or(4);
    let weights: u64 = profile.layers.iter().map(|l| l.param_bytes).sum();
    let optimizer: u64 = profile.layers.iter().map(|l| l.optimizer_bytes).sum();
    let activations: u64 = profile.layers.iter().map(|l| l.activation_bytes).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {}: {} layers, {} tokens per micro-batch, {:.2} GFLOP per token",
        profile.name,
        profile.layers.len(),
        profile.tokens_per_micro_batch,
        profile.flops_per_token() / 1e9
    );
    let _ = writeln!(
        s,
        "  whole model on one node: {} = weights+grads {} + AdamW and outer state {} + activations {} per micro-batch",
        gb(profile.whole_model_bytes()),
        gb(weights),
        gb(optimizer),
        gb(activations)
    );
    let _ = writeln!(
        s,
        "nodes ({:.0}% of each device's memory is planned for):",
        USABLE_MEMORY_FRACTION * 100.0
    );
    for node in nodes {
        let _ = writeln!(
            s,
            "  {:width$}  {} usable  {:6.1} TFLOP/s  up {:.0} / down {:.0} Mbit/s",
            node.name,
            gb(node.memory_bytes),
            node.flops_per_s / 1e12,
            node.upload_bytes_per_s * 8.0 / 1e6,
            node.download_bytes_per_s * 8.0 / 1e6,
        );
    }
    let tokens_per_s = plan.throughput() * profile.tokens_per_micro_batch as f64;
    let _ = writeln!(
        s,
        "plan: {} replica(s), {} node(s) on standby, {:.2} micro-batches/s ≈ {:.0} tokens/s in total",
        plan.replicas.len(),
        plan.standby.len(),
        plan.throughput(),
        tokens_per_s
    );
    let names = plan
        .replicas
        .iter()
        .flat_map(|replica| &replica.stages)
        .map(|stage| {
            let (start, end) = (stage.layers.start as usize, stage.layers.end as usize);
            layer_names(profile, start, end).chars().count() + 2
        })
        .max()
        .unwrap_or(0);
    for (index, replica) in plan.replicas.iter().enumerate() {
        let kind = if replica.stages.len() == 1 {
            "whole model".to_string()
        } else {
            format!("pipeline of {} stages", replica.stages.len())
        };
        let _ = writeln!(
            s,
            "  replica {index}: {kind}, bottleneck {} per micro-batch",
            ms(replica.bottleneck_s())
        );
        for (stage, plan) in replica.stages.iter().enumerate() {
            let (start, end) = (plan.layers.start as usize, plan.layers.end as usize);
            let limit = nodes
                .iter()
                .find(|node| node.id == plan.node)
                .map_or(0, |node| node.memory_bytes);
            let _ = writeln!(
                s,
                "    stage {stage}  {:width$}  layers {start:>2}..{end:<2} {:names$}  memory {} of {}  compute {}  transfer {}",
                name(plan.node),
                format!("({})", layer_names(profile, start, end)),
                gb(plan.memory_bytes),
                gb(limit),
                ms(plan.compute_s),
                ms(plan.transfer_s),
            );
        }
    }
    if !plan.standby.is_empty() {
        let names: Vec<&str> = plan.standby.iter().map(|id| name(*id)).collect();
        let _ = writeln!(
            s,
            "  standby: {} (cannot hold a stage, or adding it would not shorten any bottleneck)",
            names.join(", ")
        );
    }
    if plan.replicas.is_empty() {
        let _ = writeln!(
            s,
            "  no replica fits: add nodes with more memory, lower --micro-batch or --seq-len, or pick a smaller model"
        );
    }
    s
}
