//! The coordinator as a pure state machine: membership, assignment, rounds, global state and
//! checkpoint bookkeeping. No I/O and no clock: the caller feeds in time and messages and carries
//! out the returned [`Output`]s.
//!
//! Rules (the tests in `sim.rs` check them under a lossy simulated network):
//! - **Liveness.** Any message from a member counts as a heartbeat. A member silent for
//!   `heartbeat_timeout_ms` is declared dead on the next call at or after that moment, removed,
//!   and announced to the others. A graceful `Leave` removes it at once.
//! - **Assignment.** Outside a round, every membership change re-plans: with a model profile the
//!   planner groups members into replicas × stages (keeping running replicas unless a new plan is
//!   1.3× faster); without one every member is a whole-model replica. Each replica gets the lowest
//!   free data shard. A member that joins while a round runs waits on standby until it closes.
//! - **Rounds.** A round opens when no round is open and at least `min_replicas` replicas are
//!   assigned; its participants are fixed at that moment. It closes when every participant still
//!   alive has reported, or at its deadline, whichever is first.
//! - **Quorum.** A round commits only if a strict majority of its participants (counted at open,
//!   so members that died or were cut off still count against it; only a graceful leave before
//!   reporting takes a member out of the count) reported an outer step that
//!   agrees with the winning hash of every tensor they hold, and at least `min_replicas` replicas
//!   agree in full. Otherwise it is abandoned and nodes restore their previous parameters. A
//!   partitioned minority therefore never closes a round it shares with a majority; once the
//!   missing members are declared dead the next round is formed from the members that remain.
//! - **Agreement.** For each tensor (and for each layer range's `params_hash`) the digest most
//!   members reported wins; a tie has no winner. Disagreement is surfaced as an event.
//! - **Checkpoints.** Every `checkpoint_every_rounds` committed rounds, one fully agreeing
//!   replica writes one shard per stage. The checkpoint is committed only when every shard is
//!   reported durable by its writer with hashes matching that round's global state.
//! - **Control.** The operator's `save`, `stop` and `anneal` ([`Coordinator::control`]) wait
//!   for a round to close: the first committed round at or after theirs is checkpointed, or is
//!   the run's final version (checkpointed too), and an anneal's decay phase starts with the
//!   round after it (the run's end moves to the decay's end). An `abort` abandons the open round
//!   at once (or ends the run as its round closes), drops checkpoints not yet committed, and
//!   tells every member; no round opens again. Pending actions are part of the snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use forge_protocol::codec::{self, Channel};
use forge_protocol::run_config::{AnnealPlan, NO_DECAY_PHASE};
use forge_protocol::session::{ControlAction, ControlReply, ControlRequest, PendingControl};
use forge_protocol::stream::{self, DataDigest, DataLease, SeqRange};
use forge_protocol::{
    Assigned, Assignment, Capabilities, CheckpointCommitted, CheckpointRequest,
    CheckpointShardDurable, CheckpointShardFailed, CoordinatorMessage, DataShard, Digest,
    ErrorCode, ErrorReply, GlobalState, Hello, InitialState, JoinAccepted, LayerRange, MemberDead,
    MemberId, NodeMessage, OuterStep, Peer, PeersChanged, Ready, ReplicaId, RoundClosed, RoundId,
    RoundOpened, RoundOutcome, RoundReport, RunAborted, RunPlan, ShardWriter, StageAssignment,
    TensorHash, TensorKey,
};
use serde::{Deserialize, Serialize};

use crate::data::{self, DataPlan, Ledger};
use crate::error::{Error, Result};
use crate::planner::{self, ModelProfile, Plan};
use crate::profile::node_from_capabilities;

/// Milliseconds on the caller's monotonic clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Millis(pub u64);

impl Millis {
    fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// A connection as the caller numbers them; a reconnecting node gets a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnId(pub u64);

/// What the coordinator core needs to know; validated once by [`Coordinator::new`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The run config (TOML) handed to every node on join; the core does not read it.
    pub run_config: String,
    /// With a profile, members that cannot hold the whole model are grouped into pipelines.
    pub model: Option<ModelProfile>,
    /// Fewest fully agreeing replicas a round needs to commit (and to open).
    pub min_replicas: u32,
    /// Replicas the first round waits for (0: `min_replicas`). Every replica must start from
    /// the same global state, and a node that joins after a round has committed cannot fetch
    /// it yet, so a run starts only when all its first replicas are there.
    #[serde(default)]
    pub start_replicas: u32,
    /// Without a data plan ([`CoordinatorConfig::data`]): the number of fixed data shards, each
    /// replica reading a different one. Unused with one.
    pub data_shards: u32,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// A round closes this long after it opens, whoever has reported.
    pub round_deadline_ms: u64,
    /// Checkpoint every this many rounds (by round id); 0 never.
    pub checkpoint_every_rounds: u64,
    /// The run's budget: no round opens once this global version is committed, and the round
    /// that commits it is checkpointed (0: no budget, rounds go on until stopped).
    #[serde(default)]
    pub final_version: u64,
    /// How the run's decay phase is entered early (`control anneal`); None: its schedule has
    /// none, and an anneal is refused.
    #[serde(default)]
    pub anneal: Option<AnnealPlan>,
    /// Speed-aware rounds (`[diloco] pace = "auto"`): rounds carry a pace once the
    /// participants' measured speeds differ (see [`RoundOpened::pace_us_per_step`]).
    #[serde(default)]
    pub pace: bool,
    /// With a plan, the coordinator leases the training stream to replicas round by round
    /// ([`crate::data`]) and plans only members whose data matches the run's; without one,
    /// each replica reads its fixed data shard.
    #[serde(default)]
    pub data: Option<DataPlan>,
    /// What one run and one address may make the coordinator hold.
    #[serde(default)]
    pub limits: Limits,
}

/// Caps on what clients can make the coordinator hold, each refused with an error naming it.
/// The defaults leave room for any real cluster (the coordinator is measured at 1,000
/// members); a benchmark that simulates many machines from one address raises the per-address
/// ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Members of the run at once; a join beyond is refused.
    pub max_members: u32,
    /// Open connections from one IP address; one beyond is closed with the reason.
    pub max_connections_per_ip: u32,
    /// Join connections one IP address may open per second (a burst of as many, refilled
    /// continuously); one beyond is refused with the reason and retried by the node later.
    pub joins_per_ip_per_s: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_members: 1_024,
            max_connections_per_ip: 64,
            joins_per_ip_per_s: 16,
        }
    }
}

/// Rounds are paced once the slowest participant takes more than this many times as long per
/// inner step as the fastest.
pub const PACE_SPREAD: f64 = 1.25;

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if self.min_replicas == 0 {
            return bad("min_replicas must be at least 1".to_string());
        }
        if self.data.is_none() && self.data_shards < self.start_replicas {
            return bad(format!(
                "data_shards ({}) must be at least start_replicas ({}): every replica reads its own shard",
                self.data_shards, self.start_replicas
            ));
        }
        if self.data.is_none() && self.data_shards < self.min_replicas {
            return bad(format!(
                "data_shards ({}) must be at least min_replicas ({}): every replica reads its own shard",
                self.data_shards, self.min_replicas
            ));
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms <= self.heartbeat_interval_ms
        {
            return bad(format!(
                "heartbeat_timeout_ms ({}) must exceed heartbeat_interval_ms ({}), which must be positive; a timeout of 3-5 intervals tolerates lost heartbeats",
                self.heartbeat_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.round_deadline_ms == 0 {
            return bad("round_deadline_ms must be positive".to_string());
        }
        let limits = &self.limits;
        if limits.max_members == 0
            || limits.max_connections_per_ip == 0
            || limits.joins_per_ip_per_s == 0
        {
            return bad(format!(
                "max_members ({}), max_connections_per_ip ({}) and joins_per_ip_per_s ({}) must \
                 each be at least 1",
                limits.max_members, limits.max_connections_per_ip, limits.joins_per_ip_per_s
            ));
        }
        if let Some(model) = &self.model {
            model.validate()?;
        }
        Ok(())
    }
}

/// One member as the shell sees it for status reports.
#[derive(Clone, Copy, Debug)]
pub struct MemberView<'a> {
    pub member: MemberId,
    pub capabilities: &'a Capabilities,
    pub connected: bool,
    pub last_heard: Millis,
    pub assignment: Option<Assignment>,
}

/// What the caller feeds in besides time.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A decoded message from a connection.
    Message(NodeMessage),
    /// The connection closed. The member stays until its heartbeat timeout, so it can reconnect.
    Disconnected,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Send {
        to: ConnId,
        message: CoordinatorMessage,
    },
    /// Close the connection after sending what precedes this.
    Close { conn: ConnId },
    /// For logs, metrics and persistence.
    Event(Event),
}

/// Outputs in order, with the [`PeersChanged`] messages each connection gets merged as they
/// come into one per run of them (no other message to that connection in between), in the place
/// of the run's first: applied in order, later changes of a member win, which is what the node
/// does with them one by one. A burst of joins otherwise sends every member one message per
/// joiner, and holds all of them until the burst is sent.
#[derive(Debug, Default)]
pub struct Coalesced {
    outputs: Vec<Output>,
    /// Per connection: the index in `outputs` of its open run of peer changes, if any.
    open: HashMap<ConnId, usize>,
    /// Peers listed in the merged changes held (an upper bound).
    peers: usize,
}

impl Coalesced {
    pub fn push(&mut self, output: Output) {
        match output {
            Output::Send {
                to,
                message: CoordinatorMessage::PeersChanged(change),
            } => {
                self.peers += change.added.len();
                if let Some(&at) = self.open.get(&to)
                    && let Output::Send {
                        message: CoordinatorMessage::PeersChanged(run),
                        ..
                    } = &mut self.outputs[at]
                {
                    for member in change.removed {
                        run.added.retain(|peer| peer.member != member);
                        if !run.removed.contains(&member) {
                            run.removed.push(member);
                        }
                    }
                    for peer in change.added {
                        run.added.retain(|p| p.member != peer.member);
                        run.added.push(peer);
                    }
                    return;
                }
                self.open.insert(to, self.outputs.len());
                self.outputs.push(Output::Send {
                    to,
                    message: CoordinatorMessage::PeersChanged(change),
                });
            }
            Output::Send { to, message } => {
                self.open.remove(&to);
                self.outputs.push(Output::Send { to, message });
            }
            Output::Close { conn } => {
                self.open.remove(&conn);
                self.outputs.push(Output::Close { conn });
            }
            event => self.outputs.push(event),
        }
    }

    /// How many peers the merged changes held list, at most: what the caller bounds by sending
    /// what it holds.
    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    pub fn into_outputs(self) -> Vec<Output> {
        self.outputs
    }
}

impl Extend<Output> for Coalesced {
    fn extend<I: IntoIterator<Item = Output>>(&mut self, outputs: I) {
        for output in outputs {
            self.push(output);
        }
    }
}

