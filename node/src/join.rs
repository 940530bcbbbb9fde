//! `forge-node join`: a node of a DiLoCo run. It joins the coordinator (which hands out the run
//! config, the replica, the data shard and the round schedule), trains its replica for H inner
//! steps per round, all-reduces the weighted pseudo-gradient with the round's other members
//! over libp2p/QUIC, reports the hash of the resulting global state, and applies the outer step
//! only when the coordinator commits the round.
//!
//! This file is the shell: connections, the event loop, the jobs (state fetch, inner steps,
//! all-reduce, evaluation, checkpoint shards) and printing. What to do when is decided by the
//! node's round state machine in [`crate::round`], which does no I/O.

use crate::p2p::PeerNet;
use crate::round::{
    Action, Exit, Fetched, InnerPlan, Input, ReduceFailure, RoundLog, Rounds, RoundsConfig,
    Trained, failed_report, held_hashes,
};
use anyhow::{Context, Result, anyhow};
use forge_coordinator_client::{ClientOptions, CoordinatorClient, Notification};
use forge_protocol::messages::{
    Activity, CoordinatorMessage, GlobalState, JoinAccepted, MemberId, Peer, Ready, RoundId,
    RoundOpened, RoundSummary, RunPlan, StageAssignment,
};
use forge_protocol::stream::{DataLease, SeqRange};
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::diloco::{DilocoConfig, OuterOptimizer, Proposal};
use forge_trainer::metrics::Phases;
use forge_trainer::outer_state::{self, OuterCheckpoint};
use forge_trainer::parallel::Fault;
use forge_trainer::train::{InnerSummary, ScheduleSpan, StageSpec, StepTiming, Trainer};
use libp2p::{Multiaddr, PeerId};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

mod setup;
mod state;
mod sync;

/// How long the stages of a pipeline have to join each other, and the most any stage waits for
/// another's message.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) use setup::parse_memory_size;

/// The node's codec for `compression`, for the fuzz tests of what it decodes.
#[cfg(test)]
pub(crate) fn relay_codec(
    compression: forge_protocol::quant::Compression,
    numel: usize,
) -> Box<dyn crate::p2p::ChunkCodec> {
    Box::new(QuantCodec::new(compression, numel).unwrap())
}
use setup::{
    capabilities, local_config, shutdown_signal, start_peer_net, test_fault, upload_bytes_per_s,
};
use state::{fetch_global_state, publish_state, resume};
use sync::{QuantCodec, declared_gone, failure_of, max_weights, reduced, request, wire_hashes};

/// What `forge-node join` was told on its command line.
#[derive(Debug, Clone)]
pub(crate) struct JoinOptions {
    pub(crate) coordinator: String,
    pub(crate) token: String,
    /// One device or a list; several train the replica together.
    pub(crate) device: String,
    /// Overrides the run config's `[train.parallel] cpu_workers`.
    pub(crate) cpu_workers: Option<usize>,
    /// Overrides the run config's `[train] threads`.
    pub(crate) threads: Option<usize>,
    pub(crate) workdir: PathBuf,
    /// Relative corpus paths in the run config are taken from here.
    pub(crate) data_root: PathBuf,
    /// Address for peer connections; an unspecified IP advertises the one facing the coordinator.
    pub(crate) listen: SocketAddr,
    pub(crate) max_upload_mbps: Option<f64>,
    /// `--set section.key=value` changes to the coordinator's run config, of the keys a node
    /// may set (`forge_protocol::run_config::NODE_KEYS`).
    pub(crate) sets: Vec<String>,
    /// Caps the memory each device reports to the coordinator's stage planner.
    pub(crate) memory_limit: Option<u64>,
}

