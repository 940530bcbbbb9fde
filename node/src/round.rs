//! One node's view of the DiLoCo rounds, with no I/O: the node's half of the protocol whose other
//! half is the coordinator's core, built the same way. The shell (`join.rs`) feeds [`Rounds`]
//! what happened — a coordinator notification, a finished job (state fetch, inner steps,
//! all-reduce, evaluation, checkpoint write), a stop request — with the time, and carries out
//! the [`Action`]s it returns, feeding each job's result back as an [`Input`].
//!
//! One job runs at a time. What the coordinator says meanwhile waits in a backlog and is taken
//! in order once the node is idle, except a participant's death during the round, which gives
//! up the all-reduce at once (its own timeout would only delay the round's close).
//!
//! `P` is the outer step a successful all-reduce proposes (the trainer's `Proposal` in the node,
//! a plain value in tests): held until the coordinator commits the round, then applied or
//! dropped.

use forge_coordinator_client::Notification;
use forge_protocol::messages::{
    Assignment, CheckpointShardDurable, CheckpointShardFailed, CoordinatorMessage, Digest, F64Bits,
    JoinAccepted, MemberDead, MemberId, OuterStep, Peer, RoundClosed, RoundId, RoundOpened,
    RoundOutcome, RoundReport, RoundSummary, RunAborted, RunPlan, StageAssignment, TensorHash,
};
use forge_protocol::run_config::DilocoConfig;
use forge_protocol::stream::{DataLease, SeqRange};
use forge_trainer::metrics::Phases;
use forge_trainer::train::ScheduleSpan;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One line of `rounds.jsonl` in the node's run directory, and of its round printout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RoundLog {
    pub(crate) round: u64,
    pub(crate) inner_steps: u64,
    pub(crate) step: u64,
    pub(crate) tokens: u64,
    pub(crate) loss: f64,
    /// The learning rate of the round's last inner step: the schedule's, as the round's
    /// opening placed it (a `control anneal` shows here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) eval_bpb: Option<f64>,
    pub(crate) members: usize,
    /// The outer lr of the round's outer step (`[diloco] outer_lr`, scaled by
    /// `outer_lr_scaling`), once its all-reduce has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) outer_lr: Option<f64>,
    /// Tokens all members processed this round (the all-reduce's total weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) group_tokens: Option<f64>,
    pub(crate) outcome: String,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    /// Bytes an fp32 all-reduce of the same parameters would send (2(K-1)/K × 4 × params).
    pub(crate) fp32_bytes: u64,
    pub(crate) sync_s: f64,
    pub(crate) inner_s: f64,
    /// Seconds spent fetching the global state from peers before this round (joiners, and
    /// nodes that missed a commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) state_fetch_s: Option<f64>,
    /// When the shell wrote the line (milliseconds since the Unix epoch), to line the rounds of
    /// several nodes up in wall time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unix_ms: Option<u64>,
    /// The training stream positions this node's inner steps read, when the round committed
    /// with its contribution (the coordinator's lease, [`forge_protocol::stream`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) data: Vec<SeqRange>,
    /// This node's tokens per second of wall clock since its previous round line (stamped
    /// by the shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) wall_tokens_per_s: Option<f64>,
    /// Where this node's wall clock went since it joined (stamped by the shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) phases: Option<Phases>,
    /// With a `[data] mix`: the training tokens this node's inner steps read of each source
    /// so far, by name (stamped by the shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source_tokens: Option<std::collections::BTreeMap<String, u64>>,
}

impl RoundLog {
    /// What the coordinator's dashboard shows of the round.
    pub(crate) fn summary(&self) -> RoundSummary {
        RoundSummary {
            round: RoundId(self.round),
            committed: self.outcome.starts_with("committed"),
            inner_steps: self.inner_steps,
            tokens: self.tokens,
            loss: F64Bits::new(self.loss),
            eval_loss: self.eval_loss.map(F64Bits::new),
            eval_bpb: self.eval_bpb.map(F64Bits::new),
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            sync_ms: (self.sync_s * 1e3) as u64,
            inner_ms: (self.inner_s * 1e3) as u64,
            wall_tokens_per_s: F64Bits::new(self.wall_tokens_per_s.unwrap_or(0.0)),
        }
    }

    /// The round's printout line.
    pub(crate) fn line(&self) -> String {
        let eval = self
            .eval_loss
            .map(|l| format!(" val {l:.4} ({:.3} bpb)", self.eval_bpb.unwrap_or(f64::NAN)))
            .unwrap_or_default();
        let lr = self
            .lr
            .map(|lr| format!(" lr {lr:.2e}"))
            .unwrap_or_default();
        format!(
            "round {:>4} | {} members | steps {:>5} | loss {:.4}{lr}{eval} | sent {:.2} MB ({:.1}% of fp32) | sync {:.2}s | {}",
            self.round,
            self.members,
            self.step,
            self.loss,
            self.bytes_sent as f64 / 1e6,
            100.0 * self.bytes_sent as f64 / self.fp32_bytes.max(1) as f64,
            self.sync_s,
            self.outcome
        )
    }
}

/// What the run fixes for the whole of a node's life.
#[derive(Debug, Clone)]
pub(crate) struct RoundsConfig {
    /// The global version the run ends at (its budget, which the coordinator owns; a stop or
    /// an anneal moves it, and every round's opening and close says where it is); 0: none, the
    /// run goes on until stopped.
    pub(crate) final_version: u64,
    /// Evaluate after every this many finished rounds (and after the last one).
    pub(crate) eval_every_rounds: u64,
    /// Values in the model (the pseudo-gradient's length), for the fp32-equivalent byte count.
    pub(crate) numel: u64,
    /// The hashes of this node's version 0 (its initial parameters and zero momentum), as
    /// [`forge_protocol::InitialState`] announces them: the tensors this node holds.
    pub(crate) initial_hashes: Vec<TensorHash>,
    /// The pipeline stage this node's trainer holds (None: the whole model).
    pub(crate) stage: Option<StageAssignment>,
}

