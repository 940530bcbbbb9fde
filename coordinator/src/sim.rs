//! Deterministic simulation for tests: simulated nodes and a lossy network (seeded drops, delays,
//! duplicates, partitions, crashes) drive the coordinator core while a checker asserts the
//! invariants on everything it emits.

use std::collections::{BTreeMap, BTreeSet};

use forge_protocol::rng::SplitMix64;
use forge_protocol::{
    Activity, Capabilities, CheckpointShardDurable, CoordinatorMessage, Device, DeviceKind, Digest,
    ErrorCode, Heartbeat, Hello, Join, Leave, MemberId, NodeMessage, OuterStep, ReplicaId, RoundId,
    RoundOutcome, RoundReport, SeqRange, TensorHash, TensorKey,
};

use crate::core::{ConnId, Coordinator, CoordinatorConfig, Event, Input, Millis, Output};
#[cfg(test)]
use crate::data::DataPlan;

/// The simulation's dice: splitmix64, tiny, seedable and the same on every platform.
struct Rng(SplitMix64);

impl Rng {
    fn chance(&mut self, p: f64) -> bool {
        self.0.next_f64() <= p
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.next_u64() % (hi - lo + 1)
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Network {
    pub(crate) drop: f64,
    pub(crate) duplicate: f64,
    pub(crate) min_delay_ms: u64,
    pub(crate) max_delay_ms: u64,
}

#[derive(Clone, Debug)]
enum Delivery {
    ToCoordinator {
        node: usize,
        message: NodeMessage,
    },
    ToNode {
        node: usize,
        message: CoordinatorMessage,
    },
}

/// The new global parameters every honest node computes in a round (bit-identical averages).
pub(crate) fn honest_digest(round: RoundId) -> Digest {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&round.0.to_le_bytes());
    Digest(bytes)
}

struct SimNode {
    conn: ConnId,
    /// Its name; it joins with the peer id that stands for it (`identity::named_peer_id`).
    peer_id: String,
    alive: bool,
    member: Option<MemberId>,
    /// Participating round and when its outer step is done.
    round: Option<(RoundId, u64)>,
    /// Reports that no `RoundClosed` acknowledged yet, re-sent on every timer.
    unacknowledged: Option<RoundReport>,
    shards: Vec<CheckpointShardDurable>,
    /// Reports a different hash than everyone else.
    diverges: bool,
    /// Extra delay before writing a checkpoint shard.
    shard_delay_ms: u64,
    shard_ready_at: u64,
    next_timer: u64,
}

/// What the checker remembers to verify the invariants.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) opened: Vec<(RoundId, BTreeSet<MemberId>)>,
    pub(crate) closed: Vec<(RoundId, bool, Vec<MemberId>, u64)>,
    pub(crate) dead: BTreeMap<MemberId, u64>,
    pub(crate) disagreements: Vec<(RoundId, Vec<MemberId>)>,
    pub(crate) checkpoints: Vec<(RoundId, u64)>,
    member_of_node: BTreeMap<MemberId, usize>,
    /// Honest OK reports delivered to the coordinator, per round.
    delivered_reports: BTreeMap<RoundId, BTreeSet<MemberId>>,
    /// Members that left or were declared dead, with when.
    gone: BTreeMap<MemberId, u64>,
    writers: BTreeMap<RoundId, BTreeSet<(u32, MemberId)>>,
    durable_delivered: BTreeMap<RoundId, BTreeSet<(u32, MemberId)>>,
    replica_of: BTreeMap<(RoundId, MemberId), ReplicaId>,
    global_version: u64,
}

pub(crate) struct Sim {
    pub(crate) now: u64,
    pub(crate) coordinator: Coordinator,
    nodes: Vec<SimNode>,
    network: Network,
    rng: Rng,
    queue: BTreeMap<(u64, u64), Delivery>,
    seq: u64,
    /// Nodes cut off from the coordinator, both directions.
    pub(crate) partitioned: BTreeSet<usize>,
    pub(crate) record: Record,
    crashed_at: BTreeMap<usize, u64>,
    tick_ms: u64,
    compute_ms: (u64, u64),
}

pub(crate) fn config(min_replicas: u32) -> CoordinatorConfig {
    CoordinatorConfig {
        run_config: "[model]\npreset = \"tiny\"\n".to_string(),
        model: None,
        min_replicas,
        start_replicas: 0,
        data_shards: 16,
        heartbeat_interval_ms: 500,
        heartbeat_timeout_ms: 2_000,
        round_deadline_ms: 4_000,
        checkpoint_every_rounds: 3,
        final_version: 0,
        anneal: None,
        pace: false,
        data: None,
        limits: crate::core::Limits::default(),
    }
}

pub(crate) fn capabilities(peer_id: &str, memory_bytes: u64) -> Capabilities {
    Capabilities {
        devices: vec![Device {
            kind: DeviceKind::Cuda,
            name: "sim-gpu".to_string(),
            memory_bytes,
        }],
        tokens_per_s: 10_000.0,
        upload_bytes_per_s: 125_000_000,
        download_bytes_per_s: 125_000_000,
        peer_id: crate::identity::named_peer_id(peer_id),
        listen_addrs: vec![format!("/ip4/10.0.0.1/udp/4000/quic-v1/{peer_id}")],
    }
}

impl Sim {
    pub(crate) fn new(config: CoordinatorConfig, nodes: usize, network: Network, seed: u64) -> Sim {
        let tick_ms = 100;
        let mut sim = Sim {
            now: 0,
            coordinator: Coordinator::new(config).unwrap(),
            nodes: Vec::new(),
            network,
            rng: Rng(SplitMix64::new(seed)),
            queue: BTreeMap::new(),
            seq: 0,
            partitioned: BTreeSet::new(),
            record: Record::default(),
            crashed_at: BTreeMap::new(),
            tick_ms,
            compute_ms: (300, 2_500),
        };
        for index in 0..nodes {
            sim.add_node(index as u64 * 37);
        }
        sim
    }

    pub(crate) fn add_node(&mut self, start_at: u64) -> usize {
        let index = self.nodes.len();
        self.nodes.push(SimNode {
            conn: ConnId(index as u64 + 1),
            peer_id: format!("peer-{index}"),
            alive: true,
            member: None,
            round: None,
            unacknowledged: None,
            shards: Vec::new(),
            diverges: false,
            shard_delay_ms: 0,
            shard_ready_at: 0,
            next_timer: self.now + start_at,
        });
        index
    }

    pub(crate) fn set_diverges(&mut self, node: usize) {
        self.nodes[node].diverges = true;
    }

    pub(crate) fn set_shard_delay(&mut self, node: usize, ms: u64) {
        self.nodes[node].shard_delay_ms = ms;
    }

    pub(crate) fn crash(&mut self, node: usize) {
        self.nodes[node].alive = false;
        self.crashed_at.insert(node, self.now);
    }

    /// The node says goodbye and stops. Its transport retransmits until acknowledged, so the
    /// simulation sends a few copies: the lossy network may drop some, and duplicates are
    /// harmless.
    pub(crate) fn leave(&mut self, node: usize) {
        for _ in 0..4 {
            self.send_to_coordinator(
                node,
                NodeMessage::Leave(Leave {
                    reason: "operator stopped it".to_string(),
                }),
            );
        }
        self.nodes[node].alive = false;
    }

    pub(crate) fn member(&self, node: usize) -> Option<MemberId> {
        self.nodes[node].member
    }

    pub(crate) fn committed_rounds(&self) -> usize {
        self.record.closed.iter().filter(|c| c.1).count()
    }

    fn send_to_coordinator(&mut self, node: usize, message: NodeMessage) {
        self.transmit(Delivery::ToCoordinator { node, message });
    }

    fn transmit(&mut self, delivery: Delivery) {
        if self.rng.chance(self.network.drop) {
            return;
        }
        let copies = if self.rng.chance(self.network.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self
                .rng
                .between(self.network.min_delay_ms, self.network.max_delay_ms);
            self.seq += 1;
            self.queue
                .insert((self.now + delay, self.seq), delivery.clone());
        }
    }

