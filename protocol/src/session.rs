//! The opening exchange of a control connection (cluster token and what the client wants) and
//! the read-only status report.
//!
//! Every control connection starts with the client sending [`Open`] and the coordinator
//! answering [`OpenReply`], before any [`crate::NodeMessage`]. The token secret is checked here,
//! outside the coordinator core, so an unauthenticated peer never reaches the state machine. A
//! [`Purpose::Join`] connection sends an [`IdentityProof`] right after `Open` and then carries the
//! node protocol; a [`Purpose::Status`] connection receives one [`Status`] and is closed; a
//! [`Purpose::Control`] connection sends one [`ControlRequest`] and receives one
//! [`ControlReply`].

use serde::{Deserialize, Serialize};

use crate::codec::{self, Channel};
use crate::error::Result;
use crate::messages::{
    Assignment, DataShard, Device, ErrorReply, Hello, MemberId, ReplicaId, RoundId, RunPlan,
    StageAssignment,
};

/// ALPN id of the control protocol; a TLS peer offering anything else is refused in the
/// handshake.
pub const CONTROL_ALPN: &[u8] = b"/forge/control/1";

/// What a client opens a control connection for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// A node joining (or re-joining) the run; the node protocol follows.
    Join,
    /// A read-only status query (`forge-coordinator status`).
    Status,
    /// The operator's request to save, stop, abort or anneal the run (`forge-coordinator
    /// control`).
    Control,
}

/// What the operator asks of a run (`forge-coordinator control`, `forge-node control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlAction {
    /// A committed checkpoint at the next round (or step) boundary.
    Save,
    /// Save, then end the run: every node ends on the same final model.
    Stop,
    /// End the run at once, without saving.
    Abort,
    /// The schedule's decay phase starts at the next boundary; the run ends with it.
    Anneal,
}

impl ControlAction {
    pub const ALL: [ControlAction; 4] = [
        ControlAction::Save,
        ControlAction::Stop,
        ControlAction::Abort,
        ControlAction::Anneal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ControlAction::Save => "save",
            ControlAction::Stop => "stop",
            ControlAction::Abort => "abort",
            ControlAction::Anneal => "anneal",
        }
    }
}

impl std::fmt::Display for ControlAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ControlAction {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<ControlAction, String> {
        ControlAction::ALL
            .into_iter()
            .find(|action| action.name() == s)
            .ok_or_else(|| format!("'{s}' is no control action: save, stop, abort or anneal"))
    }
}

/// What a [`Purpose::Control`] connection sends right after `Open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    pub action: ControlAction,
    /// The round at whose close the action takes effect; None: the round under way (or the
    /// next to open if none is), and for an abort, at once.
    pub at_round: Option<RoundId>,
}

/// An action the coordinator will carry out when round `at_round` closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingControl {
    pub action: ControlAction,
    pub at_round: RoundId,
}

/// The coordinator's answer to a [`ControlRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// `what` says what will happen and when, for the operator.
    Accepted {
        what: String,
        pending: Vec<PendingControl>,
    },
    Refused(ErrorReply),
}

impl ControlRequest {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<ControlRequest> {
        codec::decode(Channel::Control, frame)
    }
}

impl ControlReply {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<ControlReply> {
        codec::decode(Channel::Control, frame)
    }
}

/// The first frame a client sends on a control connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub hello: Hello,
    /// The secret half of the cluster token (the part before the `.`).
    pub token_secret: String,
    pub purpose: Purpose,
}

/// Proof that a joining node holds the ed25519 key of the peer id it joins with, sent right
/// after a [`Purpose::Join`] `Open` (and read only once the token has been checked).
///
/// The node signs [`identity_proof_message`] of the connection's TLS exporter value (label
/// [`IDENTITY_EXPORTER_LABEL`]), which both ends derive from the handshake and which differs
/// per connection: the coordinator's challenge comes with the TLS session, so a proof seen on
/// one connection is worth nothing on another, and nobody can join as a peer id, or resume a
/// member id, whose key it does not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityProof {
    /// The libp2p protobuf encoding of the node's public key; its peer id is the one the node
    /// must join with.
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

