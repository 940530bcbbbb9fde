//! Control messages between a node and the coordinator, and the version handshake.
//!
//! A control connection starts with both sides sending [`Hello`]; the coordinator refuses a peer
//! whose protocol version differs ([`Hello::check_compatible`]). Then the node sends [`Join`] and
//! receives [`JoinAccepted`]. Each direction has its own enum ([`NodeMessage`],
//! [`CoordinatorMessage`]) so a message can only travel the way it is meant to.
//!
//! Round lifecycle as the node sees it: `RoundOpened` (who takes part) → inner steps → all-reduce
//! of the pseudo_grad with the other participants of its stage → outer step → `RoundReport` →
//! `RoundClosed`. A node keeps the previous global parameters until `RoundClosed`: if the outcome
//! is `Abandoned`, or the committed hash of its stage differs from its own, it restores them (or
//! fetches the committed state from a peer) instead of continuing from its own outer step.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::{Error, Result};
use crate::stream::{DataDigest, DataLease, SeqRange};

/// Version of the message set below; bumped on any incompatible change (4: tensor hashes carry
/// a [`TensorKey`] instead of a name; 6: the coordinator leases the data stream; 8: the status
/// report carries the stage planner's predictions; 10: run control, [`RunPlan`] and
/// [`RunAborted`]; 11: an owner's last all-gather header carries its range's share of the
/// members' pseudo-gradient norm, see [`crate::sync::SyncChunkHeader::norm`]).
pub const PROTOCOL_VERSION: u16 = 11;

/// Protocol id of the control stream, in the libp2p style.
pub const CONTROL_PROTOCOL: &str = "/forge/control/1";

/// A member of the run, numbered by the coordinator in join order; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId(pub u64);

/// One model replica: a single node, or a pipeline of nodes each holding one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

/// A DiLoCo round (H inner steps, then one outer step). Round ids only increase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoundId(pub u64);

impl RoundId {
    /// The round after this one.
    pub fn next(self) -> RoundId {
        RoundId(self.0 + 1)
    }
}

/// A 32-byte content hash (SHA-256, computed by the node) of parameters or a tensor.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member {}", self.0)
    }
}

impl fmt::Display for RoundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "round {}", self.0)
    }
}

/// The first message on a control connection, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// The Forge release, for the error message; only `protocol_version` decides compatibility.
    pub software_version: String,
}

impl Hello {
    /// The Hello this build sends.
    pub fn current() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Refuses a peer whose protocol version differs, naming both versions.
    pub fn check_compatible(&self, theirs: &Hello) -> Result<()> {
        if self.protocol_version == theirs.protocol_version {
            return Ok(());
        }
        Err(Error::IncompatibleVersion {
            ours: self.protocol_version,
            theirs: theirs.protocol_version,
            our_software: self.software_version.clone(),
            their_software: theirs.software_version.clone(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// One compute device of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub kind: DeviceKind,
    pub name: String,
    pub memory_bytes: u64,
}

/// What a node brings to the run, measured by the node before it joins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub devices: Vec<Device>,
    /// Training throughput of the whole node on the run's model (all local devices together).
    pub tokens_per_s: f64,
    pub upload_bytes_per_s: u64,
    pub download_bytes_per_s: u64,
    /// The node's peer-to-peer identity (libp2p peer id).
    pub peer_id: String,
    /// Addresses other nodes dial for the sync all-reduce and state transfer.
    pub listen_addrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub capabilities: Capabilities,
    /// Set by a node process reconnecting after its connection dropped: the member id it had.
    /// The coordinator keeps that id (and assignment) if the member is still alive with the same
    /// `peer_id`; otherwise the node joins as a new member.
    pub rejoin: Option<MemberId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The round the node is training in, if any.
    pub round: Option<RoundId>,
    pub inner_steps_done: u64,
    /// What the node is doing now, for the coordinator's status and dashboard.
    pub activity: Activity,
}

/// What a node is doing, as its heartbeats say (shown by the dashboard; nothing depends on it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    /// Joining, preparing its data, or waiting for a round.
    #[default]
    Idle,
    /// Inner steps of a round.
    Training,
    /// The outer all-reduce and outer step.
    Syncing,
    /// Fetching the global state from its peers.
    FetchingState,
    /// Validation loss after a round.
    Evaluating,
    /// Writing its checkpoint shard.
    Checkpointing,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::Training => "training",
            Activity::Syncing => "syncing",
            Activity::FetchingState => "fetching state",
            Activity::Evaluating => "evaluating",
            Activity::Checkpointing => "checkpointing",
        }
    }
}

