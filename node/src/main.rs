//! `forge-node`: the program each machine runs: `join` (a node of a DiLoCo run), `train` (one
//! machine alone), `sample`, `export`, `data stats`, `model info` and the benchmarks. This file parses the
//! command line and runs the single-machine subcommands.

/// Test-only misbehaviour for the hostile-member tests (debug builds).
mod hostile;
/// `forge-node join`: the shell around the round state machine (connections, event loop, jobs).
mod join;
/// Peer-to-peer layer: node identity, the swarm, the all-reduce and the state transfer.
mod p2p;
/// `forge-node plot`: loss curves of runs as a PNG.
mod plot;
/// One node's view of the DiLoCo rounds as a state machine with no I/O.
mod round;

/// The decoders of the files and streams a node reads, under the workspace's mutation fuzzer.
#[cfg(test)]
mod fuzz_tests;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use forge_protocol::session::ControlAction;
use forge_trainer::bench::{TrainStepBench, TrainStepResult};
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::config::{LoadRunConfig, RunConfig};
use forge_trainer::control;
use forge_trainer::data::{Dataset, Tokenizer};
use forge_trainer::device::parse_device;
use forge_trainer::export::HfExport;
use forge_trainer::models::{Family, ModelConfig, PRESETS, Precision};
use forge_trainer::sample::{SampleConfig, generate};
use forge_trainer::train::{Outcome, Trainer, load_checkpoint_model};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use tch::{Device, Tensor};