/// The TLS exporter label of the join challenge (RFC 8446 section 7.5).
pub const IDENTITY_EXPORTER_LABEL: &[u8] = b"EXPORTER-forge-join-identity";

/// Bytes of the exporter value a proof signs.
pub const IDENTITY_CHALLENGE_LEN: usize = 32;

/// What a node signs to prove its identity on the connection whose exporter value is
/// `challenge` (domain-separated so the signature means nothing elsewhere).
pub fn identity_proof_message(challenge: &[u8; IDENTITY_CHALLENGE_LEN]) -> Vec<u8> {
    let mut message = b"forge join identity v1\0".to_vec();
    message.extend_from_slice(challenge);
    message
}

impl IdentityProof {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<IdentityProof> {
        codec::decode(Channel::Control, frame)
    }
}

/// The coordinator's answer to [`Open`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenReply {
    Accepted {
        hello: Hello,
    },
    /// The coordinator closes the connection after this.
    Refused(ErrorReply),
}

/// One member as `forge-coordinator status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub member: MemberId,
    pub peer_id: String,
    pub devices: Vec<Device>,
    pub tokens_per_s: f64,
    pub upload_bytes_per_s: u64,
    pub download_bytes_per_s: u64,
    /// Whether a control connection is open right now (a member may be briefly disconnected
    /// while it reconnects, and stays a member until its heartbeat timeout).
    pub connected: bool,
    pub last_heartbeat_ms_ago: u64,
    pub assignment: Option<Assignment>,
}

/// One member's place in a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStatus {
    pub member: MemberId,
    /// `None` when the member holds the whole model.
    pub stage: Option<StageAssignment>,
    /// What the stage planner predicts for this member's part; `None` when the coordinator
    /// plans without a model profile.
    pub predicted: Option<StagePrediction>,
}

/// The stage planner's cost model for one stage, per micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePrediction {
    /// Parameters, gradients, optimizer and outer state, and the activations in flight.
    pub memory_bytes: u64,
    pub compute_us: u64,
    /// Sending and receiving the boundary activations and their gradients.
    pub transfer_us: u64,
}

/// One replica of the stage plan, members in stage order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub replica: ReplicaId,
    pub data_shard: DataShard,
    pub stages: Vec<StageStatus>,
    /// The planner's predicted time per micro-batch: its slowest stage's compute + transfer.
    pub predicted_us_per_micro_batch: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRoundStatus {
    pub round: RoundId,
    pub participants: Vec<MemberId>,
    pub reported: Vec<MemberId>,
    pub deadline_in_ms: u64,
}

/// A closed round as the coordinator's history records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: RoundId,
    pub committed: bool,
    pub included: Vec<MemberId>,
    pub excluded: Vec<MemberId>,
    /// Wall-clock close time, milliseconds since the Unix epoch.
    pub closed_at_unix_ms: u64,
}

/// How far a DiLoCo run has read its training stream (see [`crate::stream`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStatus {
    /// Windows per epoch.
    pub windows: u64,
    /// Stream positions consumed by committed rounds.
    pub consumed: u64,
    /// Positions leased and not consumed (a dead member's, an abandoned round's, a short
    /// read's), leased again before new ones.
    pub returned: u64,
}