/// An `f64` carried as its bits, so that the messages holding one stay `Eq`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct F64Bits(pub u64);

impl F64Bits {
    pub fn new(value: f64) -> F64Bits {
        F64Bits(value.to_bits())
    }

    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

/// A node's record of a closed round (its `rounds.jsonl` line, in part), sent once for the
/// coordinator's dashboard and metrics; best effort (not sent again after a reconnect), and the
/// coordinator takes it for display only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: RoundId,
    /// Whether the round committed, as the node heard it.
    pub committed: bool,
    pub inner_steps: u64,
    /// Tokens this node trained on in the round.
    pub tokens: u64,
    /// Mean training loss of its inner steps.
    pub loss: F64Bits,
    /// Validation loss and bits per byte of the committed model, when the node evaluated it.
    pub eval_loss: Option<F64Bits>,
    pub eval_bpb: Option<F64Bits>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sync_ms: u64,
    pub inner_ms: u64,
    /// The node's tokens per second of wall clock since its previous round.
    pub wall_tokens_per_s: F64Bits,
}

/// Which slice of the data a replica reads: shard `index` of `count` fixed shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataShard {
    pub index: u32,
    pub count: u32,
}

/// Half-open range of layer indices `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

/// The pipeline stage a node holds when its replica is split across nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAssignment {
    pub stage: u32,
    pub stages: u32,
    pub layers: LayerRange,
}

/// A node's work: which replica, which data shard, and which stage if the model is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub replica: ReplicaId,
    pub data_shard: DataShard,
    pub stage: Option<StageAssignment>,
}

impl Assignment {
    /// The stage index, 0 for a whole-model replica.
    pub fn stage_index(&self) -> u32 {
        self.stage.map_or(0, |stage| stage.stage)
    }
}

/// Another member as a node needs to know it: how to reach it and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub member: MemberId,
    pub assignment: Assignment,
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
}

/// What a hash in the DiLoCo global state is of. Parameter names are the model's parameter
/// paths (the Hugging Face safetensors keys), as the trainer lists them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TensorKey {
    /// A global parameter.
    Param(String),
    /// The outer optimizer's momentum of the global parameter of that name.
    Momentum(String),
    /// Not a tensor: the `params_hash` of a whole stage's global parameters, which the
    /// coordinator votes on next to the tensors of the stage holding `layers` (`None`: a
    /// whole-model replica). Never part of a committed state.
    StageParams { layers: Option<LayerRange> },
}

impl TensorKey {
    /// Whether the key names a tensor of the global state (a parameter or its momentum), as
    /// opposed to a hash over many.
    pub fn is_tensor(&self) -> bool {
        matches!(self, TensorKey::Param(_) | TensorKey::Momentum(_))
    }
}

impl fmt::Display for TensorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorKey::Param(name) => f.write_str(name),
            TensorKey::Momentum(name) => write!(f, "momentum.{name}"),
            TensorKey::StageParams { layers: None } => {
                f.write_str("parameter hash of the whole model")
            }
            TensorKey::StageParams {
                layers: Some(layers),
            } => write!(
                f,
                "parameter hash of layers {}..{}",
                layers.start, layers.end
            ),
        }
    }
}

/// The digest ([`crate::digest::tensor_digest`], or the stage's `params_hash`) of one entry of
/// the global state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorHash {
    pub key: TensorKey,
    pub digest: Digest,
}

/// The committed global parameters, as hashes a joiner checks what it fetched against.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalState {
    /// 0 before any round committed (parameters come from the run config's seed).
    pub version: u64,
    /// The round that produced this version.
    pub round: Option<RoundId>,
    pub tensor_hashes: Vec<TensorHash>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub member: MemberId,
    /// `None` while the node waits on standby: a round is running, or the planner could not
    /// place it yet. An [`Assigned`] message follows when that changes.
    pub assignment: Option<Assignment>,
    /// The run config, TOML, owned by the coordinator.
    pub run_config: String,
    /// Members holding the same stage in other replicas: the node's sync group.
    pub sync_peers: Vec<Peer>,
    pub global: GlobalState,
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this and the coordinator declares the member dead.
    pub heartbeat_timeout_ms: u64,
    pub plan: RunPlan,
}