#[derive(Debug, Parser)]
#[command(
    name = "forge-node",
    version,
    about = "Forge node: trains a model replica"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a run: train a replica with the other nodes of a coordinator (DiLoCo).
    Join(JoinArgs),
    /// Train on this machine alone, from a run config (resumes from its newest checkpoint).
    Train(TrainArgs),
    /// Control a running `forge-node train` at its next step boundary: `save` (a checkpoint
    /// now), `stop` (a final evaluation and checkpoint, then it exits 0; the run stays ended),
    /// `abort` (it exits 0 without saving) or `anneal` (the schedule's decay phase starts with
    /// the next step; the run ends with it). Prints the trainer's answer. For a run across
    /// machines, use `forge-coordinator control`.
    Control(ControlArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Draw training and validation loss against tokens for one or several runs (a train
    /// run's out_dir or a join node's --workdir) as a PNG.
    Plot(PlotArgs),
    /// Write a checkpoint as a Hugging Face model folder (transformers' from_pretrained).
    Export(ExportArgs),
    /// Inspect a run config's data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Inspect model architectures.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Parameter count and training FLOPs per token of a preset or a run config's [model].
    Info(InfoArgs),
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// The coordinator's address (host:port), as `forge-coordinator serve` printed it.
    coordinator: String,
    /// The cluster token `forge-coordinator serve` printed (or FORGE_TOKEN).
    #[arg(long, env = "FORGE_TOKEN", hide_env_values = true)]
    token: String,
    /// The devices this node trains its replica on: cpu, cuda (every visible GPU), cuda:N, or a
    /// list (cuda:0,cuda:2). With several, they train the replica together (data parallelism,
    /// gradients averaged every step) and the node takes part in rounds as one replica.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Data-parallel workers on the CPU (with --device cpu); overrides the run config's
    /// [train.parallel] cpu_workers.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    cpu_workers: Option<u32>,
    /// libtorch CPU threads for this node; overrides the run config's [train] threads (nodes
    /// sharing one machine should split its cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Node identity, token caches and the run directory.
    #[arg(long, default_value = "forge-node")]
    workdir: PathBuf,
    /// Relative corpus paths in the run config are taken from here.
    #[arg(long, default_value = ".")]
    data_root: PathBuf,
    /// Address for connections from peers (an unspecified IP advertises the one facing the
    /// coordinator).
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: std::net::SocketAddr,
    /// Cap on this node's sync upload, in Mbit/s on the link (QUIC framing and acknowledgements
    /// included). Set it to the uplink's rate (for example 1000 on gigabit Ethernet): the node
    /// then paces its upload at the link's rate instead of overrunning the switch port's queue,
    /// which makes all-reduces among 3 or more nodes faster (docs/benchmarks/diloco-tiny-cpu.md).
    #[arg(long, value_parser = positive_mbps)]
    max_upload_mbps: Option<f64>,
    /// Memory each device may use for training, as the coordinator's stage planner sees it:
    /// for example 300MB or 1.5GiB (default: the device's total memory). With less than the
    /// whole model needs, the coordinator plans pipeline stages.
    #[arg(long, value_name = "SIZE", value_parser = join::parse_memory_size)]
    memory_limit: Option<u64>,
    /// Change one key of the coordinator's run config for this node, checked like the file:
    /// --set section.key=value (repeatable). A node may set how it trains its replica
    /// (train.threads, train.micro_batch, train.precision, train.parallel.*), not what the
    /// run computes.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Run config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Start from scratch even if the run directory has checkpoints.
    #[arg(long)]
    no_resume: bool,
    /// Change one key of the run config, checked like the file: --set section.key=value
    /// (repeatable, the last wins; a value is TOML or else a string, e.g. train.lr=3e-4,
    /// train.device=cuda:0).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Print the resolved config, the model's size, tokens per step, steps, tokens in all and
    /// an estimated time from a few timed steps, then exit without training.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// The run directory ([train] out_dir) of the running `forge-node train`.
    run_dir: PathBuf,
    /// save, stop, abort or anneal.
    #[arg(value_parser = control_action())]
    action: ControlAction,
    /// Give up when the trainer has not answered after this many seconds (it takes requests
    /// between two steps; not while it evaluates or saves).
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

/// The control actions, listed in `--help`.
fn control_action() -> impl clap::builder::TypedValueParser<Value = ControlAction> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(ControlAction::ALL.map(ControlAction::name))
        .map(|name| name.parse().expect("a listed action"))
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Run folders: `forge-node train`'s out_dir (metrics.jsonl) or a node's --workdir
    /// (run/rounds.jsonl; its tokens are the whole group's).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(short, long, default_value = "loss.png")]
    output: PathBuf,
    /// Exponential smoothing of the training loss, in [0, 1): 0 draws it as logged.
    #[arg(long, default_value_t = 0.8)]
    smooth: f64,
}

#[derive(Debug, Args)]
struct SampleArgs {
    /// A checkpoint directory (runs/NAME/checkpoints/step-NNNNNNNN) or a run directory (its newest).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "Once upon a time")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// 0 samples from the whole vocabulary.
    #[arg(long, default_value_t = 40)]
    top_k: i64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// A checkpoint directory (runs/NAME/checkpoints/step-NNNNNNNN, or a DiLoCo node's
    /// diloco-checkpoints/step-NNNNNNNN) or a run directory (its newest).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The folder to write: config.json, model.safetensors, generation_config.json,
    /// tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    hf: PathBuf,
    /// A tokenizer.json to ship instead of the checkpoint's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Write into a folder that is not empty (the export's files are replaced, others kept).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Tokenize (or reuse the cache), then print corpus statistics and the bigram baseline the
    /// model must beat.
    Stats {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Forward + backward + grad clip + AdamW on a random batch: tokens/s, step time, MFU.
    TrainStep(TrainStepArgs),
    /// fp32 all-reduces over QUIC, timed against the ring bound. Without --addrs: among PEERS
    /// nodes in this process on 127.0.0.1 (loopback: this measures the stack's CPU cost, not a
    /// network). With --addrs: this process is member --rank of a benchmark among processes
    /// (one per machine or network namespace; scripts/bench_allreduce_netns.sh runs them).
    AllReduce(AllReduceArgs),
    /// A joiner's state fetch: member 0 of --addrs fetches the global state (parameters and
    /// momentum, fp32) of a --values-parameter model from all the others, timed against the
    /// state's bytes over its link (scripts/bench_allreduce_netns.sh --what state runs it).
    StateTransfer(StateTransferArgs),
    /// A model's layers in pipeline stages joined over QUIC, against the whole model in one
    /// process on the same batches, in the same run. Without --addrs: --stages stages in
    /// threads of this process on 127.0.0.1. With --addrs: this process is stage --rank of a
    /// pipeline among processes (one per machine or network namespace).
    Pipeline(PipelineArgs),
}

#[derive(Debug, Args)]
struct PipelineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: i64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: i64,
    /// Micro-batches per step (GPipe): more shrink the pipeline's bubble.
    #[arg(long, default_value_t = 4)]
    micro_batches: usize,
    /// Measured steps (the median is reported), after one warm-up step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// How activations and their gradients travel: fp32 or bf16.
    #[arg(long, default_value = "fp32", value_parser = stage_dtype)]
    wire: forge_protocol::pipeline::StageDtype,
    /// In-process stages (ignored with --addrs).
    #[arg(long, default_value_t = 2)]
    stages: usize,
    /// Every stage's IP:PORT, in stage order, the same list for every member.
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<std::net::SocketAddr>,
    /// This member's stage: its index into --addrs.
    #[arg(long, requires = "addrs")]
    rank: Option<usize>,
    /// libtorch threads of this process.
    #[arg(long)]
    threads: Option<i32>,
    /// Print one JSON object per stage instead of text.
    #[arg(long)]
    json: bool,
}

fn stage_dtype(s: &str) -> Result<forge_protocol::pipeline::StageDtype, String> {
    match s {
        "fp32" => Ok(forge_protocol::pipeline::StageDtype::F32),
        "bf16" => Ok(forge_protocol::pipeline::StageDtype::Bf16),
        _ => Err(format!("'{s}' is no wire format: fp32 or bf16")),
    }
}

#[derive(Debug, Args)]
struct StateTransferArgs {
    /// Parameters of the model whose state is fetched (15191712: 15m, 124439808: gpt2-124m).
    #[arg(long, default_value_t = 15_191_712)]
    values: usize,
    /// Measured fetches (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Every member's IP:PORT in rank order; member 0 fetches, the others serve.
    #[arg(long, value_delimiter = ',', required = true)]
    addrs: Vec<std::net::SocketAddr>,
    /// This member's index into --addrs.
    #[arg(long)]
    rank: usize,
    /// The joiner's link bandwidth, Mbit/s, for the bound.
    #[arg(long, default_value_t = 1000.0)]
    bandwidth_mbps: f64,
    /// Print one JSON object instead of text (member 0).
    #[arg(long)]
    json: bool,
}

/// An upload cap: a positive, finite number of Mbit/s.
fn positive_mbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(m) if m > 0.0 && m.is_finite() => Ok(m),
        _ => Err(format!(
            "'{s}' is not a rate: give the uplink's rate in Mbit/s, a positive number (for example 1000)"
        )),
    }
}