    /// Runs until `until` (simulated milliseconds), checking the invariants after every step.
    pub(crate) fn run_until(&mut self, until: u64) {
        while self.now < until {
            let next_tick = (self.now / self.tick_ms + 1) * self.tick_ms;
            let next_delivery = self.queue.keys().next().map(|(at, _)| *at);
            let next_timer = self
                .nodes
                .iter()
                .filter(|node| node.alive)
                .map(|node| node.next_timer)
                .min();
            let at = [Some(next_tick), next_delivery, next_timer]
                .into_iter()
                .flatten()
                .min()
                .unwrap()
                .min(until);
            self.now = at;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let delivery = entry.remove();
                self.deliver(delivery);
            }
            for node in 0..self.nodes.len() {
                if self.nodes[node].alive && self.nodes[node].next_timer <= self.now {
                    self.on_timer(node);
                }
            }
            if self.now.is_multiple_of(self.tick_ms) {
                let outputs = self.coordinator.tick(Millis(self.now));
                self.handle_outputs(outputs);
            }
            self.check_failure_detection();
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::ToCoordinator { node, message } => {
                if self.partitioned.contains(&node) {
                    return;
                }
                self.observe_inbound(node, &message);
                let conn = self.nodes[node].conn;
                let outputs =
                    self.coordinator
                        .step(Millis(self.now), conn, Input::Message(message));
                self.handle_outputs(outputs);
            }
            Delivery::ToNode { node, message } => {
                if self.partitioned.contains(&node) || !self.nodes[node].alive {
                    return;
                }
                self.on_node_message(node, message);
            }
        }
    }

    /// Remembers what reached the coordinator, to check later that it was counted.
    fn observe_inbound(&mut self, node: usize, message: &NodeMessage) {
        let Some(member) = self.nodes[node].member else {
            return;
        };
        if self.record.gone.contains_key(&member) {
            return;
        }
        match message {
            NodeMessage::RoundReport(report) => {
                let honest = matches!(&report.outer_step,
                    OuterStep::Ok { params_hash, .. } if *params_hash == honest_digest(report.round));
                if honest {
                    self.record
                        .delivered_reports
                        .entry(report.round)
                        .or_default()
                        .insert(member);
                }
            }
            NodeMessage::CheckpointShardDurable(durable) => {
                self.record
                    .durable_delivered
                    .entry(durable.round)
                    .or_default()
                    .insert((durable.shard, member));
            }
            _ => {}
        }
    }

    fn handle_outputs(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    let node = (to.0 - 1) as usize;
                    self.transmit(Delivery::ToNode { node, message });
                }
                Output::Close { .. } => {}
                Output::Event(event) => self.check_event(event),
            }
        }
    }

    fn check_event(&mut self, event: Event) {
        let record = &mut self.record;
        match event {
            Event::Joined { member, peer_id } => {
                let node = self
                    .nodes
                    .iter()
                    .position(|n| crate::identity::named_peer_id(&n.peer_id) == peer_id)
                    .unwrap();
                record.member_of_node.insert(member, node);
            }
            Event::Dead { member, .. } => {
                record.dead.insert(member, self.now);
                record.gone.insert(member, self.now);
            }
            Event::Left { member, .. } | Event::Rejected { member, .. } => {
                record.gone.insert(member, self.now);
            }
            Event::RoundOpened {
                round,
                participants,
            } => {
                if let Some((last, _)) = record.opened.last() {
                    assert!(
                        round > *last,
                        "round ids must increase: {last:?} then {round:?}"
                    );
                }
                assert!(
                    participants
                        .iter()
                        .all(|member| !record.gone.contains_key(member)),
                    "{round} opened with a dead member"
                );
                record
                    .opened
                    .push((round, participants.into_iter().collect()));
            }
            Event::RoundClosed {
                round,
                committed,
                included,
                excluded,
            } => {
                let (opened, participants) = record.opened.last().unwrap().clone();
                assert_eq!(opened, round, "closed a round that is not the open one");
                let all: BTreeSet<MemberId> = included.iter().chain(&excluded).copied().collect();
                assert!(
                    all.is_subset(&participants),
                    "{round} closed with non-participants"
                );
                for member in participants.difference(&all) {
                    assert!(
                        record.gone.contains_key(member),
                        "{round} dropped {member} from its participants"
                    );
                }
                if committed {
                    assert!(
                        included.len() * 2 > participants.len(),
                        "{round} committed by {} of {} participants: a minority",
                        included.len(),
                        participants.len()
                    );
                    let delivered = record
                        .delivered_reports
                        .get(&round)
                        .cloned()
                        .unwrap_or_default();
                    for member in &included {
                        assert!(
                            delivered.contains(member),
                            "{round} counted {member} without its report"
                        );
                    }
                    // Every honest report that arrived from a member still alive is counted.
                    for member in &delivered {
                        if participants.contains(member) && !record.gone.contains_key(member) {
                            assert!(
                                included.contains(member),
                                "{round} left out {member} whose report arrived"
                            );
                        }
                    }
                    let version = self.coordinator.global().version;
                    assert_eq!(
                        version,
                        record.global_version + 1,
                        "version must step by one"
                    );
                    record.global_version = version;
                } else {
                    assert!(included.is_empty());
                }
                record.closed.push((round, committed, included, self.now));
            }
            Event::HashDisagreement {
                round, disagreeing, ..
            } => record.disagreements.push((round, disagreeing)),
            Event::CheckpointCommitted { round } => {
                let writers = record.writers.get(&round).cloned().unwrap_or_default();
                let durable = record
                    .durable_delivered
                    .get(&round)
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    !writers.is_empty(),
                    "checkpoint of {round} committed without a request"
                );
                assert!(
                    writers.is_subset(&durable),
                    "checkpoint of {round} committed before every shard was durable: writers {writers:?}, durable {durable:?}"
                );
                record.checkpoints.push((round, self.now));
            }
            Event::Refused { .. }
            | Event::Resumed { .. }
            | Event::PlanChanged { .. }
            | Event::Benched { .. }
            | Event::Warning { .. }
            | Event::InitialState { .. }
            | Event::Finished { .. }
            | Event::ControlRequested { .. }
            | Event::ControlApplied { .. }
            | Event::DataStream { .. }
            | Event::DataConsumed { .. } => {}
        }
    }

    /// A crashed member is declared dead within the timeout (plus one tick of detection delay).
    fn check_failure_detection(&self) {
        let timeout = self.coordinator.config().heartbeat_timeout_ms;
        for (node, crashed) in &self.crashed_at {
            let Some(member) = self.nodes[*node].member else {
                continue;
            };
            if self.now > crashed + timeout + self.tick_ms {
                assert!(
                    self.record.gone.contains_key(&member),
                    "{member} crashed at {crashed} ms and is still alive at {} ms",
                    self.now
                );
            }
        }
    }

    fn on_timer(&mut self, node: usize) {
        let interval = self.coordinator.config().heartbeat_interval_ms;
        self.nodes[node].next_timer = self.now + interval;
        if self.nodes[node].member.is_none() {
            self.send_to_coordinator(node, NodeMessage::Hello(Hello::current()));
            let caps = capabilities(&self.nodes[node].peer_id.clone(), 24 << 30);
            self.send_to_coordinator(
                node,
                NodeMessage::Join(Join {
                    capabilities: caps,
                    rejoin: None,
                }),
            );
            return;
        }
        let state = &self.nodes[node];
        let round = state.round.map(|(round, _)| round);
        if let Some((round, _)) = state.round.filter(|(_, done_at)| self.now >= *done_at) {
            let digest = if state.diverges {
                Digest([0xEE; 32])
            } else {
                honest_digest(round)
            };
            let report = RoundReport {
                round,
                tokens_processed: 4_096,
                us_per_step: 0,
                consumed: vec![],
                outer_step: OuterStep::Ok {
                    params_hash: digest,
                    tensor_hashes: vec![TensorHash {
                        key: TensorKey::Param("model.embed_tokens.weight".to_string()),
                        digest,
                    }],
                },
            };
            let node_state = &mut self.nodes[node];
            node_state.round = None;
            node_state.unacknowledged = Some(report);
        }
        if let Some(report) = self.nodes[node].unacknowledged.clone() {
            self.send_to_coordinator(node, NodeMessage::RoundReport(report));
        }
        if self.now >= self.nodes[node].shard_ready_at {
            for shard in self.nodes[node].shards.clone() {
                self.send_to_coordinator(node, NodeMessage::CheckpointShardDurable(shard));
            }
        }
        self.send_to_coordinator(
            node,
            NodeMessage::Heartbeat(Heartbeat {
                round,
                inner_steps_done: 10,
                activity: Activity::Training,
            }),
        );
    }

    fn on_node_message(&mut self, node: usize, message: CoordinatorMessage) {
        match message {
            CoordinatorMessage::JoinAccepted(accepted) => {
                let state = &mut self.nodes[node];
                if state.member.is_none() {
                    state.member = Some(accepted.member);
                }
            }
            CoordinatorMessage::RoundOpened(opened) => {
                let me = self.nodes[node].member;
                if let Some(peer) = opened.participants.iter().find(|p| Some(p.member) == me) {
                    self.record
                        .replica_of
                        .insert((opened.round, peer.member), peer.assignment.replica);
                    let done = self.now + self.rng.between(self.compute_ms.0, self.compute_ms.1);
                    let state = &mut self.nodes[node];
                    if state.round.is_none_or(|(round, _)| round < opened.round) {
                        state.round = Some((opened.round, done));
                    }
                }
            }
            CoordinatorMessage::RoundClosed(closed) => {
                let me = self.nodes[node].member;
                let state = &mut self.nodes[node];
                if state
                    .unacknowledged
                    .as_ref()
                    .is_some_and(|r| r.round <= closed.round)
                {
                    state.unacknowledged = None;
                }
                if state.round.is_some_and(|(round, _)| round <= closed.round) {
                    state.round = None;
                }
                if let (Some(request), RoundOutcome::Committed { tensor_hashes, .. }) =
                    (&closed.checkpoint, &closed.outcome)
                {
                    let writers = self.record.writers.entry(closed.round).or_default();
                    for writer in &request.writers {
                        writers.insert((writer.shard, writer.member));
                    }
                    for writer in request.writers.iter().filter(|w| Some(w.member) == me) {
                        let state = &mut self.nodes[node];
                        if state.shards.iter().any(|s| s.round == closed.round) {
                            continue;
                        }
                        state.shard_ready_at = self.now + state.shard_delay_ms;
                        state.shards.push(CheckpointShardDurable {
                            round: closed.round,
                            shard: writer.shard,
                            tensor_hashes: tensor_hashes.clone(),
                        });
                    }
                }
            }
            CoordinatorMessage::CheckpointCommitted(committed) => {
                self.nodes[node]
                    .shards
                    .retain(|shard| shard.round > committed.round);
            }
            CoordinatorMessage::MemberDead(dead) => {
                if Some(dead.member) == self.nodes[node].member {
                    self.forget_membership(node);
                }
            }
            CoordinatorMessage::Error(error) => {
                if matches!(
                    error.code,
                    ErrorCode::UnknownMember | ErrorCode::NotJoined | ErrorCode::HelloRequired
                ) {
                    self.forget_membership(node);
                }
            }
            CoordinatorMessage::Hello(_)
            | CoordinatorMessage::Assigned(_)
            | CoordinatorMessage::PeersChanged(_)
            | CoordinatorMessage::RunAborted(_) => {}
        }
    }

    fn forget_membership(&mut self, node: usize) {
        let state = &mut self.nodes[node];
        state.member = None;
        state.round = None;
        state.unacknowledged = None;
        state.shards.clear();
    }
}

/// A direct driver for scenario tests that need exact control over every message.
pub(crate) struct Driver {
    pub(crate) now: u64,
    pub(crate) coordinator: Coordinator,
}

impl Driver {
    pub(crate) fn new(config: CoordinatorConfig) -> Driver {
        Driver {
            now: 0,
            coordinator: Coordinator::new(config).unwrap(),
        }
    }

    pub(crate) fn send(&mut self, conn: u64, message: NodeMessage) -> Vec<Output> {
        self.coordinator
            .step(Millis(self.now), ConnId(conn), Input::Message(message))
    }

    pub(crate) fn join(&mut self, conn: u64, memory_bytes: u64) -> (MemberId, Vec<Output>) {
        self.join_with(conn, capabilities(&format!("peer-{conn}"), memory_bytes))
    }

    pub(crate) fn join_with(&mut self, conn: u64, caps: Capabilities) -> (MemberId, Vec<Output>) {
        self.send(conn, NodeMessage::Hello(Hello::current()));
        let outputs = self.send(
            conn,
            NodeMessage::Join(Join {
                capabilities: caps,
                rejoin: None,
            }),
        );
        let member = outputs
            .iter()
            .find_map(|output| match output {
                Output::Send {
                    message: CoordinatorMessage::JoinAccepted(accepted),
                    ..
                } => Some(accepted.member),
                _ => None,
            })
            .expect("join accepted");
        (member, outputs)
    }

    pub(crate) fn advance(&mut self, ms: u64) -> Vec<Output> {
        self.now += ms;
        self.coordinator.tick(Millis(self.now))
    }

    pub(crate) fn report(&mut self, conn: u64, round: RoundId, digest: Digest) -> Vec<Output> {
        self.report_read(conn, round, digest, Vec::new())
    }

    /// A report of `round` that says its inner steps read `consumed` of the stream.
    pub(crate) fn report_read(
        &mut self,
        conn: u64,
        round: RoundId,
        digest: Digest,
        consumed: Vec<SeqRange>,
    ) -> Vec<Output> {
        self.send(
            conn,
            NodeMessage::RoundReport(RoundReport {
                round,
                tokens_processed: 1_000,
                us_per_step: 0,
                consumed,
                outer_step: OuterStep::Ok {
                    params_hash: digest,
                    tensor_hashes: vec![TensorHash {
                        key: TensorKey::Param("w".to_string()),
                        digest,
                    }],
                },
            }),
        )
    }

    pub(crate) fn leave(&mut self, conn: u64, reason: &str) -> Vec<Output> {
        self.send(
            conn,
            NodeMessage::Leave(Leave {
                reason: reason.to_string(),
            }),
        )
    }
}

pub(crate) fn events(outputs: &[Output]) -> Vec<&Event> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

pub(crate) fn messages_to(outputs: &[Output], conn: u64) -> Vec<&CoordinatorMessage> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::Send { to, message } if *to == ConnId(conn) => Some(message),
            _ => None,
        })
        .collect()
}

mod tests {
    use forge_protocol::stream::{self, DataDigest};
    use forge_protocol::{
        Assignment, CheckpointShardFailed, ErrorCode, InitialState, PROTOCOL_VERSION, PeersChanged,
        Ready,
    };

    use super::*;
    use crate::core::RESTART_GRACE_MS;
    use crate::planner::ModelProfile;
    use crate::profile::Architecture;

    const LOSSY: Network = Network {
        drop: 0.05,
        duplicate: 0.05,
        min_delay_ms: 1,
        max_delay_ms: 250,
    };

    fn closed(outputs: &[Output]) -> Option<(RoundId, bool, Vec<MemberId>)> {
        events(outputs).into_iter().find_map(|event| match event {
            Event::RoundClosed {
                round,
                committed,
                included,
                ..
            } => Some((*round, *committed, included.clone())),
            _ => None,
        })
    }

    fn opened(outputs: &[Output]) -> Option<(RoundId, Vec<MemberId>)> {
        events(outputs).into_iter().find_map(|event| match event {
            Event::RoundOpened {
                round,
                participants,
            } => Some((*round, participants.clone())),
            _ => None,
        })
    }