/// [`Coalesced`] of a whole list.
pub fn coalesce_peer_changes(outputs: Vec<Output>) -> Vec<Output> {
    let mut merged = Coalesced::default();
    merged.extend(outputs);
    merged.into_outputs()
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Refused {
        conn: ConnId,
        reason: String,
    },
    Joined {
        member: MemberId,
        peer_id: String,
    },
    /// A member reconnected and kept its id and assignment.
    Resumed {
        member: MemberId,
    },
    Left {
        member: MemberId,
        reason: String,
    },
    Dead {
        member: MemberId,
        silent_ms: u64,
    },
    /// A member removed because another participant rejected its contribution to a round.
    Rejected {
        member: MemberId,
        by: MemberId,
        round: RoundId,
        reason: String,
    },
    /// A member most other participants of `round` could not reach sits out the rounds up to
    /// and including `until` (on standby), then is assigned again.
    Benched {
        member: MemberId,
        round: RoundId,
        until: RoundId,
        reason: String,
    },
    PlanChanged {
        replicas: usize,
        standby: Vec<MemberId>,
    },
    RoundOpened {
        round: RoundId,
        participants: Vec<MemberId>,
    },
    RoundClosed {
        round: RoundId,
        committed: bool,
        included: Vec<MemberId>,
        excluded: Vec<MemberId>,
    },
    /// Reports of one round disagree on some tensor (or layer range) hashes.
    HashDisagreement {
        round: RoundId,
        tensors: Vec<String>,
        disagreeing: Vec<MemberId>,
    },
    CheckpointCommitted {
        round: RoundId,
    },
    Warning {
        message: String,
    },
    /// The run's version 0 is the one `member` announced.
    InitialState {
        member: MemberId,
    },
    /// `round` committed the run's final version: no round opens after it.
    Finished {
        version: u64,
        round: RoundId,
    },
    /// The operator asked for `action` (`control`); `what` says what will happen and when.
    ControlRequested {
        action: ControlAction,
        what: String,
    },
    /// A control action took effect as `round` closed (an immediate abort: as it was asked).
    ControlApplied {
        action: ControlAction,
        round: Option<RoundId>,
        what: String,
    },
    /// The run's training stream is the one `member` tokenized, `windows` per epoch.
    DataStream {
        member: MemberId,
        windows: u64,
    },
    /// After `round`: `replica` consumed `ranges` of its lease and `returned` the rest (all of
    /// it when the round was abandoned or went on without the replica).
    DataConsumed {
        round: RoundId,
        replica: ReplicaId,
        ranges: Vec<SeqRange>,
        returned: Vec<SeqRange>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Member {
    conn: Option<ConnId>,
    capabilities: Capabilities,
    last_heard: Millis,
    assignment: Option<Assignment>,
    /// Set once most of a round's other participants could not reach this member.
    bench: Option<Bench>,
    /// Its microseconds per inner step, averaged over its recent reports (0: not measured).
    #[serde(default)]
    us_per_step: u64,
    /// Its training stream, once it said it is tokenized (equal to the run's).
    #[serde(default)]
    data: Option<DataDigest>,
    /// Its last checkpoint shard could not be written (cleared when one is durable): another
    /// replica writes the next checkpoint if one can.
    #[serde(default)]
    write_failed: bool,
}

/// A member that most of a round's participants could not reach (cut off from its peers but not
/// from the coordinator) would fail every round it is in; it sits out a number of rounds that
/// doubles with each benching until it is part of a committed round again.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Bench {
    /// Left out of every round up to and including this one.
    until: RoundId,
    /// Still on standby for it (cleared, with a re-plan, once `until` has passed).
    active: bool,
    /// Benchings since this member was last part of a committed round.
    strikes: u32,
}

impl Member {
    fn benched(&self) -> bool {
        self.bench.as_ref().is_some_and(|b| b.active)
    }

    /// Whether the planner may give it work: not benched, and with leased data, its data ready.
    fn plannable(&self, config: &CoordinatorConfig) -> bool {
        !self.benched() && (config.data.is_none() || self.data.is_some())
    }
}

/// How a member leaves the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// It sent `Leave` and owes no report to an open round.
    Left,
    /// Silent past the heartbeat timeout, replaced by its own rejoin, or left in the middle of
    /// a round it is in: its peers stop waiting for it.
    Gone,
    /// Its contributions were rejected; it must not come back as it is.
    Expelled,
}