#[derive(Debug, Args)]
struct AllReduceArgs {
    /// In-process peers (ignored with --addrs).
    #[arg(long, default_value_t = 2)]
    peers: usize,
    /// Parameters averaged (fp32): 15191712 is the 15m preset, 124439808 gpt2-124m.
    #[arg(long, default_value_t = 15_191_712)]
    values: usize,
    /// Measured rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Every member's IP:PORT, in rank order, the same list for every member.
    #[arg(long, value_delimiter = ',')]
    addrs: Vec<std::net::SocketAddr>,
    /// This member's index into --addrs.
    #[arg(long, requires = "addrs")]
    rank: Option<usize>,
    /// Link bandwidth the ring bound is computed for, in Mbit/s (with --addrs).
    #[arg(long, default_value_t = 1000.0)]
    bandwidth_mbps: f64,
    /// Cap on this member's upload, in Mbit/s on the link, as `forge-node join --max-upload-mbps`
    /// (with --addrs).
    #[arg(long, requires = "addrs", value_parser = positive_mbps)]
    max_upload_mbps: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Which model: a preset (with an optional family) or the [model] section of a run config.
#[derive(Debug, Args)]
struct ModelArgs {
    /// Model preset: tiny, 4m, 15m, gpt2-124m, llama-1b.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// Architecture family for the preset: llama or gpt2 (default: llama; gpt2 for gpt2-124m).
    #[arg(long, conflicts_with = "config")]
    family: Option<Family>,
    /// Run config whose [model] section names the model.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ModelArgs {
    fn resolve(&self) -> Result<ModelConfig> {
        match (&self.preset, &self.config) {
            (_, Some(path)) => Ok(RunConfig::load(path)?.model_config()?),
            (Some(preset), None) => Ok(ModelConfig::preset(preset, self.family)?),
            (None, None) => anyhow::bail!(
                "name a model: --preset ({}) or --config FILE",
                PRESETS.join(", ")
            ),
        }
    }
}

#[derive(Debug, Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequence length for the attention part of FLOPs/token (default: the model's maximum).
    #[arg(long)]
    seq: Option<i64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TrainStepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: i64,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: i64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32 or bf16 for matmuls and attention (default: bf16 on CUDA, fp32 on CPU).
    #[arg(long)]
    precision: Option<Precision>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// CPU threads for libtorch kernels (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Peak TFLOP/s of the device, for MFU where the built-in table has no entry (CPUs).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Join(args) => join::run(join::JoinOptions {
            coordinator: args.coordinator,
            token: args.token,
            device: args.device,
            cpu_workers: args.cpu_workers.map(|n| n as usize),
            threads: args.threads.map(|n| n as usize),
            workdir: args.workdir,
            data_root: args.data_root,
            listen: args.listen,
            max_upload_mbps: args.max_upload_mbps,
            memory_limit: args.memory_limit,
            sets: args.sets,
        }),
        Command::Train(args) => train(&args),
        Command::Control(args) => run_control(&args),
        Command::Sample(args) => sample(&args),
        Command::Plot(args) => plot::plot(&args.runs, &args.output, args.smooth),
        Command::Export(args) => export(&args),
        Command::Data(DataCommand::Stats { config }) => data_stats(&config),
        Command::Model(ModelCommand::Info(args)) => model_info(&args),
        Command::Bench(BenchCommand::TrainStep(args)) => bench_train_step(&args),
        Command::Bench(BenchCommand::AllReduce(args)) => bench_all_reduce(&args),
        Command::Bench(BenchCommand::StateTransfer(args)) => bench_state_transfer(&args),
        Command::Bench(BenchCommand::Pipeline(args)) => bench_pipeline(&args),
    }
}