/// Everything `forge-coordinator status` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub software_version: String,
    pub members: Vec<MemberStatus>,
    /// The stage plan: replicas × stages.
    pub replicas: Vec<ReplicaStatus>,
    /// Members with no assignment (joined during a round, or the planner could not place them).
    pub standby: Vec<MemberId>,
    pub open_round: Option<OpenRoundStatus>,
    /// The newest round ever opened.
    pub last_round: Option<RoundId>,
    pub rounds_committed: u64,
    pub rounds_abandoned: u64,
    /// The newest closed rounds, oldest first.
    pub recent_rounds: Vec<RoundRecord>,
    pub global_version: u64,
    pub last_checkpoint: Option<RoundId>,
    /// None until a member said what its data is.
    pub data: Option<DataStatus>,
    /// The run's end and schedule as they stand (changed by `control stop` or `anneal`).
    pub plan: RunPlan,
    /// Control actions waiting for their round to close.
    pub pending_control: Vec<PendingControl>,
    /// The run was aborted: no round opens again.
    pub aborted: bool,
}

impl Open {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<Open> {
        codec::decode(Channel::Control, frame)
    }
}

impl OpenReply {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<OpenReply> {
        codec::decode(Channel::Control, frame)
    }
}

impl Status {
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        codec::encode(Channel::Control, self)
    }

    pub fn from_frame(frame: &[u8]) -> Result<Status> {
        codec::decode(Channel::Control, frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{DeviceKind, ErrorCode};

    #[test]
    fn open_and_refusal_round_trip() {
        let open = Open {
            hello: Hello::current(),
            token_secret: "0123abcd".to_string(),
            purpose: Purpose::Status,
        };
        assert_eq!(Open::from_frame(&open.to_frame().unwrap()).unwrap(), open);
        let refused = OpenReply::Refused(ErrorReply {
            code: ErrorCode::Unauthorized,
            message: "wrong cluster token".to_string(),
        });
        assert_eq!(
            OpenReply::from_frame(&refused.to_frame().unwrap()).unwrap(),
            refused
        );
    }

    #[test]
    fn control_requests_and_replies_round_trip() {
        for action in ControlAction::ALL {
            assert_eq!(action.name().parse::<ControlAction>(), Ok(action));
            let request = ControlRequest {
                action,
                at_round: Some(RoundId(7)),
            };
            let frame = request.to_frame().unwrap();
            assert_eq!(ControlRequest::from_frame(&frame).unwrap(), request);
        }
        assert!(
            "pause"
                .parse::<ControlAction>()
                .unwrap_err()
                .contains("anneal")
        );
        let reply = ControlReply::Accepted {
            what: "stop at the close of round 7".to_string(),
            pending: vec![PendingControl {
                action: ControlAction::Stop,
                at_round: RoundId(7),
            }],
        };
        assert_eq!(
            ControlReply::from_frame(&reply.to_frame().unwrap()).unwrap(),
            reply
        );
    }

    #[test]
    fn status_with_many_members_fits_a_control_frame_and_round_trips() {
        let members = (0..2_000)
            .map(|i| MemberStatus {
                member: MemberId(i),
                peer_id: format!("12D3KooW{i:044}"),
                devices: vec![Device {
                    kind: DeviceKind::Cuda,
                    name: "NVIDIA GeForce RTX 4090".to_string(),
                    memory_bytes: 24 << 30,
                }],
                tokens_per_s: 12_345.0,
                upload_bytes_per_s: 125_000_000,
                download_bytes_per_s: 125_000_000,
                connected: true,
                last_heartbeat_ms_ago: 300,
                assignment: None,
            })
            .collect();
        let status = Status {
            software_version: "0.1.0".to_string(),
            members,
            replicas: Vec::new(),
            standby: Vec::new(),
            open_round: None,
            last_round: Some(RoundId(7)),
            rounds_committed: 6,
            rounds_abandoned: 0,
            recent_rounds: Vec::new(),
            global_version: 6,
            last_checkpoint: None,
            data: Some(DataStatus {
                windows: 319,
                consumed: 720,
                returned: 16,
            }),
            plan: RunPlan {
                final_version: 60,
                anneal_from: Some(5),
            },
            pending_control: vec![PendingControl {
                action: ControlAction::Stop,
                at_round: RoundId(9),
            }],
            aborted: false,
        };
        let frame = status.to_frame().unwrap();
        assert_eq!(Status::from_frame(&frame).unwrap(), status);
    }
}