/// At most this many rounds on the bench at a time.
const MAX_BENCH_ROUNDS: u64 = 16;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Replica {
    /// Members in stage order.
    members: Vec<MemberId>,
    data_shard: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct OpenRound {
    id: RoundId,
    deadline: Millis,
    participants: BTreeMap<MemberId, Assignment>,
    reports: BTreeMap<MemberId, RoundReport>,
    /// The round's pace, as announced ([`RoundOpened::pace_us_per_step`]).
    #[serde(default)]
    pace_us_per_step: Option<u64>,
    /// As announced ([`RoundOpened::slowest_us_per_step`]).
    #[serde(default)]
    slowest_us_per_step: Option<u64>,
    /// The stream positions each replica reads this round.
    #[serde(default)]
    leases: BTreeMap<ReplicaId, Vec<SeqRange>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingCheckpoint {
    writers: Vec<ShardWriter>,
    durable: BTreeSet<u32>,
    /// The global state the checkpoint holds.
    version: u64,
    tensor_hashes: BTreeMap<TensorKey, Digest>,
    /// The training stream consumed up to that state.
    #[serde(default)]
    ledger: Ledger,
}

#[derive(Clone, Copy, Debug, Default)]
struct Conn {
    hello: bool,
    member: Option<MemberId>,
}

/// The operator's requests ([`Coordinator::control`]) and what they changed of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Control {
    /// Actions waiting for a round to close, one of each kind at most.
    pending: BTreeMap<ControlAction, RoundId>,
    /// The run ends at this global version (a stop, or an anneal's end).
    final_version: Option<u64>,
    /// The schedule's decay phase starts with the round that starts from this version.
    anneal_from: Option<u64>,
    aborted: bool,
}

/// The pending actions that take effect as a round closes.
#[derive(Debug, Default)]
struct Due {
    save: bool,
    stop: bool,
    anneal: bool,
    abort: bool,
}

/// The coordinator's whole state. Serializable, so a thin shell can persist it after each step
/// ([`Coordinator::to_snapshot`]) and restore it after a restart.
#[derive(Debug, Serialize, Deserialize)]
pub struct Coordinator {
    config: CoordinatorConfig,
    now: Millis,
    next_member: u64,
    next_replica: u64,
    members: BTreeMap<MemberId, Member>,
    plan: Option<Plan>,
    replicas: BTreeMap<ReplicaId, Replica>,
    membership_changed: bool,
    round: Option<OpenRound>,
    last_round: Option<RoundId>,
    global: GlobalState,
    checkpoints: BTreeMap<RoundId, PendingCheckpoint>,
    last_checkpoint: Option<RoundId>,
    /// The global state of the last committed checkpoint: where the run continues when every
    /// member is gone (a whole-cluster restart), since no node holds anything newer.
    checkpoint_state: Option<GlobalState>,
    /// The run's training stream: the first member's, which every other must match.
    #[serde(default)]
    data_digest: Option<DataDigest>,
    /// What the rounds committed so far consumed of it.
    #[serde(default)]
    ledger: Ledger,
    /// What the state of the last committed checkpoint consumed.
    #[serde(default)]
    checkpoint_ledger: Ledger,
    /// Peer ids removed for bad contributions: they may not join this run again.
    #[serde(default)]
    banned: BTreeSet<String>,
    /// Every member's assignment as the last re-plan made it (members gone since included), to
    /// tell the others what changed.
    #[serde(default)]
    planned: BTreeMap<MemberId, Assignment>,
    /// The members known to hold the global state at `global.version`, and the layers of it
    /// each holds (None: the whole model): the included members of the round that committed
    /// it, and every participant since that trained from it. None when unknown (a snapshot
    /// from an older coordinator): then only a run with no member left goes back.
    #[serde(default)]
    holders: Option<BTreeMap<MemberId, Option<LayerRange>>>,
    /// Version 0's hashes, as the members announced them: where the run goes back to when
    /// some layers are lost before any checkpoint was committed.
    #[serde(default)]
    initial_hashes: Vec<TensorHash>,
    #[serde(default)]
    control: Control,
    /// Connections do not survive a restart; nodes reconnect.
    #[serde(skip)]
    conns: BTreeMap<ConnId, Conn>,
    /// After a restart nobody counts as silent before this moment (plus the heartbeat timeout):
    /// nodes first notice the old coordinator is gone, then reconnect with backoff.
    #[serde(skip)]
    grace_until: Millis,
    /// No member can fall silent past its timeout before this moment: the earliest deadline the
    /// last scan saw (deadlines only move later, and a new member's is the latest), so a step
    /// need not look at every member.
    #[serde(skip)]
    silence_check_at: Millis,
    /// The round whose benches were last ended, while no member has been benched since.
    #[serde(skip)]
    benches_ended_for: Option<RoundId>,
}

/// How long after a restart the coordinator waits, beyond the heartbeat timeout, for its members
/// to reconnect before declaring them dead. A node notices a vanished coordinator after its
/// connection's idle timeout (the heartbeat timeout) and retries with a backoff from 0.2 s.
pub(crate) const RESTART_GRACE_MS: u64 = 10_000;

impl Coordinator {
    pub fn new(config: CoordinatorConfig) -> Result<Coordinator> {
        config.validate()?;
        Ok(Coordinator {
            config,
            now: Millis(0),
            next_member: 1,
            next_replica: 1,
            members: BTreeMap::new(),
            plan: None,
            replicas: BTreeMap::new(),
            membership_changed: false,
            round: None,
            last_round: None,
            global: GlobalState::default(),
            checkpoints: BTreeMap::new(),
            last_checkpoint: None,
            checkpoint_state: None,
            data_digest: None,
            ledger: Ledger::default(),
            checkpoint_ledger: Ledger::default(),
            banned: BTreeSet::new(),
            planned: BTreeMap::new(),
            holders: Some(BTreeMap::new()),
            initial_hashes: Vec::new(),
            control: Control::default(),
            conns: BTreeMap::new(),
            grace_until: Millis(0),
            silence_check_at: Millis(0),
            benches_ended_for: None,
        })
    }

    /// Handles one input from connection `from` at time `now`.
    pub fn step(&mut self, now: Millis, from: ConnId, input: Input) -> Vec<Output> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        match input {
            Input::Message(message) => self.on_message(from, message, &mut out),
            Input::Disconnected => {
                let conn = self.conns.remove(&from).unwrap_or_default();
                if let Some(member) = conn.member.and_then(|id| self.members.get_mut(&id))
                    && member.conn == Some(from)
                {
                    member.conn = None;
                }
            }
        }
        self.advance(&mut out);
        out
    }

    /// Lets time pass: declares silent members dead and closes rounds past their deadline.
    /// Call it at least every `heartbeat_interval_ms`.
    pub fn tick(&mut self, now: Millis) -> Vec<Output> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        self.advance(&mut out);
        out
    }

    /// The operator's request (`forge-coordinator control`, authenticated by the shell): the
    /// reply says what will happen and when, or why not. `at_round` is the round at whose close
    /// the action takes effect; it must not be past (the open round, or the next to open when
    /// none is, is the earliest). A second request of a kind replaces the first; an abort drops
    /// every other pending action, and without a round it ends the run at once.
    pub fn control(&mut self, now: Millis, request: ControlRequest) -> (ControlReply, Vec<Output>) {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let reply = match self.check_control(&request) {
            Err(message) => ControlReply::Refused(ErrorReply {
                code: ErrorCode::InvalidControl,
                message,
            }),
            Ok(at) => {
                let what = self.accept_control(request, at, &mut out);
                out.push(Output::Event(Event::ControlRequested {
                    action: request.action,
                    what: what.clone(),
                }));
                self.advance(&mut out);
                ControlReply::Accepted {
                    what,
                    pending: self.pending_control(),
                }
            }
        };
        (reply, out)
    }

    /// The round a request takes effect at, or why it cannot be carried out.
    fn check_control(&self, request: &ControlRequest) -> std::result::Result<RoundId, String> {
        if self.control.aborted {
            return Err("the run was aborted; no round opens again".to_string());
        }
        if self.finished() {
            return Err(format!(
                "the run is finished: its final version {} is committed, and its last \
                 checkpoint is the run's model",
                self.final_version()
            ));
        }
        let current = self.current_round();
        let at = request.at_round.unwrap_or(current);
        if at < current {
            let state = if self.round.is_some() {
                "under way"
            } else {
                "the next to open"
            };
            return Err(format!(
                "{at} is past: {current} is {state}; ask for {current} or a later round"
            ));
        }
        if request.action == ControlAction::Anneal && self.config.anneal.is_none() {
            return Err(format!("the run cannot anneal: its {NO_DECAY_PHASE}"));
        }
        Ok(at)
    }

    /// Records (or for an immediate abort, carries out) a checked request; says what happens.
    fn accept_control(
        &mut self,
        request: ControlRequest,
        at: RoundId,
        out: &mut Vec<Output>,
    ) -> String {
        let action = request.action;
        if action == ControlAction::Anneal
            && let Some(version) = self.control.anneal_from
        {
            return format!(
                "the decay phase already started with the round from global version {version}; \
                 the run ends at version {}",
                self.final_version()
            );
        }
        let mut what = match action {
            ControlAction::Save => format!(
                "a checkpoint of the state {at} commits (or the next round to commit, if it is \
                 abandoned)"
            ),
            ControlAction::Stop => format!(
                "the run ends with the state {at} commits (or the next round to commit): it is \
                 checkpointed and every node leaves with it"
            ),
            ControlAction::Anneal => {
                let plan = self.config.anneal.expect("checked");
                format!(
                    "the schedule's decay phase starts with the round after {at}: {} inner \
                     steps (about {} rounds) down to the schedule's floor, and the run ends \
                     with it",
                    plan.decay_steps,
                    plan.decay_steps.div_ceil(plan.inner_steps.max(1))
                )
            }
            ControlAction::Abort if request.at_round.is_none() => {
                let dropped = self.drop_pending_for_abort();
                let why = "aborted by the operator (forge-coordinator control abort)".to_string();
                let abandoned = self.round.as_ref().map(|round| round.id);
                self.abort(why, abandoned, out);
                let round = abandoned.map_or(String::new(), |r| format!(" ({r} abandoned)"));
                return format!(
                    "the run is aborted{round}: no round opens again, nothing more is \
                     checkpointed, and every node leaves{dropped}"
                );
            }
            ControlAction::Abort => format!(
                "the run is aborted as {at} closes: nothing of it is checkpointed, no round \
                 opens after it, and every node leaves{}",
                self.drop_pending_for_abort()
            ),
        };
        match self.control.pending.insert(action, at) {
            Some(before) if before == at => what.push_str(" (already pending)"),
            Some(before) => {
                what.push_str(&format!(" (replaces the {action} pending for {before})"))
            }
            None => {}
        }
        what
    }

    /// An abort makes every other pending action moot: drops them and says which.
    fn drop_pending_for_abort(&mut self) -> String {
        let dropped: Vec<String> = std::mem::take(&mut self.control.pending)
            .into_iter()
            .filter(|(action, _)| *action != ControlAction::Abort)
            .map(|(action, round)| format!("{action} at {round}"))
            .collect();
        if dropped.is_empty() {
            String::new()
        } else {
            format!("; dropped: {}", dropped.join(", "))
        }
    }

    /// Ends the run without saving: the open round is abandoned, checkpoints not yet committed
    /// are dropped, no round opens again, and every member is told.
    /// `round`: the round it ends with (the open one, or the one that just closed).
    fn abort(&mut self, reason: String, round: Option<RoundId>, out: &mut Vec<Output>) {
        if let Some(round) = self.round.take() {
            self.settle_data(&round, &[], out);
            let message = CoordinatorMessage::RoundClosed(RoundClosed {
                round: round.id,
                outcome: RoundOutcome::Abandoned {
                    reason: reason.clone(),
                },
                included: Vec::new(),
                checkpoint: None,
                plan: self.run_plan(),
            });
            for member in round.participants.keys() {
                self.send_to_member(*member, message.clone(), out);
            }
            out.push(Output::Event(Event::RoundClosed {
                round: round.id,
                committed: false,
                included: Vec::new(),
                excluded: round.participants.keys().copied().collect(),
            }));
        }
        self.control.aborted = true;
        self.control.pending.clear();
        self.checkpoints.clear();
        self.broadcast(
            CoordinatorMessage::RunAborted(RunAborted {
                reason: reason.clone(),
            }),
            out,
        );
        out.push(Output::Event(Event::ControlApplied {
            action: ControlAction::Abort,
            round,
            what: format!("the run is aborted: {reason}"),
        }));
    }

    /// The round a control request without `at_round` takes effect at: the open one, else the
    /// next to open.
    fn current_round(&self) -> RoundId {
        match (&self.round, self.last_round) {
            (Some(round), _) => round.id,
            (None, Some(last)) => last.next(),
            (None, None) => RoundId(1),
        }
    }

    /// The actions pending, in the order of their rounds.
    pub fn pending_control(&self) -> Vec<PendingControl> {
        let mut pending: Vec<PendingControl> = self
            .control
            .pending
            .iter()
            .map(|(action, at_round)| PendingControl {
                action: *action,
                at_round: *at_round,
            })
            .collect();
        pending.sort_by_key(|p| (p.at_round, p.action));
        pending
    }

    /// The run's end and schedule as they stand, as every node is told them.
    pub fn run_plan(&self) -> RunPlan {
        RunPlan {
            final_version: self.final_version(),
            anneal_from: self.control.anneal_from,
        }
    }

    /// Whether the operator aborted the run.
    pub fn aborted(&self) -> bool {
        self.control.aborted
    }

    /// The global version the run ends at: the config's budget, or earlier after a stop or an
    /// anneal (0: no end).
    pub fn final_version(&self) -> u64 {
        match (self.config.final_version, self.control.final_version) {
            (0, Some(stop)) => stop,
            (budget, Some(stop)) => budget.min(stop),
            (budget, None) => budget,
        }
    }

    /// Takes the pending actions due as `round` closes (`committed` or not): an abort or an
    /// anneal at once; a save or a stop only with a commit (else at the next one).
    fn take_due(&mut self, round: RoundId, committed: bool) -> Due {
        let mut due = Due::default();
        let pending = &mut self.control.pending;
        let mut take = |action: ControlAction, when: bool| {
            let ready = when && pending.get(&action).is_some_and(|at| *at <= round);
            if ready {
                pending.remove(&action);
            }
            ready
        };
        due.abort = take(ControlAction::Abort, true);
        if !due.abort {
            due.stop = take(ControlAction::Stop, committed);
            due.save = take(ControlAction::Save, committed);
            due.anneal = take(ControlAction::Anneal, true);
        }
        due
    }

    /// The state as one snapshot blob (magic + version, via the protocol codec).
    pub fn to_snapshot(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Snapshot, self).map_err(Error::Snapshot)
    }

    /// Restores a snapshot taken before a restart. The caller's clock restarted too, so every
    /// member gets a full heartbeat timeout to reconnect and an open round a full deadline.
    pub fn from_snapshot(bytes: &[u8], now: Millis) -> Result<Coordinator> {
        let mut coordinator: Coordinator =
            codec::decode(Channel::Snapshot, bytes).map_err(Error::SnapshotDecode)?;
        coordinator.config.validate()?;
        coordinator.check_consistent()?;
        coordinator.now = now;
        coordinator.grace_until = now.plus(RESTART_GRACE_MS);
        for member in coordinator.members.values_mut() {
            member.last_heard = now;
            member.conn = None;
        }
        if let Some(round) = &mut coordinator.round {
            round.deadline = now.plus(coordinator.config.round_deadline_ms);
        }
        Ok(coordinator)
    }

    /// What a snapshot this coordinator wrote always satisfies, checked on one read back: a
    /// damaged database is refused with what is wrong instead of failing later.
    fn check_consistent(&self) -> Result<()> {
        let damaged = |what: String| {
            Err(Error::InvalidConfig {
                reason: format!(
                    "the stored state is damaged: {what}; restore coordinator.redb from a backup or start on an empty --state-dir"
                ),
            })
        };
        if let Some(id) = self.members.keys().find(|id| id.0 >= self.next_member) {
            return damaged(format!(
                "{id} is not below the next member id {}",
                self.next_member
            ));
        }
        if let Some(round) = &self.round
            && let Some(id) = round
                .reports
                .keys()
                .find(|id| !round.participants.contains_key(id))
        {
            return damaged(format!(
                "{} holds a report of {id}, which is not a participant",
                round.id
            ));
        }
        Ok(())
    }

    /// Applies `limits` from now on (they are how the coordinator runs, so a restored run takes
    /// the current config's).
    pub fn set_limits(&mut self, limits: Limits) {
        self.config.limits = limits;
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    pub fn members(&self) -> impl Iterator<Item = (MemberId, Option<&Assignment>)> + '_ {
        self.members
            .iter()
            .map(|(id, member)| (*id, member.assignment.as_ref()))
    }

    /// The member a connection speaks for, once it joined and while it is a member.
    pub fn member_on(&self, conn: ConnId) -> Option<MemberId> {
        self.conns
            .get(&conn)
            .and_then(|c| c.member)
            .filter(|id| self.members.contains_key(id))
    }

    pub fn open_round(&self) -> Option<RoundId> {
        self.round.as_ref().map(|round| round.id)
    }

    /// The newest round ever opened.
    pub fn last_round(&self) -> Option<RoundId> {
        self.last_round
    }

    pub fn global(&self) -> &GlobalState {
        &self.global
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// The run's training stream, once a member said what it is: windows per epoch, positions
    /// consumed, positions to lease again.
    pub fn data_progress(&self) -> Option<(u64, u64, u64)> {
        self.config.data?;
        let digest = self.data_digest.as_ref()?;
        Some((
            digest.windows,
            self.ledger.consumed(),
            stream::total(&self.ledger.free),
        ))
    }

    pub fn last_checkpoint(&self) -> Option<RoundId> {
        self.last_checkpoint
    }

    /// The latest time fed in.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// Every member with what a status report shows about it.
    pub fn member_views(&self) -> impl Iterator<Item = MemberView<'_>> + '_ {
        self.members.iter().map(|(id, member)| MemberView {
            member: *id,
            capabilities: &member.capabilities,
            connected: member.conn.is_some(),
            last_heard: member.last_heard,
            assignment: member.assignment,
        })
    }

    /// The open round's participants and who has reported, with its deadline.
    pub fn open_round_view(&self) -> Option<(RoundId, Vec<MemberId>, Vec<MemberId>, Millis)> {
        self.round.as_ref().map(|round| {
            (
                round.id,
                round.participants.keys().copied().collect(),
                round.reports.keys().copied().collect(),
                round.deadline,
            )
        })
    }

    fn on_message(&mut self, from: ConnId, message: NodeMessage, out: &mut Vec<Output>) {
        if let NodeMessage::Hello(theirs) = &message {
            let ours = Hello::current();
            match ours.check_compatible(theirs) {
                Ok(()) => {
                    self.conns.entry(from).or_default().hello = true;
                    send(out, from, CoordinatorMessage::Hello(ours));
                }
                Err(err) => {
                    let reason = err.to_string();
                    reply_error(out, from, ErrorCode::IncompatibleVersion, reason.clone());
                    out.push(Output::Close { conn: from });
                    out.push(Output::Event(Event::Refused { conn: from, reason }));
                }
            }
            return;
        }
        let conn = self.conns.get(&from).copied().unwrap_or_default();
        if !conn.hello {
            reply_error(
                out,
                from,
                ErrorCode::HelloRequired,
                "send Hello first: it carries the protocol version".to_string(),
            );
            return;
        }
        let member = conn.member.filter(|id| self.members.contains_key(id));
        if let NodeMessage::Join(join) = message {
            match member {
                Some(id) => reply_error(
                    out,
                    from,
                    ErrorCode::AlreadyJoined,
                    format!("this connection already joined as {id}"),
                ),
                None => match join.rejoin {
                    Some(id) if self.can_resume(id, &join.capabilities) => {
                        self.on_resume(from, id, join.capabilities, out)
                    }
                    _ => self.on_join(from, join.capabilities, out),
                },
            }
            return;
        }
        let Some(id) = member else {
            let (code, text) = match conn.member {
                Some(gone) => (
                    ErrorCode::UnknownMember,
                    format!(
                        "{gone} is no longer part of the run (declared dead or left); send Join again"
                    ),
                ),
                None => (ErrorCode::NotJoined, "send Join first".to_string()),
            };
            reply_error(out, from, code, text);
            return;
        };
        if let Some(record) = self.members.get_mut(&id) {
            record.last_heard = self.now;
            record.conn = Some(from);
        }
        match message {
            NodeMessage::Leave(leave) => {
                // A graceful leave is no sign of a partition, so the round's quorum stops
                // counting the member (unless it already reported).
                // A member that leaves in the middle of a round it has not reported will not
                // contribute: its peers are told to stop waiting for it, like for a death.
                let mut how = Removal::Left;
                if let Some(round) = &mut self.round
                    && !round.reports.contains_key(&id)
                    && round.participants.remove(&id).is_some()
                {
                    how = Removal::Gone;
                }
                self.remove_member(id, format!("left: {}", leave.reason), how, out);
                out.push(Output::Event(Event::Left {
                    member: id,
                    reason: leave.reason,
                }));
            }
            // For the dashboard, which the shell keeps (see `member_on`).
            NodeMessage::Heartbeat(_) | NodeMessage::RoundSummary(_) => {}
            NodeMessage::RoundReport(report) => self.on_report(from, id, report, out),
            NodeMessage::CheckpointShardDurable(durable) => {
                self.on_shard_durable(from, id, durable, out)
            }
            NodeMessage::CheckpointShardFailed(failed) => self.on_shard_failed(id, failed, out),
            NodeMessage::InitialState(initial) => self.on_initial_state(id, initial, out),
            NodeMessage::Ready(ready) => self.on_ready(from, id, ready, out),
            NodeMessage::Hello(_) | NodeMessage::Join(_) => {}
        }
    }

    /// A member's version 0. The first announced while the run is at version 0 becomes that
    /// version's hashes, sent with every round that starts from it, so a node whose own
    /// initial parameters differ fetches them. Later ones are only compared.
    fn on_initial_state(&mut self, id: MemberId, initial: InitialState, out: &mut Vec<Output>) {
        if self.global.version != 0 || initial.tensor_hashes.is_empty() {
            return;
        }
        // Version 0 is the union of what members announce: a pipeline stage announces its
        // own tensors. The first announcement of a tensor sets it.
        let mut known: BTreeMap<TensorKey, Digest> = self
            .global
            .tensor_hashes
            .iter()
            .map(|t| (t.key.clone(), t.digest))
            .collect();
        let mut added = false;
        let mut differs = false;
        for hash in initial.tensor_hashes {
            match known.get(&hash.key) {
                None => {
                    known.insert(hash.key, hash.digest);
                    added = true;
                }
                Some(digest) => differs |= *digest != hash.digest,
            }
        }
        if added {
            self.global.tensor_hashes = known
                .into_iter()
                .map(|(key, digest)| TensorHash { key, digest })
                .collect();
            self.initial_hashes = self.global.tensor_hashes.clone();
            out.push(Output::Event(Event::InitialState { member: id }));
        }
        if differs {
            out.push(Output::Event(Event::Warning {
                message: format!(
                    "{id} drew other initial parameters than the run's version 0 (the same \
                     seed gives other numbers with another Forge or libtorch build); it fetches \
                     version 0 from its peers before its first round"
                ),
            }));
        }
    }

    /// A member ready to train. Its training stream: the first becomes the run's; a member
    /// whose stream differs (another corpus, tokenizer or window count) is removed with the
    /// reason, since a stream position would name other tokens on it. A matching member can be
    /// planned from now on, and its estimated speed paces rounds until it has measured one.
    fn on_ready(&mut self, from: ConnId, id: MemberId, ready: Ready, out: &mut Vec<Output>) {
        let digest = ready.data;
        match &self.data_digest {
            None => {
                out.push(Output::Event(Event::DataStream {
                    member: id,
                    windows: digest.windows,
                }));
                self.data_digest = Some(digest.clone());
            }
            Some(run) if *run != digest => {
                let mut differ = Vec::new();
                if run.corpus != digest.corpus {
                    differ.push(format!(
                        "training corpus (tokens {}, the run's {})",
                        digest.corpus, run.corpus
                    ));
                }
                if run.tokenizer != digest.tokenizer {
                    differ.push(format!(
                        "tokenizer ({}, the run's {})",
                        digest.tokenizer, run.tokenizer
                    ));
                }
                if run.windows != digest.windows {
                    differ.push(format!(
                        "window count ({}, the run's {})",
                        digest.windows, run.windows
                    ));
                }
                let reason = format!(
                    "its data differs from the run's: {}. Every node must read the same corpus \
                     with the same tokenizer, or one position of the training stream names other \
                     tokens on it; give this node the run's [data] files (under its --data-root) \
                     and join again",
                    differ.join(", ")
                );
                reply_error(out, from, ErrorCode::DataMismatch, reason.clone());
                out.push(Output::Event(Event::Warning {
                    message: format!("{id} refused: {reason}"),
                }));
                self.remove_member(id, reason, Removal::Expelled, out);
                return;
            }
            Some(_) => {}
        }
        if let Some(member) = self.members.get_mut(&id) {
            if member.us_per_step == 0 {
                member.us_per_step = ready.us_per_step;
            }
            if member.data.is_none() {
                member.data = Some(digest);
                self.membership_changed = true;
            }
        }
    }

    fn on_join(&mut self, from: ConnId, capabilities: Capabilities, out: &mut Vec<Output>) {
        let check = check_capabilities(&capabilities).and_then(|()| {
            if self.banned.contains(&capabilities.peer_id) {
                Err(format!(
                    "peer {} was removed from this run for contributions other members \
                     rejected; it may not join again. Find the cause (its data, precision or \
                     hardware) before it joins another run",
                    capabilities.peer_id
                ))
            } else {
                Ok(())
            }
        });
        // The same peer joining again (after a restart or reconnect) replaces its old self.
        let previous: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, member)| member.capabilities.peer_id == capabilities.peer_id)
            .map(|(id, _)| *id)
            .collect();
        let max_members = self.config.limits.max_members as usize;
        let check = check.and_then(|()| {
            if previous.is_empty() && self.members.len() >= max_members {
                Err(format!(
                    "the run has its limit of {max_members} members; raise [coordinator] \
                     max_members in the run config (and restart the coordinator on an empty \
                     --state-dir) to admit more"
                ))
            } else {
                Ok(())
            }
        });
        if let Err(reason) = check {
            reply_error(out, from, ErrorCode::InvalidJoin, reason.clone());
            out.push(Output::Event(Event::Refused { conn: from, reason }));
            return;
        }
        // A bench outlives a restart: the node is as unreachable as before.
        let bench = previous
            .iter()
            .find_map(|old| self.members[old].bench.clone());
        for old in previous {
            self.remove_member(
                old,
                "rejoined as a new member".to_string(),
                Removal::Gone,
                out,
            );
        }
        let id = MemberId(self.next_member);
        self.next_member += 1;
        let peer_id = capabilities.peer_id.clone();
        self.members.insert(
            id,
            Member {
                conn: Some(from),
                capabilities,
                last_heard: self.now,
                assignment: None,
                bench,
                us_per_step: 0,
                data: None,
                write_failed: false,
            },
        );
        self.conns.entry(from).or_default().member = Some(id);
        self.membership_changed = true;
        if self.round.is_none() {
            self.replan(Some(id), out);
        }
        let accepted = self.join_accepted(id);
        send(out, from, CoordinatorMessage::JoinAccepted(accepted));
        self.tell_if_aborted(from, out);
        out.push(Output::Event(Event::Joined {
            member: id,
            peer_id,
        }));
    }

    /// A reconnecting node keeps its member id only if that member is still alive and has the
    /// same peer identity: a member declared dead is gone for good (its replica was re-planned).
    fn can_resume(&self, id: MemberId, capabilities: &Capabilities) -> bool {
        self.members
            .get(&id)
            .is_some_and(|member| member.capabilities.peer_id == capabilities.peer_id)
    }

    fn on_resume(
        &mut self,
        from: ConnId,
        id: MemberId,
        capabilities: Capabilities,
        out: &mut Vec<Output>,
    ) {
        if let Err(reason) = check_capabilities(&capabilities) {
            reply_error(out, from, ErrorCode::InvalidJoin, reason.clone());
            out.push(Output::Event(Event::Refused { conn: from, reason }));
            return;
        }
        let member = self.members.get_mut(&id).expect("checked by can_resume");
        if let Some(old) = member.conn.replace(from) {
            // Messages the old connection still delivers must not count for the member.
            if let Some(conn) = self.conns.get_mut(&old) {
                conn.member = None;
            }
        }
        member.last_heard = self.now;
        if member.capabilities != capabilities {
            member.capabilities = capabilities;
            self.membership_changed = true;
        }
        self.conns.entry(from).or_default().member = Some(id);
        let accepted = self.join_accepted(id);
        send(out, from, CoordinatorMessage::JoinAccepted(accepted));
        self.tell_if_aborted(from, out);
        // The RoundOpened sent before the drop may be lost; a participant that has not
        // reported gets it again (nodes ignore a round they already know).
        if let Some(round) = &self.round
            && round.participants.contains_key(&id)
            && !round.reports.contains_key(&id)
        {
            let remaining = round.deadline.0.saturating_sub(self.now.0);
            let message = CoordinatorMessage::RoundOpened(RoundOpened {
                round: round.id,
                participants: round
                    .participants
                    .keys()
                    .map(|m| self.peer_of(*m, round))
                    .collect(),
                deadline_ms: remaining,
                global_version: self.global.version,
                tensor_hashes: self.global.tensor_hashes.clone(),
                pace_us_per_step: round.pace_us_per_step,
                slowest_us_per_step: round.slowest_us_per_step,
                data: lease_list(round),
                plan: self.run_plan(),
            });
            send(out, from, message);
        }
        out.push(Output::Event(Event::Resumed { member: id }));
    }

    fn on_report(
        &mut self,
        from: ConnId,
        id: MemberId,
        report: RoundReport,
        out: &mut Vec<Output>,
    ) {
        let open = self.round.as_ref().map(|round| round.id);
        if open == Some(report.round) {
            let round = self.round.as_mut().expect("checked above");
            if !round.participants.contains_key(&id) {
                reply_error(
                    out,
                    from,
                    ErrorCode::NotAParticipant,
                    format!(
                        "{id} is not a participant of {}; it joined after the round opened",
                        report.round
                    ),
                );
                return;
            }
            // A duplicate (retransmitted) report does not replace the first.
            if round.reports.contains_key(&id) {
                return;
            }
            let measured = report.us_per_step;
            // It trained from the round's global state, so it holds that state's layers.
            let trained =
                matches!(report.outer_step, OuterStep::Ok { .. }) || report.tokens_processed > 0;
            let layers = round.participants[&id].stage.map(|s| s.layers);
            round.reports.insert(id, report);
            if trained && let Some(holders) = &mut self.holders {
                holders.insert(id, layers);
            }
            if measured > 0
                && let Some(member) = self.members.get_mut(&id)
            {
                // Half the newest measurement: speeds change (thermal limits, other work).
                member.us_per_step = match member.us_per_step {
                    0 => measured,
                    old => (old + measured) / 2,
                };
            }
            return;
        }
        let newest = open.or(self.last_round);
        if newest.is_none_or(|newest| report.round > newest) {
            reply_error(
                out,
                from,
                ErrorCode::WrongRound,
                format!(
                    "report for {} but the newest round is {}",
                    report.round,
                    newest.map_or("none".to_string(), |round| round.0.to_string())
                ),
            );
        }
        // A report for a closed round arrives too late to count; RoundClosed told the node.
    }

    /// A writer could not write its shard: that checkpoint cannot commit (the previous one
    /// stays the run's), and later checkpoints go to a replica whose members can write.
    fn on_shard_failed(
        &mut self,
        id: MemberId,
        failed: CheckpointShardFailed,
        out: &mut Vec<Output>,
    ) {
        let writer = ShardWriter {
            shard: failed.shard,
            member: id,
        };
        let Some(pending) = self.checkpoints.get(&failed.round) else {
            return;
        };
        if !pending.writers.contains(&writer) {
            return;
        }
        self.checkpoints.remove(&failed.round);
        if let Some(member) = self.members.get_mut(&id) {
            member.write_failed = true;
        }
        let reason: String = failed.reason.chars().take(512).collect();
        out.push(Output::Event(Event::Warning {
            message: format!(
                "{id} could not write shard {} of the {} checkpoint ({reason}); the checkpoint \
                 is dropped, the last committed one stays the run's, and later checkpoints are \
                 written by another replica while one can",
                failed.shard, failed.round
            ),
        }));
    }

    fn on_shard_durable(
        &mut self,
        from: ConnId,
        id: MemberId,
        durable: CheckpointShardDurable,
        out: &mut Vec<Output>,
    ) {
        let Some(pending) = self.checkpoints.get_mut(&durable.round) else {
            return;
        };
        let writer = ShardWriter {
            shard: durable.shard,
            member: id,
        };
        if !pending.writers.contains(&writer) {
            reply_error(
                out,
                from,
                ErrorCode::CheckpointMismatch,
                format!(
                    "{id} is not the writer of shard {} of the {} checkpoint",
                    durable.shard, durable.round
                ),
            );
            return;
        }
        if let Some(bad) = durable
            .tensor_hashes
            .iter()
            .find(|hash| pending.tensor_hashes.get(&hash.key) != Some(&hash.digest))
        {
            reply_error(
                out,
                from,
                ErrorCode::CheckpointMismatch,
                format!(
                    "shard {} of the {} checkpoint has tensor {} with hash {}, which is not that round's committed hash; rewrite the shard from the committed state",
                    durable.shard, durable.round, bad.key, bad.digest
                ),
            );
            return;
        }
        pending.durable.insert(durable.shard);
        if let Some(member) = self.members.get_mut(&id) {
            member.write_failed = false;
        }
        let Some(pending) = self.checkpoints.get_mut(&durable.round) else {
            return;
        };
        if pending.durable.len() < pending.writers.len() {
            return;
        }
        let round = durable.round;
        let shards = pending.writers.len() as u32;
        self.checkpoint_state = Some(GlobalState {
            version: pending.version,
            round: Some(round),
            tensor_hashes: pending
                .tensor_hashes
                .iter()
                .map(|(key, digest)| TensorHash {
                    key: key.clone(),
                    digest: *digest,
                })
                .collect(),
        });
        self.checkpoint_ledger = pending.ledger.clone();
        // An older checkpoint still pending is superseded by this one.
        self.checkpoints
            .retain(|pending_round, _| *pending_round > round);
        self.last_checkpoint = Some(round);
        let message =
            CoordinatorMessage::CheckpointCommitted(CheckpointCommitted { round, shards });
        self.broadcast(message, out);
        out.push(Output::Event(Event::CheckpointCommitted { round }));
    }

    /// Forgets member `id` and tells the others why; an expelled member (bad contributions)
    /// is told as well, so that it stops instead of joining again.
    fn remove_member(&mut self, id: MemberId, reason: String, how: Removal, out: &mut Vec<Output>) {
        let expelled = how == Removal::Expelled;
        let message = CoordinatorMessage::MemberDead(MemberDead {
            member: id,
            reason,
            expelled,
            left: how == Removal::Left,
        });
        if expelled {
            self.send_to_member(id, message.clone(), out);
        }
        if self.members.remove(&id).is_none() {
            return;
        }
        self.membership_changed = true;
        self.broadcast(message, out);
    }

    /// The layers of the global state that no live member holds (empty while every layer
    /// lives on somewhere). Without a model profile each member holds the whole model, one
    /// "layer" here.
    fn lost_layers(&self) -> Vec<LayerRange> {
        let n = self
            .config
            .model
            .as_ref()
            .map_or(1, |model| model.layers.len() as u32);
        let whole = LayerRange { start: 0, end: n };
        let Some(holders) = &self.holders else {
            return if self.members.is_empty() {
                vec![whole]
            } else {
                Vec::new()
            };
        };
        let mut held: Vec<LayerRange> = holders
            .iter()
            .filter(|(id, _)| self.members.contains_key(id))
            .map(|(_, layers)| layers.unwrap_or(whole))
            .collect();
        held.sort_unstable();
        let mut lost = Vec::new();
        let mut covered = 0;
        for range in held {
            if range.start > covered {
                lost.push(LayerRange {
                    start: covered,
                    end: range.start,
                });
            }
            covered = covered.max(range.end);
        }
        if covered < n {
            lost.push(LayerRange {
                start: covered,
                end: n,
            });
        }
        lost
    }

    /// No live member holds some layers of the global state (every member is gone, or every
    /// holder of a pipeline stage): nothing past the last committed checkpoint can be
    /// recovered, so the run continues from that checkpoint (or from the start without one),
    /// and the nodes load it from their checkpoint shards or fetch it from those that did.
    fn roll_back_to_checkpoint(&mut self, out: &mut Vec<Output>) {
        // A finished run keeps its final version: its members leave once it is committed, and
        // its checkpoint, still being written, is the run's model. An aborted one is over.
        if self.finished() || self.control.aborted {
            return;
        }
        let target = self
            .checkpoint_state
            .clone()
            .unwrap_or_else(|| GlobalState {
                // Survivors draw version 0 again from the seed and check it against these; a
                // cluster that restarts whole announces it anew.
                tensor_hashes: if self.members.is_empty() {
                    Vec::new()
                } else {
                    self.initial_hashes.clone()
                },
                ..GlobalState::default()
            });
        if target.version == self.global.version {
            return;
        }
        let lost = self.lost_layers();
        if lost.is_empty() {
            return;
        }
        let why = if self.members.is_empty() {
            "every member is gone".to_string()
        } else {
            let layers: Vec<String> = lost
                .iter()
                .map(|r| format!("{}..{}", r.start, r.end))
                .collect();
            format!(
                "no live member holds layers {} of global version {} (every node that held \
                 them is gone)",
                layers.join(", "),
                self.global.version
            )
        };
        let message = match &target.round {
            Some(round) => format!(
                "{why}: the run continues from the checkpoint of {round} (global version {}), \
                 not version {}",
                target.version, self.global.version
            ),
            None => format!(
                "{why} and no checkpoint was committed: the run restarts from its initial \
                 state, not global version {}",
                self.global.version
            ),
        };
        out.push(Output::Event(Event::Warning { message }));
        self.global = target;
        self.holders = Some(BTreeMap::new());
        self.checkpoints.clear();
        // The data the lost rounds read is read again.
        self.ledger = self.checkpoint_ledger.clone();
        if let Some(round) = &mut self.round {
            round.leases.clear();
        }
    }

    /// Everything that follows from the passage of time or a change: deaths, round close,
    /// re-planning and the next round.
    fn advance(&mut self, out: &mut Vec<Output>) {
        let silent = if self.now >= self.silence_check_at {
            self.silent_members()
        } else {
            Vec::new()
        };
        for (id, silent_ms) in silent {
            self.remove_member(
                id,
                format!("no message for {silent_ms} ms"),
                Removal::Gone,
                out,
            );
            out.push(Output::Event(Event::Dead {
                member: id,
                silent_ms,
            }));
        }
        if self.round.is_some() {
            self.try_close_round(out);
        }
        if self.round.is_none() {
            self.roll_back_to_checkpoint(out);
            self.end_benches();
            if self.membership_changed {
                self.replan(None, out);
            }
            self.try_open_round(out);
        }
    }

    /// Members silent past the heartbeat timeout, and how long; sets when to look again.
    fn silent_members(&mut self) -> Vec<(MemberId, u64)> {
        let timeout = self.config.heartbeat_timeout_ms;
        let deadline = |member: &Member| member.last_heard.max(self.grace_until).plus(timeout);
        let mut silent = Vec::new();
        let mut earliest = None::<Millis>;
        for (id, member) in &self.members {
            let due = deadline(member);
            if self.now >= due {
                silent.push((*id, self.now.0 - member.last_heard.0));
            } else {
                earliest = Some(earliest.map_or(due, |e| e.min(due)));
            }
        }
        // With nobody left to watch, the next member's deadline is unknown: look every step.
        self.silence_check_at = earliest.unwrap_or(Millis(0));
        silent
    }

    /// Members whose bench has run out are planned into the next round again.
    fn end_benches(&mut self) {
        let next = self.last_round.map_or(RoundId(1), RoundId::next);
        if self.benches_ended_for == Some(next) {
            return;
        }
        self.benches_ended_for = Some(next);
        for member in self.members.values_mut() {
            if let Some(bench) = &mut member.bench
                && bench.active
                && bench.until < next
            {
                bench.active = false;
                self.membership_changed = true;
            }
        }
    }

    /// Recomputes replicas and stages; sends `Assigned` to every member whose assignment
    /// changed, except `joiner`, whose `JoinAccepted` carries it.
    fn replan(&mut self, joiner: Option<MemberId>, out: &mut Vec<Output>) {
        self.membership_changed = false;
        let groups: Vec<Vec<(MemberId, Option<StageAssignment>)>> = match &self.config.model {
            None => {
                self.plan = None;
                self.members
                    .iter()
                    .filter(|(_, member)| member.plannable(&self.config))
                    .map(|(id, _)| vec![(*id, None)])
                    .collect()
            }
            Some(profile) => {
                let nodes: Vec<_> = self
                    .members
                    .iter()
                    .filter(|(_, member)| member.plannable(&self.config))
                    .map(|(id, member)| node_from_capabilities(id.0, &member.capabilities, profile))
                    .collect();
                let wanted = self.replicas_needed() as usize;
                let plan = planner::rebalance(self.plan.as_ref(), profile, &nodes, wanted);
                let mut groups: Vec<Vec<_>> = plan
                    .replicas
                    .iter()
                    .map(|replica| {
                        let stages = replica.stages.len() as u32;
                        replica
                            .stages
                            .iter()
                            .enumerate()
                            .map(|(index, stage)| {
                                let assignment = (stages > 1).then_some(StageAssignment {
                                    stage: index as u32,
                                    stages,
                                    layers: stage.layers,
                                });
                                (MemberId(stage.node), assignment)
                            })
                            .collect()
                    })
                    .collect();
                // In member order, as without a model, so new replicas get their ids and data
                // shards in join order (the planner lists them by memory).
                groups.sort_by_key(|group| group[0].0);
                self.plan = Some(plan);
                groups
            }
        };

        // Replicas made of the same members keep their id and data shard.
        let by_members: BTreeMap<&[MemberId], ReplicaId> = self
            .replicas
            .iter()
            .map(|(id, replica)| (replica.members.as_slice(), *id))
            .collect();
        let mut kept = BTreeMap::new();
        let mut fresh = Vec::new();
        for group in groups {
            let members: Vec<MemberId> = group.iter().map(|(id, _)| *id).collect();
            match by_members.get(members.as_slice()) {
                Some(id) => {
                    kept.insert(*id, (self.replicas[id].clone(), group));
                }
                None => fresh.push((members, group)),
            }
        }
        let mut used: BTreeSet<u32> = kept.values().map(|(r, _)| r.data_shard).collect();
        let mut replicas = BTreeMap::new();
        let mut assignments: BTreeMap<MemberId, Assignment> = BTreeMap::new();
        // With leased data a replica's shard is the whole stream (its leases say which part it
        // reads) and there is no limit on replicas; otherwise each reads one of data_shards.
        let leased = self.config.data.is_some();
        let shards = if leased {
            u32::MAX
        } else {
            self.config.data_shards
        };
        let mut place =
            |id: ReplicaId, data_shard: u32, group: Vec<(MemberId, Option<StageAssignment>)>| {
                for (member, stage) in group {
                    let data_shard = match leased {
                        true => DataShard { index: 0, count: 1 },
                        false => DataShard {
                            index: data_shard,
                            count: self.config.data_shards,
                        },
                    };
                    assignments.insert(
                        member,
                        Assignment {
                            replica: id,
                            data_shard,
                            stage,
                        },
                    );
                }
            };
        for (id, (replica, group)) in kept {
            place(id, replica.data_shard, group);
            replicas.insert(id, replica);
        }
        for (members, group) in fresh {
            let Some(shard) = (0..shards).find(|shard| !used.contains(shard)) else {
                out.push(Output::Event(Event::Warning {
                    message: format!(
                        "all {} data shards are in use; members {members:?} stay on standby (raise data_shards)",
                        self.config.data_shards
                    ),
                }));
                continue;
            };
            used.insert(shard);
            let id = ReplicaId(self.next_replica);
            self.next_replica += 1;
            place(id, shard, group);
            replicas.insert(
                id,
                Replica {
                    members,
                    data_shard: shard,
                },
            );
        }
        self.replicas = replicas;

        let mut changed = Vec::new();
        for (id, member) in &mut self.members {
            let next = assignments.get(id).copied();
            if member.assignment != next {
                member.assignment = next;
                changed.push(*id);
            }
        }
        let standby: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, member)| member.assignment.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !changed.is_empty() {
            out.push(Output::Event(Event::PlanChanged {
                replicas: self.replicas.len(),
                standby,
            }));
        }
        // A member whose assignment changed hears it with all its sync peers (the joiner in its
        // JoinAccepted). The others hear only what changed among their sync peers (a replica came
        // or went: they admit a new replica's nodes, which fetch the global state from them), so
        // a join costs each member one small message rather than the whole member list.
        let before = std::mem::replace(&mut self.planned, assignments);
        let moved: Vec<MemberId> = before
            .keys()
            .chain(self.planned.keys())
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|id| before.get(id) != self.planned.get(id))
            .collect();
        for id in &changed {
            if Some(*id) != joiner {
                let message = CoordinatorMessage::Assigned(Assigned {
                    assignment: self.members[id].assignment,
                    sync_peers: self.sync_peers(*id),
                });
                self.send_to_member(*id, message, out);
            }
        }
        if moved.is_empty() {
            return;
        }
        for (id, mine) in &self.planned {
            if changed.contains(id) {
                continue;
            }
            let mut delta = PeersChanged::default();
            for other in &moved {
                let now = self.planned.get(other).filter(|a| syncs_with(mine, a));
                if now.is_some() {
                    delta.added.push(self.peer(*other));
                } else if before.get(other).is_some_and(|a| syncs_with(mine, a)) {
                    delta.removed.push(*other);
                }
            }
            if !delta.added.is_empty() || !delta.removed.is_empty() {
                self.send_to_member(*id, CoordinatorMessage::PeersChanged(delta), out);
            }
        }
    }

    /// The reply to a join or a rejoin: the run config, the member's assignment and peers, the
    /// global state and the heartbeat settings.
    fn join_accepted(&self, id: MemberId) -> JoinAccepted {
        JoinAccepted {
            member: id,
            assignment: self.members[&id].assignment,
            run_config: self.config.run_config.clone(),
            sync_peers: self.sync_peers(id),
            global: self.global.clone(),
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.config.heartbeat_timeout_ms,
            plan: self.run_plan(),
        }
    }

    /// A node that joins or reconnects after an abort hears of it at once, and leaves.
    fn tell_if_aborted(&self, conn: ConnId, out: &mut Vec<Output>) {
        if self.control.aborted {
            let reason = "the run was aborted by the operator; no round opens again".to_string();
            send(
                out,
                conn,
                CoordinatorMessage::RunAborted(RunAborted { reason }),
            );
        }
    }

    /// Replicas a round needs to open: `start_replicas` for the first, `min_replicas` after.
    fn replicas_needed(&self) -> u32 {
        match self.last_round {
            None => self.config.min_replicas.max(self.config.start_replicas),
            Some(_) => self.config.min_replicas,
        }
    }

    fn try_open_round(&mut self, out: &mut Vec<Output>) {
        if self.finished() || self.control.aborted {
            return;
        }
        if (self.replicas.len() as u32) < self.replicas_needed() {
            return;
        }
        let participants: BTreeMap<MemberId, Assignment> = self
            .members
            .iter()
            .filter_map(|(id, member)| member.assignment.map(|a| (*id, a)))
            .collect();
        let id = self.last_round.map_or(RoundId(1), RoundId::next);
        self.last_round = Some(id);
        let peers: Vec<Peer> = participants
            .keys()
            .map(|member| self.peer(*member))
            .collect();
        let pace_us_per_step = self.pace(participants.keys());
        let slowest_us_per_step = self.measured(participants.keys()).last().copied();
        let leases = self.lease_data(&participants, pace_us_per_step);
        let round = OpenRound {
            id,
            deadline: self.now.plus(self.config.round_deadline_ms),
            participants,
            reports: BTreeMap::new(),
            pace_us_per_step,
            slowest_us_per_step,
            leases,
        };
        let message = CoordinatorMessage::RoundOpened(RoundOpened {
            round: id,
            participants: peers,
            deadline_ms: self.config.round_deadline_ms,
            global_version: self.global.version,
            tensor_hashes: self.global.tensor_hashes.clone(),
            pace_us_per_step,
            slowest_us_per_step,
            data: lease_list(&round),
            plan: self.run_plan(),
        });
        for member in round.participants.keys() {
            self.send_to_member(*member, message.clone(), out);
        }
        out.push(Output::Event(Event::RoundOpened {
            round: id,
            participants: round.participants.keys().copied().collect(),
        }));
        self.round = Some(round);
    }

    /// With a data plan: each replica's lease for a round, sized by its slowest member's speed
    /// when the round is paced ([`DataPlan::lease_len`]).
    fn lease_data(
        &mut self,
        participants: &BTreeMap<MemberId, Assignment>,
        pace: Option<u64>,
    ) -> BTreeMap<ReplicaId, Vec<SeqRange>> {
        let Some(plan) = self.config.data else {
            return BTreeMap::new();
        };
        let mut slowest: BTreeMap<ReplicaId, u64> = BTreeMap::new();
        for (id, assignment) in participants {
            let us = self.members.get(id).map_or(0, |m| m.us_per_step);
            let entry = slowest.entry(assignment.replica).or_default();
            *entry = (*entry).max(us);
        }
        slowest
            .into_iter()
            .map(|(replica, us)| (replica, self.ledger.lease(plan.lease_len(pace, us))))
            .collect()
    }

    /// After `round` closed: what each replica whose work the run keeps (`kept`) reported it
    /// read is consumed; every other leased position is leased again in later rounds.
    fn settle_data(&mut self, round: &OpenRound, kept: &[ReplicaId], out: &mut Vec<Output>) {
        for (replica, lease) in &round.leases {
            let report = round
                .participants
                .iter()
                .filter(|(_, a)| a.replica == *replica)
                .find_map(|(id, _)| round.reports.get(id).map(|r| (*id, r)));
            let (consumed, rest) = match report {
                Some((member, report)) if kept.contains(replica) => {
                    let (consumed, rest, exact) = data::settle(lease, &report.consumed);
                    if !exact {
                        out.push(Output::Event(Event::Warning {
                            message: format!(
                                "{}: {member} reported reading {} of its lease {}; counted as \
                                 the lease's first {} positions",
                                round.id,
                                stream::describe(&report.consumed),
                                stream::describe(lease),
                                stream::total(&consumed)
                            ),
                        }));
                    }
                    (consumed, rest)
                }
                _ => (Vec::new(), lease.clone()),
            };
            self.ledger.give_back(&rest);
            out.push(Output::Event(Event::DataConsumed {
                round: round.id,
                replica: *replica,
                ranges: consumed,
                returned: rest,
            }));
        }
    }

    fn try_close_round(&mut self, out: &mut Vec<Output>) {
        let Some(round) = &self.round else {
            return;
        };
        let waiting = round
            .participants
            .keys()
            .any(|id| self.members.contains_key(id) && !round.reports.contains_key(id));
        if waiting && self.now < round.deadline {
            return;
        }
        let round = self.round.take().expect("checked above");
        let verdict = judge(&round);
        if !verdict.disagreeing_tensors.is_empty() {
            out.push(Output::Event(Event::HashDisagreement {
                round: round.id,
                tensors: verdict.disagreeing_tensors.clone(),
                disagreeing: verdict.disagreeing.clone(),
            }));
        }
        let complete: Vec<ReplicaId> = verdict.complete_replicas(&round);
        let quorum = verdict.agreeing.len() * 2 > round.participants.len()
            && complete.len() as u32 >= self.config.min_replicas;
        self.settle_data(&round, if quorum { &complete } else { &[] }, out);
        let due = self.take_due(round.id, quorum);
        let (outcome, included, checkpoint) = if quorum {
            self.global = GlobalState {
                version: self.global.version + 1,
                round: Some(round.id),
                tensor_hashes: verdict
                    .tensors
                    .iter()
                    .map(|(key, digest)| TensorHash {
                        key: key.clone(),
                        digest: *digest,
                    })
                    .collect(),
            };
            if due.stop {
                self.control.final_version = Some(self.global.version);
            }
            // An abort saves nothing; a save is checkpointed whatever checkpoint_every_rounds.
            let checkpoint = match due.abort {
                true => None,
                false => self.request_checkpoint(&round, &complete, &verdict, due.save),
            };
            self.holders = Some(
                verdict
                    .agreeing
                    .iter()
                    .map(|id| (*id, round.participants[id].stage.map(|s| s.layers)))
                    .collect(),
            );
            let outcome = RoundOutcome::Committed {
                version: self.global.version,
                tensor_hashes: self.global.tensor_hashes.clone(),
            };
            (outcome, verdict.agreeing.clone(), checkpoint)
        } else {
            let reason = format!(
                "{} of {} participants agreed on the new parameters and {} replicas agreed in full; committing needs a strict majority of participants and min_replicas = {} replicas",
                verdict.agreeing.len(),
                round.participants.len(),
                complete.len(),
                self.config.min_replicas
            );
            (RoundOutcome::Abandoned { reason }, Vec::new(), None)
        };
        if due.anneal {
            self.start_decay(round.id, out);
        }
        let message = CoordinatorMessage::RoundClosed(RoundClosed {
            round: round.id,
            outcome,
            included: included.clone(),
            checkpoint,
            plan: self.run_plan(),
        });
        for member in round.participants.keys() {
            self.send_to_member(*member, message.clone(), out);
        }
        if quorum && self.finished() {
            // Members outside the final round (on standby, or joined during it) learn the end
            // from its close too.
            let others: Vec<MemberId> = self
                .members
                .keys()
                .filter(|id| !round.participants.contains_key(id))
                .copied()
                .collect();
            for member in others {
                self.send_to_member(member, message.clone(), out);
            }
        }
        let excluded = round
            .participants
            .keys()
            .filter(|id| !included.contains(id))
            .copied()
            .collect();
        // Part of a committed round: reachable again, so a later benching starts over.
        for id in &included {
            if let Some(member) = self.members.get_mut(id) {
                member.bench = None;
            }
        }
        out.push(Output::Event(Event::RoundClosed {
            round: round.id,
            committed: quorum,
            included,
            excluded,
        }));
        let applied = [
            (
                ControlAction::Stop,
                due.stop,
                "the run ends with this state, checkpointed",
            ),
            (ControlAction::Save, due.save, "this state is checkpointed"),
        ];
        for (action, _, what) in applied.into_iter().filter(|(_, due, _)| *due) {
            out.push(Output::Event(Event::ControlApplied {
                action,
                round: Some(round.id),
                what: what.to_string(),
            }));
        }
        if quorum && self.finished() {
            // Nothing is left to act on.
            self.control.pending.clear();
            out.push(Output::Event(Event::Finished {
                version: self.global.version,
                round: round.id,
            }));
        }
        if due.abort {
            let why = "aborted by the operator (forge-coordinator control abort)".to_string();
            self.abort(why, Some(round.id), out);
        }
        self.remove_rejected(&round, out);
        self.bench_unreachable(&round, out);
    }

    /// The anneal due as `round` closed: the decay phase starts with the next round, from the
    /// global version the close leaves, and the run ends with it.
    fn start_decay(&mut self, round: RoundId, out: &mut Vec<Output>) {
        let Some(plan) = self.config.anneal else {
            return;
        };
        let from = self.global.version;
        let end = plan.final_version(from);
        self.control.anneal_from = Some(from);
        self.control.final_version = Some(self.control.final_version.map_or(end, |v| v.min(end)));
        out.push(Output::Event(Event::ControlApplied {
            action: ControlAction::Anneal,
            round: Some(round),
            what: format!(
                "the decay phase starts with the round from global version {from}; the run ends \
                 at version {}",
                self.final_version()
            ),
        }));
    }

    /// Removes the members whose contributions to `round` other participants rejected (NaN or
    /// Inf, wrong shape or version, an outlier norm): one node sending bad updates would
    /// otherwise make every round fail. Removal needs corroboration: at least two accusers and
    /// a strict majority of the other participants ([`expulsion_votes`]), so one lying member
    /// cannot remove an honest one (in a round of two nobody is removed: the round fails, with
    /// a warning). A removed member's peer id may not join the run again. See [`single_out`]
    /// for the order and ties.
    fn remove_rejected(&mut self, round: &OpenRound, out: &mut Vec<Output>) {
        let accused = accusations(round, Blame::Rejected);
        let needed = expulsion_votes(round.participants.len());
        let (culprits, tied) = single_out(accused.clone(), needed);
        for (member, accusers) in &accused {
            if !culprits.iter().any(|(c, _, _)| c == member) && !tied.contains(member) {
                out.push(Output::Event(Event::Warning {
                    message: format!(
                        "{}: {member}'s contribution was rejected by {} of the {} other \
                         participants ({}); removing it takes {needed}, so it stays",
                        round.id,
                        accusers.len(),
                        round.participants.len().saturating_sub(1),
                        join_ids(&accusers.keys().copied().collect::<Vec<_>>())
                    ),
                }));
            }
        }
        for (member, by, reason) in culprits {
            let why = format!(
                "member {by} rejected its contribution to {}: {reason}",
                round.id
            );
            if let Some(record) = self.members.get(&member) {
                self.banned.insert(record.capabilities.peer_id.clone());
            }
            self.remove_member(member, why.clone(), Removal::Expelled, out);
            out.push(Output::Event(Event::Rejected {
                member,
                by,
                round: round.id,
                reason: why,
            }));
        }
        if !tied.is_empty() {
            out.push(Output::Event(Event::Warning {
                message: format!(
                    "{}: members {} had their contributions rejected by equally many others; none of them is removed",
                    round.id,
                    join_ids(&tied)
                ),
            }));
        }
    }

    /// Benches the members that a strict majority of the round's other participants could not
    /// reach (timed out on, lost the connection to, or heard an abort blaming): a node cut off
    /// from its peers but still talking to the coordinator would otherwise be in, and fail,
    /// every round. It sits out 1, 2, 4, ... rounds (at most [`MAX_BENCH_ROUNDS`]), then is
    /// planned in again and fetches the global state; once it is part of a committed round its
    /// count starts over. Members blamed by equally many others (two nodes that cannot reach
    /// each other) are all kept, with a warning: nobody can tell which side is cut off.
    ///
    /// A rejection not corroborated enough to remove a member counts here too: when one owner
    /// rejects a member and aborts, the others hear the abort before they read that member's
    /// contribution themselves and can only blame it as unreachable. Together they are a
    /// majority, and the member sits out instead of failing every round.
    fn bench_unreachable(&mut self, round: &OpenRound, out: &mut Vec<Output>) {
        let others = round.participants.len().saturating_sub(1);
        let mut blamed = accusations(round, Blame::Unreachable);
        for (member, accusers) in accusations(round, Blame::Rejected) {
            let entry = blamed.entry(member).or_default();
            for (by, reason) in accusers {
                entry.entry(by).or_insert(reason);
            }
        }
        let (culprits, tied) = single_out(blamed, others / 2 + 1);
        for (id, by, reason) in culprits {
            let Some(member) = self.members.get_mut(&id) else {
                continue; // already gone (dead, left or expelled)
            };
            let strikes = member.bench.as_ref().map_or(0, |b| b.strikes) + 1;
            let rounds = (1u64 << (strikes - 1).min(16)).min(MAX_BENCH_ROUNDS);
            let until = RoundId(round.id.0 + rounds);
            member.bench = Some(Bench {
                until,
                active: true,
                strikes,
            });
            self.benches_ended_for = None;
            self.membership_changed = true;
            out.push(Output::Event(Event::Benched {
                member: id,
                round: round.id,
                until,
                reason: format!("member {by} could not reach it in {}: {reason}", round.id),
            }));
        }
        if !tied.is_empty() {
            out.push(Output::Event(Event::Warning {
                message: format!(
                    "{}: members {} could not reach each other (blamed by equally many); none of them is benched",
                    round.id,
                    join_ids(&tied)
                ),
            }));
        }
    }

    /// A round's pace with `[diloco] pace = "auto"`: the median measured participant's microseconds per
    /// inner step, when at least two are measured and the slowest takes more than
    /// [`PACE_SPREAD`] times as long per step as the fastest; None otherwise (H steps each).
    fn pace<'a>(&self, participants: impl Iterator<Item = &'a MemberId>) -> Option<u64> {
        if !self.config.pace {
            return None;
        }
        let speeds = self.measured(participants);
        let (&fastest, &slowest) = (speeds.first()?, speeds.last()?);
        if speeds.len() < 2 || (slowest as f64) <= PACE_SPREAD * fastest as f64 {
            return None;
        }
        let n = speeds.len();
        Some((speeds[(n - 1) / 2] + speeds[n / 2]) / 2)
    }

    /// The measured microseconds per inner step of `participants`, fastest first.
    fn measured<'a>(&self, participants: impl Iterator<Item = &'a MemberId>) -> Vec<u64> {
        let mut speeds: Vec<u64> = participants
            .filter_map(|id| self.members.get(id))
            .map(|member| member.us_per_step)
            .filter(|&us| us > 0)
            .collect();
        speeds.sort_unstable();
        speeds
    }

    /// Whether the run's final version is committed: the run is over.
    pub fn finished(&self) -> bool {
        let last = self.final_version();
        last > 0 && self.global.version >= last
    }

    /// `asked`: the operator asked for this checkpoint (`control save`).
    fn request_checkpoint(
        &mut self,
        round: &OpenRound,
        complete: &[ReplicaId],
        verdict: &Verdict,
        asked: bool,
    ) -> Option<CheckpointRequest> {
        let every = self.config.checkpoint_every_rounds;
        let due = every > 0 && round.id.0.is_multiple_of(every);
        // The final state is always checkpointed: it is the run's model.
        if !due && !asked && !self.finished() {
            return None;
        }
        // A replica none of whose members last failed to write, if there is one.
        let can_write = |replica: &&ReplicaId| {
            !round.participants.iter().any(|(id, a)| {
                a.replica == **replica && self.members.get(id).is_some_and(|m| m.write_failed)
            })
        };
        let writer = complete
            .iter()
            .find(can_write)
            .or_else(|| complete.first())?;
        let mut stages: Vec<(u32, MemberId)> = round
            .participants
            .iter()
            .filter(|(_, a)| a.replica == *writer)
            .map(|(id, a)| (a.stage_index(), *id))
            .collect();
        stages.sort_unstable();
        let writers: Vec<ShardWriter> = stages
            .into_iter()
            .map(|(shard, member)| ShardWriter { shard, member })
            .collect();
        self.checkpoints.insert(
            round.id,
            PendingCheckpoint {
                writers: writers.clone(),
                durable: BTreeSet::new(),
                version: self.global.version,
                tensor_hashes: verdict.tensors.clone(),
                ledger: self.ledger.clone(),
            },
        );
        Some(CheckpointRequest {
            shards: writers.len() as u32,
            writers,
        })
    }

    /// Members of other replicas holding the same layers: the ones `id` all-reduces with.
    fn sync_peers(&self, id: MemberId) -> Vec<Peer> {
        let Some(mine) = self.members.get(&id).and_then(|m| m.assignment) else {
            return Vec::new();
        };
        self.members
            .iter()
            .filter(|(other, member)| {
                **other != id && member.assignment.is_some_and(|a| syncs_with(&mine, &a))
            })
            .map(|(other, _)| self.peer(*other))
            .collect()
    }

    /// A round participant as it was assigned when the round opened.
    fn peer_of(&self, id: MemberId, round: &OpenRound) -> Peer {
        let capabilities = self.members.get(&id).map(|m| &m.capabilities);
        Peer {
            member: id,
            assignment: round.participants[&id],
            peer_id: capabilities.map_or(String::new(), |c| c.peer_id.clone()),
            listen_addrs: capabilities.map_or(Vec::new(), |c| c.listen_addrs.clone()),
        }
    }

    fn peer(&self, id: MemberId) -> Peer {
        let member = &self.members[&id];
        Peer {
            member: id,
            assignment: member.assignment.expect("only assigned members are peers"),
            peer_id: member.capabilities.peer_id.clone(),
            listen_addrs: member.capabilities.listen_addrs.clone(),
        }
    }

    fn send_to_member(&self, id: MemberId, message: CoordinatorMessage, out: &mut Vec<Output>) {
        if let Some(conn) = self.members.get(&id).and_then(|member| member.conn) {
            send(out, conn, message);
        }
    }

    fn broadcast(&self, message: CoordinatorMessage, out: &mut Vec<Output>) {
        for id in self.members.keys() {
            self.send_to_member(*id, message.clone(), out);
        }
    }
}