/// For the test that kills a run in the middle of a background save:
/// `FORGE_TEST_HOLD_CHECKPOINT_WRITES=STEP` stops background writes of checkpoints of STEP and
/// later halfway, for good.
fn test_hold_checkpoint_writes() -> Result<Option<u64>> {
    let Ok(step) = std::env::var("FORGE_TEST_HOLD_CHECKPOINT_WRITES") else {
        return Ok(None);
    };
    let step = step.parse().with_context(|| {
        format!("FORGE_TEST_HOLD_CHECKPOINT_WRITES={step}: give the step whose write to hold")
    })?;
    Ok(Some(step))
}

fn train(args: &TrainArgs) -> Result<()> {
    let mut cfg = RunConfig::load_with(&args.config, &args.sets)?;
    if args.dry_run {
        return dry_run(cfg);
    }
    if args.no_resume {
        cfg.checkpoint.resume = false;
    }
    // Ctrl-C / SIGTERM set the flag; the loop saves a checkpoint and returns.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    // Held while this process trains: `forge-node control` talks to it through the run dir.
    let inbox = control::Inbox::open(&cfg.train.out_dir)?;
    let mut trainer = Trainer::new(cfg)?;
    trainer.set_control(inbox);
    if let Some(step) = test_hold_checkpoint_writes()? {
        trainer.hold_checkpoint_writes_from(step);
    }
    let summary = trainer.run(&stop)?;
    match &summary.outcome {
        Outcome::Finished { step, checkpoint } => {
            println!(
                "finished at step {step}; checkpoint {}",
                checkpoint.display()
            );
        }
        Outcome::Interrupted { step, checkpoint } => {
            println!(
                "interrupted at step {step}; checkpoint {}; run the same command to resume",
                checkpoint.display()
            );
        }
        Outcome::Aborted { step } => {
            let newest = trainer
                .last_checkpoint()
                .map_or("none".to_string(), |dir| dir.display().to_string());
            println!(
                "aborted at step {step} by forge-node control; nothing saved (newest checkpoint: \
                 {newest})"
            );
            return Ok(());
        }
    }
    if let (Some(loss), Some(bpb)) = (summary.final_eval_loss, summary.final_eval_bpb) {
        println!("validation loss {loss:.4} ({bpb:.4} bits per byte)");
    }
    if let Some(text) = &summary.sample {
        println!("sample: {text}");
    }
    if trainer.workers() > 1 {
        let timing = trainer.timing();
        println!(
            "data parallelism: {} workers; gradient exchange {:.2} s of {:.2} s in {} steps ({:.1}% of step time)",
            trainer.workers(),
            timing.comm_s,
            timing.step_s,
            timing.steps,
            100.0 * timing.comm_fraction()
        );
    }
    println!(
        "metrics: {}",
        summary.out_dir.join("metrics.jsonl").display()
    );
    Ok(())
}