/// What happened, fed to [`Rounds::handle`].
#[derive(Debug)]
pub(crate) enum Input<P> {
    /// Fed once, before anything else: the global version the node's outer state holds (None:
    /// it must fetch the state before it contributes) and its inner step. Version 0, the run's
    /// initial state, is the same on every node; a later one comes from its checkpoint shard.
    Resumed { held: Option<u64>, step: u64 },
    /// A notification of the coordinator client.
    Note(Notification),
    /// The coordinator client's channel closed: it has stopped for good. Read only while the
    /// node is idle (no job's answer is outstanding).
    CoordinatorGone,
    /// SIGINT or SIGTERM: finish a round already announced, then leave. `waiting` are the
    /// notifications that had arrived, unread, when the signal came: only an announced round
    /// among them is still played; the node leaves without acting on the rest.
    StopRequested { waiting: Vec<Notification> },
    /// The answer to [`Action::FetchState`]: the error chain as text on failure.
    StateFetched(Result<Fetched, String>),
    /// The answer to [`Action::Train`].
    Trained(Result<Trained, String>),
    /// The answer to [`Action::Train`] when the pipeline could not form or broke off (another
    /// stage's node unreachable or gone): the round fails for this node, which stays.
    PipelineBroken(String),
    /// The answer to [`Action::AllReduce`] and [`Action::AbortAllReduce`].
    Reduced(Result<Reduced<P>, ReduceFailure>),
    /// The answer to [`Action::Evaluate`]: validation loss and bits per byte.
    Evaluated { loss: f64, bpb: f64 },
    /// The answer to [`Action::WriteCheckpoint`]: where the shard went, or why it did not.
    CheckpointWritten(Result<String, String>),
    /// The answer to [`Action::Restage`]: the rebuilt trainer's version-0 hashes (the tensors
    /// it holds) and its values.
    Restaged {
        initial_hashes: Vec<TensorHash>,
        numel: u64,
    },
}

/// Global state fetched from peers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Fetched {
    /// The run's inner step the state belongs to; training continues from it.
    pub(crate) step: u64,
    /// The round that made the state.
    pub(crate) made_by_round: u64,
    pub(crate) seconds: f64,
}

/// A round's inner steps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Trained {
    pub(crate) steps: u64,
    pub(crate) tokens: u64,
    pub(crate) mean_loss: f64,
    /// The learning rate of the last inner step (None: no step).
    pub(crate) lr: Option<f64>,
    pub(crate) seconds: f64,
    /// The node's inner step after them.
    pub(crate) step: u64,
    /// The stream positions they read (empty without a lease).
    pub(crate) consumed: Vec<SeqRange>,
}

/// A finished all-reduce and the outer step it proposes.
#[derive(Debug)]
pub(crate) struct Reduced<P> {
    pub(crate) proposal: P,
    pub(crate) params_hash: [u8; 32],
    pub(crate) tensor_hashes: Vec<TensorHash>,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) total_weight: f64,
    pub(crate) sync_s: f64,
    /// The outer lr the proposal took (`[diloco] outer_lr` scaled for the members averaged).
    pub(crate) outer_lr: f64,
}

/// A failed all-reduce, and the peer it blames.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReduceFailure {
    pub(crate) reason: String,
    /// The peer id this node blames, if any.
    pub(crate) peer: Option<String>,
    /// Whether that peer's contribution was rejected (bad data) rather than missing.
    pub(crate) rejected: bool,
    pub(crate) sync_s: f64,
}

/// How a node ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Exit {
    /// Leave the run telling the coordinator why (budget spent, stopped, the coordinator gone);
    /// then a final evaluation and a sample.
    Leave(String),
    /// Training itself failed: report the round failed, leave telling why, and exit with that
    /// error.
    Failed { round: RoundId, reason: String },
    /// The coordinator stopped this node (refused on reconnect, or gave up): exit with an error.
    Stopped(String),
    /// The operator aborted the run: leave at once, without a final evaluation or checkpoint.
    Aborted(String),
}

/// What the shell must do, in order.
#[derive(Debug)]
pub(crate) enum Action<P> {
    /// Print a line for the user.
    Say(String),
    /// Rebuild the trainer for these layers (a pipeline stage; None: the whole model), which
    /// the coordinator's plan now gives this node, then answer [`Input::Restaged`].
    Restage(Option<StageAssignment>),
    /// Accept peer connections from these members only (the round's participants and the other
    /// replicas' nodes, which may fetch the global state from this node).
    SetMembers(Vec<Peer>),
    /// Read data shard `index` of `count` from its start.
    FollowShard { index: u32, count: u32 },
    /// Fetch the round's global state from its other participants, check it against the
    /// round's hashes and take it; answer with [`Input::StateFetched`].
    FetchState(RoundOpened),
    /// Run the round's inner steps from global `version` (the schedule's position), paced
    /// when the round says so ([`RoundOpened::pace_us_per_step`]); answer with
    /// [`Input::Trained`].
    Train {
        round: RoundId,
        version: u64,
        pace_us_per_step: Option<u64>,
        /// When the round's announcement arrived.
        opened_at: Instant,
        /// The stream positions this node's replica reads this round: the inner steps stop
        /// when they run out. None: the coordinator leases no data, the node reads its shard.
        lease: Option<Vec<SeqRange>>,
        /// The nodes of this node's pipeline in stage order, itself included (empty for a
        /// whole replica): the stages a step runs through.
        pipeline: Vec<Peer>,
        /// The run's end and decay phase as the round's opening says.
        plan: RunPlan,
    },
    /// All-reduce the weighted pseudo-gradient with these participants and propose the outer
    /// step; answer with [`Input::Reduced`].
    AllReduce {
        round: RoundId,
        participants: Vec<Peer>,
        /// The round's data leases: no participant may weigh more than its replica's.
        leases: Vec<DataLease>,
        /// The node's tokens this round: the contribution's weight.
        tokens: u64,
        /// How long this node may wait for slower participants to finish their inner steps,
        /// on top of the transfer's own timeout ([`peer_wait`]).
        wait: Duration,
    },
    /// Give up the round's all-reduce (running or about to start): the coordinator declared
    /// this participant gone (None: the run was aborted). Answer with [`Input::Reduced`].
    AbortAllReduce {
        round: RoundId,
        peer: Option<String>,
        reason: String,
    },
    /// Tell the coordinator how the round went.
    Report(RoundReport),
    /// The coordinator committed this node's outer step: take it (every local device too).
    ApplyOuterStep(P),
    /// Evaluate on the validation set; answer with [`Input::Evaluated`].
    Evaluate,
    /// Serve the global state this node now holds to peers that join or fell behind.
    PublishState { version: u64, round: u64 },
    /// Write this node's checkpoint shard of the committed state, in the background (the node
    /// goes on meanwhile); answer with [`Input::CheckpointWritten`] when it is written, shards
    /// in the order they were asked for.
    WriteCheckpoint {
        round: RoundId,
        shard: u32,
        version: u64,
        tensor_hashes: Vec<TensorHash>,
    },
    /// Tell the coordinator a checkpoint shard is on disk.
    ShardDurable(CheckpointShardDurable),
    /// Tell the coordinator a checkpoint shard could not be written (the node trains on).
    ShardFailed(CheckpointShardFailed),
    /// Append the round's record to `rounds.jsonl` and print it.
    Record(Box<RoundLog>),
    /// Stop; nothing follows.
    Exit(Exit),
}