    /// The text of the error sent to `conn`.
    fn error_message(outputs: &[Output], conn: u64) -> String {
        messages_to(outputs, conn)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::Error(e) => Some(e.message.clone()),
                _ => None,
            })
            .expect("an error was sent")
    }

    fn error_codes(outputs: &[Output], conn: u64) -> Vec<ErrorCode> {
        messages_to(outputs, conn)
            .into_iter()
            .filter_map(|message| match message {
                CoordinatorMessage::Error(error) => Some(error.code),
                _ => None,
            })
            .collect()
    }

    /// The lease each participant's RoundOpened gives its replica (conn n is member n).
    fn leases_in(outputs: &[Output]) -> BTreeMap<u64, Vec<SeqRange>> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    message: CoordinatorMessage::RoundOpened(open),
                } => {
                    let me = open.participants.iter().find(|p| p.member.0 == to.0)?;
                    let lease = open
                        .data
                        .iter()
                        .find(|l| l.replica == me.assignment.replica)?;
                    Some((to.0, lease.ranges.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn consumed_in(outputs: &[Output]) -> Vec<SeqRange> {
        events(outputs)
            .into_iter()
            .flat_map(|event| match event {
                Event::DataConsumed { ranges, .. } => ranges.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// With a data plan, a member is planned once its data is the run's, and one with another
    /// corpus is refused with the reason. Each replica leases its own positions; what a
    /// committed replica read is consumed, and the rest (a short read, the lease of a member
    /// that left mid-round, an abandoned round's) is leased again before new positions, so the
    /// positions consumed tile the stream with no gap and no repeat, across a restart too.
    #[test]
    fn the_stream_is_leased_per_round_and_what_was_not_read_is_leased_again() {
        let mut cfg = config(2);
        cfg.start_replicas = 3;
        cfg.data = Some(DataPlan {
            sequences_per_step: 4,
            inner_steps: 5,
        });
        let mut d = Driver::new(cfg);
        let data = |corpus: u8| {
            NodeMessage::Ready(Ready {
                data: DataDigest {
                    corpus: Digest([corpus; 32]),
                    tokenizer: Digest([0; 32]),
                    windows: 50,
                },
                us_per_step: 0,
            })
        };
        let (_, joined) = d.join(1, 1 << 40);
        let accepted = messages_to(&joined, 1).into_iter().find_map(|m| match m {
            CoordinatorMessage::JoinAccepted(a) => Some(a.assignment),
            _ => None,
        });
        assert_eq!(accepted, Some(None), "planned before its data is known");
        let first = d.send(1, data(1));
        assert!(
            events(&first)
                .iter()
                .any(|e| matches!(e, Event::DataStream { windows: 50, .. })),
            "{first:?}"
        );
        d.join(2, 1 << 40);
        d.send(2, data(1));
        d.join(3, 1 << 40);
        let round1 = d.send(3, data(1));
        let (stranger, _) = d.join(4, 1 << 40);
        let refused = d.send(4, data(2));
        assert_eq!(error_codes(&refused, 4), [ErrorCode::DataMismatch]);
        let message = error_message(&refused, 4);
        assert!(
            message.contains("training corpus") && !message.contains("tokenizer ("),
            "{message}"
        );
        assert!(d.coordinator.members().all(|(id, _)| id != stranger));
        let leases = leases_in(&round1);
        assert_eq!(
            leases.values().cloned().collect::<Vec<_>>(),
            [0..20, 20..40, 40..60].map(|r| vec![SeqRange::new(r.start, r.end)])
        );
        // Member 3 reads 2 of its 5 steps.
        let read = |conn: u64, leases: &BTreeMap<u64, Vec<SeqRange>>, n: u64| {
            stream::split_at(&leases[&conn], n).0
        };
        let mut consumed = Vec::new();
        d.report_read(1, RoundId(1), Digest([1; 32]), read(1, &leases, 20));
        d.report_read(2, RoundId(1), Digest([1; 32]), read(2, &leases, 20));
        let closed1 = d.report_read(3, RoundId(1), Digest([1; 32]), read(3, &leases, 8));
        consumed.extend(consumed_in(&closed1));
        assert_eq!(stream::total(&consumed), 48);
        // Round 2: member 3's unread 12 go out first; member 2 leaves mid-round.
        let leases = leases_in(&closed1);
        assert_eq!(leases[&1], [SeqRange::new(48, 60), SeqRange::new(60, 68)]);
        let member2 = leases[&2].clone();
        d.leave(2, "stopped");
        d.report_read(1, RoundId(2), Digest([2; 32]), read(1, &leases, 20));
        let closed2 = d.report_read(3, RoundId(2), Digest([2; 32]), read(3, &leases, 20));
        consumed.extend(consumed_in(&closed2));
        // Round 3 (two replicas) takes member 2's lease back first; it is abandoned.
        let leases = leases_in(&closed2);
        assert_eq!(leases[&1], member2);
        d.report_read(1, RoundId(3), Digest([3; 32]), read(1, &leases, 20));
        let closed3 = d.report_read(3, RoundId(3), Digest([4; 32]), read(3, &leases, 20));
        assert!(consumed_in(&closed3).is_empty());
        let leases4 = leases_in(&closed3);
        assert_eq!(
            leases4, leases,
            "an abandoned round's leases are leased again"
        );
        // The state survives a coordinator restart, the open round's leases included.
        let snapshot = d.coordinator.to_snapshot().unwrap();
        d.coordinator = Coordinator::from_snapshot(&snapshot, Millis(d.now)).unwrap();
        d.send(1, NodeMessage::Hello(Hello::current()));
        d.send(3, NodeMessage::Hello(Hello::current()));
        for (conn, member) in [(1, 1), (3, 3)] {
            d.send(
                conn,
                NodeMessage::Join(Join {
                    capabilities: capabilities(&format!("peer-{conn}"), 1 << 40),
                    rejoin: Some(MemberId(member)),
                }),
            );
        }
        d.report_read(1, RoundId(4), Digest([5; 32]), read(1, &leases4, 20));
        let closed4 = d.report_read(3, RoundId(4), Digest([5; 32]), read(3, &leases4, 20));
        consumed.extend(consumed_in(&closed4));
        let consumed = stream::normalized(consumed.clone());
        assert_eq!(consumed, [SeqRange::new(0, 128)], "consumed: {consumed:?}");
    }

    /// With speed-aware rounds, the speeds nodes estimate when they are ready pace the first
    /// round already, and leases follow them: a node four times faster reads more.
    #[test]
    fn estimated_speeds_pace_the_first_round_and_size_its_leases() {
        let mut cfg = config(2);
        cfg.pace = true;
        cfg.data = Some(DataPlan {
            sequences_per_step: 4,
            inner_steps: 10,
        });
        let mut d = Driver::new(cfg);
        let ready = |us_per_step| {
            NodeMessage::Ready(Ready {
                data: DataDigest {
                    corpus: Digest([1; 32]),
                    tokenizer: Digest([0; 32]),
                    windows: 1000,
                },
                us_per_step,
            })
        };
        d.join(1, 1 << 40);
        d.send(1, ready(1_000));
        d.join(2, 1 << 40);
        let round1 = d.send(2, ready(4_000));
        let open = round1
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    message: CoordinatorMessage::RoundOpened(open),
                    ..
                } => Some(open.clone()),
                _ => None,
            })
            .expect("round 1 opens");
        assert_eq!(open.pace_us_per_step, Some(2_500));
        assert_eq!(open.slowest_us_per_step, Some(4_000));
        let leases = leases_in(&round1);
        // 25 and 7 steps expected in the median's time for 10: 32 and 9 leased.
        assert_eq!(stream::total(&leases[&1]), 32 * 4);
        assert_eq!(stream::total(&leases[&2]), 9 * 4);
    }

    /// A join tells each member already there only what changed among its sync peers (one
    /// small message), not its whole peer list; a departure likewise.
    #[test]
    fn a_join_costs_each_member_one_small_peer_change() {
        let mut cfg = config(2);
        cfg.start_replicas = 10;
        let mut driver = Driver::new(cfg);
        for conn in 1..=5 {
            driver.join(conn, 24 << 30);
        }
        let (sixth, outputs) = driver.join(6, 24 << 30);
        for conn in 1..=5 {
            let to = messages_to(&outputs, conn);
            assert_eq!(to.len(), 1, "member {conn}: {to:?}");
            let CoordinatorMessage::PeersChanged(delta) = to[0] else {
                panic!("member {conn}: {to:?}");
            };
            assert_eq!(
                delta.added.iter().map(|p| p.member).collect::<Vec<_>>(),
                [sixth]
            );
            assert!(delta.removed.is_empty());
        }
        let accepted = messages_to(&outputs, 6).into_iter().find_map(|m| match m {
            CoordinatorMessage::JoinAccepted(a) => Some(a.sync_peers.len()),
            _ => None,
        });
        assert_eq!(accepted, Some(5), "the joiner gets the whole list");
        let outputs = driver.leave(3, "stopped");
        let delta = messages_to(&outputs, 1).into_iter().find_map(|m| match m {
            CoordinatorMessage::PeersChanged(delta) => Some(delta.clone()),
            _ => None,
        });
        assert_eq!(
            delta,
            Some(PeersChanged {
                added: vec![],
                removed: vec![MemberId(3)]
            })
        );
    }

    /// The first round waits for start_replicas; later rounds need only min_replicas.
    #[test]
    fn the_first_round_waits_for_start_replicas() {
        let opened = |outputs: &[Output]| {
            outputs.iter().any(|o| {
                matches!(
                    o,
                    Output::Send {
                        message: CoordinatorMessage::RoundOpened(_),
                        ..
                    }
                )
            })
        };
        let mut cfg = config(2);
        cfg.start_replicas = 3;
        let mut driver = Driver::new(cfg);
        let (_, a) = driver.join(1, 1 << 40);
        let (_, b) = driver.join(2, 1 << 40);
        assert!(!opened(&a) && !opened(&b), "two of three: no round yet");
        let (_, c) = driver.join(3, 1 << 40);
        assert!(opened(&c), "the third replica opens the first round");
        let mut bad = config(2);
        bad.start_replicas = 17;
        assert!(
            Coordinator::new(bad).is_err(),
            "more start replicas than data shards"
        );
    }

    /// The first version 0 announced is the run's: rounds from version 0 carry its hashes (a
    /// node that drew other numbers then fetches it), a different one later is only warned
    /// about, and nothing is recorded once a round has committed.
    #[test]
    fn the_first_announced_version_0_is_the_runs() {
        let announce = |digest: u8| {
            NodeMessage::InitialState(InitialState {
                tensor_hashes: vec![TensorHash {
                    key: TensorKey::Param("w".to_string()),
                    digest: Digest([digest; 32]),
                }],
            })
        };
        let opened_hashes = |outputs: &[Output]| {
            outputs.iter().find_map(|o| match o {
                Output::Send {
                    message: CoordinatorMessage::RoundOpened(open),
                    ..
                } => Some(open.tensor_hashes.clone()),
                _ => None,
            })
        };
        let mut cfg = config(2);
        cfg.start_replicas = 3;
        let mut driver = Driver::new(cfg);
        driver.join(1, 1 << 40);
        driver.join(2, 1 << 40);
        let first = driver.send(1, announce(1));
        assert!(
            events(&first)
                .iter()
                .any(|e| matches!(e, Event::InitialState { .. })),
            "{first:?}"
        );
        let other = driver.send(2, announce(2));
        assert!(
            events(&other)
                .iter()
                .any(|e| matches!(e, Event::Warning { message } if message.contains("other initial parameters"))),
            "{other:?}"
        );
        assert_eq!(
            driver.coordinator.global().tensor_hashes[0].digest,
            Digest([1; 32])
        );
        let (_, third) = driver.join(3, 1 << 40);
        let hashes = opened_hashes(&third).expect("the third replica opens round 1");
        assert_eq!(hashes, driver.coordinator.global().tensor_hashes);
        for conn in 1..=3 {
            driver.report(conn, RoundId(1), Digest([9; 32]));
        }
        driver.advance(1);
        assert_eq!(driver.coordinator.global().version, 1);
        let late = driver.send(3, announce(3));
        assert!(events(&late).is_empty(), "{late:?}");
        assert_eq!(
            driver.coordinator.global().tensor_hashes[0].digest,
            Digest([9; 32])
        );
    }

    /// The budget is the coordinator's: the round that commits the final version is
    /// checkpointed (with checkpoint_every_rounds = 0 too) and no round opens after it.
    #[test]
    fn the_final_version_ends_the_run_with_a_checkpoint() {
        let mut cfg = config(2);
        cfg.checkpoint_every_rounds = 0;
        cfg.final_version = 2;
        let mut driver = Driver::new(cfg);
        driver.join(1, 1 << 40);
        driver.join(2, 1 << 40);
        let closed = |outputs: &[Output]| {
            outputs.iter().find_map(|o| match o {
                Output::Send {
                    message: CoordinatorMessage::RoundClosed(closed),
                    ..
                } => Some(closed.clone()),
                _ => None,
            })
        };
        let mut last = Vec::new();
        for round in 1..=2 {
            assert_eq!(driver.coordinator.open_round(), Some(RoundId(round)));
            driver.report(1, RoundId(round), Digest([round as u8; 32]));
            last = driver.report(2, RoundId(round), Digest([round as u8; 32]));
            let closed = closed(&last).expect("the round closes");
            assert_eq!(
                closed.checkpoint.is_some(),
                round == 2,
                "round {round}: only the final round is checkpointed"
            );
        }
        assert!(
            events(&last)
                .iter()
                .any(|e| matches!(e, Event::Finished { version: 2, .. })),
            "{last:?}"
        );
        assert!(driver.coordinator.finished());
        driver.advance(10_000);
        driver.join(3, 1 << 40);
        assert_eq!(
            driver.coordinator.open_round(),
            None,
            "no round after the final one"
        );
    }

    /// Speed-aware rounds: once the participants' reported speeds differ by more than
    /// PACE_SPREAD, a round carries the median time per step; equal speeds, or pace = "fixed",
    /// carry none.
    #[test]
    fn rounds_are_paced_once_speeds_differ() {
        let pace_of = |outputs: &[Output]| {
            outputs.iter().find_map(|o| match o {
                Output::Send {
                    message: CoordinatorMessage::RoundOpened(open),
                    ..
                } => Some(open.pace_us_per_step),
                _ => None,
            })
        };
        let report = |round: u64, us: u64| {
            NodeMessage::RoundReport(RoundReport {
                round: RoundId(round),
                tokens_processed: 1_000,
                us_per_step: us,
                consumed: vec![],
                outer_step: OuterStep::Ok {
                    params_hash: Digest([round as u8; 32]),
                    tensor_hashes: vec![TensorHash {
                        key: TensorKey::Param("w".to_string()),
                        digest: Digest([round as u8; 32]),
                    }],
                },
            })
        };
        for paced in [true, false] {
            let mut cfg = config(2);
            cfg.pace = paced;
            let mut driver = Driver::new(cfg);
            driver.join(1, 1 << 40);
            let (_, first) = driver.join(2, 1 << 40);
            assert_eq!(pace_of(&first), Some(None), "nothing measured yet");
            driver.send(1, report(1, 1_000));
            let opened = driver.send(2, report(1, 3_000));
            let expected = paced.then_some(2_000);
            assert_eq!(pace_of(&opened), Some(expected), "paced: {paced}");
            let slowest = opened.iter().find_map(|o| match o {
                Output::Send {
                    message: CoordinatorMessage::RoundOpened(open),
                    ..
                } => open.slowest_us_per_step,
                _ => None,
            });
            assert_eq!(slowest, Some(3_000), "the slowest, paced or not");
            // Speeds that come together end the pacing: each report counts half (3000, then
            // 2000, 1500 and 1250 against 1000).
            for (round, pace) in [(2, Some(1_500)), (3, Some(1_250)), (4, None)] {
                driver.send(1, report(round, 1_000));
                let opened = driver.send(2, report(round, 1_000));
                assert_eq!(
                    pace_of(&opened),
                    Some(pace.filter(|_| paced)),
                    "round {round}"
                );
            }
        }
    }

    #[test]
    fn lossy_network_keeps_every_invariant_and_makes_progress() {
        for seed in 0..10 {
            let mut sim = Sim::new(config(2), 5, LOSSY, seed);
            sim.run_until(60_000);
            assert!(
                sim.committed_rounds() >= 8,
                "seed {seed}: only {} rounds committed",
                sim.committed_rounds()
            );
            assert!(
                !sim.record.checkpoints.is_empty(),
                "seed {seed}: no checkpoint committed"
            );
        }
    }

    #[test]
    fn heavy_loss_and_duplication_never_break_the_invariants() {
        let network = Network {
            drop: 0.3,
            duplicate: 0.3,
            min_delay_ms: 1,
            max_delay_ms: 1_500,
        };
        for seed in 100..106 {
            let mut sim = Sim::new(config(2), 6, network, seed);
            sim.run_until(60_000);
        }
    }

    #[test]
    fn crashed_member_is_declared_dead_within_the_timeout_and_rounds_go_on() {
        let mut sim = Sim::new(config(2), 5, LOSSY, 7);
        sim.run_until(8_000);
        let leaver = sim.member(4).expect("node 4 joined");
        sim.leave(4);
        sim.run_until(10_000);
        assert!(
            sim.record.gone.contains_key(&leaver),
            "graceful leave not processed"
        );
        assert!(
            !sim.record.dead.contains_key(&leaver),
            "a leaver is not declared dead"
        );
        let victim = sim.member(1).expect("node 1 joined");
        let crashed_at = sim.now;
        sim.crash(1);
        sim.run_until(40_000);
        let dead_at = sim.record.dead[&victim];
        assert!(
            dead_at <= crashed_at + 2_000 + 100,
            "declared dead at {dead_at} ms, crashed at {crashed_at} ms"
        );
        let after: Vec<_> = sim
            .record
            .closed
            .iter()
            .filter(|(_, committed, _, at)| *committed && *at > dead_at)
            .collect();
        assert!(
            after.len() >= 3,
            "only {} rounds committed after the death",
            after.len()
        );
        assert!(
            after
                .iter()
                .all(|(_, _, included, _)| !included.contains(&victim))
        );
    }

    #[test]
    fn coordinator_cut_off_from_the_majority_commits_nothing_until_it_heals() {
        let mut sim = Sim::new(config(3), 5, LOSSY, 11);
        sim.run_until(15_000);
        let before = sim.committed_rounds();
        assert!(before > 0);
        let cut = sim.now;
        sim.partitioned.extend([0, 1, 2]);
        sim.run_until(40_000);
        // A round open at the cut may still commit from reports that arrived before it (the
        // checker verifies them); after its deadline nothing commits.
        for (round, committed, _, at) in &sim.record.closed {
            if *at > cut + 4_000 {
                assert!(
                    !committed,
                    "{round} committed while the majority was cut off"
                );
            }
        }
        for node in 0..3 {
            let member = sim
                .record
                .member_of_node
                .iter()
                .find(|(_, n)| **n == node)
                .map(|(m, _)| *m);
            assert!(member.is_some_and(|m| sim.record.gone.contains_key(&m)));
        }
        sim.partitioned.clear();
        sim.run_until(70_000);
        assert!(
            sim.committed_rounds() > before + 2,
            "rounds did not resume after the partition healed"
        );
    }

    #[test]
    fn round_shared_with_a_silent_majority_is_abandoned_not_committed() {
        let mut driver = Driver::new(config(2));
        let members: Vec<MemberId> = (1..=5).map(|conn| driver.join(conn, 24 << 30).0).collect();
        // Round 1 opened with the first two members; finish it so all five take part in round 2.
        let round1 = RoundId(1);
        driver.report(1, round1, honest_digest(round1));
        let outputs = driver.report(2, round1, honest_digest(round1));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        let (round2, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants, members);
        // Members 3, 4, 5 fall silent (a partition); 1 and 2 report.
        driver.report(1, round2, honest_digest(round2));
        driver.report(2, round2, honest_digest(round2));
        let mut closing = Vec::new();
        let heartbeat = NodeMessage::Heartbeat(Heartbeat {
            round: Some(round2),
            inner_steps_done: 0,
            activity: Activity::Training,
        });
        while closed(&closing).is_none() && driver.now < 10_000 {
            closing.extend(driver.advance(100));
            closing.extend(driver.send(1, heartbeat.clone()));
            closing.extend(driver.send(2, heartbeat.clone()));
        }
        assert_eq!(
            driver.now, 2_000,
            "closed once the silent members were declared dead"
        );
        let (round, committed, included) = closed(&closing).expect("round 2 closed");
        assert_eq!((round, committed, included), (round2, false, Vec::new()));
        assert_eq!(driver.coordinator.global().version, 1);
        let abandoned = messages_to(&closing, 1).into_iter().any(|m| {
            matches!(m, CoordinatorMessage::RoundClosed(c) if matches!(c.outcome, RoundOutcome::Abandoned { .. }))
        });
        assert!(
            abandoned,
            "members must be told to restore their parameters"
        );
        // The silent members are gone now; the next round is formed from those that remain.
        let (round3, participants) = opened(&closing).expect("round 3 opened");
        assert_eq!(participants, members[..2].to_vec());
        driver.report(1, round3, honest_digest(round3));
        let outputs = driver.report(2, round3, honest_digest(round3));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        assert_eq!(driver.coordinator.global().version, 2);
    }

    /// One accuser cannot remove a member: it takes two and a majority of the others. A member
    /// removed that way may not join again with its peer id.
    #[test]
    fn expulsion_needs_two_accusers_and_bans_the_peer_id() {
        let mut cfg = config(2);
        cfg.start_replicas = 4;
        let mut driver = Driver::new(cfg);
        let members: Vec<MemberId> = (1..=4).map(|conn| driver.join(conn, 24 << 30).0).collect();
        let failed = |round: RoundId, rejected: Option<MemberId>| {
            failed_report(round, "contribution has NaN", rejected, None)
        };
        // Round 1: member 1 alone accuses member 4 (a liar, or the only one to see it).
        let round1 = RoundId(1);
        driver.send(1, failed(round1, Some(members[3])));
        driver.send(2, failed(round1, None));
        driver.send(3, failed(round1, None));
        let outputs = driver.send(4, failed(round1, None));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(false));
        assert!(
            !events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::Rejected { .. })),
            "{outputs:?}"
        );
        assert!(events(&outputs).iter().any(|e| matches!(e, Event::Warning { message }
            if message.contains("rejected by 1 of the 3 other participants") && message.contains("takes 2"))));
        // Round 2: members 1 and 2 reject it: removed.
        let (round2, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants.len(), 4);
        driver.send(1, failed(round2, Some(members[3])));
        driver.send(2, failed(round2, Some(members[3])));
        driver.send(3, failed(round2, None));
        let outputs = driver.send(4, failed(round2, Some(members[0])));
        let expelled: Vec<MemberId> = events(&outputs)
            .into_iter()
            .filter_map(|event| match event {
                Event::Rejected { member, .. } => Some(*member),
                _ => None,
            })
            .collect();
        assert_eq!(expelled, vec![members[3]]);
        // Its peer id cannot come back, on a new connection either.
        driver.send(9, NodeMessage::Hello(Hello::current()));
        let outputs = driver.send(
            9,
            NodeMessage::Join(Join {
                capabilities: capabilities("peer-4", 24 << 30),
                rejoin: Some(members[3]),
            }),
        );
        assert_eq!(error_codes(&outputs, 9), vec![ErrorCode::InvalidJoin]);
        assert!(format!("{outputs:?}").contains("may not join again"));
        assert_eq!(driver.coordinator.members().count(), 3);
        // The ban survives a coordinator restart.
        let snapshot = driver.coordinator.to_snapshot().unwrap();
        driver.coordinator = Coordinator::from_snapshot(&snapshot, Millis(driver.now)).unwrap();
        driver.send(10, NodeMessage::Hello(Hello::current()));
        let outputs = driver.send(
            10,
            NodeMessage::Join(Join {
                capabilities: capabilities("peer-4", 24 << 30),
                rejoin: None,
            }),
        );
        assert_eq!(error_codes(&outputs, 10), vec![ErrorCode::InvalidJoin]);
    }

    #[test]
    fn member_whose_contribution_was_rejected_is_expelled_not_its_accuser() {
        let mut driver = Driver::new(config(2));
        let members: Vec<MemberId> = (1..=3).map(|conn| driver.join(conn, 24 << 30).0).collect();
        let round1 = RoundId(1);
        driver.report(1, round1, honest_digest(round1));
        let outputs = driver.report(2, round1, honest_digest(round1));
        let (round2, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants, members);
        let failed = |rejected: Option<MemberId>| {
            failed_report(round2, "contribution has NaN", rejected, None)
        };
        // Member 3 sent NaN; members 1 and 2 rejected it, and member 3 blames member 1 back.
        driver.send(1, failed(Some(members[2])));
        driver.send(2, failed(Some(members[2])));
        let outputs = driver.send(3, failed(Some(members[0])));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(false));
        let expelled: Vec<MemberId> = events(&outputs)
            .into_iter()
            .filter_map(|event| match event {
                Event::Rejected { member, .. } => Some(*member),
                _ => None,
            })
            .collect();
        assert_eq!(expelled, vec![members[2]], "only the rejected member goes");
        let told = messages_to(&outputs, 3).into_iter().any(|m| {
            matches!(m, CoordinatorMessage::MemberDead(d) if d.member == members[2] && d.expelled)
        });
        assert!(told, "the expelled member is told, so it stops");
        let others_told = messages_to(&outputs, 2).into_iter().any(|m| {
            matches!(m, CoordinatorMessage::MemberDead(d) if d.member == members[2] && d.expelled && d.reason.contains("NaN"))
        });
        assert!(others_told, "the others learn who was removed and why");
        let (round3, participants) = opened(&outputs).expect("round 3 opened");
        assert_eq!(participants, members[..2].to_vec());
        driver.report(1, round3, honest_digest(round3));
        let outputs = driver.report(2, round3, honest_digest(round3));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
    }

    #[test]
    fn members_hear_of_a_new_replica_so_they_can_serve_it_the_state() {
        let mut driver = Driver::new(config(2));
        let (m1, _) = driver.join(1, 24 << 30);
        driver.join(2, 24 << 30);
        // Round 1 runs; the third member waits on standby until it closes.
        let (m3, _) = driver.join(3, 24 << 30);
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        let outputs = driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        let told = messages_to(&outputs, 1).into_iter().any(|m| {
            matches!(m, CoordinatorMessage::PeersChanged(d) if d.added.iter().any(|p| p.member == m3))
        });
        assert!(
            told,
            "member {m1} was not told of the new replica's node {m3}"
        );
        let opened = messages_to(&outputs, 3).into_iter().find_map(|m| match m {
            CoordinatorMessage::RoundOpened(open) => Some(open.clone()),
            _ => None,
        });
        let opened = opened.expect("the new member takes part in round 2");
        assert_eq!(opened.global_version, 1);
        assert!(
            !opened.tensor_hashes.is_empty(),
            "the round names the hashes a joiner checks its fetched state against"
        );
    }

    #[test]
    fn when_every_member_is_gone_the_run_continues_from_the_last_checkpoint() {
        let mut cfg = config(2);
        cfg.checkpoint_every_rounds = 1;
        let mut driver = Driver::new(cfg);
        let (m1, _) = driver.join(1, 24 << 30);
        driver.join(2, 24 << 30);
        // Round 1 commits and its checkpoint becomes durable; round 2 commits, its checkpoint
        // never does.
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        let outputs = driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        let request = messages_to(&outputs, 1)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::RoundClosed(c) => c.checkpoint.clone(),
                _ => None,
            })
            .expect("checkpoint requested");
        let writer = request.writers[0];
        let conn = if writer.member == m1 { 1 } else { 2 };
        let outputs = driver.send(
            conn,
            NodeMessage::CheckpointShardDurable(CheckpointShardDurable {
                round: RoundId(1),
                shard: writer.shard,
                tensor_hashes: vec![TensorHash {
                    key: TensorKey::Param("w".to_string()),
                    digest: honest_digest(RoundId(1)),
                }],
            }),
        );
        assert!(
            events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::CheckpointCommitted { .. }))
        );
        let checkpointed = driver.coordinator.global().clone();
        driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        driver.report(2, RoundId(2), honest_digest(RoundId(2)));
        assert_eq!(driver.coordinator.global().version, 2);
        // Both nodes die: nobody holds version 2 any more.
        let mut outputs = Vec::new();
        while driver.now < 10_000 {
            outputs.extend(driver.advance(500));
        }
        assert_eq!(driver.coordinator.global(), &checkpointed);
        assert!(events(&outputs).iter().any(|e| matches!(
            e,
            Event::Warning { message } if message.contains("continues from the checkpoint of round 1")
        )));
        // A returning node is told to start from the checkpoint's state.
        let (_, outputs) = driver.join(3, 24 << 30);
        let accepted = messages_to(&outputs, 3)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::JoinAccepted(a) => Some(a.global.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(accepted, checkpointed);
    }

    /// One owner rejects member 3 and aborts; the other honest member hears the abort first and
    /// can only blame it as unreachable. Not enough to remove it, but together a majority: it
    /// sits out the next round instead of failing every round (the race the hostile-member
    /// test met in CI).
    #[test]
    fn a_rejection_and_a_relayed_abort_bench_the_member() {
        let mut cfg = config(2);
        cfg.start_replicas = 3;
        let mut driver = Driver::new(cfg);
        let members: Vec<MemberId> = (1..=3).map(|conn| driver.join(conn, 24 << 30).0).collect();
        let failed = |rejected: Option<MemberId>, unreachable: Option<MemberId>| {
            failed_report(
                RoundId(1),
                "claims a weight above its lease",
                rejected,
                unreachable,
            )
        };
        driver.send(1, failed(Some(members[2]), None));
        driver.send(2, failed(None, Some(members[2])));
        let outputs = driver.send(3, failed(Some(members[0]), None));
        assert!(
            !events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::Rejected { .. })),
            "{outputs:?}"
        );
        let benched: Vec<MemberId> = events(&outputs)
            .into_iter()
            .filter_map(|event| match event {
                Event::Benched { member, .. } => Some(*member),
                _ => None,
            })
            .collect();
        assert_eq!(benched, vec![members[2]], "{outputs:?}");
        let (_, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants.len(), 2);
        assert!(!participants.contains(&members[2]));
    }

    /// A writer whose disk is full reports its shard failed: that checkpoint is dropped with a
    /// warning, the next one goes to the other replica and commits, and the run goes on.
    #[test]
    fn a_writer_that_cannot_write_hands_the_next_checkpoint_to_another_replica() {
        let mut cfg = config(2);
        cfg.checkpoint_every_rounds = 1;
        let mut driver = Driver::new(cfg);
        let (m1, _) = driver.join(1, 24 << 30);
        driver.join(2, 24 << 30);
        let writer_of = |outputs: &[Output]| {
            messages_to(outputs, 1)
                .into_iter()
                .find_map(|m| match m {
                    CoordinatorMessage::RoundClosed(c) => c.checkpoint.clone(),
                    _ => None,
                })
                .expect("checkpoint requested")
                .writers[0]
        };
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        let outputs = driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        let first = writer_of(&outputs);
        let conn = |member| if member == m1 { 1 } else { 2 };
        let outputs = driver.send(
            conn(first.member),
            NodeMessage::CheckpointShardFailed(CheckpointShardFailed {
                round: RoundId(1),
                shard: first.shard,
                reason: "No space left on device (os error 28)".to_string(),
            }),
        );
        assert!(events(&outputs).iter().any(|e| matches!(
            e,
            Event::Warning { message } if message.contains("could not write shard 0 of the round 1 checkpoint (No space left")
        )));
        driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        let outputs = driver.report(2, RoundId(2), honest_digest(RoundId(2)));
        let second = writer_of(&outputs);
        assert_ne!(
            second.member, first.member,
            "the failed writer was asked again"
        );
        let outputs = driver.send(
            conn(second.member),
            NodeMessage::CheckpointShardDurable(CheckpointShardDurable {
                round: RoundId(2),
                shard: second.shard,
                tensor_hashes: vec![TensorHash {
                    key: TensorKey::Param("w".to_string()),
                    digest: honest_digest(RoundId(2)),
                }],
            }),
        );
        assert!(events(&outputs).iter().any(|e| matches!(
            e,
            Event::CheckpointCommitted { round } if *round == RoundId(2)
        )));
    }

    /// A report of `round` failed for its sender, blaming `rejected`'s contribution and/or
    /// `unreachable`.
    fn failed_report(
        round: RoundId,
        reason: &str,
        rejected: Option<MemberId>,
        unreachable: Option<MemberId>,
    ) -> NodeMessage {
        NodeMessage::RoundReport(RoundReport {
            round,
            tokens_processed: 1_000,
            us_per_step: 0,
            consumed: vec![],
            outer_step: OuterStep::Failed {
                reason: reason.to_string(),
                rejected,
                unreachable,
            },
        })
    }

    fn unreachable(round: RoundId, member: MemberId) -> NodeMessage {
        failed_report(round, "timed out", None, Some(member))
    }

    fn benched(outputs: &[Output]) -> Vec<(MemberId, RoundId)> {
        events(outputs)
            .into_iter()
            .filter_map(|event| match event {
                Event::Benched { member, until, .. } => Some((*member, *until)),
                _ => None,
            })
            .collect()
    }

    /// A node cut off from its peers but not from the coordinator: everyone else times out on
    /// it. It sits out 1 round, then 2 (it is still cut off), and once a round with it commits,
    /// its next benching starts from 1 again.
    #[test]
    fn member_the_others_cannot_reach_sits_out_rounds_that_double() {
        let mut driver = Driver::new(config(2));
        let members: Vec<MemberId> = (1..=4).map(|conn| driver.join(conn, 24 << 30).0).collect();
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        let outputs = driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        let (round, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants, members);
        // Member 4 is cut off: 1-3 blame it, it blames member 1.
        let cut_off = |driver: &mut Driver, round: RoundId| {
            for conn in 1..=3 {
                driver.send(conn, unreachable(round, members[3]));
            }
            driver.send(4, unreachable(round, members[0]))
        };
        let outputs = cut_off(&mut driver, round);
        assert_eq!(closed(&outputs).map(|c| c.1), Some(false));
        assert_eq!(benched(&outputs), vec![(members[3], RoundId(3))]);
        assert!(
            messages_to(&outputs, 4)
                .into_iter()
                .any(|m| matches!(m, CoordinatorMessage::Assigned(a) if a.assignment.is_none())),
            "the benched member is told it is on standby"
        );
        let (round, participants) = opened(&outputs).expect("round 3 opened");
        assert_eq!((round, participants), (RoundId(3), members[..3].to_vec()));
        for conn in 1..=2 {
            driver.report(conn, round, honest_digest(round));
        }
        let outputs = driver.report(3, round, honest_digest(round));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        let (round, participants) = opened(&outputs).expect("round 4 opened");
        assert_eq!(participants, members, "back after one round");
        // Still cut off: two rounds on the bench this time.
        let mut outputs = cut_off(&mut driver, round);
        assert_eq!(benched(&outputs), vec![(members[3], RoundId(6))]);
        for expected in [RoundId(5), RoundId(6)] {
            let (round, participants) = opened(&outputs).expect("next round opened");
            assert_eq!((round, participants), (expected, members[..3].to_vec()));
            for conn in 1..=2 {
                driver.report(conn, round, honest_digest(round));
            }
            outputs = driver.report(3, round, honest_digest(round));
            assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        }
        // Reachable again: round 7 commits with it, which wipes its strikes.
        let (round, participants) = opened(&outputs).expect("round 7 opened");
        assert_eq!((round, participants), (RoundId(7), members.clone()));
        for conn in 1..=3 {
            driver.report(conn, round, honest_digest(round));
        }
        let outputs = driver.report(4, round, honest_digest(round));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        let (round, _) = opened(&outputs).expect("round 8 opened");
        let outputs = cut_off(&mut driver, round);
        assert_eq!(benched(&outputs), vec![(members[3], RoundId(9))]);
    }

    /// Two members that cannot reach each other blame each other equally: nobody can tell which
    /// side is cut off, so neither is benched.
    #[test]
    fn two_members_that_cannot_reach_each_other_are_not_benched() {
        let mut driver = Driver::new(config(2));
        let members: Vec<MemberId> = (1..=2).map(|conn| driver.join(conn, 24 << 30).0).collect();
        driver.send(1, unreachable(RoundId(1), members[1]));
        let outputs = driver.send(2, unreachable(RoundId(1), members[0]));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(false));
        assert!(benched(&outputs).is_empty());
        assert!(events(&outputs).iter().any(
            |e| matches!(e, Event::Warning { message } if message.contains("could not reach each other"))
        ));
        let (_, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(participants, members);
    }

    #[test]
    fn two_members_rejecting_each_other_are_both_kept_with_a_warning() {
        let mut driver = Driver::new(config(2));
        let members: Vec<MemberId> = (1..=2).map(|conn| driver.join(conn, 24 << 30).0).collect();
        let failed =
            |rejected: MemberId| failed_report(RoundId(1), "outlier norm", Some(rejected), None);
        driver.send(1, failed(members[1]));
        let outputs = driver.send(2, failed(members[0]));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(false));
        let events = events(&outputs);
        assert!(!events.iter().any(|e| matches!(e, Event::Rejected { .. })));
        // One accuser each: neither accusation is corroborated.
        let warned = events
            .iter()
            .filter(|e| matches!(e, Event::Warning { message } if message.contains("removing it takes 2")))
            .count();
        assert_eq!(warned, 2, "{events:?}");
        assert_eq!(opened(&outputs).map(|o| o.1), Some(members));
    }

    #[test]
    fn hash_disagreement_is_surfaced_and_the_diverging_member_excluded() {
        let mut sim = Sim::new(config(2), 5, LOSSY, 3);
        sim.set_diverges(4);
        sim.run_until(40_000);
        let rogue = sim.member(4).expect("node 4 joined");
        assert!(sim.committed_rounds() >= 5);
        assert!(
            sim.record
                .disagreements
                .iter()
                .any(|(_, disagreeing)| disagreeing == &vec![rogue]),
            "disagreement not surfaced: {:?}",
            sim.record.disagreements
        );
        for (round, _, included, _) in &sim.record.closed {
            assert!(
                !included.contains(&rogue),
                "{round} counted the diverging member"
            );
        }
    }

    #[test]
    fn slow_checkpoint_shard_delays_the_commit_but_never_breaks_it() {
        let mut sim = Sim::new(config(2), 3, LOSSY, 5);
        for node in 0..3 {
            sim.set_shard_delay(node, 6_000);
        }
        sim.run_until(60_000);
        assert!(!sim.record.checkpoints.is_empty());
        for (round, at) in &sim.record.checkpoints {
            let closed_at = sim.record.closed.iter().find(|c| c.0 == *round).unwrap().3;
            assert!(
                *at >= closed_at + 6_000,
                "{round} checkpoint committed before its shard was written"
            );
        }
    }

    #[test]
    fn incompatible_hello_is_refused_naming_both_versions() {
        let mut driver = Driver::new(config(1));
        let outputs = driver.send(
            9,
            NodeMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION + 1,
                software_version: "9.9.9".to_string(),
            }),
        );
        let reply = messages_to(&outputs, 9);
        let CoordinatorMessage::Error(error) = reply[0] else {
            panic!("expected an error, got {reply:?}");
        };
        assert_eq!(error.code, ErrorCode::IncompatibleVersion);
        assert!(
            error
                .message
                .contains(&format!("protocol version {}", PROTOCOL_VERSION + 1))
        );
        assert!(error.message.contains("9.9.9"));
        assert!(outputs.contains(&Output::Close { conn: ConnId(9) }));
    }

    #[test]
    fn messages_before_hello_or_join_are_refused() {
        let mut driver = Driver::new(config(1));
        let heartbeat = NodeMessage::Heartbeat(Heartbeat {
            round: None,
            inner_steps_done: 0,
            activity: Activity::Training,
        });
        let outputs = driver.send(1, heartbeat.clone());
        assert_eq!(error_codes(&outputs, 1), vec![ErrorCode::HelloRequired]);
        driver.send(1, NodeMessage::Hello(Hello::current()));
        let outputs = driver.send(1, heartbeat);
        assert_eq!(error_codes(&outputs, 1), vec![ErrorCode::NotJoined]);
        let mut bad = capabilities("peer-1", 8 << 30);
        bad.tokens_per_s = 0.0;
        let outputs = driver.send(
            1,
            NodeMessage::Join(Join {
                capabilities: bad,
                rejoin: None,
            }),
        );
        assert_eq!(error_codes(&outputs, 1), vec![ErrorCode::InvalidJoin]);
    }

    /// A join listing more than a node has (devices, addresses, long strings) is refused with
    /// the limit: every member's addresses go into messages to every other member.
    #[test]
    fn an_oversized_join_is_refused_with_the_limit() {
        let mut driver = Driver::new(config(1));
        driver.send(1, NodeMessage::Hello(Hello::current()));
        let join = |capabilities| {
            NodeMessage::Join(Join {
                capabilities,
                rejoin: None,
            })
        };
        let mut many = capabilities("peer-1", 8 << 30);
        many.listen_addrs = vec!["/ip4/127.0.0.1/udp/1/quic-v1".to_string(); 1000];
        let outputs = driver.send(1, join(many));
        assert_eq!(error_codes(&outputs, 1), vec![ErrorCode::InvalidJoin]);
        assert!(format!("{outputs:?}").contains("at most 64 and 16 are allowed"));
        let mut long = capabilities("peer-1", 8 << 30);
        long.devices[0].name = "x".repeat(100_000);
        let outputs = driver.send(1, join(long));
        assert!(format!("{outputs:?}").contains("of 100000 bytes; at most 256"));
        assert_eq!(driver.coordinator.members().count(), 0);
        let (_, outputs) = driver.join(1, 8 << 30);
        assert!(error_codes(&outputs, 1).is_empty());
    }

    /// A burst of joins in one batch sends each member one merged peer change, which leaves
    /// it with the same peers as the changes one by one would.
    #[test]
    fn a_burst_of_joins_sends_each_member_one_merged_peer_change() {
        // Rounds never open (more replicas needed than join), as in the heartbeat benchmark.
        let mut driver = Driver::new(config(16));
        driver.join(1, 8 << 30);
        let mut outputs = Vec::new();
        for conn in 2..=6 {
            outputs.extend(driver.join(conn, 8 << 30).1);
        }
        // A member that leaves within the burst is removed from the merged change.
        outputs.extend(driver.leave(4, "gone"));
        let apply = |outputs: &[Output]| {
            let mut peers: Vec<MemberId> = Vec::new();
            for message in messages_to(outputs, 1) {
                if let CoordinatorMessage::PeersChanged(change) = message {
                    peers.retain(|m| {
                        !change.removed.contains(m) && !change.added.iter().any(|a| a.member == *m)
                    });
                    peers.extend(change.added.iter().map(|p| p.member));
                }
            }
            peers.sort();
            peers
        };
        let merged = crate::core::coalesce_peer_changes(outputs.clone());
        let changes = |outputs: &[Output]| {
            messages_to(outputs, 1)
                .into_iter()
                .filter(|m| matches!(m, CoordinatorMessage::PeersChanged(_)))
                .count()
        };
        assert_eq!(changes(&outputs), 6);
        // The five joins merge into one; the leave's MemberDead ends that run.
        assert_eq!(changes(&merged), 2);
        assert_eq!(apply(&merged), apply(&outputs));
        assert_eq!(apply(&merged).len(), 4);
    }

    /// A run holds `max_members` members: one more is refused with the limit, while a member
    /// already in (the same peer id) may still join again, and a place freed is taken.
    #[test]
    fn a_join_beyond_max_members_is_refused_with_the_limit() {
        let mut run = config(1);
        run.limits.max_members = 2;
        let mut driver = Driver::new(run);
        driver.join(1, 8 << 30);
        driver.join(2, 8 << 30);
        driver.send(3, NodeMessage::Hello(Hello::current()));
        let third = NodeMessage::Join(Join {
            capabilities: capabilities("peer-3", 8 << 30),
            rejoin: None,
        });
        let outputs = driver.send(3, third.clone());
        assert_eq!(error_codes(&outputs, 3), vec![ErrorCode::InvalidJoin]);
        let refused = error_message(&outputs, 3);
        assert!(
            refused.contains("limit of 2 members; raise [coordinator] max_members"),
            "{refused}"
        );
        assert_eq!(driver.coordinator.members().count(), 2);
        // peer-2 restarting (a new connection) replaces itself: not a new member.
        driver.send(4, NodeMessage::Hello(Hello::current()));
        let again = NodeMessage::Join(Join {
            capabilities: capabilities("peer-2", 8 << 30),
            rejoin: None,
        });
        assert!(error_codes(&driver.send(4, again), 4).is_empty());
        assert_eq!(driver.coordinator.members().count(), 2);
        // A place freed is taken.
        driver.send(
            1,
            NodeMessage::Leave(Leave {
                reason: "done".to_string(),
            }),
        );
        assert!(error_codes(&driver.send(3, third), 3).is_empty());
        assert_eq!(driver.coordinator.members().count(), 2);
    }

    /// A join whose peer id is not a libp2p peer id (`sim-member` used to send `sim-0`) is
    /// refused: every node dials and admits its peers by that id, and one that does not parse
    /// stopped them all. The members already there hear nothing of it.
    #[test]
    fn a_join_with_an_invalid_peer_id_is_refused_and_the_others_hear_nothing() {
        let mut driver = Driver::new(config(1));
        driver.join(1, 8 << 30);
        driver.send(2, NodeMessage::Hello(Hello::current()));
        let mut bad = capabilities("peer-2", 8 << 30);
        bad.peer_id = "sim-0".to_string();
        let outputs = driver.send(
            2,
            NodeMessage::Join(Join {
                capabilities: bad,
                rejoin: None,
            }),
        );
        assert_eq!(error_codes(&outputs, 2), vec![ErrorCode::InvalidJoin]);
        let refused = error_message(&outputs, 2);
        assert!(
            refused.contains("\"sim-0\" is not a libp2p peer id"),
            "{refused}"
        );
        assert!(messages_to(&outputs, 1).is_empty(), "{outputs:?}");
        assert_eq!(driver.coordinator.members().count(), 1);
    }

    #[test]
    fn join_hands_out_the_run_config_and_distinct_data_shards() {
        let mut driver = Driver::new(config(3));
        let mut shards = BTreeSet::new();
        for conn in 1..=3 {
            let (_, outputs) = driver.join(conn, 24 << 30);
            let Some(CoordinatorMessage::JoinAccepted(accepted)) =
                messages_to(&outputs, conn).into_iter().next()
            else {
                panic!("no JoinAccepted");
            };
            assert_eq!(accepted.run_config, config(3).run_config);
            let assignment = accepted.assignment.expect("assigned between rounds");
            assert!(assignment.stage.is_none());
            shards.insert(assignment.data_shard.index);
        }
        assert_eq!(shards.len(), 3, "every replica reads its own shard");
        assert_eq!(driver.coordinator.open_round(), Some(RoundId(1)));
    }

    #[test]
    fn joiner_during_a_round_waits_on_standby_then_takes_part() {
        let mut driver = Driver::new(config(1));
        driver.join(1, 24 << 30);
        assert_eq!(driver.coordinator.open_round(), Some(RoundId(1)));
        let (second, outputs) = driver.join(2, 24 << 30);
        let Some(CoordinatorMessage::JoinAccepted(accepted)) =
            messages_to(&outputs, 2).into_iter().next()
        else {
            panic!("no JoinAccepted");
        };
        assert_eq!(accepted.assignment, None);
        let outputs = driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        assert!(
            messages_to(&outputs, 2)
                .iter()
                .any(|m| matches!(m, CoordinatorMessage::Assigned(a) if a.assignment.is_some()))
        );
        let (round, participants) = opened(&outputs).expect("round 2 opened");
        assert_eq!(round, RoundId(2));
        assert!(participants.contains(&second));
    }

    #[test]
    fn late_member_is_excluded_at_the_deadline_and_its_report_ignored() {
        let mut driver = Driver::new(config(2));
        for conn in 1..=3 {
            driver.join(conn, 24 << 30);
        }
        // Round 1 opened with members 1 and 2; complete it so all three take part in round 2.
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        let outputs = driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        let (round, _) = opened(&outputs).unwrap();
        driver.report(1, round, honest_digest(round));
        driver.report(2, round, honest_digest(round));
        let mut outputs = Vec::new();
        while closed(&outputs).is_none() {
            driver.now += 500;
            for conn in 1..=3 {
                outputs.extend(driver.send(
                    conn,
                    NodeMessage::Heartbeat(Heartbeat {
                        round: Some(round),
                        inner_steps_done: 1,
                        activity: Activity::Training,
                    }),
                ));
            }
        }
        let (_, committed, included) = closed(&outputs).unwrap();
        assert!(committed);
        assert_eq!(included, vec![MemberId(1), MemberId(2)]);
        assert_eq!(driver.now, 4_000, "closed at the deadline");
        let next = opened(&outputs).unwrap().0;
        assert_eq!(next, RoundId(round.0 + 1));
        let late = driver.report(3, round, honest_digest(round));
        assert!(
            error_codes(&late, 3).is_empty(),
            "a late report is dropped quietly"
        );
        assert_eq!(driver.coordinator.global().round, Some(round));
        let future = driver.report(3, RoundId(99), honest_digest(round));
        assert_eq!(error_codes(&future, 3), vec![ErrorCode::WrongRound]);
    }

    #[test]
    fn reconnecting_member_keeps_its_id_and_hears_the_open_round_again() {
        let mut driver = Driver::new(config(1));
        let (first, _) = driver.join(1, 24 << 30);
        let (second, _) = driver.join(2, 24 << 30);
        let outputs = driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        assert_eq!(opened(&outputs), Some((RoundId(2), vec![first, second])));
        driver
            .coordinator
            .step(Millis(driver.now), ConnId(2), Input::Disconnected);
        driver.now += 500;

        driver.send(12, NodeMessage::Hello(Hello::current()));
        let rejoin = |peer: &str, member| {
            NodeMessage::Join(Join {
                capabilities: capabilities(peer, 24 << 30),
                rejoin: Some(member),
            })
        };
        let outputs = driver.send(12, rejoin("peer-2", second));
        assert!(events(&outputs).contains(&&Event::Resumed { member: second }));
        let to_new = messages_to(&outputs, 12);
        assert!(
            matches!(to_new[0], CoordinatorMessage::JoinAccepted(a) if a.member == second && a.assignment.is_some()),
            "{to_new:?}"
        );
        assert!(
            matches!(to_new[1], CoordinatorMessage::RoundOpened(o) if o.round == RoundId(2) && o.deadline_ms == 3_500),
            "{to_new:?}"
        );
        // The old connection no longer speaks for the member; the new one does.
        let stale = driver.report(2, RoundId(2), honest_digest(RoundId(2)));
        assert_eq!(error_codes(&stale, 2), vec![ErrorCode::HelloRequired]);
        driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        let outputs = driver.report(12, RoundId(2), honest_digest(RoundId(2)));
        assert_eq!(
            closed(&outputs),
            Some((RoundId(2), true, vec![first, second]))
        );

        // Another peer cannot take over a member id: it joins as a new member.
        driver.send(13, NodeMessage::Hello(Hello::current()));
        let outputs = driver.send(13, rejoin("peer-x", first));
        assert!(!events(&outputs).contains(&&Event::Resumed { member: first }));
        assert!(driver.coordinator.members().any(|(id, _)| id == first));
        assert_eq!(driver.coordinator.members().count(), 3);

        // A member already declared dead comes back under a new id.
        let outputs = driver.advance(2_000);
        assert!(
            events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::Dead { .. }))
        );
        let alive: Vec<MemberId> = driver.coordinator.members().map(|(id, _)| id).collect();
        assert!(
            !alive.contains(&second) && !alive.contains(&first),
            "{alive:?}"
        );
        driver.send(14, NodeMessage::Hello(Hello::current()));
        let outputs = driver.send(14, rejoin("peer-2", second));
        let accepted = messages_to(&outputs, 14)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::JoinAccepted(a) => Some(a.member),
                _ => None,
            })
            .unwrap();
        assert!(accepted > second, "{accepted:?}");
    }

    #[test]
    fn a_member_leaving_after_its_report_is_announced_as_left() {
        let mut driver = Driver::new(config(1));
        driver.join(1, 24 << 30);
        let (leaver, _) = driver.join(2, 24 << 30);
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        driver.report(2, RoundId(2), honest_digest(RoundId(2)));
        let outputs = driver.leave(2, "stopped by signal");
        assert!(
            messages_to(&outputs, 1).iter().any(
                |m| matches!(m, CoordinatorMessage::MemberDead(d) if d.member == leaver && d.left)
            ),
            "its peers need not give up on round 2, which it reported"
        );
        let outputs = driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        assert_eq!(
            closed(&outputs).map(|c| (c.0, c.1, c.2)),
            Some((RoundId(2), true, vec![MemberId(1), leaver]))
        );
    }

    #[test]
    fn graceful_leave_removes_the_member_at_once() {
        let mut driver = Driver::new(config(1));
        driver.join(1, 24 << 30);
        let (leaver, _) = driver.join(2, 24 << 30);
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        let outputs = driver.leave(2, "done");
        assert!(events(&outputs).contains(&&Event::Left {
            member: leaver,
            reason: "done".to_string()
        }));
        // It left in the middle of round 2 without reporting: its peers must stop waiting for
        // it, so it is announced like a death (left = false).
        assert!(messages_to(&outputs, 1).iter().any(
            |m| matches!(m, CoordinatorMessage::MemberDead(d) if d.member == leaver && !d.left)
        ));
        // Round 2 no longer waits for the member that left.
        assert_eq!(
            closed(&outputs).map(|c| (c.0, c.1)),
            Some((RoundId(2), true))
        );
        let outputs = driver.send(
            2,
            NodeMessage::Heartbeat(Heartbeat {
                round: None,
                inner_steps_done: 0,
                activity: Activity::Training,
            }),
        );
        assert_eq!(error_codes(&outputs, 2), vec![ErrorCode::UnknownMember]);
    }

    #[test]
    fn snapshot_restores_members_rounds_and_global_state() {
        let mut driver = Driver::new(config(1));
        driver.join(1, 24 << 30);
        driver.join(2, 24 << 30);
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        driver.report(1, RoundId(2), honest_digest(RoundId(2)));
        driver.report(2, RoundId(2), honest_digest(RoundId(2)));
        let bytes = driver.coordinator.to_snapshot().unwrap();
        assert_eq!(&bytes[..4], b"FGSN");
        let mut restored = Coordinator::from_snapshot(&bytes, Millis(5)).unwrap();
        assert_eq!(restored.global(), driver.coordinator.global());
        assert_eq!(restored.last_round(), Some(RoundId(3)));
        assert_eq!(restored.members().count(), 2);
        // Members get the restart grace on top of the heartbeat timeout to notice the restart
        // and reconnect.
        let outputs = restored.tick(Millis(5 + 2_000));
        assert!(
            !events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::Dead { .. }))
        );
        // Nobody reconnects: after the grace and a full timeout on the new clock both are dead
        // and the open round is abandoned; round ids still only increase.
        let outputs = restored.tick(Millis(5 + RESTART_GRACE_MS + 2_000));
        assert_eq!(
            events(&outputs)
                .iter()
                .filter(|e| matches!(e, Event::Dead { .. }))
                .count(),
            2
        );
        assert_eq!(
            closed(&outputs).map(|c| (c.0, c.1)),
            Some((RoundId(3), false))
        );
        let Err(err) = Coordinator::from_snapshot(&bytes[..bytes.len() - 1], Millis(0)) else {
            panic!("a truncated snapshot was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("empty --state-dir"), "{err}");
    }

    fn pipeline_profile() -> (ModelProfile, u64) {
        let profile = Architecture::preset("4m").unwrap().profile("4m").unwrap();
        let whole = profile.whole_model_bytes();
        (profile, whole)
    }

    /// Every member's assignment, in member order.
    fn assignments(coordinator: &Coordinator) -> Vec<(MemberId, Option<Assignment>)> {
        coordinator
            .members()
            .map(|(id, assignment)| (id, assignment.copied()))
            .collect()
    }

    #[test]
    fn members_that_fit_the_model_are_the_same_replicas_with_planning_on() {
        let tiny = || {
            Architecture::preset("tiny")
                .unwrap()
                .profile("tiny")
                .unwrap()
        };
        // Memory in another order than joins: the planner lists nodes by memory, the replicas
        // must not be. Members 2-4 join during round 1 and are planned together when it closes.
        let memories = [24 << 30, 2 << 30, 1 << 30, 8 << 30];
        let run = |model: Option<ModelProfile>| {
            let mut cfg = config(1);
            cfg.model = model;
            let mut driver = Driver::new(cfg);
            for (conn, memory) in (1..).zip(memories) {
                driver.join(conn, memory);
            }
            let outputs = driver.report(1, RoundId(1), honest_digest(RoundId(1)));
            assert_eq!(opened(&outputs).map(|o| o.1.len()), Some(4));
            driver
        };
        let planned = run(Some(tiny()));
        assert!(
            planned.coordinator.plan().is_some(),
            "the model was planned"
        );
        let expected = assignments(&run(None).coordinator);
        assert_eq!(assignments(&planned.coordinator), expected);
        assert_eq!(expected.len(), memories.len());
        let replicas: BTreeSet<_> = expected
            .iter()
            .map(|(_, a)| {
                let a = a.expect("every member is a replica");
                assert_eq!(a.stage, None, "no stage assignments");
                a.replica
            })
            .collect();
        assert_eq!(replicas.len(), memories.len(), "one replica per member");

        // And over a lossy network with a crash, round for round the same as without a model.
        for seed in 0..3 {
            let mut cfg = config(2);
            cfg.model = Some(tiny());
            let mut with = Sim::new(cfg, 5, LOSSY, seed);
            let mut without = Sim::new(config(2), 5, LOSSY, seed);
            for sim in [&mut with, &mut without] {
                sim.run_until(10_000);
                sim.crash(2);
                sim.run_until(30_000);
            }
            assert!(with.committed_rounds() >= 3, "seed {seed}");
            assert_eq!(with.record.closed, without.record.closed, "seed {seed}");
            assert_eq!(
                assignments(&with.coordinator),
                assignments(&without.coordinator),
                "seed {seed}"
            );
        }
    }

    /// Two members that hold the 4m model only together form a pipeline (round 1); a third,
    /// slow one joins during that round.
    fn pipeline_and_a_slow_joiner() -> (Driver, ModelProfile, [MemberId; 3]) {
        let (profile, whole) = pipeline_profile();
        let mut cfg = config(1);
        cfg.model = Some(profile.clone());
        let mut driver = Driver::new(cfg);
        let (first, _) = driver.join(1, whole);
        let (second, outputs) = driver.join(2, whole);
        assert_eq!(opened(&outputs).map(|o| o.1), Some(vec![first, second]));
        let mut slow = capabilities("peer-3", whole);
        slow.tokens_per_s = 5_000.0;
        let (third, _) = driver.join_with(3, slow);
        (driver, profile, [first, second, third])
    }

    #[test]
    fn a_join_that_gains_less_than_the_rebalance_threshold_leaves_the_pipeline_alone() {
        let (mut driver, profile, [first, second, third]) = pipeline_and_a_slow_joiner();
        let running = driver.coordinator.plan().unwrap().clone();
        assert_eq!(running.replicas.len(), 1);
        assert_eq!(running.replicas[0].stages.len(), 2);
        let before = assignments(&driver.coordinator);

        // The premise: with the joiner a plan from scratch is faster, but not 1.3× faster.
        let (_, whole) = pipeline_profile();
        let nodes: Vec<_> = [(1, 10_000.0), (2, 10_000.0), (3, 5_000.0)]
            .into_iter()
            .map(|(id, tokens_per_s)| {
                let mut caps = capabilities(&format!("peer-{id}"), whole);
                caps.tokens_per_s = tokens_per_s;
                crate::profile::node_from_capabilities(id, &caps, &profile)
            })
            .collect();
        let fresh = crate::planner::plan(&profile, &nodes, 1);
        let gain = fresh.throughput() / running.throughput();
        assert!(
            gain > 1.0 && gain < crate::planner::REBALANCE_GAIN,
            "gain {gain}"
        );
        assert_ne!(fresh.replicas, running.replicas);

        let round = driver.coordinator.open_round().unwrap();
        driver.report(1, round, honest_digest(round));
        let outputs = driver.report(2, round, honest_digest(round));
        assert!(closed(&outputs).is_some(), "round 1 closed");
        // Re-planned with the joiner: the pipeline is kept as it was, the joiner waits.
        assert_eq!(
            driver.coordinator.plan().unwrap().replicas,
            running.replicas
        );
        assert_eq!(driver.coordinator.plan().unwrap().standby, vec![third.0]);
        let after = assignments(&driver.coordinator);
        assert_eq!(after[..2], before[..2]);
        assert_eq!(after[2], (third, None));
        for conn in [1, 2] {
            assert!(
                !messages_to(&outputs, conn)
                    .iter()
                    .any(|m| matches!(m, CoordinatorMessage::Assigned(_))),
                "member on conn {conn} was re-assigned"
            );
        }
        assert_eq!(opened(&outputs).map(|o| o.1), Some(vec![first, second]));
    }

    #[test]
    fn losing_a_stage_node_re_plans_the_pipeline() {
        let (mut driver, _, [first, _second, third]) = pipeline_and_a_slow_joiner();
        let round = driver.coordinator.open_round().unwrap();
        driver.report(1, round, honest_digest(round));
        driver.report(2, round, honest_digest(round));
        let kept = driver.coordinator.plan().unwrap().clone();
        assert_eq!(kept.standby, vec![third.0]);

        // Round 2 runs on the pipeline; its second stage leaves, and the round ends with the
        // first stage's report: re-planning waits for no round.
        let round = driver.coordinator.open_round().unwrap();
        let mut outputs = driver.leave(2, "stage node going away");
        assert_eq!(
            driver.coordinator.plan().unwrap(),
            &kept,
            "not in the middle of a round"
        );
        outputs.extend(driver.report(1, round, honest_digest(round)));
        assert!(closed(&outputs).is_some(), "round {round} closed");
        let plan = driver.coordinator.plan().unwrap();
        assert_eq!(plan.replicas.len(), 1);
        let nodes: Vec<u64> = plan.replicas[0].stages.iter().map(|s| s.node).collect();
        assert_eq!(
            nodes.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([first.0, third.0])
        );
        assert!(plan.standby.is_empty());
        // Both hear their new stage: the first its changed layers, the joiner its first work.
        for conn in [1, 3] {
            let stage = messages_to(&outputs, conn)
                .into_iter()
                .find_map(|m| match m {
                    CoordinatorMessage::Assigned(a) => a.assignment.and_then(|a| a.stage),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("conn {conn} heard no stage"));
            assert_eq!(stage.stages, 2);
        }
        assert_ne!(plan.replicas, kept.replicas);
    }

    /// Commits `round` with a report from each of `conns` and makes its checkpoint durable
    /// (each writer sends its shard).
    fn commit_and_checkpoint(driver: &mut Driver, conns: &[u64], round: RoundId) {
        let digest = honest_digest(round);
        let mut outputs = Vec::new();
        for conn in conns {
            outputs.extend(driver.report(*conn, round, digest));
        }
        let request = messages_to(&outputs, conns[0])
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::RoundClosed(c) => c.checkpoint.clone(),
                _ => None,
            })
            .expect("checkpoint requested");
        let conn_of: BTreeMap<MemberId, u64> = driver
            .coordinator
            .members()
            .map(|(id, _)| id)
            .zip(1..)
            .collect();
        for writer in &request.writers {
            driver.send(
                conn_of[&writer.member],
                NodeMessage::CheckpointShardDurable(CheckpointShardDurable {
                    round,
                    shard: writer.shard,
                    tensor_hashes: vec![TensorHash {
                        key: TensorKey::Param("w".to_string()),
                        digest,
                    }],
                }),
            );
        }
        assert_eq!(driver.coordinator.last_checkpoint(), Some(round));
    }

    /// The only node holding a pipeline's second stage leaves after round 2 committed: no live
    /// member holds those layers of version 2, so the run goes back to the checkpoint of round
    /// 1, and its stage-0 node is told to start from there.
    #[test]
    fn a_stage_no_live_member_holds_rolls_the_run_back_to_its_last_checkpoint() {
        let (profile, whole) = pipeline_profile();
        let layers = profile.layers.len();
        let mut cfg = config(1);
        cfg.model = Some(profile);
        cfg.checkpoint_every_rounds = 2;
        let mut driver = Driver::new(cfg.clone());
        let (first, _) = driver.join(1, whole);
        driver.join(2, whole);
        assert!(
            driver
                .coordinator
                .members()
                .all(|(_, a)| a.unwrap().stage.is_some())
        );
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        commit_and_checkpoint(&mut driver, &[1, 2], RoundId(2));
        let checkpointed = driver.coordinator.global().clone();
        assert_eq!(checkpointed.version, 2);
        driver.report(1, RoundId(3), honest_digest(RoundId(3)));
        driver.report(2, RoundId(3), honest_digest(RoundId(3)));
        assert_eq!(driver.coordinator.global().version, 3);
        let stage = driver
            .coordinator
            .members()
            .find_map(|(id, a)| (id == first).then(|| a.unwrap().stage.unwrap()))
            .unwrap();
        // Round 4 fails without its second stage; the run goes back once it is closed.
        let mut outputs = driver.leave(2, "stage node going away");
        assert_eq!(
            driver.coordinator.global().version,
            3,
            "not in the middle of a round"
        );
        outputs.extend(driver.report(1, RoundId(4), honest_digest(RoundId(4))));
        assert_eq!(driver.coordinator.global(), &checkpointed);
        let warning = events(&outputs)
            .into_iter()
            .find_map(|e| match e {
                Event::Warning { message } if message.contains("continues from") => {
                    Some(message.clone())
                }
                _ => None,
            })
            .expect("a warning names the loss");
        assert!(
            warning.starts_with(&format!(
                "no live member holds layers {}..{layers} of global version 3",
                stage.layers.end
            )),
            "{warning}"
        );
        assert!(
            warning.contains("continues from the checkpoint of round 2 (global version 2)"),
            "{warning}"
        );
        // The survivor hears the rolled-back version with the next round.
        let (joined, outputs) = driver.join(3, whole);
        let open = messages_to(&outputs, 1)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::RoundOpened(open) => Some(open.clone()),
                _ => None,
            })
            .expect("a round opens with the new member");
        assert_eq!(open.global_version, 2);
        let members: BTreeSet<MemberId> = open.participants.iter().map(|p| p.member).collect();
        assert_eq!(members, BTreeSet::from([first, joined]));

        // Without a checkpoint the run goes back to version 0, whose hashes the survivor
        // checks the parameters it draws again against.
        cfg.checkpoint_every_rounds = 0;
        let mut driver = Driver::new(cfg);
        driver.join(1, whole);
        driver.join(2, whole);
        let initial = vec![TensorHash {
            key: TensorKey::Param("w".to_string()),
            digest: Digest([7; 32]),
        }];
        driver.send(
            1,
            NodeMessage::InitialState(InitialState {
                tensor_hashes: initial.clone(),
            }),
        );
        driver.report(1, RoundId(1), honest_digest(RoundId(1)));
        driver.report(2, RoundId(1), honest_digest(RoundId(1)));
        assert_eq!(driver.coordinator.global().version, 1);
        let mut outputs = driver.leave(2, "stage node going away");
        outputs.extend(driver.report(1, RoundId(2), honest_digest(RoundId(2))));
        assert_eq!(driver.coordinator.global().version, 0);
        assert_eq!(driver.coordinator.global().tensor_hashes, initial);
        assert!(events(&outputs).iter().any(|e| matches!(
            e,
            Event::Warning { message } if message.contains("the run restarts from its initial state")
        )));
    }

    /// Two pipelines; one loses its second stage: the other pipeline's node of that stage still
    /// holds it, so the run keeps its version (the lost stage's new owner fetches it).
    #[test]
    fn a_stage_that_another_pipeline_holds_is_not_rolled_back() {
        let (profile, whole) = pipeline_profile();
        let mut cfg = config(2);
        cfg.model = Some(profile);
        cfg.checkpoint_every_rounds = 1;
        let mut driver = Driver::new(cfg);
        for conn in 1..=4 {
            driver.join(conn, whole);
        }
        let plan = driver.coordinator.plan().unwrap();
        assert_eq!(plan.replicas.len(), 2);
        assert!(plan.replicas.iter().all(|r| r.stages.len() == 2));
        let round = driver.coordinator.open_round().unwrap();
        commit_and_checkpoint(&mut driver, &[1, 2, 3, 4], round);
        let next = driver.coordinator.open_round().unwrap();
        for conn in 1..=4 {
            driver.report(conn, next, honest_digest(next));
        }
        let global = driver.coordinator.global().clone();
        assert_eq!(global.version, 2);
        let last_stage = driver
            .coordinator
            .members()
            .zip(1..)
            .find(|((_, a), _)| a.unwrap().stage.unwrap().stage == 1)
            .map(|(_, conn)| conn)
            .unwrap();
        let outputs = driver.leave(last_stage, "stage node going away");
        assert_eq!(driver.coordinator.global(), &global);
        assert!(
            !events(&outputs).iter().any(
                |e| matches!(e, Event::Warning { message } if message.contains("continues from"))
            ),
            "{outputs:?}"
        );
    }

    #[test]
    fn pipeline_checkpoint_commits_only_when_every_shard_is_durable() {
        let (profile, whole) = pipeline_profile();
        let mut cfg = config(1);
        cfg.model = Some(profile);
        cfg.checkpoint_every_rounds = 1;
        let mut driver = Driver::new(cfg);
        // Devices just big enough for the whole model before headroom: neither node fits it alone.
        let (first, _) = driver.join(1, whole);
        let (second, outputs) = driver.join(2, whole);
        let (round, participants) = opened(&outputs).expect("a pipeline replica formed");
        assert_eq!(participants, vec![first, second]);
        let assignments: BTreeMap<MemberId, _> = driver
            .coordinator
            .members()
            .map(|(id, a)| (id, *a.unwrap()))
            .collect();
        assert_eq!(assignments[&first].replica, assignments[&second].replica);
        let stages: Vec<_> = assignments.values().map(|a| a.stage.unwrap()).collect();
        assert_eq!(
            stages[0].layers.end, stages[1].layers.start,
            "contiguous layers"
        );
        // Each stage reports the hashes of its own tensors.
        let report = |digest: Digest, name: &str| {
            NodeMessage::RoundReport(RoundReport {
                round,
                tokens_processed: 10,
                us_per_step: 0,
                consumed: vec![],
                outer_step: OuterStep::Ok {
                    params_hash: digest,
                    tensor_hashes: vec![TensorHash {
                        key: TensorKey::Param(name.to_string()),
                        digest,
                    }],
                },
            })
        };
        let digest_a = Digest([1; 32]);
        let digest_b = Digest([2; 32]);
        driver.send(1, report(digest_a, "stage0.w"));
        let outputs = driver.send(2, report(digest_b, "stage1.w"));
        assert_eq!(closed(&outputs).map(|c| c.1), Some(true));
        // The committed state lists both stages' tensors; the stages' parameter hashes were
        // voted on too, but are no tensors of it.
        let committed: Vec<TensorKey> = messages_to(&outputs, 1)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::RoundClosed(closed) => match &closed.outcome {
                    RoundOutcome::Committed { tensor_hashes, .. } => {
                        Some(tensor_hashes.iter().map(|t| t.key.clone()).collect())
                    }
                    RoundOutcome::Abandoned { .. } => None,
                },
                _ => None,
            })
            .expect("round committed");
        assert_eq!(
            committed,
            [
                TensorKey::Param("stage0.w".into()),
                TensorKey::Param("stage1.w".into())
            ]
        );
        let request = messages_to(&outputs, 1)
            .into_iter()
            .find_map(|m| match m {
                CoordinatorMessage::RoundClosed(c) => c.checkpoint.clone(),
                _ => None,
            })
            .expect("checkpoint requested");
        assert_eq!(request.shards, 2);
        let durable = |shard: u32, name: &str, digest: Digest| {
            NodeMessage::CheckpointShardDurable(CheckpointShardDurable {
                round,
                shard,
                tensor_hashes: vec![TensorHash {
                    key: TensorKey::Param(name.to_string()),
                    digest,
                }],
            })
        };
        let shard_of = |member: MemberId| {
            request
                .writers
                .iter()
                .find(|w| w.member == member)
                .unwrap()
                .shard
        };
        let outputs = driver.send(1, durable(shard_of(first), "stage0.w", digest_a));
        assert!(
            !events(&outputs)
                .iter()
                .any(|e| matches!(e, Event::CheckpointCommitted { .. }))
        );
        assert_eq!(driver.coordinator.last_checkpoint(), None);
        // The wrong member, then the right member with a wrong hash: both refused.
        let outputs = driver.send(1, durable(shard_of(second), "stage1.w", digest_b));
        assert_eq!(
            error_codes(&outputs, 1),
            vec![ErrorCode::CheckpointMismatch]
        );
        let outputs = driver.send(2, durable(shard_of(second), "stage1.w", digest_a));
        assert_eq!(
            error_codes(&outputs, 2),
            vec![ErrorCode::CheckpointMismatch]
        );
        assert_eq!(driver.coordinator.last_checkpoint(), None);
        let outputs = driver.send(2, durable(shard_of(second), "stage1.w", digest_b));
        assert!(events(&outputs).contains(&&Event::CheckpointCommitted { round }));
        assert_eq!(driver.coordinator.last_checkpoint(), Some(round));
    }

    #[test]
    fn invalid_config_is_refused_with_the_reason() {
        let mut cfg = config(3);
        cfg.data_shards = 2;
        let err = Coordinator::new(cfg).unwrap_err().to_string();
        assert!(err.contains("data_shards (2)"), "{err}");
        let mut cfg = config(1);
        cfg.heartbeat_timeout_ms = cfg.heartbeat_interval_ms;
        assert!(Coordinator::new(cfg).is_err());
    }
}