/// `forge-node control`: the trainer's answer, or an error when it refused or is not there.
fn run_control(args: &ControlArgs) -> Result<()> {
    let timeout = std::time::Duration::from_secs(args.timeout_s);
    let answer = control::request(&args.run_dir, args.action, timeout)?;
    if !answer.accepted {
        anyhow::bail!(
            "forge-node train refused {} at step {}: {}",
            answer.action,
            answer.step,
            answer.what
        );
    }
    println!("{} at step {}: {}", answer.action, answer.step, answer.what);
    Ok(())
}

fn sample(args: &SampleArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let dir = resolve_checkpoint(&args.checkpoint)?;
    let (_vs, model, _state) = load_checkpoint_model(&dir, device)?;
    let tokenizer = Tokenizer::load(&dir.join("tokenizer.json"))?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let cfg = SampleConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let new = generate(&model, &prompt, &cfg, &tokenizer.stop_ids(), device);
    println!("{}{}", args.prompt, tokenizer.decode(&new)?);
    Ok(())
}

fn export(args: &ExportArgs) -> Result<()> {
    let checkpoint = resolve_checkpoint(&args.checkpoint)?;
    let done = HfExport {
        checkpoint,
        out: args.hf.clone(),
        tokenizer: args.tokenizer.clone(),
        force: args.force,
    }
    .run()?;
    println!(
        "exported step {} ({:.2}M parameters) to {} as {}: {}",
        done.step,
        done.params as f64 / 1e6,
        done.out.display(),
        done.architecture,
        done.files.join(", ")
    );
    println!(
        "load it with AutoModelForCausalLM.from_pretrained({:?}) and AutoTokenizer.from_pretrained({:?})",
        done.out.display().to_string(),
        done.out.display().to_string()
    );
    Ok(())
}

/// A checkpoint directory as given, or the newest valid one under a run directory (a DiLoCo
/// node's run directory keeps its shards in `diloco-checkpoints/`).
fn resolve_checkpoint(path: &std::path::Path) -> Result<PathBuf> {
    if path.join("manifest.json").is_file() {
        return Ok(path.to_path_buf());
    }
    for root in [
        path.join("checkpoints"),
        path.join("diloco-checkpoints"),
        path.to_path_buf(),
    ] {
        if let Some((_, dir)) = CheckpointDir::new(&root, usize::MAX).latest_valid() {
            return Ok(dir);
        }
    }
    anyhow::bail!(
        "no valid checkpoint at {}: pass a step-NNNNNNNN directory or a run directory that has \
         checkpoints/ or diloco-checkpoints/",
        path.display()
    )
}

fn data_stats(config: &std::path::Path) -> Result<()> {
    let cfg = RunConfig::load(config)?;
    let dataset = Dataset::prepare(&cfg.data)?;
    print!("{}", dataset.stats_report()?);
    Ok(())
}