/// The run's end and schedule as the coordinator has them now: the run config's, unless the
/// operator changed them (`forge-coordinator control stop` or `anneal`). Every round's opening
/// and close carries it, so every node follows the same plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlan {
    /// The global version the run ends at (0: none, the run goes on until stopped).
    pub final_version: u64,
    /// The schedule's decay phase starts with the round that starts from this global version
    /// (`control anneal`; see `run_config::AnnealPlan`); None: where the run config puts it.
    pub anneal_from: Option<u64>,
}

/// The operator aborted the run (`forge-coordinator control abort`): no round opens again and
/// no checkpoint is written; every node gives up what it is doing and leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAborted {
    pub reason: String,
}

/// A new or changed assignment, sent between rounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub assignment: Option<Assignment>,
    pub sync_peers: Vec<Peer>,
}

/// What changed among a member's sync peers after a re-plan (its own assignment did not change):
/// members to admit or replace (by member id), and members that are no longer its sync peers.
/// Sent instead of the whole list, so one join costs every member one small message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersChanged {
    pub added: Vec<Peer>,
    pub removed: Vec<MemberId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundOpened {
    pub round: RoundId,
    /// Everyone taking part; a node all-reduces with the participants of its own stage.
    pub participants: Vec<Peer>,
    /// The coordinator closes the round this long after opening it, whoever has reported.
    pub deadline_ms: u64,
    /// The global state version the round starts from.
    pub global_version: u64,
    /// That version's committed tensor hashes: a node that holds another version (it joined
    /// mid-run, or missed a commit) fetches this one from its peers and checks it against them.
    pub tensor_hashes: Vec<TensorHash>,
    /// Speed-aware rounds (`[diloco] pace = "auto"` and the participants' speeds differ): the
    /// median participant's microseconds per inner step. Every node trains for the time that
    /// median node needs for the round's H steps, fast nodes doing more steps and slow ones
    /// fewer, so all reach the all-reduce together. None: H steps each.
    pub pace_us_per_step: Option<u64>,
    /// The slowest measured participant's microseconds per inner step: how long a node that
    /// finished its inner steps early waits at the all-reduce for the others (None: nothing
    /// measured yet).
    pub slowest_us_per_step: Option<u64>,
    /// The stream positions each replica reads this round (see [`crate::stream`]); empty when
    /// the coordinator has no data plan, and a replica reads its fixed data shard.
    pub data: Vec<DataLease>,
    pub plan: RunPlan,
}

/// A paced round gives a node at most this many times H inner steps, however fast it is.
pub const MAX_PACED_ROUND: u64 = 8;

/// How a node's outer step went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OuterStep {
    Ok {
        /// Hash of the node's new global parameters (its stage's tensors, in name order).
        params_hash: Digest,
        tensor_hashes: Vec<TensorHash>,
    },
    Failed {
        reason: String,
        /// The member whose contribution this node rejected (NaN/Inf, wrong shape or version,
        /// a norm far outside the others'), if that is why the round failed. The coordinator
        /// removes that member from the run.
        rejected: Option<MemberId>,
        /// The member this node could not exchange its round with (it timed out, its
        /// connection failed, or another member aborted the all-reduce blaming it). A member
        /// that most of the others cannot reach sits out rounds for a while (the coordinator
        /// benches it), so a node cut off from its peers does not fail every round.
        unreachable: Option<MemberId>,
    },
}

/// A node ready to train: what its training stream is, and how fast it expects to step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub data: DataDigest,
    /// Its estimate of microseconds per inner step of the run's model (0: none), from which
    /// the coordinator paces the first round; the rounds' measurements replace it.
    pub us_per_step: u64,
}