/// How a round's reports agree.
struct Verdict {
    /// Winning digest per tensor (stage parameter hashes left out).
    tensors: BTreeMap<TensorKey, Digest>,
    agreeing: Vec<MemberId>,
    disagreeing: Vec<MemberId>,
    disagreeing_tensors: Vec<String>,
}

impl Verdict {
    fn complete_replicas(&self, round: &OpenRound) -> Vec<ReplicaId> {
        // Per replica: whether every participant agrees, the stages they hold, and how many
        // it has. A pipeline whose stage left the round is no complete replica.
        let mut replicas: BTreeMap<ReplicaId, (bool, BTreeSet<u32>, u32)> = BTreeMap::new();
        for (id, assignment) in &round.participants {
            let agrees = self.agreeing.contains(id);
            let stages = assignment.stage.map_or(1, |s| s.stages);
            let replica =
                replicas
                    .entry(assignment.replica)
                    .or_insert((true, BTreeSet::new(), stages));
            replica.0 &= agrees;
            replica.1.insert(assignment.stage_index());
        }
        replicas
            .into_iter()
            .filter(|(_, (agree, held, stages))| *agree && held.len() as u32 == *stages)
            .map(|(id, _)| id)
            .collect()
    }
}

/// What a failed report blames another member for.
#[derive(Clone, Copy)]
enum Blame {
    /// Its contribution was refused (`OuterStep::Failed.rejected`).
    Rejected,
    /// It could not be reached (`OuterStep::Failed.unreachable`).
    Unreachable,
}