fn model_info(args: &InfoArgs) -> Result<()> {
    let cfg = args.model.resolve()?;
    let seq = args.seq.unwrap_or(cfg.max_seq_len);
    let flops = cfg.train_flops_per_token(seq);
    if args.json {
        let value = serde_json::json!({
            "config": cfg,
            "params": cfg.param_count(),
            "matmul_params": cfg.matmul_params(),
            "seq_len": seq,
            "train_flops_per_token": flops,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("family          {}", cfg.family);
    println!(
        "layers          {} (d_model {}, heads {}, kv heads {}, d_ff {})",
        cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff
    );
    println!(
        "vocab           {} (tied head: {})",
        cfg.vocab_size, cfg.tie_embeddings
    );
    println!("max seq len     {}", cfg.max_seq_len);
    println!(
        "parameters      {} ({:.2}M)",
        cfg.param_count(),
        cfg.param_count() as f64 / 1e6
    );
    println!("matmul params   {}", cfg.matmul_params());
    println!("train FLOPs/tok {:.4e} at seq {}", flops, seq);
    Ok(())
}

fn bench_train_step(args: &TrainStepArgs) -> Result<()> {
    let model = args.model.resolve()?;
    let device = parse_device(&args.device)?;
    let precision = args.precision.unwrap_or(match device {
        Device::Cpu => Precision::Fp32,
        _ => Precision::Bf16,
    });
    let bench = TrainStepBench {
        model,
        batch: args.batch,
        seq_len: args.seq,
        device,
        precision,
        warmup: args.warmup,
        steps: args.steps,
        threads: args.threads,
        peak_tflops: args.peak_tflops,
        seed: 0,
    };
    let result = bench.run().context("train-step benchmark")?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_result(&result);
    }
    Ok(())
}

fn bench_all_reduce(args: &AllReduceArgs) -> Result<()> {
    anyhow::ensure!(
        args.values > 0 && args.rounds > 0,
        "need --values > 0 and --rounds > 0"
    );
    anyhow::ensure!(
        args.bandwidth_mbps > 0.0,
        "--bandwidth-mbps must be positive"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, place) = if args.addrs.is_empty() {
        anyhow::ensure!(args.peers >= 2, "need --peers >= 2");
        let report = runtime.block_on(p2p::bench_local(args.peers, args.values, args.rounds))?;
        (report, "on 127.0.0.1".to_string())
    } else {
        anyhow::ensure!(
            args.addrs.len() >= 2,
            "--addrs needs at least two members (IP:PORT,IP:PORT,...)"
        );
        let rank = args
            .rank
            .context("--addrs needs --rank: this member's index into the list")?;
        let report = runtime.block_on(p2p::bench_member(
            rank,
            &args.addrs,
            args.values,
            args.rounds,
            args.bandwidth_mbps * 1e6 / 8.0,
            args.max_upload_mbps.map(|m| (m * 1e6 / 8.0) as u64),
        ))?;
        (report, format!("as member {rank} of {:?}", args.addrs))
    };
    let bandwidth = args.bandwidth_mbps * 1e6 / 8.0;
    let times: Vec<f64> = report.rounds.iter().map(|d| d.as_secs_f64()).collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "peers": report.peers,
                "rank": args.rank,
                "payload_bytes": report.payload_bytes,
                "bytes_sent": report.bytes_sent,
                "rounds_s": times,
                "median_s": report.median().as_secs_f64(),
                "bandwidth_mbps": args.bandwidth_mbps,
                "max_upload_mbps": args.max_upload_mbps,
                "ring_bound_s": report.ring_bound(bandwidth).as_secs_f64(),
                "ratio": report.ring_bound_ratio(bandwidth),
                "cpu_per_round_s": report.cpu_per_round().as_secs_f64(),
                "cores_at_bound": report.cores_at_bound(bandwidth),
            })
        );
        return Ok(());
    }
    let times: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    println!(
        "all-reduce of {:.1} MB fp32 among {} peers {place}: median {:.3} s ({:.0} MB/s of payload), \
         {:.1} MB sent per peer; rounds [{}] s",
        report.payload_bytes as f64 / 1e6,
        report.peers,
        report.median().as_secs_f64(),
        report.payload_bytes_per_s() / 1e6,
        report.bytes_sent as f64 / 1e6,
        times.join(", ")
    );
    let mut links = vec![args.bandwidth_mbps];
    if args.addrs.is_empty() {
        links = vec![1000.0, 10_000.0];
    }
    let whose = if args.addrs.is_empty() {
        format!("all {} peers'", report.peers)
    } else {
        "this member's".to_string()
    };
    println!(
        "  CPU per round: {:.3} s ({whose}, user + system)",
        report.cpu_per_round().as_secs_f64()
    );
    for mbps in links {
        let bandwidth = mbps * 1e6 / 8.0;
        println!(
            "  the ring bound at {mbps} Mbit/s is {:.3} s (median / bound = {:.2}); rounds that \
             fast would keep {:.2} cores busy",
            report.ring_bound(bandwidth).as_secs_f64(),
            report.ring_bound_ratio(bandwidth),
            report.cores_at_bound(bandwidth)
        );
    }
    Ok(())
}