/// Runs a node until the run's budget is spent, SIGTERM/SIGINT, or a fatal error.
pub(crate) fn run(opts: JoinOptions) -> Result<()> {
    // The form and the keys of --set are checked before joining; the values, once the
    // coordinator's run config is here.
    forge_protocol::run_config::apply_overrides(
        "",
        Path::new("<run config from the coordinator>"),
        &opts.sets,
        Some(forge_protocol::run_config::NODE_KEYS),
    )?;
    if let Err(err) = std::fs::create_dir_all(&opts.workdir) {
        // AlreadyExists is what create_dir_all reports when a file is in the way.
        let why = if err.kind() == std::io::ErrorKind::AlreadyExists {
            "it exists and is not a directory; pass --workdir a directory, or a path that does not exist yet".to_string()
        } else {
            err.to_string()
        };
        anyhow::bail!(
            "cannot create the workdir {}: {why}",
            opts.workdir.display()
        );
    }
    // Held until the process ends.
    let _lock = lock_workdir(&opts.workdir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(node(opts))
}

/// The file lock that makes a workdir one node's: two nodes on one workdir would share its peer
/// identity (the coordinator would take each join for the other's restart) and rotate each
/// other's checkpoints away. The lock goes with the process, however it ends.
fn lock_workdir(workdir: &std::path::Path) -> Result<File> {
    let path = workdir.join("node.lock");
    match forge_trainer::control::try_lock(&path) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => anyhow::bail!(
            "another forge-node is running with --workdir {} (it holds {}); two nodes on one \
             workdir would share its identity and checkpoints: give each node its own --workdir",
            workdir.display(),
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

async fn node(opts: JoinOptions) -> Result<()> {
    let (stop, shutdown) = shutdown_signal()?;
    let coordinator: SocketAddr = tokio::net::lookup_host(&opts.coordinator)
        .await
        .with_context(|| format!("resolving the coordinator address {}", opts.coordinator))?
        .next()
        .with_context(|| format!("{} resolves to no address", opts.coordinator))?;
    // Peer-to-peer layer first: its peer id and address go into the join.
    let (net, advertised, identity) = start_peer_net(&opts, coordinator).await?;
    let upload = upload_bytes_per_s(&opts);
    let caps =
        tokio::task::block_in_place(|| capabilities(&opts, &net.peer_id(), &advertised, upload))?;
    tracing::info!(
        "peer {} at {advertised}; {:.0} tokens/s on the reference model",
        net.peer_id(),
        caps.tokens_per_s
    );
    let (client, accepted, notes) = CoordinatorClient::connect(
        coordinator,
        &opts.token,
        identity,
        caps,
        ClientOptions::default(),
    )
    .await
    .with_context(|| format!("joining the coordinator at {coordinator}"))?;
    println!("joined {coordinator} as member {}", accepted.member.0);
    let (halt, notes) = halt_on(notes, shutdown.clone());
    let leaver = client.clone();
    let setup = async {
        let (mut shell, queue) = Shell::start(&opts, &accepted, net, client, stop, halt)?;
        // The coordinator plans this node once it knows its data is the run's; the estimated
        // speed paces the first round.
        let ready = tokio::task::block_in_place(|| -> Result<Ready> {
            Ok(Ready {
                data: shell.trainer.data_digest(),
                us_per_step: shell.trainer.probe_us_per_step()?,
            })
        })?;
        shell.us_per_step = Some(ready.us_per_step);
        shell.client.ready(ready).await?;
        if accepted.global.version == 0 {
            // The first node to announce its version 0 gives the run its initial parameters.
            let initial = shell.rounds.initial_hashes().to_vec();
            shell.client.initial_state(initial).await?;
        }
        anyhow::Ok((shell, queue))
    };
    match setup.await {
        Ok((shell, queue)) => shell.run(queue, notes, shutdown).await,
        Err(e) => {
            // Its data, model or disk failed this node after it joined: the coordinator hears
            // why now instead of declaring it dead at its heartbeat timeout.
            leaver.leave(&format!("node failed: {e:#}")).await.ok();
            Err(e)
        }
    }
}

/// Passes the coordinator's notes on, and raises the flag it returns, which stops the inner
/// steps at the next step, on SIGINT/SIGTERM (`shutdown`) or when the run is aborted: neither
/// waits for a round's inner steps to end.
fn halt_on(
    mut notes: mpsc::UnboundedReceiver<Notification>,
    mut shutdown: watch::Receiver<bool>,
) -> (Arc<AtomicBool>, mpsc::UnboundedReceiver<Notification>) {
    let halt = Arc::new(AtomicBool::new(false));
    let (forward, forwarded) = mpsc::unbounded_channel();
    let flag = Arc::clone(&halt);
    tokio::spawn(async move {
        let mut signals = true;
        loop {
            tokio::select! {
                note = notes.recv() => {
                    let Some(note) = note else { break };
                    if matches!(note, Notification::Message(CoordinatorMessage::RunAborted(_))) {
                        flag.store(true, Ordering::Relaxed);
                    }
                    if forward.send(note).is_err() {
                        break;
                    }
                }
                changed = shutdown.changed(), if signals => match changed {
                    Ok(()) => flag.store(true, Ordering::Relaxed),
                    Err(_) => signals = false,
                },
            }
        }
    });
    (halt, forwarded)
}

/// One all-reduce as the state machine asked for it ([`Action::AllReduce`]).
struct Exchange<'a> {
    round: RoundId,
    participants: &'a [Peer],
    leases: &'a [DataLease],
    tokens: u64,
    wait: Duration,
}

/// What the node's jobs work on, and the round state machine that says which job comes next.
struct Shell {
    rounds: Rounds<Proposal>,
    trainer: Trainer,
    outer: OuterOptimizer,
    codec: QuantCodec,
    diloco: DilocoConfig,
    net: PeerNet,
    client: CoordinatorClient,
    /// `rounds.jsonl` in the run directory.
    rounds_log: File,
    /// Checkpoint shards this node writes when the coordinator asks, and resumes from after a
    /// whole-cluster restart.
    checkpoints: CheckpointDir,
    /// This node's upload rate in bytes/s, for timeouts.
    bandwidth: f64,
    stop: Arc<AtomicBool>,
    /// Whether the state machine has been told of the signal.
    stop_told: bool,
    /// The inner steps stop at the next step: a signal, or the run aborted ([`halt_on`]).
    halt: Arc<AtomicBool>,
    fault: Option<(usize, Fault, u64)>,
    /// This node's microseconds per inner step in its last round, for paced rounds.
    us_per_step: Option<u64>,
    /// The members (and peers) of the pipeline the trainer is joined to, in stage order (empty:
    /// none).
    pipeline: Vec<(MemberId, PeerId)>,
    clock: WallClock,
    overlap: Overlap,
    /// The checkpoint shard being written in the background, if any (one at a time).
    writer: Option<Writer>,
}

/// A checkpoint shard's background write: its thread, and the signal it sends as it ends.
struct Writer {
    thread: std::thread::JoinHandle<forge_trainer::Result<PathBuf>>,
    ended: tokio::sync::oneshot::Receiver<()>,
}

/// The inner steps a round runs while its outer gradients travel
/// ([`DilocoConfig::overlap_steps`]): the tail of its inner steps, whose progress goes on top of
/// the outer step once the round commits and into the next round's pseudo-gradient.
#[derive(Default)]
struct Overlap {
    /// The tail the round's inner steps left for its all-reduce: how many steps, and where in
    /// the lr schedule.
    tail: Option<(u64, ScheduleSpan)>,
    /// What the last tail trained, counted with the next round's inner steps.
    trained: InnerSummary,
    /// The last tail's progress (parameters after it less before it), flattened: put on top
    /// of its round's outer step if that round commits with this node.
    progress: Option<Vec<f32>>,
    /// The progress of a tail whose round committed, added to the parameters as the next
    /// round starts (evaluations and checkpoint shards in between see the global state).
    carried: Option<Vec<f32>>,
    /// Seconds this node's last outer sync took (for `auto`).
    sync_s: Option<f64>,
}

impl Overlap {
    /// The node's parameters were replaced (state fetched, a checkpoint resumed, the trainer
    /// rebuilt): what the last tail trained is gone with them.
    fn forget(&mut self) {
        *self = Overlap {
            sync_s: self.sync_s,
            ..Overlap::default()
        };
    }
}

/// What a job of the node's event loop spends its time on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Train,
    OuterSync,
    StateFetch,
    Eval,
    Checkpoint,
    Other,
}

impl Phase {
    fn of(action: &Action<Proposal>) -> Phase {
        match action {
            Action::Train { .. } => Phase::Train,
            Action::AllReduce { .. } | Action::ApplyOuterStep(_) => Phase::OuterSync,
            Action::FetchState(_) => Phase::StateFetch,
            Action::Evaluate => Phase::Eval,
            Action::WriteCheckpoint { .. } => Phase::Checkpoint,
            _ => Phase::Other,
        }
    }

    /// What the node's heartbeats say while a job of this phase runs (None: no change).
    fn activity(self) -> Option<Activity> {
        match self {
            Phase::Train => Some(Activity::Training),
            Phase::OuterSync => Some(Activity::Syncing),
            Phase::StateFetch => Some(Activity::FetchingState),
            Phase::Eval => Some(Activity::Evaluating),
            Phase::Checkpoint => Some(Activity::Checkpointing),
            Phase::Other => None,
        }
    }
}

/// Where the node's wall clock went since it joined: its jobs by phase, the waits for the
/// coordinator, and the inner steps' parts from the trainer (summed over the rounds: a re-plan
/// or a restart from the seed rebuilds the trainer, whose own timing starts again).
struct WallClock {
    started: Instant,
    phases: Phases,
    /// The inner steps' timing since the node joined.
    steps: StepTiming,
    /// Inner steps, the time and the phases at the previous round line.
    last: (u64, Instant, Phases),
}

impl WallClock {
    fn new() -> WallClock {
        let now = Instant::now();
        WallClock {
            started: now,
            phases: Phases::default(),
            steps: StepTiming::default(),
            last: (0, now, Phases::default()),
        }
    }

    /// Counts a job of `phase` that took `seconds`; `steps` the trainer's steps in it. Inner
    /// steps that ran during another job (overlapped with the outer sync) count as steps, and
    /// the job has the rest of its time.
    fn add(&mut self, phase: Phase, seconds: f64, steps: &StepTiming) {
        let p = &mut self.phases;
        p.step_s += steps.step_s;
        self.steps.accumulate(steps);
        let rest = (seconds - steps.step_s).max(0.0);
        match phase {
            // A round's inner steps: what is not in the steps themselves (the pipeline
            // forming, the divergence guard) is the rest.
            Phase::Train | Phase::Other => {}
            Phase::OuterSync => p.outer_sync_s += rest,
            Phase::StateFetch => p.state_fetch_s += rest,
            Phase::Eval => p.eval_s += rest,
            Phase::Checkpoint => p.checkpoint_s += rest,
        }
    }

    /// The phases since the node joined, with the inner steps' parts and the rest.
    fn phases(&self) -> Phases {
        let mut phases = self.phases;
        phases.set_step_parts(&self.steps);
        phases.rest_of(self.started.elapsed().as_secs_f64());
        phases
    }

    /// Tokens per second of wall clock since the previous call (at `tokens_per_step`), and
    /// the phases since then (`phases`: [`WallClock::phases`] now); starts the next span.
    fn since_last(&mut self, tokens_per_step: u64, phases: Phases) -> (f64, Phases) {
        let now = Instant::now();
        let tokens = (self.steps.steps - self.last.0) * tokens_per_step;
        let seconds = now.duration_since(self.last.1).as_secs_f64().max(1e-9);
        let span = phases.since(&self.last.2);
        self.last = (self.steps.steps, now, phases);
        (tokens as f64 / seconds, span)
    }
}

impl Shell {
    /// Builds the trainer and the outer optimizer from the coordinator's run config, follows
    /// the assignment and resumes from the local checkpoint shard if it holds the run's global
    /// state. Returns the actions to carry out first.
    fn start(
        opts: &JoinOptions,
        accepted: &JoinAccepted,
        net: PeerNet,
        client: CoordinatorClient,
        stop: Arc<AtomicBool>,
        halt: Arc<AtomicBool>,
    ) -> Result<(Shell, VecDeque<Action<Proposal>>)> {
        let (cfg, diloco) = local_config(&accepted.run_config, opts)?;
        let final_version = cfg.final_version();
        let stage = accepted.assignment.and_then(|a| a.stage);
        let spec = stage.map(|s| StageSpec {
            layers: s.layers,
            stage: s.stage,
            stages: s.stages,
        });
        if let Some(s) = stage {
            println!(
                "training stage {} of {} (layers {}..{}) of a pipeline",
                s.stage + 1,
                s.stages,
                s.layers.start,
                s.layers.end
            );
        }
        let mut trainer = tokio::task::block_in_place(|| Trainer::with_stage(cfg, spec))?;
        trainer.observe_steps(progress_line());
        let outer = OuterOptimizer::without(trainer.var_store(), diloco, trainer.derived_param())?;
        let codec = QuantCodec::new(diloco.compression, outer.numel())?;
        let out_dir = trainer.config().train.out_dir.clone();
        let rounds_path = out_dir.join("rounds.jsonl");
        let rounds_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rounds_path)
            .with_context(|| format!("opening {}", rounds_path.display()))?;
        let config = RoundsConfig {
            final_version,
            eval_every_rounds: diloco.eval_every_rounds,
            numel: outer.numel() as u64,
            initial_hashes: wire_hashes(&outer.state_hashes()),
            stage,
        };
        let rounds = Rounds::new(config, accepted, Instant::now());
        // The assignment's data shard is set before a resume restores its position.
        if let Some((index, count)) = rounds.shard() {
            trainer.set_data_shard(index as usize, count as usize)?;
        }
        let checkpoints = CheckpointDir::new(
            out_dir.join("diloco-checkpoints"),
            trainer.config().checkpoint.keep,
        );
        let mut shell = Shell {
            rounds,
            codec,
            diloco,
            net,
            client,
            rounds_log,
            checkpoints,
            bandwidth: upload_bytes_per_s(opts) as f64,
            stop,
            stop_told: false,
            halt,
            fault: test_fault()?,
            us_per_step: None,
            pipeline: Vec::new(),
            clock: WallClock::new(),
            overlap: Overlap::default(),
            writer: None,
            outer,
            trainer,
        };
        // A pipeline stage resumes its own tensors.
        let mine = held_hashes(
            shell.rounds.initial_hashes(),
            &accepted.global.tensor_hashes,
        );
        let held = resume(
            &shell.checkpoints,
            &accepted.global,
            mine,
            shell.position_at(accepted.global.version),
            &mut shell.trainer,
            &mut shell.outer,
            &shell.net,
        )?;
        let resumed = Input::Resumed {
            held: held.map(|(version, _)| version),
            step: shell.trainer.step(),
        };
        let queue = shell.feed(resumed).into();
        Ok((shell, queue))
    }

    /// The event loop: carries out the state machine's actions, feeding each job's result back,
    /// and waits for the coordinator or a signal when there is nothing to do.
    async fn run(
        mut self,
        mut queue: VecDeque<Action<Proposal>>,
        mut notes: mpsc::UnboundedReceiver<Notification>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        loop {
            while let Some(action) = queue.pop_front() {
                if let Action::Exit(exit) = action {
                    return self.exit(exit).await;
                }
                let (phase, begun, before) =
                    (Phase::of(&action), Instant::now(), self.trainer.timing());
                if let Some(activity) = phase.activity() {
                    let round = self.rounds.round_in_flight();
                    self.client.set_progress(round, 0, activity);
                }
                let done = self.carry_out(action, &mut notes, &mut queue).await;
                let steps = self.trainer.timing().since(&before);
                self.clock.add(phase, begun.elapsed().as_secs_f64(), &steps);
                if let Some(written) = self.written(false) {
                    queue.extend(self.feed(written));
                }
                match done {
                    Ok(Some(input)) => queue.extend(self.feed(input)),
                    Ok(None) => {}
                    Err(e) => {
                        // A job failed for this node's own reasons (its trainer, its disk, its
                        // connection): the round under way fails and the node leaves.
                        let round = self.rounds.round_in_flight();
                        self.leave_failed(round, &format!("{e:#}")).await;
                        return Err(e);
                    }
                }
            }
            let waiting = Instant::now();
            self.client
                .set_progress(self.rounds.round_in_flight(), 0, Activity::Idle);
            let input = tokio::select! {
                // A signal first, as the state machine would see it between two notes.
                biased;
                _ = shutdown.changed(), if !self.stop_told => {
                    let mut waiting = Vec::new();
                    while let Ok(note) = notes.try_recv() {
                        waiting.push(note);
                    }
                    Input::StopRequested { waiting }
                }
                note = notes.recv() => note.map_or(Input::CoordinatorGone, Input::Note),
                // A background checkpoint write that ends is reported at once.
                written = self.writer_done(), if self.writer.is_some() => written,
            };
            self.clock.phases.waiting_s += waiting.elapsed().as_secs_f64();
            queue.extend(self.feed(input));
        }
    }

    /// Hands an input to the state machine. A signal that came while a job ran is told first,
    /// as soon as that job is done.
    fn feed(&mut self, input: Input<Proposal>) -> Vec<Action<Proposal>> {
        let now = Instant::now();
        let mut actions = Vec::new();
        if let Input::StopRequested { .. } = input {
            self.stop_told = true;
        } else if !self.stop_told && self.stop.load(Ordering::Relaxed) {
            self.stop_told = true;
            let stop = Input::StopRequested { waiting: vec![] };
            actions.extend(self.rounds.handle(now, stop));
        }
        if let Input::Note(note) = &input {
            tracing::debug!("coordinator: {note:?}");
        }
        actions.extend(self.rounds.handle(now, input));
        actions
    }

    /// Carries out one action; a job's result comes back as the next input.
    async fn carry_out(
        &mut self,
        action: Action<Proposal>,
        notes: &mut mpsc::UnboundedReceiver<Notification>,
        queue: &mut VecDeque<Action<Proposal>>,
    ) -> Result<Option<Input<Proposal>>> {
        match action {
            Action::Say(line) => println!("{line}"),
            Action::Restage(stage) => return Ok(Some(self.restage(stage)?)),
            Action::SetMembers(peers) => {
                let members = peers_of(&peers)
                    .into_iter()
                    .map(|(_, id, addrs)| (id, addrs))
                    .collect();
                self.net.set_members(members).await?
            }
            Action::FollowShard { index, count } => self
                .trainer
                .set_data_shard(index as usize, count as usize)?,
            Action::FetchState(open) => return Ok(Some(self.fetch(&open).await)),
            Action::Train {
                round,
                version,
                pace_us_per_step,
                opened_at,
                lease,
                pipeline,
                plan,
            } => {
                tracing::debug!("{round}: inner steps from step {}", self.trainer.step());
                if let Err(e) = self.join_pipeline(&pipeline).await {
                    // The pipeline cannot run this round (a stage unreachable or gone): the
                    // round fails for this node, which stays for the next.
                    let reason = format!("it did not form: {e:#}");
                    return Ok(Some(Input::PipelineBroken(reason)));
                }
                let trained = self.train(
                    version,
                    pace_us_per_step,
                    opened_at.elapsed(),
                    lease.as_deref(),
                    plan,
                )?;
                // What the coordinator said while this node trained (a participant declared
                // gone) decides whether the all-reduce starts at all.
                while let Ok(note) = notes.try_recv() {
                    queue.extend(self.feed(Input::Note(note)));
                }
                return Ok(Some(trained));
            }
            Action::AllReduce {
                round,
                participants,
                leases,
                tokens,
                wait,
            } => {
                let exchange = Exchange {
                    round,
                    participants: &participants,
                    leases: &leases,
                    tokens,
                    wait,
                };
                let input = self.all_reduce(exchange, notes, queue);
                return Ok(Some(input.await?));
            }
            Action::AbortAllReduce {
                round,
                peer,
                reason,
            } => {
                let failure = failure_of(&declared_gone(round, peer.as_deref(), &reason), 0.0);
                return Ok(Some(Input::Reduced(Err(failure))));
            }
            Action::Report(report) => self.client.report(report).await?,
            Action::ApplyOuterStep(proposal) => {
                self.outer.commit(proposal, self.trainer.var_store());
                self.overlap.carried = self.overlap.progress.take();
                // The outer step happened once, on worker 0: every local worker takes it.
                self.trainer.broadcast_params()?;
            }
            Action::Evaluate => {
                let (loss, bpb) = tokio::task::block_in_place(|| self.trainer.evaluate());
                return Ok(Some(Input::Evaluated { loss, bpb }));
            }
            Action::PublishState { version, round } => {
                publish_state(&self.net, &self.outer, &self.trainer, version, round)?
            }
            Action::WriteCheckpoint {
                round,
                shard,
                version,
                tensor_hashes,
            } => {
                // One write at a time: the previous one ends (and is reported) first.
                if let Some(written) = self.written(true) {
                    queue.extend(self.feed(written));
                }
                tracing::debug!("{round}: writing checkpoint shard {shard} of v{version}");
                let meta = OuterCheckpoint {
                    version,
                    round: round.0,
                    tensor_hashes,
                };
                let (ended_tx, ended) = tokio::sync::oneshot::channel();
                let started = tokio::task::block_in_place(|| {
                    outer_state::write_in_background(
                        &self.checkpoints,
                        &self.trainer,
                        &self.outer,
                        meta,
                        move || {
                            let _ = ended_tx.send(());
                        },
                    )
                });
                match started {
                    Ok(thread) => self.writer = Some(Writer { thread, ended }),
                    Err(e) => return Ok(Some(Input::CheckpointWritten(Err(format!("{e:#}"))))),
                }
            }
            Action::ShardDurable(durable) => self.client.shard_durable(durable).await?,
            Action::ShardFailed(failed) => self.client.shard_failed(failed).await?,
            Action::Record(log) => {
                let summary = self.record(&log)?;
                self.client.round_summary(summary).await?;
            }
            Action::Exit(_) => unreachable!("the event loop takes exits"),
        }
        Ok(None)
    }

    /// Rebuilds the trainer (and the outer state, which covers its tensors) for `stage`, at the
    /// same place in the run: the coordinator's plan gave this node other layers.
    fn restage(&mut self, stage: Option<StageAssignment>) -> Result<Input<Proposal>> {
        let spec = stage.map(|s| StageSpec {
            layers: s.layers,
            stage: s.stage,
            stages: s.stages,
        });
        let progress = (self.trainer.step(), self.trainer.tokens());
        self.rebuild(spec, progress)?;
        // The state served so far, of the old layers, stays published until the next commit:
        // after a re-cut, the nodes that now hold those layers fetch them from it.
        Ok(Input::Restaged {
            initial_hashes: wire_hashes(&self.outer.state_hashes()),
            numel: self.outer.numel() as u64,
        })
    }

    /// A new trainer and outer state for `spec`, with the run's initial parameters (drawn from
    /// its seed), at `progress` (inner step, tokens).
    fn rebuild(&mut self, spec: Option<StageSpec>, progress: (u64, u64)) -> Result<()> {
        let cfg = self.trainer.config().clone();
        let mut trainer = tokio::task::block_in_place(|| Trainer::with_stage(cfg, spec))?;
        trainer.observe_steps(progress_line());
        trainer.set_progress(progress.0, progress.1);
        if let Some((index, count)) = self.rounds.shard() {
            trainer.set_data_shard(index as usize, count as usize)?;
        }
        let outer =
            OuterOptimizer::without(trainer.var_store(), self.diloco, trainer.derived_param())?;
        self.codec = QuantCodec::new(self.diloco.compression, outer.numel())?;
        self.trainer = trainer;
        self.outer = outer;
        self.pipeline.clear();
        self.overlap.forget();
        Ok(())
    }

    /// Back to the run's initial state (version 0: the run went back with no checkpoint
    /// committed): the trainer is built again from the seed. Whether it drew the run's
    /// version 0 (the committed hashes of its tensors); if not, it fetches it from its peers.
    fn restart_from_seed(&mut self, open: &RoundOpened) -> Result<bool> {
        self.rebuild(self.trainer.stage(), (0, 0))?;
        let mine = wire_hashes(&self.outer.state_hashes());
        let committed = held_hashes(&mine, &open.tensor_hashes);
        let drawn = committed.len() == mine.len() && committed.iter().all(|c| mine.contains(c));
        if drawn {
            publish_state(&self.net, &self.outer, &self.trainer, 0, 0)?;
            println!(
                "round {}: the run restarts from its initial state; this node drew it again \
                 from the seed",
                open.round.0
            );
        }
        Ok(drawn)
    }

    /// Joins the trainer to the other stages of its pipeline (`pipeline`: its nodes in stage
    /// order), unless it is joined to these already.
    async fn join_pipeline(&mut self, pipeline: &[Peer]) -> Result<()> {
        let Some(spec) = self.trainer.stage() else {
            return Ok(());
        };
        let members: Vec<(MemberId, PeerId)> = peers_of(pipeline)
            .into_iter()
            .map(|(peer, id, _)| (peer.member, id))
            .collect();
        let peers: Vec<PeerId> = members.iter().map(|(_, id)| *id).collect();
        if peers.len() != pipeline.len() || peers.len() != spec.stages as usize {
            anyhow::bail!(
                "the round lists {} nodes with valid peer ids for this node's pipeline of {} \
                 stages",
                peers.len(),
                spec.stages
            );
        }
        // By member too: a stage's node started again on its workdir has the same peer id,
        // and the link to its old process is dead.
        if members == self.pipeline {
            return Ok(());
        }
        self.pipeline.clear();
        let link = self
            .net
            .pipeline_link(spec.stage, &peers, PIPELINE_TIMEOUT)
            .await?;
        self.trainer.set_stage_link(Box::new(link))?;
        self.pipeline = members;
        Ok(())
    }

    /// The round's participants this node all-reduces with: those holding its layers.
    fn same_layers(&self, participants: &[Peer]) -> Vec<Peer> {
        let mine = self.trainer.stage().map(|s| s.layers);
        participants
            .iter()
            .filter(|p| p.assignment.stage.map(|s| s.layers) == mine)
            .cloned()
            .collect()
    }

    /// Fetches the round's global state from its other participants, or, when the run went back
    /// to its last checkpoint, takes it from this node's checkpoint shard if one holds it.
    async fn fetch(&mut self, open: &RoundOpened) -> Input<Proposal> {
        self.overlap.forget();
        if self.rounds.went_back() && open.global_version == 0 {
            let started = Instant::now();
            match self.restart_from_seed(open) {
                Ok(true) => {
                    return Input::StateFetched(Ok(Fetched {
                        step: 0,
                        made_by_round: 0,
                        seconds: started.elapsed().as_secs_f64(),
                    }));
                }
                Ok(false) => {}
                Err(e) => return Input::StateFetched(Err(format!("{e:#}"))),
            }
        } else if self.rounds.went_back() {
            let started = Instant::now();
            let global = GlobalState {
                version: open.global_version,
                round: None,
                tensor_hashes: open.tensor_hashes.clone(),
            };
            let resumed = resume(
                &self.checkpoints,
                &global,
                self.rounds.held_of(&open.tensor_hashes),
                self.position_at(open.global_version),
                &mut self.trainer,
                &mut self.outer,
                &self.net,
            );
            match resumed {
                Ok(Some((_, round))) => {
                    return Input::StateFetched(Ok(Fetched {
                        step: self.trainer.step(),
                        made_by_round: round,
                        seconds: started.elapsed().as_secs_f64(),
                    }));
                }
                Ok(None) => {}
                Err(e) => println!("round {}: {e:#}; fetching from peers", open.round.0),
            }
        }
        // A pipeline stage's state: its tensors, each from the nodes holding it (the same stage
        // in other pipelines, or after a re-cut the nodes whose old layers overlap its new ones).
        let open = &RoundOpened {
            tensor_hashes: self.rounds.held_of(&open.tensor_hashes),
            ..open.clone()
        };
        let me = self.rounds.member();
        let progress = self.position_at(open.global_version);
        let fetched = fetch_global_state(
            open,
            me,
            &self.net,
            &mut self.trainer,
            &mut self.outer,
            self.bandwidth,
            progress,
        )
        .await;
        Input::StateFetched(match fetched {
            Ok((seconds, round)) => Ok(Fetched {
                step: self.trainer.step(),
                made_by_round: round,
                seconds,
            }),
            Err(e) => Err(format!("{e:#}")),
        })
    }

    /// The run's (inner step, tokens) at global `version`: where a replica that played every
    /// round would be, the schedule's position.
    fn position_at(&self, version: u64) -> (u64, u64) {
        let step = self.diloco.step_at_version(version);
        (step, step * self.trainer.config().tokens_per_step())
    }

    /// The round's inner steps from global `version` (see [`InnerPlan`]), none once stopped;
    /// `run` says where the run ends and whether its decay phase was entered early.
    fn train(
        &mut self,
        version: u64,
        pace_us_per_step: Option<u64>,
        elapsed: Duration,
        lease: Option<&[SeqRange]>,
        run: RunPlan,
    ) -> Result<Input<Proposal>> {
        if let Some((rank, fault)) = self
            .fault
            .take_if(|(_, _, at)| self.trainer.step() >= *at)
            .map(|(rank, fault, _)| (rank, fault))
        {
            self.trainer.inject_fault(rank, fault)?;
        }
        // The operator's anneal: the decay phase from the round it names, the same on every node.
        let anneal = match run.anneal_from {
            Some(from) => {
                let plan = self.trainer.config().anneal_plan().context(
                    "the coordinator announced an anneal this node's run config cannot make",
                )?;
                Some(plan.anneal(from))
            }
            None => None,
        };
        self.trainer.set_anneal(anneal);
        let total_steps = anneal.map_or(self.trainer.config().total_steps(), |a| a.end());
        let mut plan = InnerPlan::new(
            &self.diloco,
            total_steps,
            version,
            pace_us_per_step,
            self.us_per_step,
            elapsed,
        );
        if let Some(ranges) = lease {
            let leased = tokio::task::block_in_place(|| self.trainer.set_data_lease(ranges))?;
            if leased < plan.steps && pace_us_per_step.is_none() {
                tracing::warn!(
                    "the coordinator leased {leased} inner steps of data for a round of {}",
                    plan.steps
                );
            }
            plan.steps = plan.steps.min(leased);
        }
        // The last tail's progress on top of the outer step its round committed.
        self.overlap.tail = None;
        if let Some(carried) = self.overlap.carried.take() {
            self.outer
                .add_to_params(self.trainer.var_store(), &carried)?;
            self.trainer.broadcast_params()?;
        }
        let tail = self.tail_steps(version, &plan, run.final_version);
        plan.steps -= tail;
        if let (Some(budget), Some(us)) = (plan.budget, self.us_per_step) {
            // A paced round's time covers its tail too.
            let tail_time = Duration::from_micros(us.saturating_mul(tail));
            plan.budget = Some(
                budget
                    .saturating_sub(tail_time)
                    .max(Duration::from_millis(1)),
            );
        }
        let inner = tokio::task::block_in_place(|| {
            self.trainer
                .inner_steps(plan.steps, plan.budget, &self.halt, plan.schedule)
        });
        if let Err(forge_trainer::Error::Pipeline(reason)) = &inner {
            // Another stage's node gone or unreachable: not this node's failure. The pipeline
            // forms again next round.
            self.pipeline.clear();
            return Ok(Input::PipelineBroken(reason.clone()));
        }
        if let Ok(inner) = &inner
            && inner.steps > 0
        {
            self.us_per_step = Some((inner.seconds * 1e6 / inner.steps as f64).max(1.0) as u64);
            if tail > 0 {
                let schedule = ScheduleSpan {
                    start: plan.schedule.start
                        + (inner.steps as f64 * plan.schedule.per_step) as u64,
                    per_step: plan.schedule.per_step,
                };
                self.overlap.tail = Some((tail, schedule));
            }
        }
        // The last tail's steps are in this round's pseudo-gradient.
        let mut trained = std::mem::take(&mut self.overlap.trained);
        let inner = inner.map(|inner| {
            trained.absorb(&inner);
            trained
        });
        // The tail reads the rest of the lease while the round syncs: the round reports it
        // read.
        let ahead = self.overlap.tail.map_or(0, |(steps, _)| steps);
        Ok(Input::Trained(
            inner
                .map(|inner| Trained {
                    steps: inner.steps,
                    tokens: inner.tokens,
                    mean_loss: inner.mean_loss(),
                    lr: (inner.steps > 0).then_some(inner.last_lr),
                    seconds: inner.seconds,
                    // Where the round ends, once its tail ran.
                    step: self.trainer.step() + ahead,
                    consumed: match lease {
                        Some(_) => self.trainer.data_consumed_after(ahead),
                        None => Vec::new(),
                    },
                })
                .map_err(|e| format!("{e:#}")),
        ))
    }

    /// The inner steps of a round of `plan` (from global `version`) to run while its outer
    /// gradients travel ([`forge_trainer::diloco::OverlapSteps::steps`]; `auto` from this
    /// node's last outer sync), none in the run's last round (nothing would sync them; the run
    /// ends at `final_version`) or in a pipeline stage (its stages step together).
    fn tail_steps(&self, version: u64, plan: &InnerPlan, final_version: u64) -> u64 {
        let last = version + 1 >= final_version;
        if last || self.trainer.stage().is_some() || self.halt.load(Ordering::Relaxed) {
            return 0;
        }
        let round = self.diloco.round_steps(plan.schedule.start);
        let steps = self
            .diloco
            .overlap_steps
            .steps(round, self.overlap.sync_s, self.us_per_step);
        steps.min(plan.steps.saturating_sub(1))
    }

    /// All-reduces the pseudo-gradient weighted by this node's tokens and proposes the outer
    /// step. Notes that arrive meanwhile go to the state machine; one that declares a
    /// participant gone gives the all-reduce up.
    async fn all_reduce(
        &mut self,
        exchange: Exchange<'_>,
        notes: &mut mpsc::UnboundedReceiver<Notification>,
        queue: &mut VecDeque<Action<Proposal>>,
    ) -> Result<Input<Proposal>> {
        let Exchange {
            round,
            participants,
            leases,
            tokens,
            wait,
        } = exchange;
        // A pipeline stage averages its own layers with the nodes holding them.
        let group = self.same_layers(participants);
        let participants = group.as_slice();
        let tail = self.overlap.tail.take();
        self.overlap.progress = None;
        let data = self.outer.pseudo_gradient(self.trainer.var_store());
        let snapshot = tail.is_some().then(|| data.clone());
        let seq_len = self.trainer.config().train.seq_len.max(1) as u64;
        let max_weights = max_weights(participants, leases, seq_len);
        // No more than this node's lease holds (its last tail's steps count in this round and
        // a shorter tail now leaves them above it).
        let me = self.net.peer_id().to_string();
        let tokens = participants
            .iter()
            .zip(&max_weights)
            .find(|(p, _)| p.peer_id == me)
            .map_or(tokens, |(_, &cap)| tokens.min(cap as u64));
        let mut request = match request(
            round,
            participants,
            data,
            tokens,
            &self.codec,
            self.bandwidth,
        ) {
            Ok(request) => request,
            // A participant this node cannot address: the round fails, blaming it.
            Err(failure) => return Ok(Input::Reduced(Err(failure))),
        };
        request.timeout += wait;
        request.max_weights = max_weights;
        if crate::hostile::mode() == Some(crate::hostile::Mode::InflateWeight) {
            request.weight *= f64::from(crate::hostile::INFLATE);
            request
                .data
                .iter_mut()
                .for_each(|v| *v *= crate::hostile::INFLATE);
        }
        let reducing = reduce(
            &self.net,
            &mut self.codec,
            &mut self.rounds,
            (round, request),
            notes,
            queue,
        );
        let (result, sync_s) = match tail {
            None => reducing.await,
            Some((steps, schedule)) => {
                // The tail trains on a thread of its own while this one drives the all-reduce.
                let (trainer, stop) = (&mut self.trainer, &self.halt);
                let (reduced, tail) = tokio::task::block_in_place(|| {
                    let runtime = tokio::runtime::Handle::current();
                    std::thread::scope(|scope| {
                        let tail = std::thread::Builder::new()
                            .name("overlap".into())
                            .spawn_scoped(scope, move || {
                                trainer.inner_steps(steps, None, stop, schedule)
                            });
                        let reduced = runtime.block_on(reducing);
                        let tail = match tail {
                            Ok(handle) => handle
                                .join()
                                .map_err(|_| anyhow!("the overlapped inner steps panicked")),
                            Err(e) => Err(anyhow!(
                                "cannot start a thread for the overlapped inner steps: {e}"
                            )),
                        };
                        (reduced, tail)
                    })
                });
                let tail = tail?.context("the inner steps overlapped with the outer sync")?;
                self.overlap.trained = tail;
                if let (Ok(_), Some(snapshot)) = (&reduced.0, snapshot) {
                    // Both against the same global state: their difference is the tail's
                    // progress.
                    let after = self.outer.pseudo_gradient(self.trainer.var_store());
                    let progress = snapshot.iter().zip(&after).map(|(b, a)| b - a).collect();
                    self.overlap.progress = Some(progress);
                }
                reduced
            }
        };
        if result.is_ok() {
            self.overlap.sync_s = Some(sync_s);
        }
        let out = match result {
            Ok(out) => out,
            Err(e) => return Ok(Input::Reduced(Err(failure_of(&e, sync_s)))),
        };
        if crate::hostile::mode() == Some(crate::hostile::Mode::AccuseHonest)
            && let Some(victim) = participants
                .iter()
                .find(|p| p.peer_id != self.net.peer_id().to_string())
        {
            let failure = ReduceFailure {
                reason: "hostile test node: a false accusation".to_string(),
                peer: Some(victim.peer_id.clone()),
                rejected: true,
                sync_s,
            };
            return Ok(Input::Reduced(Err(failure)));
        }
        let proposal = self
            .outer
            .propose(&out.average, participants.len(), out.member_norm)?;
        let reduced = reduced(proposal, &out, sync_s);
        self.net.recycle_average(out.average);
        Ok(Input::Reduced(Ok(reduced)))
    }

    /// The background checkpoint write's outcome once it has ended (waiting for it when
    /// `wait`); None while it runs or when there is none.
    fn written(&mut self, wait: bool) -> Option<Input<Proposal>> {
        let writer = self.writer.take_if(|w| wait || w.thread.is_finished())?;
        let result = tokio::task::block_in_place(|| writer.thread.join());
        Some(Input::CheckpointWritten(match result {
            Ok(Ok(dir)) => Ok(dir.display().to_string()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the checkpoint writer panicked".to_string()),
        }))
    }

    /// Waits until the background checkpoint write ends (its thread signals as it ends); its
    /// outcome. Never ready when there is none.
    async fn writer_done(&mut self) -> Input<Proposal> {
        if let Some(writer) = self.writer.as_mut() {
            // The sender goes only as the thread ends, signalled or not.
            let _ = (&mut writer.ended).await;
        }
        match self.written(true) {
            Some(written) => written,
            None => std::future::pending().await,
        }
    }

    /// Appends the round to `rounds.jsonl` and prints it; returns its summary for the
    /// coordinator's dashboard.
    fn record(&mut self, log: &RoundLog) -> Result<RoundSummary> {
        clear_progress_line();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let phases = self.clock.phases();
        let tokens_per_step = self.trainer.config().tokens_per_step();
        let (wall_tokens_per_s, span) = self.clock.since_last(tokens_per_step, phases);
        let stamped = RoundLog {
            unix_ms: Some(at),
            wall_tokens_per_s: Some(wall_tokens_per_s),
            phases: Some(phases),
            source_tokens: self.trainer.source_tokens(),
            ..log.clone()
        };
        // The record is for people; a full or failing disk must not stop training over it.
        let line = serde_json::to_string(&stamped)?;
        if let Err(e) = writeln!(self.rounds_log, "{line}") {
            tracing::warn!(
                "round {}: cannot append to rounds.jsonl under --workdir ({e}); the round is \
                 printed but not recorded there; free space on that disk",
                log.round
            );
        }
        println!("{}", stamped.line());
        println!(
            "  since the last round: {wall_tokens_per_s:.0} tok/s of wall clock ({})",
            span.shares()
        );
        Ok(stamped.summary())
    }

    /// Reports `round` failed (if any) and leaves, telling the coordinator why; best effort, as
    /// the node is going anyway.
    async fn leave_failed(&self, round: Option<RoundId>, reason: &str) {
        if let Some(round) = round {
            let failed = failed_report(round, reason.to_string(), None, None);
            self.client.report(failed).await.ok();
        }
        self.client
            .clone()
            .leave(&format!("node failed: {reason}"))
            .await
            .ok();
    }

    async fn exit(mut self, exit: Exit) -> Result<()> {
        // A checkpoint shard still being written is finished, whatever the node leaves for.
        if let Some(Input::CheckpointWritten(Err(e))) = self.written(true) {
            tracing::warn!("the last checkpoint shard was not written: {e}");
        }
        match exit {
            Exit::Leave(reason) => {
                println!("leaving: {reason}");
                self.client.leave(&reason).await.ok();
                // The run's model is the committed global state, not what this node trained
                // since (a node stopped mid-run has local steps no round took).
                let version = self.rounds.held();
                if version.is_some() {
                    self.outer.load_into(self.trainer.var_store());
                    self.trainer.broadcast_params()?;
                }
                let evaluating = Instant::now();
                let (loss, bpb) = tokio::task::block_in_place(|| self.trainer.evaluate());
                self.clock.phases.eval_s += evaluating.elapsed().as_secs_f64();
                let model = version.map_or(
                    "this node's own parameters (it holds no committed version)".to_string(),
                    |v| format!("global version {v}"),
                );
                println!(
                    "final validation loss {loss:.4} ({bpb:.4} bits per byte) of {model}, after {} inner steps",
                    self.trainer.step()
                );
                println!(
                    "sample: {}",
                    tokio::task::block_in_place(|| self.trainer.sample())
                );
                let phases = self.clock.phases();
                let steps = self.clock.steps.steps;
                let wall = phases.total();
                println!(
                    "wall clock {wall:.1} s for {steps} inner steps, {:.0} tokens/s: {}",
                    (steps * self.trainer.config().tokens_per_step()) as f64 / wall.max(1e-9),
                    phases.shares()
                );
                tokio::task::block_in_place(|| self.trainer.leave_pipeline());
                Ok(())
            }
            Exit::Failed { round, reason } => {
                self.leave_failed(Some(round), &reason).await;
                Err(anyhow!(reason))
            }
            Exit::Stopped(reason) => Err(anyhow!(reason)),
            Exit::Aborted(reason) => {
                // An abort saves nothing: no final evaluation, no checkpoint.
                println!("leaving: {reason}; no final evaluation or checkpoint");
                self.client.leave(&reason).await.ok();
                tokio::task::block_in_place(|| self.trainer.leave_pipeline());
                Ok(())
            }
        }
    }
}

/// Runs `request`, the all-reduce of `round`, and its time in seconds. Notes that arrive
/// meanwhile go to the state machine; one that declares a participant gone gives it up.
async fn reduce(
    net: &PeerNet,
    codec: &mut QuantCodec,
    rounds: &mut Rounds<Proposal>,
    (round, request): (RoundId, crate::p2p::AllReduceRequest),
    notes: &mut mpsc::UnboundedReceiver<Notification>,
    queue: &mut VecDeque<Action<Proposal>>,
) -> (
    std::result::Result<crate::p2p::AllReduceOutput, crate::p2p::AllReduceError>,
    f64,
) {
    let started = Instant::now();
    let all_reduce = net.all_reduce(request, codec);
    tokio::pin!(all_reduce);
    let result = loop {
        tokio::select! {
            result = &mut all_reduce => break result,
            Some(note) = notes.recv() => {
                let mut abort = None;
                for action in rounds.handle(Instant::now(), Input::Note(note)) {
                    match action {
                        Action::AbortAllReduce { peer, reason, .. } => {
                            abort = Some(declared_gone(round, peer.as_deref(), &reason));
                        }
                        other => queue.push_back(other),
                    }
                }
                if let Some(e) = abort {
                    break Err(e);
                }
            }
        }
    };
    (result, started.elapsed().as_secs_f64())
}

/// The members' libp2p ids and addresses. One whose peer id does not parse (the coordinator
/// refuses such a join, so only another coordinator would pass one) is left out with a warning:
/// another member's data never stops this node.
fn peers_of(participants: &[Peer]) -> Vec<(&Peer, PeerId, Vec<Multiaddr>)> {
    participants
        .iter()
        .filter_map(|p| match p.peer_id.parse::<PeerId>() {
            Ok(id) => {
                let addrs = p
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                Some((p, id, addrs))
            }
            Err(e) => {
                tracing::warn!(
                    "member {} has an invalid peer id {:?} ({e}); it is left out",
                    p.member.0,
                    p.peer_id
                );
                None
            }
        })
        .collect()
}

/// On a terminal, a line on stderr that follows a round's inner steps (rewritten in place at
/// most twice a second, cleared before the round's own line); None elsewhere (logs and pipes
/// get the round lines alone).
fn progress_line() -> Option<forge_trainer::train::StepObserver> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let mut shown = Instant::now();
    Some(Box::new(move |summary, steps| {
        if summary.steps < steps && shown.elapsed() < Duration::from_millis(500) {
            return;
        }
        shown = Instant::now();
        eprint!("\r{}\x1b[K", progress_text(summary, steps));
    }))
}