/// A node's version 0: the hashes of the initial parameters (and zero outer momentum) it drew
/// from the run's seed, sent once its model is built while the run is at version 0. The first
/// announcement becomes version 0's committed hashes; a node whose own differ (another libtorch
/// build draws other numbers) fetches version 0 from its peers like any other version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialState {
    pub tensor_hashes: Vec<TensorHash>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: RoundId,
    pub tokens_processed: u64,
    /// The node's mean microseconds per inner step in this round (0: not measured), from which
    /// the coordinator paces later rounds.
    pub us_per_step: u64,
    /// The stream positions the node's inner steps read: a prefix of its replica's lease.
    pub consumed: Vec<SeqRange>,
    pub outer_step: OuterStep,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundOutcome {
    /// The round's outer step is the new global state; a node whose own tensor hashes differ
    /// fetches the committed state from a peer.
    Committed {
        version: u64,
        tensor_hashes: Vec<TensorHash>,
    },
    /// No quorum agreed; every node restores the parameters it had when the round opened.
    Abandoned { reason: String },
}

/// Which member writes which checkpoint shard: one complete replica writes the checkpoint, one
/// shard per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardWriter {
    pub shard: u32,
    pub member: MemberId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    pub shards: u32,
    pub writers: Vec<ShardWriter>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundClosed {
    pub round: RoundId,
    pub outcome: RoundOutcome,
    /// Members whose reports made up the outcome; a participant not listed was excluded.
    pub included: Vec<MemberId>,
    /// Present when this round's state is to be checkpointed.
    pub checkpoint: Option<CheckpointRequest>,
    /// The plan after this close: a stop or an anneal may have moved the run's end.
    pub plan: RunPlan,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDead {
    pub member: MemberId,
    pub reason: String,
    /// Removed for bad contributions rather than silence or leaving: the member is told too,
    /// and must not rejoin as it is.
    pub expelled: bool,
    /// It sent `Leave` itself and owes no report to the open round (it reported, or was not in
    /// it), so its peers have no reason to give up on that round. Otherwise it died, was
    /// replaced, or left mid-round, and peers stop waiting for it at once.
    pub left: bool,
}

/// A node reports that its checkpoint shard of `round` is on disk (fsynced).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointShardDurable {
    pub round: RoundId,
    pub shard: u32,
    pub tensor_hashes: Vec<TensorHash>,
}

/// A node reports that it could not write its checkpoint shard of `round` (a full disk, a
/// read-only or failing drive): the coordinator asks another replica for later checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointShardFailed {
    pub round: RoundId,
    pub shard: u32,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCommitted {
    pub round: RoundId,
    pub shards: u32,
}

/// Why the coordinator refused a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    IncompatibleVersion,
    HelloRequired,
    AlreadyJoined,
    NotJoined,
    /// The member was declared dead or left; join again.
    UnknownMember,
    WrongRound,
    NotAParticipant,
    CheckpointMismatch,
    InvalidJoin,
    /// The member's corpus or tokenizer differs from the run's.
    DataMismatch,
    /// The cluster token is missing or wrong, or the join's identity proof does not hold.
    Unauthorized,
    /// Too many joins from the client's address; try again after a pause.
    RateLimited,
    /// A run control request that cannot be carried out (a round in the past, a run that is
    /// over, a schedule with no decay phase to enter).
    InvalidControl,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Everything a node sends to the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeMessage {
    Hello(Hello),
    Join(Join),
    Leave(Leave),
    Heartbeat(Heartbeat),
    RoundReport(RoundReport),
    CheckpointShardDurable(CheckpointShardDurable),
    InitialState(InitialState),
    /// Sent once the node's data is tokenized and its model built.
    Ready(Ready),
    CheckpointShardFailed(CheckpointShardFailed),
    /// A closed round as the node recorded it, for the dashboard.
    RoundSummary(RoundSummary),
}

/// Everything the coordinator sends to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Hello(Hello),
    JoinAccepted(JoinAccepted),
    Assigned(Assigned),
    PeersChanged(PeersChanged),
    RoundOpened(RoundOpened),
    RoundClosed(RoundClosed),
    MemberDead(MemberDead),
    CheckpointCommitted(CheckpointCommitted),
    Error(ErrorReply),
    RunAborted(RunAborted),
}

impl NodeMessage {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<NodeMessage> {
        codec::decode(Channel::Control, frame)
    }
}

impl CoordinatorMessage {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<CoordinatorMessage> {
        codec::decode(Channel::Control, frame)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{HEADER_LEN, parse_header};