fn bench_pipeline(args: &PipelineArgs) -> Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.seq > 0 && args.steps > 0 && args.micro_batches > 0,
        "need positive --batch, --seq, --steps and --micro-batches"
    );
    anyhow::ensure!(
        args.micro_batches as i64 <= args.batch,
        "--micro-batches {} is more than the --batch of {} sequences",
        args.micro_batches,
        args.batch
    );
    let model = match (&args.model.preset, &args.model.config) {
        (None, None) => ModelConfig::preset("4m", args.model.family)?,
        _ => args.model.resolve()?,
    };
    anyhow::ensure!(
        args.seq <= model.max_seq_len,
        "--seq {} exceeds the model's max_seq_len {}",
        args.seq,
        model.max_seq_len
    );
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let bench = p2p::PipelineBench {
        model,
        seq_len: args.seq,
        batch: args.batch,
        micro_batches: args.micro_batches,
        steps: args.steps,
        wire: args.wire,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let reports = if args.addrs.is_empty() {
        anyhow::ensure!(
            args.stages >= 2 && args.stages as i64 <= bench.model.n_layer + 2,
            "--stages must be between 2 and the model's {} planner layers",
            bench.model.n_layer + 2
        );
        runtime.block_on(p2p::bench_pipeline_local(&bench, args.stages))?
    } else {
        anyhow::ensure!(
            args.addrs.len() >= 2,
            "--addrs needs at least two stages (IP:PORT,IP:PORT,...)"
        );
        let rank = args
            .rank
            .context("--addrs needs --rank: this member's stage, an index into the list")?;
        vec![runtime.block_on(p2p::bench_pipeline_member(&bench, rank, &args.addrs))?]
    };
    if args.json {
        for report in &reports {
            println!("{}", serde_json::to_string(report)?);
        }
        return Ok(());
    }
    for report in &reports {
        let step = p2p::median(&report.step_s);
        let tokens = report.tokens_per_step as f64;
        println!(
            "stage {} of {} (layers {}..{}): step median {step:.3} s = {:.0} tokens/s; sent {:.1} MB \
             per step = {:.0} bytes per token",
            report.stage,
            report.stages,
            report.layers.0,
            report.layers.1,
            tokens / step,
            report.bytes_sent_per_step / 1e6,
            report.bytes_sent_per_step / tokens
        );
        if let Some(whole) = &report.whole_step_s {
            let alone = p2p::median(whole);
            let (s, m) = (report.stages as f64, args.micro_batches as f64);
            println!(
                "the whole model in one process, same batches: step median {alone:.3} s = {:.0} \
                 tokens/s; pipeline / whole = {:.2} (GPipe's bubble with {} micro-batches: {:.0}% \
                 of a step)",
                tokens / alone,
                alone / step,
                args.micro_batches,
                100.0 * (s - 1.0) / (m + s - 1.0)
            );
        }
    }
    Ok(())
}