/// Who in `round` blames whom for `blame`: accused -> accuser -> reason. Only accusations of
/// another participant count.
fn accusations(round: &OpenRound, blame: Blame) -> BTreeMap<MemberId, BTreeMap<MemberId, String>> {
    let mut accusations: BTreeMap<MemberId, BTreeMap<MemberId, String>> = BTreeMap::new();
    for (by, report) in &round.reports {
        let OuterStep::Failed {
            reason,
            rejected,
            unreachable,
        } = &report.outer_step
        else {
            continue;
        };
        let accused = match blame {
            Blame::Rejected => rejected,
            Blame::Unreachable => unreachable,
        };
        if let Some(member) = *accused
            && member != *by
            && round.participants.contains_key(&member)
        {
            accusations
                .entry(member)
                .or_default()
                .insert(*by, reason.clone());
        }
    }
    accusations
}

/// Accusers it takes to remove a member whose contribution was rejected, in a round of
/// `participants`: two, and a strict majority of the others.
fn expulsion_votes(participants: usize) -> usize {
    let others = participants.saturating_sub(1);
    (others / 2 + 1).max(2)
}

/// The members to act on, as (member, one accuser, its reason): repeatedly the one accused by
/// the most others, if that is at least `min_votes`, after which its own accusations stop
/// counting. Stops at a tie for the most and returns the tied members too.
fn single_out(
    mut accusations: BTreeMap<MemberId, BTreeMap<MemberId, String>>,
    min_votes: usize,
) -> (Vec<(MemberId, MemberId, String)>, Vec<MemberId>) {
    let mut culprits = Vec::new();
    loop {
        let Some(votes) = accusations.values().map(BTreeMap::len).max() else {
            return (culprits, Vec::new());
        };
        if votes < min_votes.max(1) {
            return (culprits, Vec::new());
        }
        let most: Vec<MemberId> = accusations
            .iter()
            .filter(|(_, accusers)| accusers.len() == votes)
            .map(|(member, _)| *member)
            .collect();
        let [member] = most[..] else {
            return (culprits, most);
        };
        let accusers = accusations.remove(&member).expect("listed above");
        let (by, reason) = accusers.into_iter().next().expect("at least one accuser");
        culprits.push((member, by, reason));
        for accusers in accusations.values_mut() {
            accusers.remove(&member);
        }
        accusations.retain(|_, accusers| !accusers.is_empty());
    }
}