    fn digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest)
    }

    fn tensor_key() -> impl Strategy<Value = TensorKey> {
        prop_oneof![
            "[a-z_.0-9]{1,24}".prop_map(TensorKey::Param),
            "[a-z_.0-9]{1,24}".prop_map(TensorKey::Momentum),
            prop::option::of((0..40u32, 0..40u32)).prop_map(|layers| TensorKey::StageParams {
                layers: layers.map(|(start, len)| LayerRange {
                    start,
                    end: start + len,
                }),
            }),
        ]
    }

    fn ranges() -> impl Strategy<Value = Vec<SeqRange>> {
        prop::collection::vec(
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| SeqRange::new(a.min(b), a.max(b))),
            0..4,
        )
    }

    fn tensor_hashes() -> impl Strategy<Value = Vec<TensorHash>> {
        prop::collection::vec(
            (tensor_key(), digest()).prop_map(|(key, digest)| TensorHash { key, digest }),
            0..6,
        )
    }

    fn assignment() -> impl Strategy<Value = Assignment> {
        (
            any::<u64>(),
            any::<u32>(),
            1..64u32,
            prop::option::of((0..8u32, 1..9u32, 0..40u32, 0..40u32)),
        )
            .prop_map(|(replica, index, count, stage)| Assignment {
                replica: ReplicaId(replica),
                data_shard: DataShard { index, count },
                stage: stage.map(|(stage, stages, start, len)| StageAssignment {
                    stage,
                    stages,
                    layers: LayerRange {
                        start,
                        end: start + len,
                    },
                }),
            })
    }

    fn peer() -> impl Strategy<Value = Peer> {
        (
            any::<u64>(),
            assignment(),
            "[A-Za-z0-9]{0,52}",
            prop::collection::vec("/ip4/[0-9.]{7,15}/udp/[0-9]{1,5}/quic-v1", 0..3),
        )
            .prop_map(|(member, assignment, peer_id, listen_addrs)| Peer {
                member: MemberId(member),
                assignment,
                peer_id,
                listen_addrs,
            })
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (any::<u16>(), "[0-9.a-z-]{0,16}").prop_map(|(protocol_version, software_version)| Hello {
            protocol_version,
            software_version,
        })
    }

    fn outer_step() -> impl Strategy<Value = OuterStep> {
        prop_oneof![
            (digest(), tensor_hashes()).prop_map(|(params_hash, tensor_hashes)| OuterStep::Ok {
                params_hash,
                tensor_hashes
            }),
            (
                ".{0,40}",
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(reason, rejected, unreachable)| OuterStep::Failed {
                    reason,
                    rejected: rejected.map(MemberId),
                    unreachable: unreachable.map(MemberId),
                }),
        ]
    }

    fn node_message() -> impl Strategy<Value = NodeMessage> {
        let device =
            (any::<bool>(), ".{0,20}", any::<u64>()).prop_map(|(cuda, name, memory)| Device {
                kind: if cuda {
                    DeviceKind::Cuda
                } else {
                    DeviceKind::Cpu
                },
                name,
                memory_bytes: memory,
            });
        let join = (
            prop::collection::vec(device, 0..4),
            0.0..1e7f64,
            any::<u64>(),
            any::<u64>(),
            "[A-Za-z0-9]{0,52}",
            prop::collection::vec(".{0,30}", 0..3),
            prop::option::of(any::<u64>().prop_map(MemberId)),
        )
            .prop_map(
                |(devices, tokens_per_s, up, down, peer_id, listen_addrs, rejoin)| {
                    NodeMessage::Join(Join {
                        rejoin,
                        capabilities: Capabilities {
                            devices,
                            tokens_per_s,
                            upload_bytes_per_s: up,
                            download_bytes_per_s: down,
                            peer_id,
                            listen_addrs,
                        },
                    })
                },
            );
        prop_oneof![
            hello().prop_map(NodeMessage::Hello),
            join,
            ".{0,40}".prop_map(|reason| NodeMessage::Leave(Leave { reason })),
            (prop::option::of(any::<u64>()), any::<u64>()).prop_map(|(round, steps)| {
                NodeMessage::Heartbeat(Heartbeat {
                    round: round.map(RoundId),
                    inner_steps_done: steps,
                    activity: Activity::Syncing,
                })
            }),
            (any::<u64>(), any::<u64>(), ranges(), outer_step()).prop_map(
                |(round, tokens, consumed, outer_step)| {
                    NodeMessage::RoundReport(RoundReport {
                        round: RoundId(round),
                        tokens_processed: tokens,
                        us_per_step: tokens / 7,
                        consumed,
                        outer_step,
                    })
                }
            ),
            (any::<u64>(), any::<u32>(), tensor_hashes()).prop_map(|(round, shard, hashes)| {
                NodeMessage::CheckpointShardDurable(CheckpointShardDurable {
                    round: RoundId(round),
                    shard,
                    tensor_hashes: hashes,
                })
            }),
            (
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<f64>(),
                any::<u64>()
            )
                .prop_map(|(round, committed, tokens, loss, bytes)| {
                    NodeMessage::RoundSummary(RoundSummary {
                        round: RoundId(round),
                        committed,
                        inner_steps: tokens / 3,
                        tokens,
                        loss: F64Bits::new(loss),
                        eval_loss: committed.then_some(F64Bits::new(-loss)),
                        eval_bpb: None,
                        bytes_sent: bytes,
                        bytes_received: bytes / 2,
                        sync_ms: round / 5,
                        inner_ms: tokens / 11,
                        wall_tokens_per_s: F64Bits::new(loss / 3.0),
                    })
                }),
            tensor_hashes().prop_map(|tensor_hashes| NodeMessage::InitialState(InitialState {
                tensor_hashes
            })),
            (any::<u64>(), any::<u32>(), ".{0,200}").prop_map(|(round, shard, reason)| {
                NodeMessage::CheckpointShardFailed(CheckpointShardFailed {
                    round: RoundId(round),
                    shard,
                    reason,
                })
            }),
            (digest(), digest(), any::<u64>(), any::<u64>()).prop_map(
                |(corpus, tokenizer, windows, us_per_step)| {
                    NodeMessage::Ready(Ready {
                        data: DataDigest {
                            corpus,
                            tokenizer,
                            windows,
                        },
                        us_per_step,
                    })
                }
            ),
        ]
    }

    fn coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
        let accepted = (
            any::<u64>(),
            prop::option::of(assignment()),
            ".{0,200}",
            prop::collection::vec(peer(), 0..4),
            (any::<u64>(), tensor_hashes()),
        )
            .prop_map(
                |(member, assignment, run_config, sync_peers, (version, hashes))| {
                    CoordinatorMessage::JoinAccepted(JoinAccepted {
                        member: MemberId(member),
                        assignment,
                        run_config,
                        sync_peers,
                        global: GlobalState {
                            version,
                            round: Some(RoundId(version)),
                            tensor_hashes: hashes,
                        },
                        heartbeat_interval_ms: 1000,
                        heartbeat_timeout_ms: 5000,
                        plan: RunPlan {
                            final_version: version.wrapping_add(3),
                            anneal_from: Some(version),
                        },
                    })
                },
            );
        let outcome = prop_oneof![
            (any::<u64>(), tensor_hashes()).prop_map(|(version, tensor_hashes)| {
                RoundOutcome::Committed {
                    version,
                    tensor_hashes,
                }
            }),
            ".{0,40}".prop_map(|reason| RoundOutcome::Abandoned { reason }),
        ];
        let closed = (
            any::<u64>(),
            outcome,
            prop::collection::vec(any::<u64>().prop_map(MemberId), 0..6),
            prop::option::of(prop::collection::vec(
                (any::<u32>(), any::<u64>()).prop_map(|(shard, member)| ShardWriter {
                    shard,
                    member: MemberId(member),
                }),
                0..4,
            )),
        )
            .prop_map(|(round, outcome, included, writers)| {
                CoordinatorMessage::RoundClosed(RoundClosed {
                    round: RoundId(round),
                    outcome,
                    included,
                    checkpoint: writers.map(|writers| CheckpointRequest {
                        shards: writers.len() as u32,
                        writers,
                    }),
                    plan: RunPlan {
                        final_version: round,
                        anneal_from: None,
                    },
                })
            });
        prop_oneof![
            hello().prop_map(CoordinatorMessage::Hello),
            accepted,
            (
                prop::option::of(assignment()),
                prop::collection::vec(peer(), 0..3)
            )
                .prop_map(|(assignment, sync_peers)| {
                    CoordinatorMessage::Assigned(Assigned {
                        assignment,
                        sync_peers,
                    })
                }),
            (
                prop::collection::vec(peer(), 0..3),
                prop::collection::vec(any::<u64>().prop_map(MemberId), 0..3)
            )
                .prop_map(|(added, removed)| {
                    CoordinatorMessage::PeersChanged(PeersChanged { added, removed })
                }),
            (
                any::<u64>(),
                prop::collection::vec(peer(), 0..5),
                any::<u64>(),
                any::<u64>(),
                tensor_hashes(),
                prop::option::of(any::<u64>()),
                prop::option::of(any::<u64>()),
                prop::collection::vec(
                    (any::<u64>(), ranges()).prop_map(|(replica, ranges)| DataLease {
                        replica: ReplicaId(replica),
                        ranges,
                    }),
                    0..3,
                ),
            )
                .prop_map(
                    |(
                        round,
                        participants,
                        deadline_ms,
                        global_version,
                        tensor_hashes,
                        pace,
                        slowest,
                        data,
                    )| {
                        CoordinatorMessage::RoundOpened(RoundOpened {
                            round: RoundId(round),
                            participants,
                            deadline_ms,
                            global_version,
                            tensor_hashes,
                            pace_us_per_step: pace,
                            slowest_us_per_step: slowest,
                            data,
                            plan: RunPlan {
                                final_version: deadline_ms,
                                anneal_from: pace,
                            },
                        })
                    }
                ),
            closed,
            (any::<u64>(), ".{0,30}", any::<bool>(), any::<bool>()).prop_map(
                |(member, reason, expelled, left)| {
                    CoordinatorMessage::MemberDead(MemberDead {
                        member: MemberId(member),
                        reason,
                        expelled,
                        left,
                    })
                }
            ),
            (any::<u64>(), any::<u32>()).prop_map(|(round, shards)| {
                CoordinatorMessage::CheckpointCommitted(CheckpointCommitted {
                    round: RoundId(round),
                    shards,
                })
            }),
            ".{0,60}".prop_map(|message| CoordinatorMessage::Error(ErrorReply {
                code: ErrorCode::WrongRound,
                message
            })),
            ".{0,60}".prop_map(|reason| CoordinatorMessage::RunAborted(RunAborted { reason })),
        ]
    }

    /// A byte edit applied to a valid frame: overwrite, insert, delete or truncate.
    fn mutate(frame: &mut Vec<u8>, edits: &[(u8, usize, u8)]) {
        for &(kind, at, byte) in edits {
            if frame.is_empty() {
                frame.push(byte);
                continue;
            }
            let at = at % frame.len();
            match kind % 4 {
                0 => frame[at] ^= byte.max(1),
                1 => frame.insert(at, byte),
                2 => {
                    frame.remove(at);
                }
                _ => frame.truncate(at),
            }
        }
    }

    proptest! {
        // A fixed seed keeps the suite deterministic; PROPTEST_CASES=10000 searches further.
        #![proptest_config(ProptestConfig {
            rng_seed: prop::test_runner::RngSeed::Fixed(0x464f_5247),
            ..ProptestConfig::default()
        })]

        #[test]
        fn node_messages_round_trip(message in node_message()) {
            let frame = message.to_frame().unwrap();
            prop_assert_eq!(NodeMessage::from_frame(&frame).unwrap(), message);
        }

        #[test]
        fn coordinator_messages_round_trip(message in coordinator_message()) {
            let frame = message.to_frame().unwrap();
            prop_assert_eq!(CoordinatorMessage::from_frame(&frame).unwrap(), message);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = NodeMessage::from_frame(&bytes);
            let _ = CoordinatorMessage::from_frame(&bytes);
            let _ = crate::sync::SyncChunkHeader::from_frame(&bytes);
            let _ = crate::state::Request::from_frame(&bytes);
            let _ = crate::state::Response::from_frame(&bytes);
        }

        #[test]
        fn random_payload_behind_a_valid_header_never_panics(
            payload in prop::collection::vec(any::<u8>(), 0..512),
            compressed in any::<bool>(),
            decoded_len in 0u32..4096,
        ) {
            // Valid header, hostile payload: exercises bincode and zstd rather than the header.
            let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
            frame.extend_from_slice(b"FGCT");
            frame.extend_from_slice(&crate::codec::FORMAT_VERSION.to_le_bytes());
            frame.push(u8::from(compressed));
            frame.push(0);
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let decoded = if compressed { decoded_len } else { payload.len() as u32 };
            frame.extend_from_slice(&decoded.to_le_bytes());
            frame.extend_from_slice(&payload);
            prop_assert!(parse_header(Channel::Control, &frame).is_ok());
            let _ = NodeMessage::from_frame(&frame);
            let _ = CoordinatorMessage::from_frame(&frame);
        }

        #[test]
        fn mutated_frames_never_panic(
            message in coordinator_message(),
            edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
        ) {
            let mut frame = message.to_frame().unwrap();
            mutate(&mut frame, &edits);
            let _ = CoordinatorMessage::from_frame(&frame);
            let _ = NodeMessage::from_frame(&frame);
        }

        #[test]
        fn mutated_node_frames_never_panic(
            message in node_message(),
            edits in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
        ) {
            let mut frame = message.to_frame().unwrap();
            mutate(&mut frame, &edits);
            let _ = NodeMessage::from_frame(&frame);
        }
    }

    #[test]
    fn large_join_accepted_is_compressed_and_round_trips() {
        let hashes = (0..400)
            .map(|i| TensorHash {
                key: TensorKey::Param(format!("model.layers.{i}.mlp.down_proj.weight")),
                digest: Digest([i as u8; 32]),
            })
            .collect();
        let message = CoordinatorMessage::JoinAccepted(JoinAccepted {
            member: MemberId(3),
            assignment: None,
            run_config: "[model]\npreset = \"tiny\"\n".repeat(50),
            sync_peers: Vec::new(),
            global: GlobalState {
                version: 9,
                round: Some(RoundId(9)),
                tensor_hashes: hashes,
            },
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            plan: RunPlan::default(),
        });
        let frame = message.to_frame().unwrap();
        assert!(parse_header(Channel::Control, &frame).unwrap().compressed);
        assert_eq!(CoordinatorMessage::from_frame(&frame).unwrap(), message);
    }

    #[test]
    fn incompatible_hello_names_both_versions() {
        let ours = Hello {
            protocol_version: 1,
            software_version: "0.1.0".to_string(),
        };
        let theirs = Hello {
            protocol_version: 2,
            software_version: "0.2.0".to_string(),
        };
        let err = ours.check_compatible(&theirs).unwrap_err().to_string();
        assert!(err.contains("protocol version 2 (forge 0.2.0)"), "{err}");
        assert!(err.contains("speaks 1 (forge 0.1.0)"), "{err}");
        let same_protocol = Hello {
            protocol_version: 1,
            software_version: "0.1.7".to_string(),
        };
        assert!(ours.check_compatible(&same_protocol).is_ok());
    }

    #[test]
    fn sync_header_checks_limits_before_the_payload_is_read() {
        use crate::sync::{MAX_SYNC_CHUNK_BYTES, SyncChunkHeader, SyncCodec, SyncPhase};
        let header = SyncChunkHeader {
            round: RoundId(4),
            group: 7,
            sender: 1,
            stage: 0,
            phase: SyncPhase::ReduceScatter,
            owner: 2,
            members: 8,
            offset: 0,
            values: 1 << 18,
            total_len: 1 << 21,
            weight: 512.0,
            norm: 3.5,
            codec: SyncCodec::Int8Blocks { block: 256 },
            payload_len: 1 << 20,
            zstd: true,
        };
        let frame = header.to_frame().unwrap();
        assert_eq!(SyncChunkHeader::from_frame(&frame).unwrap(), header);
        let huge = SyncChunkHeader {
            payload_len: MAX_SYNC_CHUNK_BYTES + 1,
            ..header
        };
        let err = SyncChunkHeader::from_frame(&huge.to_frame().unwrap()).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
        let bad_owner = SyncChunkHeader { owner: 8, ..header };
        assert!(SyncChunkHeader::from_frame(&bad_owner.to_frame().unwrap()).is_err());
    }
}