/// A round this node has reported and awaits the outcome of.
#[derive(Debug)]
struct Pending<P> {
    round: RoundId,
    /// The proposed outer step and the hash of the global parameters it makes.
    proposal: Option<(P, [u8; 32])>,
    log: RoundLog,
    /// The stream positions the round's inner steps read.
    consumed: Vec<SeqRange>,
}

/// A closed round whose evaluation or checkpoint write is under way.
#[derive(Debug)]
struct Closing {
    closed: RoundClosed,
    log: RoundLog,
}

/// The job under way; inputs other than its answer wait in the backlog.
#[derive(Debug)]
enum Phase {
    Idle,
    Fetching(RoundOpened),
    Training {
        open: RoundOpened,
        state_fetch_s: Option<f64>,
    },
    Reducing {
        open: RoundOpened,
        state_fetch_s: Option<f64>,
        trained: Trained,
    },
    Evaluating(Box<Closing>),
    Exited,
}

/// One node's view of the rounds: what it holds, what it played, what it waits for.
#[derive(Debug)]
pub(crate) struct Rounds<P> {
    config: RoundsConfig,
    me: MemberId,
    joined_at: Instant,
    /// The global version this node's outer state holds. Version 0, the run's initial state, is
    /// the same on every node (same seed); later ones come from a commit or from peers. None:
    /// this node missed a commit and must fetch the state before it can contribute again.
    held: Option<u64>,
    /// The node's inner step (the trainer's, as last reported by a job).
    step: u64,
    /// The last round this node played: a round is played once, however often it is announced.
    last_opened: Option<RoundId>,
    pending: Option<Pending<P>>,
    phase: Phase,
    /// Coordinator notifications that arrived while a job ran, in order.
    backlog: VecDeque<Notification>,
    /// Checkpoint shards being written in the background, oldest first, each with the report
    /// that tells the coordinator it is durable.
    writing: VecDeque<CheckpointShardDurable>,
    /// The data shard this node reads (index, count); None on standby.
    shard: Option<(u32, u32)>,
    /// Peers of the other replicas (they may fetch the global state from this node).
    sync_peers: Vec<Peer>,
    /// The current round's participants.
    participants: Vec<Peer>,
    rounds_done: u64,
    contributed: bool,
    stopping: bool,
    /// The newest global version the coordinator committed, as far as this node heard.
    run_version: u64,
    /// The round being fetched starts from an older global version than the run had reached:
    /// the coordinator went back to its last checkpoint (a whole stage, or every member, was
    /// lost), which this node may hold in its own checkpoint shards.
    went_back: bool,
    /// When the newest RoundOpened was taken in.
    opened_at: Option<(RoundId, Instant)>,
    /// When the last round's close was taken in, and when the last job after it (evaluation,
    /// checkpoint shard, state fetch) ended: the coordinator opens the next round as it closes
    /// one, so a paced round's time counts from the close for a node busy with those jobs.
    closed_at: Option<(RoundId, Instant)>,
    job_ended: Instant,
    /// The time of the input being handled.
    now: Instant,
}

impl<P> Rounds<P> {
    /// A node that `accepted` admitted; it reads the data shard of its assignment
    /// ([`Rounds::shard`]). The shell feeds [`Input::Resumed`] next, with the state it holds.
    /// The hashes of the version 0 this node holds or would start from.
    pub(crate) fn initial_hashes(&self) -> &[TensorHash] {
        &self.config.initial_hashes
    }

    pub(crate) fn new(config: RoundsConfig, accepted: &JoinAccepted, now: Instant) -> Rounds<P> {
        let mut config = config;
        config.final_version = accepted.plan.final_version;
        let mut rounds = Rounds {
            config,
            me: accepted.member,
            joined_at: now,
            held: Some(0),
            step: 0,
            last_opened: None,
            pending: None,
            phase: Phase::Idle,
            backlog: VecDeque::new(),
            writing: VecDeque::new(),
            shard: None,
            sync_peers: accepted.sync_peers.clone(),
            participants: Vec::new(),
            rounds_done: 0,
            contributed: false,
            stopping: false,
            run_version: accepted.global.version,
            went_back: false,
            opened_at: None,
            closed_at: None,
            job_ended: now,
            now,
        };
        if let Some(a) = &accepted.assignment {
            rounds.shard = Some((a.data_shard.index, a.data_shard.count));
        }
        rounds
    }

    /// The data shard this node reads (index, count); None on standby.
    pub(crate) fn shard(&self) -> Option<(u32, u32)> {
        self.shard
    }

    /// The round whose fetch, inner steps or all-reduce is under way, if any: the round a job
    /// that fails for this node's own reasons fails.
    pub(crate) fn round_in_flight(&self) -> Option<RoundId> {
        match &self.phase {
            Phase::Fetching(open) | Phase::Training { open, .. } | Phase::Reducing { open, .. } => {
                Some(open.round)
            }
            _ => None,
        }
    }