fn bench_state_transfer(args: &StateTransferArgs) -> Result<()> {
    anyhow::ensure!(
        args.addrs.len() >= 2 && args.values > 0 && args.rounds > 0 && args.bandwidth_mbps > 0.0,
        "need at least two --addrs, and positive --values, --rounds and --bandwidth-mbps"
    );
    let bandwidth = args.bandwidth_mbps * 1e6 / 8.0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(p2p::bench_state_member(
        args.rank,
        &args.addrs,
        args.values,
        args.rounds,
        bandwidth,
    ))?;
    let Some(report) = report else {
        return Ok(());
    };
    let median = report.median().as_secs_f64();
    let bound = report.link_bound(bandwidth).as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "servers": report.servers,
                "state_bytes": report.state_bytes,
                "fetches_s": report.fetches.iter().map(std::time::Duration::as_secs_f64).collect::<Vec<_>>(),
                "median_s": median,
                "link_bound_s": bound,
                "ratio": median / bound,
            })
        );
    } else {
        println!(
            "fetched {:.1} MB of state from {} peers: median {median:.3} s; the link bound at {} \
             Mbit/s is {bound:.3} s (median / bound = {:.2})",
            report.state_bytes as f64 / 1e6,
            report.servers,
            args.bandwidth_mbps,
            median / bound
        );
    }
    Ok(())
}

fn print_result(r: &TrainStepResult) {
    println!(
        "{} {:.2}M params, batch {} x seq {}, {} ({}), {:?}, {} threads",
        r.family,
        r.params as f64 / 1e6,
        r.batch,
        r.seq_len,
        r.device,
        r.device_name,
        r.precision,
        r.threads
    );
    println!(
        "step {:.1} ms median ({:.1} mean over {} steps), {:.0} tokens/s, {:.3} TFLOP/s",
        r.step_ms_median, r.step_ms_mean, r.steps, r.tokens_per_s, r.achieved_tflops
    );
    match r.mfu {
        Some(mfu) => println!(
            "MFU {:.1}% of {:.1} TFLOP/s peak",
            mfu * 100.0,
            r.peak_tflops.unwrap_or(0.0)
        ),
        None => println!("MFU n/a: peak unknown for this device (pass --peak-tflops)"),
    }
}

/// `forge-node train --dry-run`: the resolved config, the model's size, the run's budget, and
/// the time its steps would take, from a few steps timed on a scratch copy of the run (its
/// checkpoints and metrics go to a temporary folder; the data cache is the run's own).
fn dry_run(mut cfg: RunConfig) -> Result<()> {
    const TIMED: usize = 3;
    println!("# resolved run config");
    println!(
        "{}",
        toml::to_string(&cfg).context("printing the resolved config")?
    );
    let scratch = tempfile::tempdir().context("creating a scratch folder for the timed steps")?;
    cfg.train.out_dir = scratch.path().join("run");
    cfg.checkpoint.resume = false;
    let steps = cfg.total_steps();
    let tokens_per_step = cfg.tokens_per_step();
    let mut trainer = Trainer::new(cfg)?;
    let params: i64 = trainer
        .var_store()
        .variables()
        .values()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum();
    // The first step warms up (allocations, kernels); the rest are timed.
    trainer.train_step()?;
    let started = Instant::now();
    for _ in 1..TIMED {
        trainer.train_step()?;
    }
    let per_step = started.elapsed().as_secs_f64() / (TIMED - 1) as f64;
    let cfg = trainer.config();
    println!("# dry run");
    println!(
        "parameters        {params} ({:.2}M) on {} ({} worker{})",
        params as f64 / 1e6,
        cfg.train.device,
        trainer.workers(),
        if trainer.workers() == 1 { "" } else { "s" }
    );
    println!(
        "tokens per step   {tokens_per_step} ({} sequences of {})",
        cfg.train.batch_size, cfg.train.seq_len
    );
    println!("steps             {steps}");
    println!(
        "tokens in all     {} ({:.1}M)",
        steps * tokens_per_step,
        (steps * tokens_per_step) as f64 / 1e6
    );
    let total = per_step * steps as f64;
    println!(
        "estimated time    {} ({per_step:.3} s per step over {} timed steps, {:.0} tokens/s; evals \
         every {} steps and checkpoints every {} come on top)",
        human_duration(total),
        TIMED - 1,
        tokens_per_step as f64 / per_step,
        cfg.eval.every,
        cfg.checkpoint.every,
    );
    Ok(())
}

/// Seconds as people read them: 45 s, 12 min, 3.2 h.
fn human_duration(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 90.0 * 60.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}