/// The progress line's text: steps of the round so far, their mean loss and speed.
fn progress_text(summary: &forge_trainer::train::InnerSummary, steps: u64) -> String {
    let width = steps.to_string().len();
    let bar_len = 20;
    let filled = (summary.steps * bar_len / steps.max(1)).min(bar_len) as usize;
    format!(
        "inner steps [{}{}] {:>width$}/{steps} | loss {:.4} | {:.0} tok/s",
        "#".repeat(filled),
        " ".repeat(bar_len as usize - filled),
        summary.steps,
        summary.mean_loss(),
        summary.tokens as f64 / summary.seconds.max(1e-9),
    )
}

/// Clears the progress line, if stderr is a terminal, before a line of output.
fn clear_progress_line() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn the_progress_line_shows_steps_loss_and_speed() {
        let summary = forge_trainer::train::InnerSummary {
            steps: 15,
            tokens: 15 * 2048,
            loss_sum: 15.0 * 4.25,
            last_loss: 4.0,
            last_grad_norm: 1.0,
            last_lr: 1e-3,
            seconds: 3.0,
        };
        assert_eq!(
            progress_text(&summary, 30),
            "inner steps [##########          ] 15/30 | loss 4.2500 | 10240 tok/s"
        );
        let done = forge_trainer::train::InnerSummary {
            steps: 30,
            ..summary
        };
        assert!(progress_text(&done, 30).starts_with("inner steps [####################] 30/30"));
    }
}