    /// Takes one input and returns what to do, in order.
    pub(crate) fn handle(&mut self, now: Instant, input: Input<P>) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Exited) {
            return out;
        }
        self.now = now;
        match input {
            Input::Note(note) => self.on_note(note, &mut out),
            Input::Resumed { held, step } => {
                self.held = held;
                self.step = step;
            }
            Input::Restaged {
                initial_hashes,
                numel,
            } => {
                // The rebuilt trainer holds version 0 of its layers; a later version is fetched.
                self.config.initial_hashes = initial_hashes;
                self.config.numel = numel;
                self.held = self.held.filter(|&v| v == 0);
            }
            Input::CoordinatorGone => self.exit(
                Exit::Leave("the coordinator connection closed".into()),
                &mut out,
            ),
            Input::StopRequested { waiting } => {
                self.backlog.extend(waiting);
                self.stopping = true;
            }
            Input::StateFetched(result) => {
                self.job_ended = now;
                self.on_fetched(result, &mut out)
            }
            Input::Trained(result) => self.on_trained(result, &mut out),
            Input::PipelineBroken(reason) => {
                if let Phase::Training {
                    open,
                    state_fetch_s,
                } = std::mem::replace(&mut self.phase, Phase::Idle)
                {
                    let trained = Trained {
                        steps: 0,
                        tokens: 0,
                        mean_loss: f64::NAN,
                        lr: None,
                        seconds: 0.0,
                        step: self.step,
                        consumed: Vec::new(),
                    };
                    self.phase = Phase::Reducing {
                        open,
                        state_fetch_s,
                        trained,
                    };
                    let failure = ReduceFailure {
                        reason: format!("the pipeline broke off: {reason}"),
                        peer: None,
                        rejected: false,
                        sync_s: 0.0,
                    };
                    self.on_reduced(now, Err(failure), &mut out);
                }
            }
            Input::Reduced(result) => self.on_reduced(now, result, &mut out),
            Input::Evaluated { loss, bpb } => {
                self.job_ended = now;
                self.on_evaluated(loss, bpb, &mut out)
            }
            Input::CheckpointWritten(result) => {
                self.job_ended = now;
                self.on_checkpoint_written(result, &mut out)
            }
        }
        self.drive(&mut out);
        out
    }

    /// The member id this node has now (a new one after the coordinator replaced it).
    pub(crate) fn member(&self) -> MemberId {
        self.me
    }

    /// The global version this node holds, if any.
    pub(crate) fn held(&self) -> Option<u64> {
        self.held
    }

    /// Whether the round being fetched went back to an older global version (see
    /// [`Rounds::went_back`]'s field): its state may be in this node's checkpoint shards.
    pub(crate) fn went_back(&self) -> bool {
        self.went_back
    }

    fn busy(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::Exited)
    }

    /// While idle: leave when stopping or out of budget, else take the backlog in order.
    fn drive(&mut self, out: &mut Vec<Action<P>>) {
        while !self.busy() && !matches!(self.phase, Phase::Exited) {
            if let Some(aborted) = self.backlog.iter().find_map(aborted) {
                let why = format!("the run was aborted: {}", aborted.reason);
                self.exit(Exit::Aborted(why), out);
                return;
            }
            if self.stopping {
                // Finish a round already announced to this node before leaving (its inner steps
                // stop at once; what it trained since the last round is still contributed), so
                // its peers do not wait for it.
                let last = self.last_opened;
                let announced = self.backlog.iter().any(|note| {
                    matches!(note, Notification::Message(CoordinatorMessage::RoundOpened(open))
                        if unplayed(last, open.round))
                });
                if !announced || self.finished() {
                    // Not before its checkpoint shards are written and reported.
                    if self.writing.is_empty() {
                        self.exit(Exit::Leave("stopped by signal".into()), out);
                    }
                    return;
                }
            }
            if self.finished() && self.pending.is_none() {
                if !self.writing.is_empty() {
                    return;
                }
                let version = self.config.final_version;
                let why = if self.held == Some(version) {
                    format!("the run is finished: its final version {version} is committed")
                } else {
                    format!(
                        "the run finished at version {version} without this node; its model is \
                         the run's final checkpoint"
                    )
                };
                self.exit(Exit::Leave(why), out);
                return;
            }
            let Some(note) = self.backlog.pop_front() else {
                return;
            };
            self.take_note(note, out);
        }
    }

    /// Whether the coordinator committed the run's final version.
    fn finished(&self) -> bool {
        self.config.final_version > 0 && self.run_version >= self.config.final_version
    }

    fn exit(&mut self, exit: Exit, out: &mut Vec<Action<P>>) {
        self.phase = Phase::Exited;
        out.push(Action::Exit(exit));
    }

    fn on_note(&mut self, note: Notification, out: &mut Vec<Action<P>>) {
        // A participant of the round under way died: the all-reduce cannot finish. Checked when
        // the note arrives; the note itself waits like any other.
        if let Phase::Reducing { open, .. } = &self.phase
            && let Some((peer, reason)) = gives_up(open, &note)
        {
            out.push(Action::AbortAllReduce {
                round: open.round,
                peer,
                reason,
            });
        }
        if let Notification::Message(CoordinatorMessage::RoundOpened(open)) = &note
            && self.opened_at.is_none_or(|(round, _)| round < open.round)
        {
            self.opened_at = Some((open.round, self.now));
        }
        self.backlog.push_back(note);
    }

    /// Acts on one coordinator notification while idle.
    fn take_note(&mut self, note: Notification, out: &mut Vec<Action<P>>) {
        match note {
            Notification::Message(CoordinatorMessage::RoundOpened(open)) => {
                self.on_round_opened(open, out)
            }
            Notification::Message(CoordinatorMessage::RoundClosed(closed)) => {
                self.on_round_closed(closed, out)
            }
            Notification::Message(CoordinatorMessage::Assigned(a)) => {
                if let Some(a) = &a.assignment {
                    self.restage(a, out);
                }
                match &a.assignment {
                    Some(assignment) => self.follow_shard(assignment, out),
                    None if self.shard.is_some() => {
                        // Benched (most peers could not reach this node) or no data shard free.
                        out.push(Action::Say(
                            "on standby: the coordinator left this node out of its plan".into(),
                        ));
                        self.shard = None;
                    }
                    None => {}
                }
                // Admit new replicas' nodes now: they fetch the global state from their peers.
                self.sync_peers = a.sync_peers;
                out.push(Action::SetMembers(self.allowlist()));
            }
            Notification::Message(CoordinatorMessage::PeersChanged(delta)) => {
                self.sync_peers.retain(|p| {
                    !delta.removed.contains(&p.member)
                        && !delta.added.iter().any(|a| a.member == p.member)
                });
                self.sync_peers.extend(delta.added);
                out.push(Action::SetMembers(self.allowlist()));
            }
            Notification::Message(CoordinatorMessage::MemberDead(dead)) => {
                out.push(Action::Say(format!(
                    "member {} is gone: {}",
                    dead.member.0, dead.reason
                )));
            }
            Notification::Message(CoordinatorMessage::RunAborted(aborted)) => {
                let why = format!("the run was aborted: {}", aborted.reason);
                self.exit(Exit::Aborted(why), out);
            }
            Notification::Message(_) => {}
            Notification::Disconnected { reason } => out.push(Action::Say(format!(
                "coordinator connection lost ({reason}); reconnecting"
            ))),
            Notification::Rejoined {
                kept_member,
                accepted,
            } => self.on_rejoined(kept_member, accepted, out),
            Notification::Stopped { reason } => self.exit(
                Exit::Stopped(format!("the coordinator stopped this node: {reason}")),
                out,
            ),
        }
    }

    fn on_rejoined(&mut self, kept_member: bool, accepted: JoinAccepted, out: &mut Vec<Action<P>>) {
        out.push(Action::Say(format!(
            "reconnected to the coordinator (same member: {kept_member})"
        )));
        // Its plan as it stands now (a coordinator restarted after a stop, say).
        self.config.final_version = accepted.plan.final_version;
        if kept_member {
            return;
        }
        // A fresh joiner: the outcome of a round it reported to its old self never comes, and
        // its assignment and peers are the new ones.
        self.me = accepted.member;
        if let Some(stale) = self.pending.take() {
            out.push(Action::Say(format!(
                "round {}: outcome lost with the old membership; its outer step is dropped",
                stale.round.0
            )));
        }
        if let Some(a) = &accepted.assignment {
            self.restage(a, out);
        }
        if let Some(a) = &accepted.assignment {
            self.follow_shard(a, out);
        }
        self.sync_peers = accepted.sync_peers;
        out.push(Action::SetMembers(self.allowlist()));
    }

    fn on_round_opened(&mut self, open: RoundOpened, out: &mut Vec<Action<P>>) {
        if !unplayed(self.last_opened, open.round) {
            // Sent again after a reconnect (or a coordinator restart) before our report arrived:
            // this node played that round and its report is being resent.
            return;
        }
        self.last_opened = Some(open.round);
        self.config.final_version = open.plan.final_version;
        if let Some(stale) = self.pending.take() {
            // Its RoundClosed never reached this node (cut off from the coordinator): the outer
            // step is dropped; the version check below fetches whatever the others committed.
            out.push(Action::Say(format!(
                "round {}: no outcome heard; its outer step is dropped",
                stale.round.0
            )));
        }
        self.participants = open.participants.clone();
        out.push(Action::SetMembers(self.allowlist()));
        self.went_back = open.global_version < self.run_version;
        if self.went_back {
            out.push(Action::Say(format!(
                "round {}: the run went back from global version {} to {}, its last committed \
                 checkpoint (the layers past it were lost with every node that held them)",
                open.round.0, self.run_version, open.global_version
            )));
            self.run_version = open.global_version;
        }
        let announced = self.held_of(&open.tensor_hashes);
        let other_start = open.global_version == 0
            && self.held == Some(0)
            && !announced.is_empty()
            && announced != self.held_of(&self.config.initial_hashes);
        if other_start {
            out.push(Action::Say(format!(
                "round {}: the run's version 0 is not this node's initial parameters (another \
                 node drew them first, with other numbers); fetching it from the peers",
                open.round.0
            )));
        }
        if self.held != Some(open.global_version) || other_start {
            out.push(Action::FetchState(open.clone()));
            self.phase = Phase::Fetching(open);
        } else {
            out.push(self.train(&open));
            self.phase = Phase::Training {
                open,
                state_fetch_s: None,
            };
        }
    }

    /// The inner steps of the round `open` announces. A paced round's time runs from when the
    /// node took its announcement in, less the jobs this node ran since the previous round
    /// closed (the next round opened then, while this node evaluated, wrote its checkpoint
    /// shard or fetched state), so a node slower at those trains that much less.
    fn train(&self, open: &RoundOpened) -> Action<P> {
        let taken = match self.opened_at {
            Some((round, at)) if round == open.round => at,
            _ => self.now,
        };
        let opened_at = match self.closed_at {
            Some((round, closed)) if round.next() == open.round && self.job_ended > closed => {
                taken.checked_sub(self.job_ended - closed).unwrap_or(taken)
            }
            _ => taken,
        };
        Action::Train {
            round: open.round,
            version: open.global_version,
            pace_us_per_step: open.pace_us_per_step,
            opened_at,
            lease: self.lease(open),
            pipeline: self.pipeline(open),
            plan: open.plan,
        }
    }

    /// The nodes of this node's pipeline in `open`, in stage order (empty for a whole replica).
    fn pipeline(&self, open: &RoundOpened) -> Vec<Peer> {
        let Some(me) = open.participants.iter().find(|p| p.member == self.me) else {
            return Vec::new();
        };
        if me.assignment.stage.is_none() {
            return Vec::new();
        }
        let mut stages: Vec<Peer> = open
            .participants
            .iter()
            .filter(|p| p.assignment.replica == me.assignment.replica)
            .cloned()
            .collect();
        stages.sort_by_key(|p| p.assignment.stage_index());
        stages
    }

    /// Asks for the trainer to be rebuilt when `assignment` gives this node other layers than
    /// its trainer holds (a re-plan made it a pipeline stage, another stage, or whole again).
    fn restage(&mut self, assignment: &Assignment, out: &mut Vec<Action<P>>) {
        if assignment.stage == self.config.stage {
            return;
        }
        let what = match assignment.stage {
            None => "the whole model".to_string(),
            Some(s) => format!(
                "stage {} of {} (layers {}..{})",
                s.stage + 1,
                s.stages,
                s.layers.start,
                s.layers.end
            ),
        };
        out.push(Action::Say(format!(
            "the coordinator's plan gives this node {what} of replica {}",
            assignment.replica.0
        )));
        self.config.stage = assignment.stage;
        out.push(Action::Restage(assignment.stage));
    }

    /// `hashes` restricted to the tensors this node holds (a pipeline stage holds its own).
    pub(crate) fn held_of(&self, hashes: &[TensorHash]) -> Vec<TensorHash> {
        held_hashes(&self.config.initial_hashes, hashes)
    }

    /// This node's replica's lease in `open`; None when the round carries no leases.
    fn lease(&self, open: &RoundOpened) -> Option<Vec<SeqRange>> {
        if open.data.is_empty() {
            return None;
        }
        let replica = open
            .participants
            .iter()
            .find(|p| p.member == self.me)
            .map(|p| p.assignment.replica);
        Some(
            open.data
                .iter()
                .find(|lease| Some(lease.replica) == replica)
                .map(|lease| lease.ranges.clone())
                .unwrap_or_default(),
        )
    }

    fn on_fetched(&mut self, result: Result<Fetched, String>, out: &mut Vec<Action<P>>) {
        let Phase::Fetching(open) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        match result {
            Ok(fetched) => {
                self.held = Some(open.global_version);
                if open.global_version == 0 {
                    // Version 0 is now the run's, whatever this node drew (of its tensors).
                    self.config.initial_hashes = self.held_of(&open.tensor_hashes);
                }
                self.step = fetched.step;
                out.push(Action::PublishState {
                    version: open.global_version,
                    round: fetched.made_by_round,
                });
                out.push(self.train(&open));
                self.phase = Phase::Training {
                    open,
                    state_fetch_s: Some(fetched.seconds),
                };
            }
            Err(e) => {
                // Without the group's state this node cannot contribute; the round fails for it
                // (and, through the all-reduce, for the others) rather than mixing states. The
                // next round tries again.
                let reason = format!("could not fetch global state v{}: {e}", open.global_version);
                out.push(Action::Say(format!("round {}: {reason}", open.round.0)));
                out.push(Action::Report(failed_report(
                    open.round, reason, None, None,
                )));
            }
        }
    }

    fn on_trained(&mut self, result: Result<Trained, String>, out: &mut Vec<Action<P>>) {
        let Phase::Training {
            open,
            state_fetch_s,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        let trained = match result {
            Ok(trained) => trained,
            Err(reason) => {
                // Training itself failed (a data-parallel worker crashed or hangs, the loss
                // diverged): fail this round and leave, telling the coordinator why.
                self.exit(
                    Exit::Failed {
                        round: open.round,
                        reason,
                    },
                    out,
                );
                return;
            }
        };
        self.step = trained.step;
        // A participant the coordinator declared gone while this node trained: no all-reduce.
        let dead = self.backlog.iter().find_map(|note| gives_up(&open, note));
        out.push(match dead {
            Some((peer, reason)) => Action::AbortAllReduce {
                round: open.round,
                peer,
                reason,
            },
            None => Action::AllReduce {
                round: open.round,
                participants: open.participants.clone(),
                leases: open.data.clone(),
                tokens: trained.tokens,
                wait: peer_wait(&open, &trained),
            },
        });
        self.phase = Phase::Reducing {
            open,
            state_fetch_s,
            trained,
        };
    }

    fn on_reduced(
        &mut self,
        now: Instant,
        result: Result<Reduced<P>, ReduceFailure>,
        out: &mut Vec<Action<P>>,
    ) {
        let Phase::Reducing {
            open,
            state_fetch_s,
            trained,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        let mut log = self.round_log(&open, &trained, state_fetch_s);
        let (outer_step, proposal) = match result {
            Ok(reduced) => {
                log.bytes_sent = reduced.bytes_sent;
                log.bytes_received = reduced.bytes_received;
                log.group_tokens = Some(reduced.total_weight);
                log.sync_s = reduced.sync_s;
                log.outer_lr = Some(reduced.outer_lr);
                let step = OuterStep::Ok {
                    params_hash: Digest(reduced.params_hash),
                    tensor_hashes: reduced.tensor_hashes,
                };
                (step, Some((reduced.proposal, reduced.params_hash)))
            }
            Err(failure) => {
                log.sync_s = failure.sync_s;
                out.push(Action::Say(format!(
                    "round {}: all-reduce failed: {}",
                    open.round.0, failure.reason
                )));
                (failed_step(&open, failure), None)
            }
        };
        if !self.contributed && proposal.is_some() {
            self.contributed = true;
            out.push(Action::Say(format!(
                "first contribution (round {}) {:.1} s after joining",
                open.round.0,
                now.saturating_duration_since(self.joined_at).as_secs_f64()
            )));
        }
        out.push(Action::Report(RoundReport {
            round: open.round,
            tokens_processed: trained.tokens,
            us_per_step: us_per_step(&trained),
            consumed: trained.consumed.clone(),
            outer_step,
        }));
        self.pending = Some(Pending {
            round: open.round,
            proposal,
            log,
            consumed: trained.consumed,
        });
    }

    /// The round's record as far as this node knows it before the outcome.
    fn round_log(
        &self,
        open: &RoundOpened,
        trained: &Trained,
        state_fetch_s: Option<f64>,
    ) -> RoundLog {
        let k = open.participants.len();
        let fp32_bytes =
            (2.0 * (k as f64 - 1.0) / k as f64 * 4.0 * self.config.numel as f64) as u64;
        RoundLog {
            round: open.round.0,
            inner_steps: trained.steps,
            step: trained.step,
            tokens: trained.tokens,
            loss: trained.mean_loss,
            lr: trained.lr,
            eval_loss: None,
            eval_bpb: None,
            members: k,
            outer_lr: None,
            group_tokens: None,
            outcome: String::new(),
            bytes_sent: 0,
            bytes_received: 0,
            fp32_bytes,
            sync_s: 0.0,
            inner_s: trained.seconds,
            state_fetch_s,
            unix_ms: None,
            wall_tokens_per_s: None,
            phases: None,
            data: Vec::new(),
            source_tokens: None,
        }
    }

    fn on_round_closed(&mut self, closed: RoundClosed, out: &mut Vec<Action<P>>) {
        self.closed_at = Some((closed.round, self.now));
        // A stop or an anneal may have moved the run's end as this round closed.
        self.config.final_version = closed.plan.final_version;
        if let RoundOutcome::Committed { version, .. } = &closed.outcome {
            // The final round's close reaches every member, participant or not.
            self.run_version = self.run_version.max(*version);
        }
        let Some(pending) = self.pending.take_if(|p| p.round == closed.round) else {
            return;
        };
        self.rounds_done += 1;
        let mut log = pending.log;
        match (&closed.outcome, pending.proposal) {
            (RoundOutcome::Committed { version, .. }, Some((proposal, hash))) => {
                let hash = digest_hex(&hash);
                if closed.included.contains(&self.me) {
                    out.push(Action::ApplyOuterStep(proposal));
                    self.held = Some(*version);
                    log.outcome = format!("committed v{version} {hash}");
                    log.data = pending.consumed;
                } else {
                    // Our hash lost the vote: our global state is no longer the group's. Take
                    // nothing; the next round starts by fetching the committed state from peers.
                    self.held = None;
                    log.outcome = format!(
                        "committed v{version} without this node (its hash {hash} disagreed); \
                         fetching the committed state next round"
                    );
                }
            }
            (RoundOutcome::Committed { version, .. }, None) => {
                // The others committed without us: fetch their state before contributing again.
                self.held = None;
                log.outcome = format!("committed v{version} without this node");
            }
            (RoundOutcome::Abandoned { reason }, _) => {
                log.outcome = format!("abandoned: {reason}");
            }
        }
        let closing = Closing { closed, log };
        if self
            .rounds_done
            .is_multiple_of(self.config.eval_every_rounds.max(1))
            || self.finished()
        {
            out.push(Action::Evaluate);
            self.phase = Phase::Evaluating(Box::new(closing));
        } else {
            self.after_evaluation(closing, out);
        }
    }

    fn on_evaluated(&mut self, loss: f64, bpb: f64, out: &mut Vec<Action<P>>) {
        let Phase::Evaluating(mut closing) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        closing.log.eval_loss = Some(loss);
        closing.log.eval_bpb = Some(bpb);
        self.after_evaluation(*closing, out);
    }

    /// A closed round: serve the committed state this node holds, write its checkpoint shard if
    /// the coordinator asked this node to, and record the round.
    fn after_evaluation(&mut self, closing: Closing, out: &mut Vec<Action<P>>) {
        let RoundOutcome::Committed {
            version,
            tensor_hashes,
        } = &closing.closed.outcome
        else {
            out.push(Action::Record(Box::new(closing.log)));
            return;
        };
        if self.held != Some(*version) {
            out.push(Action::Record(Box::new(closing.log)));
            return;
        }
        out.push(Action::PublishState {
            version: *version,
            round: closing.closed.round.0,
        });
        let writer = closing
            .closed
            .checkpoint
            .as_ref()
            .and_then(|c| c.writers.iter().find(|w| w.member == self.me));
        if let Some(writer) = writer {
            out.push(Action::WriteCheckpoint {
                round: closing.closed.round,
                shard: writer.shard,
                version: *version,
                tensor_hashes: tensor_hashes.clone(),
            });
            self.writing.push_back(CheckpointShardDurable {
                round: closing.closed.round,
                shard: writer.shard,
                tensor_hashes: tensor_hashes.clone(),
            });
        }
        out.push(Action::Record(Box::new(closing.log)));
    }

    fn on_checkpoint_written(&mut self, result: Result<String, String>, out: &mut Vec<Action<P>>) {
        let Some(durable) = self.writing.pop_front() else {
            return;
        };
        let (round, shard) = (durable.round.0, durable.shard);
        match result {
            Ok(path) => {
                out.push(Action::Say(format!(
                    "round {round}: checkpoint shard {shard} written to {path}"
                )));
                out.push(Action::ShardDurable(durable));
            }
            // The coordinator keeps the previous committed checkpoint and asks another replica
            // for the next one; this node trains on.
            Err(e) => {
                out.push(Action::Say(format!(
                    "round {round}: checkpoint shard {shard} not written: {e}; training goes on \
                     and another replica is asked for the next checkpoint (free space under \
                     --workdir for this node to write again)"
                )));
                out.push(Action::ShardFailed(CheckpointShardFailed {
                    round: durable.round,
                    shard,
                    reason: e,
                }));
            }
        }
    }

    fn follow_shard(&mut self, assignment: &Assignment, out: &mut Vec<Action<P>>) {
        let next = (assignment.data_shard.index, assignment.data_shard.count);
        if self.shard != Some(next) {
            out.push(Action::FollowShard {
                index: next.0,
                count: next.1,
            });
            self.shard = Some(next);
        }
    }

    /// Who may connect to this node: the round's participants and the other replicas' nodes.
    fn allowlist(&self) -> Vec<Peer> {
        let mut peers = self.participants.clone();
        for peer in &self.sync_peers {
            if !peers.iter().any(|p| p.member == peer.member) {
                peers.push(peer.clone());
            }
        }
        peers
    }
}

/// The hashes of `hashes` whose tensors `mine` lists (the tensors a node holds).
pub(crate) fn held_hashes(mine: &[TensorHash], hashes: &[TensorHash]) -> Vec<TensorHash> {
    hashes
        .iter()
        .filter(|h| mine.iter().any(|m| m.key == h.key))
        .cloned()
        .collect()
}

/// Why `note` gives up the all-reduce of `open`: a participant declared dead (not one that
/// left cleanly), as its peer id and the coordinator's reason, or the run aborted (no peer).
fn gives_up(open: &RoundOpened, note: &Notification) -> Option<(Option<String>, String)> {
    if let Some(aborted) = aborted(note) {
        return Some((None, format!("the run was aborted: {}", aborted.reason)));
    }
    match note {
        Notification::Message(CoordinatorMessage::MemberDead(MemberDead {
            member,
            reason,
            left: false,
            ..
        })) => open
            .participants
            .iter()
            .find(|p| p.member == *member)
            .map(|p| (Some(p.peer_id.clone()), reason.clone())),
        _ => None,
    }
}

/// The abort `note` announces, if it is one.
fn aborted(note: &Notification) -> Option<&RunAborted> {
    match note {
        Notification::Message(CoordinatorMessage::RunAborted(aborted)) => Some(aborted),
        _ => None,
    }
}

/// A failed all-reduce as reported: the coordinator learns whom this node blames (a dead, slow
/// or poisoning peer), and removes a member whose contribution this node rejected.
fn failed_step(open: &RoundOpened, failure: ReduceFailure) -> OuterStep {
    let member = failure.peer.as_deref().and_then(|peer| {
        open.participants
            .iter()
            .find(|p| p.peer_id == peer)
            .map(|p| p.member)
    });
    let (rejected, unreachable) = if failure.rejected {
        (member, None)
    } else {
        (None, member)
    };
    let reason = format!(
        "{} [blamed peer: {}]",
        failure.reason,
        failure.peer.as_deref().unwrap_or("none")
    );
    OuterStep::Failed {
        reason,
        rejected,
        unreachable,
    }
}

pub(crate) use forge_protocol::MAX_PACED_ROUND;

/// How a round's inner steps go: how many, for how long, and where on the lr schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct InnerPlan {
    pub(crate) steps: u64,
    /// Train until this much time has passed (at least one step), if set.
    pub(crate) budget: Option<Duration>,
    pub(crate) schedule: ScheduleSpan,
}