fn join_ids(ids: &[MemberId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Votes per tensor (real tensors, plus each stage's `params_hash` as a
/// [`TensorKey::StageParams`]) and finds who agrees with every winner.
fn judge(round: &OpenRound) -> Verdict {
    let mut votes: BTreeMap<TensorKey, BTreeMap<Digest, usize>> = BTreeMap::new();
    let mut claims: BTreeMap<MemberId, Vec<(TensorKey, Digest)>> = BTreeMap::new();
    for (id, report) in &round.reports {
        let OuterStep::Ok {
            params_hash,
            tensor_hashes,
        } = &report.outer_step
        else {
            continue;
        };
        let stage = TensorKey::StageParams {
            layers: round.participants[id].stage.map(|stage| stage.layers),
        };
        let mut mine = vec![(stage, *params_hash)];
        mine.extend(tensor_hashes.iter().map(|t| (t.key.clone(), t.digest)));
        for (key, digest) in &mine {
            *votes
                .entry(key.clone())
                .or_default()
                .entry(*digest)
                .or_default() += 1;
        }
        claims.insert(*id, mine);
    }
    let mut winners: BTreeMap<TensorKey, Digest> = BTreeMap::new();
    let mut disagreeing_tensors = Vec::new();
    for (key, counts) in &votes {
        if counts.len() > 1 {
            disagreeing_tensors.push(key.to_string());
        }
        let top = counts.values().copied().max().unwrap_or(0);
        let mut leaders = counts.iter().filter(|(_, count)| **count == top);
        if let (Some((digest, _)), None) = (leaders.next(), leaders.next()) {
            winners.insert(key.clone(), *digest);
        }
    }
    let mut agreeing = Vec::new();
    let mut disagreeing = Vec::new();
    for (id, mine) in &claims {
        if mine
            .iter()
            .all(|(key, digest)| winners.get(key) == Some(digest))
        {
            agreeing.push(*id);
        } else {
            disagreeing.push(*id);
        }
    }
    winners.retain(|key, _| key.is_tensor());
    Verdict {
        tensors: winners,
        agreeing,
        disagreeing,
        disagreeing_tensors,
    }
}

/// Limits on what a join may list: a real node has a few devices and addresses. Above them a
/// join is refused, since every member's peers go into messages to every other member.
const MAX_DEVICES: usize = 64;
const MAX_LISTEN_ADDRS: usize = 16;
const MAX_JOIN_STRING: usize = 256;

fn check_capabilities(capabilities: &Capabilities) -> std::result::Result<(), String> {
    if capabilities.devices.len() > MAX_DEVICES
        || capabilities.listen_addrs.len() > MAX_LISTEN_ADDRS
    {
        return Err(format!(
            "Join lists {} devices and {} listen addresses; at most {MAX_DEVICES} and \
             {MAX_LISTEN_ADDRS} are allowed",
            capabilities.devices.len(),
            capabilities.listen_addrs.len()
        ));
    }
    let long = capabilities
        .devices
        .iter()
        .map(|d| d.name.len())
        .chain(capabilities.listen_addrs.iter().map(String::len))
        .chain([capabilities.peer_id.len()])
        .max()
        .unwrap_or(0);
    if long > MAX_JOIN_STRING {
        return Err(format!(
            "Join has a device name, listen address or peer id of {long} bytes; at most \
             {MAX_JOIN_STRING} are allowed"
        ));
    }
    if capabilities.devices.is_empty()
        || capabilities
            .devices
            .iter()
            .any(|device| device.memory_bytes == 0)
    {
        return Err("Join lists no devices, or a device with 0 bytes of memory; the node must report its devices".to_string());
    }
    if !(capabilities.tokens_per_s.is_finite() && capabilities.tokens_per_s > 0.0) {
        return Err(format!(
            "Join reports {} tokens/s; the node must measure its speed before joining",
            capabilities.tokens_per_s
        ));
    }
    if capabilities.upload_bytes_per_s == 0 || capabilities.download_bytes_per_s == 0 {
        return Err(
            "Join reports 0 bytes/s of bandwidth; the node must measure its link".to_string(),
        );
    }
    crate::identity::check_peer_id(&capabilities.peer_id)?;
    Ok(())
}

/// Whether a member assigned `other` is a sync peer of one assigned `mine`: it holds the same
/// layers in another replica.
fn syncs_with(mine: &Assignment, other: &Assignment) -> bool {
    let layers = |a: &Assignment| a.stage.map(|stage| stage.layers);
    other.replica != mine.replica && layers(other) == layers(mine)
}

/// The leases of `round` as its announcement carries them.
fn lease_list(round: &OpenRound) -> Vec<DataLease> {
    round
        .leases
        .iter()
        .map(|(replica, ranges)| DataLease {
            replica: *replica,
            ranges: ranges.clone(),
        })
        .collect()
}

fn send(out: &mut Vec<Output>, to: ConnId, message: CoordinatorMessage) {
    out.push(Output::Send { to, message });
}

fn reply_error(out: &mut Vec<Output>, to: ConnId, code: ErrorCode, message: String) {
    send(
        out,
        to,
        CoordinatorMessage::Error(ErrorReply { code, message }),
    );
}