impl InnerPlan {
    /// The inner steps of the round that starts from global `version`, for a run of
    /// `total_steps` per replica. The schedule starts where a replica that played every round
    /// would be ([`DilocoConfig::step_at_version`]), the run's progress. A round of H steps
    /// (not a warmup round of one) that carries a pace ends for every node at the same moment:
    /// the median node's time for H steps after the round's announcement, `elapsed` ago (a node
    /// still evaluating or fetching when it came trains that much less). This node trains until
    /// then, up to [`MAX_PACED_ROUND`] x H steps, and strides through the round's H schedule
    /// steps by how many it expects to do at its own speed (`mine`, microseconds per step in its
    /// last round). Unpaced: H steps (the last round of the budget shorter), stopped early after
    /// `round_seconds` when that is set.
    pub(crate) fn new(
        diloco: &DilocoConfig,
        total_steps: u64,
        version: u64,
        pace_us_per_step: Option<u64>,
        mine: Option<u64>,
        elapsed: Duration,
    ) -> InnerPlan {
        let start = diloco.step_at_version(version);
        let target = diloco.round_steps(start);
        match pace_us_per_step.filter(|&us| us > 0 && target > 1) {
            Some(pace) => {
                let round_us = pace
                    .saturating_mul(target)
                    .saturating_sub(elapsed.as_micros() as u64);
                let expected =
                    (round_us / mine.unwrap_or(pace).max(1)).clamp(1, MAX_PACED_ROUND * target);
                InnerPlan {
                    steps: MAX_PACED_ROUND * target,
                    budget: Some(Duration::from_micros(round_us)),
                    schedule: ScheduleSpan {
                        start,
                        per_step: target as f64 / expected as f64,
                    },
                }
            }
            None => {
                // Past the budget (a run whose last rounds were abandoned) rounds stay full.
                let left = total_steps.saturating_sub(start);
                InnerPlan {
                    steps: if left == 0 { target } else { target.min(left) },
                    budget: (diloco.round_seconds > 0.0)
                        .then(|| Duration::from_secs_f64(diloco.round_seconds)),
                    schedule: ScheduleSpan {
                        start,
                        per_step: 1.0,
                    },
                }
            }
        }
    }
}

/// Without a measured speed (the run's first rounds), a node waits at the all-reduce for
/// participants this many times slower than itself.
pub(crate) const UNMEASURED_SLOWDOWN: f64 = 4.0;

/// How long a node that finished its inner steps waits for slower participants at the
/// all-reduce, beyond the transfer's timeout: in a paced round everyone trains the same time,
/// so one step of the slowest (its last step overruns the round's time) twice over; unpaced,
/// the slowest participant's time for this node's step count past this node's own time, half
/// as much again; with nothing measured, time for a participant [`UNMEASURED_SLOWDOWN`] times
/// slower. A dead participant ends the wait sooner (the coordinator says so).
pub(crate) fn peer_wait(open: &RoundOpened, trained: &Trained) -> Duration {
    let own = trained.seconds.max(0.0);
    let seconds = match (open.pace_us_per_step, open.slowest_us_per_step) {
        (Some(_), Some(slowest)) => 2.0 * slowest as f64 / 1e6,
        (Some(_), None) => 0.0,
        (None, Some(slowest)) => {
            let theirs = trained.steps as f64 * slowest as f64 / 1e6;
            1.5 * (theirs - own).max(0.0)
        }
        (None, None) => (UNMEASURED_SLOWDOWN - 1.0) * own,
    };
    Duration::from_secs_f64(seconds.min(86_400.0))
}

/// Mean microseconds per inner step of a round's training (0: no step).
fn us_per_step(trained: &Trained) -> u64 {
    if trained.steps == 0 {
        return 0;
    }
    (trained.seconds * 1e6 / trained.steps as f64).round() as u64
}

pub(crate) fn failed_report(
    round: RoundId,
    reason: String,
    rejected: Option<MemberId>,
    unreachable: Option<MemberId>,
) -> RoundReport {
    RoundReport {
        round,
        tokens_processed: 0,
        us_per_step: 0,
        consumed: Vec::new(),
        outer_step: OuterStep::Failed {
            reason,
            rejected,
            unreachable,
        },
    }
}

/// Whether `round` comes after the last round this node played: a round is played once, however
/// often it is announced (again after a reconnect or a coordinator restart).
fn unplayed(last_opened: Option<RoundId>, round: RoundId) -> bool {
    last_opened.is_none_or(|last| round > last)
}

/// The first six bytes of a digest in hex, as round lines print hashes.
fn digest_hex(d: &[u8; 32]) -> String {
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
