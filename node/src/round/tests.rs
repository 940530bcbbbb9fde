//! The node's round state machine driven through the situations the integration tests cover
//! with real processes: a round end to end, a late joiner, a failed fetch, an abandoned round, a
//! coordinator restart that announces the open round again, standby, SIGTERM mid-round, a member
//! dead during the all-reduce, checkpoint shards, a replaced member, the budget's end.

use super::*;
use forge_protocol::messages::{
    Assigned, CheckpointRequest, DataShard, GlobalState, PeersChanged, ReplicaId, ShardWriter,
};
use std::time::Duration;

/// The outer step stands in as the round it was proposed in.
type Node = Rounds<u64>;

const ME: MemberId = MemberId(1);

/// The run's plan as the coordinator announces it: 20 rounds, the config's schedule.
const PLAN: RunPlan = RunPlan {
    final_version: 20,
    anneal_from: None,
};

fn config() -> RoundsConfig {
    RoundsConfig {
        final_version: 20,
        eval_every_rounds: 2,
        numel: 1000,
        initial_hashes: hashes(0),
        stage: None,
    }
}

/// Per-tensor hashes standing for one version 0 (`seed` tells versions drawn differently apart).
fn hashes(seed: u8) -> Vec<TensorHash> {
    ["embed", "head"]
        .iter()
        .map(|name| TensorHash {
            key: forge_protocol::messages::TensorKey::Param(name.to_string()),
            digest: Digest([seed; 32]),
        })
        .collect()
}

fn assignment(shard: u32, count: u32) -> Assignment {
    Assignment {
        replica: ReplicaId(u64::from(shard)),
        data_shard: DataShard {
            index: shard,
            count,
        },
        stage: None,
    }
}

fn peer(member: u64) -> Peer {
    Peer {
        member: MemberId(member),
        assignment: assignment(member as u32 - 1, 3),
        peer_id: format!("peer-{member}"),
        listen_addrs: vec![],
    }
}

fn accepted(member: MemberId, shard: Option<u32>) -> JoinAccepted {
    JoinAccepted {
        member,
        assignment: shard.map(|s| assignment(s, 3)),
        run_config: String::new(),
        sync_peers: vec![peer(2), peer(3)],
        global: GlobalState::default(),
        heartbeat_interval_ms: 500,
        heartbeat_timeout_ms: 2000,
        plan: PLAN,
    }
}

/// Round `round` from `version` among `members`, unpaced, with no hashes.
fn open(round: u64, version: u64, members: &[u64]) -> RoundOpened {
    RoundOpened {
        round: RoundId(round),
        participants: members.iter().map(|&m| peer(m)).collect(),
        deadline_ms: 60_000,
        global_version: version,
        tensor_hashes: vec![],
        pace_us_per_step: None,
        slowest_us_per_step: None,
        data: vec![],
        plan: PLAN,
    }
}

fn opened(round: u64, version: u64, members: &[u64]) -> Notification {
    Notification::Message(CoordinatorMessage::RoundOpened(open(
        round, version, members,
    )))
}

fn closed(
    round: u64,
    outcome: RoundOutcome,
    included: &[u64],
    writer: Option<u64>,
) -> Notification {
    Notification::Message(CoordinatorMessage::RoundClosed(RoundClosed {
        round: RoundId(round),
        outcome,
        included: included.iter().map(|&m| MemberId(m)).collect(),
        checkpoint: writer.map(|member| CheckpointRequest {
            shards: 1,
            writers: vec![ShardWriter {
                shard: 0,
                member: MemberId(member),
            }],
        }),
        plan: PLAN,
    }))
}

fn committed(version: u64) -> RoundOutcome {
    RoundOutcome::Committed {
        version,
        tensor_hashes: vec![],
    }
}

fn dead(member: u64, left: bool) -> Notification {
    Notification::Message(CoordinatorMessage::MemberDead(MemberDead {
        member: MemberId(member),
        reason: "no heartbeat for 2000 ms".into(),
        expelled: false,
        left,
    }))
}

fn trained(step: u64) -> Input<u64> {
    Input::Trained(Ok(Trained {
        steps: 25,
        tokens: 25 * 2048,
        mean_loss: 3.5,
        lr: Some(1e-3),
        seconds: 2.0,
        step,
        consumed: vec![],
    }))
}

fn reduced(round: u64) -> Input<u64> {
    Input::Reduced(Ok(Reduced {
        proposal: round,
        params_hash: [round as u8; 32],
        tensor_hashes: vec![],
        bytes_sent: 1000,
        bytes_received: 1000,
        total_weight: 3.0 * 25.0 * 2048.0,
        sync_s: 0.5,
        outer_lr: 1.0,
    }))
}

/// Short names of actions, so a test reads as the sequence the shell carries out.
fn names(actions: &[Action<u64>]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Say(line) => format!("say {line}"),
            Action::SetMembers(peers) => format!(
                "members {:?}",
                peers.iter().map(|p| p.member.0).collect::<Vec<_>>()
            ),
            Action::FollowShard { index, count } => format!("shard {index}/{count}"),
            Action::FetchState(open) => format!("fetch v{}", open.global_version),
            Action::Train { round, .. } => format!("train {}", round.0),
            Action::AllReduce { round, .. } => format!("all-reduce {}", round.0),
            Action::AbortAllReduce { peer, .. } => {
                format!("abort {}", peer.as_deref().unwrap_or("(no peer)"))
            }
            Action::Report(report) => match &report.outer_step {
                OuterStep::Ok { .. } => format!("report {} ok", report.round.0),
                OuterStep::Failed { .. } => format!("report {} failed", report.round.0),
            },
            Action::ApplyOuterStep(round) => format!("apply {round}"),
            Action::Restage(stage) => format!("restage {stage:?}"),
            Action::Evaluate => "evaluate".into(),
            Action::PublishState { version, round } => format!("publish v{version} r{round}"),
            Action::WriteCheckpoint { round, shard, .. } => {
                format!("checkpoint {} shard {shard}", round.0)
            }
            Action::ShardDurable(d) => format!("durable {} shard {}", d.round.0, d.shard),
            Action::ShardFailed(f) => {
                format!("failed {} shard {}: {}", f.round.0, f.shard, f.reason)
            }
            Action::Record(log) => format!("record {}: {}", log.round, log.outcome),
            Action::Exit(exit) => format!("exit {exit:?}"),
        })
        .collect()
}

/// A node that holds version 0, reads shard 0 and is idle.
fn node(t0: Instant) -> Node {
    let mut node = Node::new(config(), &accepted(ME, Some(0)), t0);
    assert_eq!(node.shard(), Some((0, 3)));
    let resumed = Input::Resumed {
        held: Some(0),
        step: 0,
    };
    assert!(node.handle(t0, resumed).is_empty());
    node
}

fn note(node: &mut Node, now: Instant, n: Notification) -> Vec<String> {
    names(&node.handle(now, Input::Note(n)))
}

fn input(node: &mut Node, now: Instant, i: Input<u64>) -> Vec<String> {
    names(&node.handle(now, i))
}

/// Plays round `round` from `version` among members 1..=3 up to its report.
fn play(node: &mut Node, now: Instant, round: u64, version: u64, step: u64) {
    let actions = note(node, now, opened(round, version, &[1, 2, 3]));
    assert_eq!(actions.last().unwrap(), &format!("train {round}"));
    assert_eq!(
        input(node, now, trained(step)),
        [format!("all-reduce {round}")]
    );
    let actions = input(node, now, reduced(round));
    assert_eq!(actions.last().unwrap(), &format!("report {round} ok"));
}

/// Version 0 announced by another node with other numbers (another libtorch build): this node
/// fetches it before training, and trains from it afterwards without fetching again; the same
/// hashes as its own change nothing.
#[test]
fn a_node_whose_version_0_differs_fetches_the_runs() {
    let t0 = Instant::now();
    let with = |round: u64, hashes: Vec<TensorHash>| {
        Notification::Message(CoordinatorMessage::RoundOpened(RoundOpened {
            tensor_hashes: hashes,
            ..open(round, 0, &[1, 2, 3])
        }))
    };
    let mut same = node(t0);
    assert_eq!(
        note(&mut same, t0, with(1, hashes(0))),
        ["members [1, 2, 3]", "train 1"]
    );

    let mut n = node(t0);
    let actions = note(&mut n, t0, with(1, hashes(7)));
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert!(
        actions[1].contains("version 0 is not this node's"),
        "{actions:?}"
    );
    assert_eq!(actions[2], "fetch v0");
    let fetched = Input::StateFetched(Ok(Fetched {
        step: 0,
        made_by_round: 0,
        seconds: 0.1,
    }));
    assert_eq!(input(&mut n, t0, fetched), ["publish v0 r0", "train 1"]);
    // The round is abandoned; the next one starts from the same version 0, now held.
    assert_eq!(input(&mut n, t0, trained(25)), ["all-reduce 1"]);
    input(&mut n, t0, reduced(1));
    let abandoned = RoundOutcome::Abandoned {
        reason: "no quorum".into(),
    };
    note(&mut n, t0, closed(1, abandoned, &[], None));
    assert_eq!(
        note(&mut n, t0, with(2, hashes(7))),
        ["members [1, 2, 3]", "train 2"]
    );
}

#[test]
fn a_round_end_to_end() {
    let t0 = Instant::now();
    let mut n = node(t0);
    assert_eq!(
        note(&mut n, t0, opened(1, 0, &[1, 2, 3])),
        ["members [1, 2, 3]", "train 1"]
    );
    assert_eq!(input(&mut n, t0, trained(25)), ["all-reduce 1"]);
    let later = t0 + Duration::from_millis(3500);
    assert_eq!(
        input(&mut n, later, reduced(1)),
        [
            "say first contribution (round 1) 3.5 s after joining",
            "report 1 ok"
        ]
    );
    let actions = n.handle(t0, Input::Note(closed(1, committed(1), &[1, 2, 3], None)));
    assert_eq!(
        names(&actions),
        [
            "apply 1",
            "publish v1 r1",
            "record 1: committed v1 010101010101"
        ]
    );
    let Action::Record(log) = &actions[2] else {
        unreachable!()
    };
    assert_eq!((log.members, log.step, log.inner_steps), (3, 25, 25));
    assert_eq!(log.fp32_bytes, 5333, "2(K-1)/K x 4 x 1000");
    assert_eq!(
        (log.sync_s, log.bytes_sent, log.eval_loss),
        (0.5, 1000, None)
    );
    assert_eq!(n.held(), Some(1));

    // The second round is evaluated (every 2 rounds), and the first contribution is not
    // announced again.
    play(&mut n, t0, 2, 1, 50);
    assert_eq!(
        note(&mut n, t0, closed(2, committed(2), &[1, 2, 3], None)),
        ["apply 2", "evaluate"]
    );
    let actions = n.handle(
        t0,
        Input::Evaluated {
            loss: 3.25,
            bpb: 1.5,
        },
    );
    assert_eq!(
        names(&actions),
        ["publish v2 r2", "record 2: committed v2 020202020202"]
    );
    let Action::Record(log) = &actions[1] else {
        unreachable!()
    };
    assert_eq!((log.eval_loss, log.eval_bpb), (Some(3.25), Some(1.5)));
    assert!(
        log.line().contains("val 3.2500 (1.500 bpb)"),
        "{}",
        log.line()
    );
}

#[test]
fn a_late_joiner_fetches_the_state_first_and_retries_a_failed_fetch() {
    let t0 = Instant::now();
    // Joined while the run is at version 7, with nothing local to resume from.
    let mut n = Node::new(config(), &accepted(ME, Some(0)), t0);
    let resumed = Input::Resumed {
        held: None,
        step: 0,
    };
    assert!(n.handle(t0, resumed).is_empty());
    assert_eq!(
        note(&mut n, t0, opened(8, 7, &[1, 2, 3])),
        ["members [1, 2, 3]", "fetch v7"]
    );
    assert_eq!(
        input(
            &mut n,
            t0,
            Input::StateFetched(Err("no peer answered".into()))
        ),
        [
            "say round 8: could not fetch global state v7: no peer answered",
            "report 8 failed"
        ]
    );
    assert_eq!(n.held(), None);
    // The next round tries again, and continues at the step the state belongs to.
    assert_eq!(
        note(&mut n, t0, opened(9, 7, &[1, 2, 3])),
        ["members [1, 2, 3]", "fetch v7"]
    );
    let fetched = Fetched {
        step: 50,
        made_by_round: 7,
        seconds: 0.25,
    };
    assert_eq!(
        input(&mut n, t0, Input::StateFetched(Ok(fetched))),
        ["publish v7 r7", "train 9"]
    );
    assert_eq!(n.held(), Some(7));
    assert_eq!(input(&mut n, t0, trained(75)), ["all-reduce 9"]);
    input(&mut n, t0, reduced(9));
    let actions = n.handle(t0, Input::Note(closed(9, committed(8), &[1, 2, 3], None)));
    let Some(Action::Record(log)) = actions.last() else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!(log.state_fetch_s, Some(0.25));
}

#[test]
fn an_abandoned_round_keeps_the_held_version() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    let abandoned = RoundOutcome::Abandoned {
        reason: "no quorum".into(),
    };
    assert_eq!(
        note(&mut n, t0, closed(1, abandoned, &[], None)),
        ["record 1: abandoned: no quorum"]
    );
    assert_eq!(n.held(), Some(0));
    // The next round starts from version 0 again: no fetch.
    assert_eq!(
        note(&mut n, t0, opened(2, 0, &[1, 2, 3])),
        ["members [1, 2, 3]", "train 2"]
    );
}

/// Version 1 committed, then the run went back to version 0 (a whole stage was lost before any
/// checkpoint): the node says so and takes the older version (from its own shard or seed, see
/// the shell) before training; a later fetch is an ordinary one.
#[test]
fn a_run_that_went_back_to_an_older_version_is_fetched_as_such() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], None));
    assert_eq!(n.held(), Some(1));
    assert!(!n.went_back());
    let actions = note(&mut n, t0, opened(2, 0, &[1, 2, 3]));
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert!(
        actions[1].contains("the run went back from global version 1 to 0"),
        "{actions:?}"
    );
    assert_eq!(actions[2], "fetch v0");
    assert!(n.went_back());
    let fetched = Input::StateFetched(Ok(Fetched {
        step: 0,
        made_by_round: 0,
        seconds: 0.1,
    }));
    assert_eq!(input(&mut n, t0, fetched), ["publish v0 r0", "train 2"]);
    assert_eq!(n.held(), Some(0));
    // Round 2 commits without this node: the next fetch goes forward.
    input(&mut n, t0, trained(25));
    input(&mut n, t0, reduced(2));
    let actions = note(&mut n, t0, closed(2, committed(1), &[2, 3], None));
    assert_eq!(actions, ["evaluate"]);
    let evaluated = Input::Evaluated {
        loss: 4.0,
        bpb: 1.0,
    };
    input(&mut n, t0, evaluated);
    let actions = note(&mut n, t0, opened(3, 1, &[1, 2, 3]));
    assert_eq!(actions.last().unwrap(), "fetch v1");
    assert!(!n.went_back());
}

#[test]
fn a_round_announced_again_after_a_coordinator_restart_is_not_played_twice() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 4, 0, 25);
    assert_eq!(
        note(
            &mut n,
            t0,
            Notification::Disconnected {
                reason: "timed out".into()
            }
        ),
        ["say coordinator connection lost (timed out); reconnecting"]
    );
    assert_eq!(
        note(
            &mut n,
            t0,
            Notification::Rejoined {
                accepted: accepted(ME, Some(0)),
                kept_member: true
            }
        ),
        ["say reconnected to the coordinator (same member: true)"]
    );
    assert!(note(&mut n, t0, opened(4, 0, &[1, 2, 3])).is_empty());
    // The report was resent by the client; the outcome still applies.
    assert_eq!(
        note(&mut n, t0, closed(4, committed(1), &[1, 2, 3], None)),
        [
            "apply 4",
            "publish v1 r4",
            "record 4: committed v1 040404040404"
        ]
    );
}

#[test]
fn a_missed_outcome_drops_the_outer_step_and_fetches_what_the_others_committed() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    assert_eq!(
        note(&mut n, t0, opened(2, 1, &[1, 2, 3])),
        [
            "say round 1: no outcome heard; its outer step is dropped",
            "members [1, 2, 3]",
            "fetch v1"
        ]
    );
}

#[test]
fn outvoted_or_left_out_nodes_fetch_the_committed_state_next_round() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    assert_eq!(
        note(&mut n, t0, closed(1, committed(1), &[2, 3], None)),
        [
            "record 1: committed v1 without this node (its hash 010101010101 disagreed); \
             fetching the committed state next round"
        ]
    );
    assert_eq!(n.held(), None);
    assert_eq!(note(&mut n, t0, opened(2, 1, &[1, 2, 3]))[1], "fetch v1");
}

#[test]
fn standby_and_back() {
    let t0 = Instant::now();
    let mut n = node(t0);
    let benched = Notification::Message(CoordinatorMessage::Assigned(Assigned {
        assignment: None,
        sync_peers: vec![peer(2)],
    }));
    assert_eq!(
        note(&mut n, t0, benched.clone()),
        [
            "say on standby: the coordinator left this node out of its plan",
            "members [2]"
        ]
    );
    // Said once.
    assert_eq!(note(&mut n, t0, benched), ["members [2]"]);
    let back = Notification::Message(CoordinatorMessage::Assigned(Assigned {
        assignment: Some(assignment(2, 3)),
        sync_peers: vec![peer(2), peer(3)],
    }));
    assert_eq!(note(&mut n, t0, back), ["shard 2/3", "members [2, 3]"]);
}

/// A node the plan gives other layers than its trainer holds (here: a stage, to a node holding
/// the whole model) rebuilds its trainer for them, as a planned member and as a fresh joiner
/// after a reconnect; it then holds version 0 of its layers, and a later version not at all.
#[test]
fn an_assignment_to_other_layers_rebuilds_the_trainer() {
    let stage = forge_protocol::messages::StageAssignment {
        stage: 1,
        stages: 2,
        layers: forge_protocol::LayerRange { start: 3, end: 6 },
    };
    let staged = Assignment {
        stage: Some(stage),
        ..assignment(4, 1)
    };
    let t0 = Instant::now();
    let mut n = node(t0);
    let moved = Notification::Message(CoordinatorMessage::Assigned(Assigned {
        assignment: Some(staged),
        sync_peers: vec![peer(2)],
    }));
    let actions = n.handle(t0, Input::Note(moved.clone()));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Restage(Some(s)) if *s == stage)),
        "{:?}",
        names(&actions)
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Say(line) if line.contains("stage 2 of 2 (layers 3..6) of replica 4")
    )));
    // Said again, the same layers: nothing to rebuild.
    let again = n.handle(t0, Input::Note(moved));
    assert!(!again.iter().any(|a| matches!(a, Action::Restage(_))));
    let stage_hashes = hashes(0)[..1].to_vec();
    n.handle(
        t0,
        Input::Restaged {
            initial_hashes: stage_hashes.clone(),
            numel: 10,
        },
    );
    assert_eq!(n.initial_hashes(), stage_hashes.as_slice());
    assert_eq!(n.held(), Some(0), "version 0 of its layers");
    assert_eq!(
        n.held_of(&hashes(0)),
        stage_hashes,
        "only its tensors count"
    );

    let mut n = node(t0);
    let mut fresh = accepted(MemberId(9), None);
    fresh.assignment = Some(staged);
    let rejoined = Notification::Rejoined {
        accepted: fresh,
        kept_member: false,
    };
    let actions = n.handle(t0, Input::Note(rejoined));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Restage(Some(_)))),
        "{:?}",
        names(&actions)
    );
}

/// Sync peers change by deltas: added (or replaced by member id) and removed.
#[test]
fn peer_changes_update_the_allowlist() {
    let t0 = Instant::now();
    // Sync peers 2 and 3 from the join.
    let mut n = node(t0);
    let changed = |added: Vec<Peer>, removed: Vec<u64>| {
        Notification::Message(CoordinatorMessage::PeersChanged(PeersChanged {
            added,
            removed: removed.into_iter().map(MemberId).collect(),
        }))
    };
    assert_eq!(
        note(&mut n, t0, changed(vec![peer(4)], vec![])),
        ["members [2, 3, 4]"]
    );
    assert_eq!(
        note(&mut n, t0, changed(vec![peer(3)], vec![2])),
        ["members [4, 3]"]
    );
}

#[test]
fn sigterm_mid_round_finishes_the_round_then_leaves() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    // Stopped while training: the inner steps stop (the shell's flag); the round is still
    // contributed so the peers do not wait for this node.
    assert!(input(&mut n, t0, stop(vec![])).is_empty());
    assert_eq!(input(&mut n, t0, trained(10)), ["all-reduce 1"]);
    assert_eq!(
        input(&mut n, t0, reduced(1)),
        [
            "say first contribution (round 1) 0.0 s after joining",
            "report 1 ok",
            "exit Leave(\"stopped by signal\")"
        ]
    );
    // Nothing after the exit.
    assert!(note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], None)).is_empty());
}

#[test]
fn sigterm_while_idle_leaves_at_once_unless_a_round_was_announced() {
    let t0 = Instant::now();
    let mut n = node(t0);
    assert_eq!(
        input(&mut n, t0, stop(vec![])),
        ["exit Leave(\"stopped by signal\")"]
    );

    // A round announced while the node was busy with the previous one is played first.
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    input(&mut n, t0, trained(25));
    assert!(note(&mut n, t0, opened(2, 0, &[1, 2, 3])).is_empty());
    assert!(input(&mut n, t0, stop(vec![])).is_empty());
    assert_eq!(
        input(&mut n, t0, reduced(1)),
        [
            "say first contribution (round 1) 0.0 s after joining",
            "report 1 ok",
            "say round 1: no outcome heard; its outer step is dropped",
            "members [1, 2, 3]",
            "train 2"
        ]
    );
    input(&mut n, t0, trained(26));
    let actions = input(&mut n, t0, reduced(2));
    assert_eq!(actions.last().unwrap(), "exit Leave(\"stopped by signal\")");
}

#[test]
fn a_participant_dead_during_the_all_reduce_aborts_it() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    input(&mut n, t0, trained(25));
    // Member 4 is not in the round, and member 2 left cleanly: no reason to give up.
    assert!(note(&mut n, t0, dead(4, false)).is_empty());
    assert!(note(&mut n, t0, dead(2, true)).is_empty());
    let actions = n.handle(t0, Input::Note(dead(3, false)));
    assert_eq!(names(&actions), ["abort peer-3"]);
    let failure = ReduceFailure {
        reason: "peer peer-3 failed: the coordinator declared it gone".into(),
        peer: Some("peer-3".into()),
        rejected: false,
        sync_s: 0.1,
    };
    let actions = n.handle(t0, Input::Reduced(Err(failure)));
    assert_eq!(
        names(&actions),
        [
            "say round 1: all-reduce failed: peer peer-3 failed: the coordinator declared it gone",
            "report 1 failed",
            // The notes that waited, in order.
            "say member 4 is gone: no heartbeat for 2000 ms",
            "say member 2 is gone: no heartbeat for 2000 ms",
            "say member 3 is gone: no heartbeat for 2000 ms"
        ]
    );
    let Action::Report(RoundReport {
        outer_step:
            OuterStep::Failed {
                reason,
                rejected,
                unreachable,
            },
        ..
    }) = &actions[1]
    else {
        unreachable!()
    };
    assert!(reason.ends_with("[blamed peer: peer-3]"), "{reason}");
    assert_eq!((*rejected, *unreachable), (None, Some(MemberId(3))));
    // The round closes without this node; it fetches next time.
    assert_eq!(
        note(&mut n, t0, closed(1, committed(1), &[1, 2], None)),
        ["record 1: committed v1 without this node"]
    );
    assert_eq!(n.held(), None);
}

#[test]
fn a_participant_dead_while_training_skips_the_all_reduce() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    assert!(note(&mut n, t0, dead(2, false)).is_empty());
    assert_eq!(input(&mut n, t0, trained(25)), ["abort peer-2"]);
}

#[test]
fn a_rejected_contribution_names_the_member() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    input(&mut n, t0, trained(25));
    let failure = ReduceFailure {
        reason: "rejected".into(),
        peer: Some("peer-2".into()),
        rejected: true,
        sync_s: 0.1,
    };
    let actions = n.handle(t0, Input::Reduced(Err(failure)));
    let Some(Action::Report(RoundReport {
        outer_step:
            OuterStep::Failed {
                rejected,
                unreachable,
                ..
            },
        ..
    })) = actions.last()
    else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!((*rejected, *unreachable), (Some(MemberId(2)), None));
}

/// The shard is written in the background: the round is recorded and the next one trains while
/// it is written, and the write's outcome is reported when it comes.
#[test]
fn the_writer_writes_its_checkpoint_shard_and_reports_it_durable() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    assert_eq!(
        note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], Some(1))),
        [
            "apply 1",
            "publish v1 r1",
            "checkpoint 1 shard 0",
            "record 1: committed v1 010101010101"
        ]
    );
    let actions = note(&mut n, t0, opened(2, 1, &[1, 2, 3]));
    assert_eq!(actions.last().unwrap(), "train 2");
    assert_eq!(
        input(
            &mut n,
            t0,
            Input::CheckpointWritten(Ok("ckpt/step-25".into()))
        ),
        [
            "say round 1: checkpoint shard 0 written to ckpt/step-25",
            "durable 1 shard 0",
        ]
    );
    assert_eq!(input(&mut n, t0, trained(50)), ["all-reduce 2"]);
    let actions = input(&mut n, t0, reduced(2));
    assert_eq!(actions.last().unwrap(), "report 2 ok");
    assert_eq!(
        note(&mut n, t0, closed(2, committed(2), &[1, 2, 3], None)),
        ["apply 2", "evaluate"]
    );
    let evaluated = Input::Evaluated {
        loss: 3.0,
        bpb: 1.0,
    };
    assert_eq!(
        input(&mut n, t0, evaluated),
        ["publish v2 r2", "record 2: committed v2 020202020202"]
    );
    // A failed write is said and reported failed (the coordinator asks another replica next
    // time); nothing is reported durable.
    play(&mut n, t0, 3, 2, 75);
    assert_eq!(
        note(&mut n, t0, closed(3, committed(3), &[1, 2, 3], Some(1))),
        [
            "apply 3",
            "publish v3 r3",
            "checkpoint 3 shard 0",
            "record 3: committed v3 030303030303"
        ]
    );
    assert_eq!(
        input(
            &mut n,
            t0,
            Input::CheckpointWritten(Err("disk full".into()))
        ),
        [
            "say round 3: checkpoint shard 0 not written: disk full; training goes on and \
             another replica is asked for the next checkpoint (free space under --workdir for \
             this node to write again)",
            "failed 3 shard 0: disk full",
        ]
    );
    // Another member's shard is not this node's to write.
    play(&mut n, t0, 4, 3, 100);
    assert_eq!(
        note(&mut n, t0, closed(4, committed(4), &[1, 2, 3], Some(2))),
        ["apply 4", "evaluate"]
    );
    let evaluated = Input::Evaluated {
        loss: 3.0,
        bpb: 1.0,
    };
    assert_eq!(
        input(&mut n, t0, evaluated),
        ["publish v4 r4", "record 4: committed v4 040404040404"]
    );
}

#[test]
fn a_replaced_member_drops_its_pending_round_and_takes_the_new_assignment() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    let rejoined = Notification::Rejoined {
        accepted: accepted(MemberId(9), Some(1)),
        kept_member: false,
    };
    assert_eq!(
        note(&mut n, t0, rejoined),
        [
            "say reconnected to the coordinator (same member: false)",
            "say round 1: outcome lost with the old membership; its outer step is dropped",
            "shard 1/3",
            "members [1, 2, 3]"
        ]
    );
    assert_eq!(n.member(), MemberId(9));
    // Its old round's outcome is no longer its own.
    assert!(note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], None)).is_empty());
}

#[test]
fn notes_during_a_job_wait_and_are_taken_in_order() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    input(&mut n, t0, trained(25));
    let moved = Notification::Message(CoordinatorMessage::Assigned(Assigned {
        assignment: Some(assignment(1, 2)),
        sync_peers: vec![peer(2)],
    }));
    assert!(note(&mut n, t0, moved).is_empty());
    assert!(note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], None)).is_empty());
    assert_eq!(
        input(&mut n, t0, reduced(1)),
        [
            "say first contribution (round 1) 0.0 s after joining",
            "report 1 ok",
            "shard 1/2",
            "members [1, 2, 3]",
            "apply 1",
            "publish v1 r1",
            "record 1: committed v1 010101010101"
        ]
    );
}

#[test]
fn a_failed_training_reports_the_round_and_exits_with_the_error() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    let reason = "worker 1 did not reach the gradient exchange within 5 s".to_string();
    let actions = n.handle(t0, Input::Trained(Err(reason.clone())));
    let [Action::Exit(Exit::Failed { round, reason: why })] = actions.as_slice() else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!((*round, why), (RoundId(1), &reason));
}

/// Round `round`, which committed the run's final version `round`, closes (`close`): evaluated
/// whatever the interval, checkpointed by this node, the writer (the coordinator always asks
/// for the final state), and the node leaves once its shard is written and reported.
fn ends_with_its_final_round(n: &mut Node, t0: Instant, close: Notification, round: u64) {
    assert_eq!(
        note(n, t0, close),
        [format!("apply {round}"), "evaluate".to_string()]
    );
    let evaluated = Input::Evaluated {
        loss: 3.0,
        bpb: 1.0,
    };
    let hash = format!("{round:02x}").repeat(6);
    assert_eq!(
        input(n, t0, evaluated),
        [
            format!("publish v{round} r{round}"),
            format!("checkpoint {round} shard 0"),
            format!("record {round}: committed v{round} {hash}")
        ]
    );
    let written = Input::CheckpointWritten(Ok("ckpt".into()));
    let actions = input(n, t0, written);
    assert_eq!(
        actions[1..],
        [
            format!("durable {round} shard 0"),
            format!("exit Leave(\"the run is finished: its final version {round} is committed\")")
        ]
    );
}

#[test]
fn the_final_version_ends_the_node_once_its_round_is_closed() {
    let t0 = Instant::now();
    let mut n = Node::new(config(), &accepted(ME, Some(0)), t0);
    let resumed = Input::Resumed {
        held: Some(19),
        step: 475,
    };
    assert!(n.handle(t0, resumed).is_empty());
    play(&mut n, t0, 20, 19, 500);
    let close = closed(20, committed(20), &[1, 2, 3], Some(1));
    ends_with_its_final_round(&mut n, t0, close, 20);

    // A member outside the final round (on standby) hears its close too, and leaves.
    let mut standby = node(t0);
    assert_eq!(
        note(&mut standby, t0, closed(20, committed(20), &[2, 3], None)),
        [
            "exit Leave(\"the run finished at version 20 without this node; its model is the run's final checkpoint\")"
        ]
    );

    // A node that joins a finished run leaves before any round.
    let mut done = accepted(ME, Some(0));
    done.global.version = 20;
    let mut late = Node::new(config(), &done, t0);
    let resumed = Input::Resumed {
        held: None,
        step: 0,
    };
    assert_eq!(
        names(&late.handle(t0, resumed)),
        [
            "exit Leave(\"the run finished at version 20 without this node; its model is the run's final checkpoint\")"
        ]
    );
}

#[test]
fn the_coordinator_gone_or_stopping_the_node_ends_it() {
    let t0 = Instant::now();
    let mut n = node(t0);
    assert_eq!(
        input(&mut n, t0, Input::CoordinatorGone),
        ["exit Leave(\"the coordinator connection closed\")"]
    );
    let mut n = node(t0);
    assert_eq!(
        note(
            &mut n,
            t0,
            Notification::Stopped {
                reason: "token refused".into()
            }
        ),
        ["exit Stopped(\"the coordinator stopped this node: token refused\")"]
    );
}

fn stop(waiting: Vec<Notification>) -> Input<u64> {
    Input::StopRequested { waiting }
}

/// A node stopped while its checkpoint shard is written in the background leaves once the
/// write is done and reported.
#[test]
fn sigterm_waits_for_the_checkpoint_shard_being_written() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    let actions = note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], Some(1)));
    assert_eq!(actions[2], "checkpoint 1 shard 0");
    assert!(input(&mut n, t0, stop(Vec::new())).is_empty());
    assert_eq!(
        input(&mut n, t0, Input::CheckpointWritten(Ok("ckpt".into()))),
        [
            "say round 1: checkpoint shard 0 written to ckpt",
            "durable 1 shard 0",
            "exit Leave(\"stopped by signal\")"
        ]
    );
}

#[test]
fn sigterm_leaves_without_acting_on_what_waited_unless_it_announces_a_round() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    // The outcome of the reported round and a replacement waited, unread: the node leaves at
    // once without taking the outer step or the new membership.
    let rejoined = Notification::Rejoined {
        accepted: accepted(MemberId(9), Some(1)),
        kept_member: false,
    };
    let waiting = vec![closed(1, committed(1), &[1, 2, 3], Some(1)), rejoined];
    assert_eq!(
        input(&mut n, t0, stop(waiting)),
        ["exit Leave(\"stopped by signal\")"]
    );

    // An announced round among them is played, and what came before it is taken in order.
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    let waiting = vec![
        closed(1, committed(1), &[1, 2, 3], None),
        opened(2, 1, &[1, 2, 3]),
    ];
    assert_eq!(
        input(&mut n, t0, stop(waiting)),
        [
            "apply 1",
            "publish v1 r1",
            "record 1: committed v1 010101010101",
            "members [1, 2, 3]",
            "train 2"
        ]
    );
    assert_eq!(n.round_in_flight(), Some(RoundId(2)));
    input(&mut n, t0, trained(26));
    let actions = input(&mut n, t0, reduced(2));
    assert_eq!(actions.last().unwrap(), "exit Leave(\"stopped by signal\")");
    assert_eq!(n.round_in_flight(), None);
}

/// Unpaced rounds are H steps (the budget's last one shorter) on the run's schedule; a paced
/// round lasts the median node's time for H steps, and a node twice as fast strides through the
/// same H schedule steps in twice as many steps.
#[test]
fn inner_steps_follow_the_run_and_the_pace() {
    let diloco = DilocoConfig {
        inner_steps: 10,
        sync_warmup_steps: 2,
        ..DilocoConfig::default()
    };
    let fixed = InnerPlan::new(&diloco, 25, 3, None, Some(500), Duration::ZERO);
    assert_eq!(fixed.steps, 10);
    assert_eq!(fixed.budget, None);
    assert_eq!(
        fixed.schedule,
        ScheduleSpan {
            start: 12,
            per_step: 1.0
        },
        "2 warmup rounds of one step, then one of 10"
    );
    assert_eq!(
        InnerPlan::new(&diloco, 25, 4, None, None, Duration::ZERO).steps,
        3,
        "the last round"
    );
    assert_eq!(
        InnerPlan::new(&diloco, 25, 6, None, None, Duration::ZERO).steps,
        10,
        "past the budget"
    );
    // Warmup rounds (one step) are never paced.
    let warm = InnerPlan::new(&diloco, 25, 1, Some(1000), Some(500), Duration::ZERO);
    assert_eq!((warm.steps, warm.budget), (1, None));

    let fast = InnerPlan::new(&diloco, 25, 3, Some(1000), Some(500), Duration::ZERO);
    assert_eq!(fast.budget, Some(Duration::from_millis(10)));
    assert_eq!(fast.steps, MAX_PACED_ROUND * 10);
    assert_eq!(fast.schedule.per_step, 0.5);
    let slow = InnerPlan::new(&diloco, 25, 3, Some(1000), Some(4000), Duration::ZERO);
    assert_eq!(slow.schedule.per_step, 10.0 / 2.0);
    let unmeasured = InnerPlan::new(&diloco, 25, 3, Some(1000), None, Duration::ZERO);
    assert_eq!(unmeasured.schedule.per_step, 1.0);
}

/// A paced round's pace reaches the inner steps, and the report carries this node's measured
/// time per step for the coordinator's next pace.
#[test]
fn a_paced_round_passes_its_pace_on_and_reports_the_nodes_speed() {
    let t0 = Instant::now();
    let mut n = node(t0);
    let open = RoundOpened {
        pace_us_per_step: Some(1500),
        slowest_us_per_step: Some(3000),
        ..open(1, 0, &[1, 2, 3])
    };
    let actions = n.handle(
        t0,
        Input::Note(Notification::Message(CoordinatorMessage::RoundOpened(open))),
    );
    assert!(
        matches!(
            actions.last(),
            Some(Action::Train {
                version: 0,
                pace_us_per_step: Some(1500),
                ..
            })
        ),
        "{:?}",
        names(&actions)
    );
    input(&mut n, t0, trained(25));
    let actions = n.handle(t0, reduced(1));
    let Some(Action::Report(report)) = actions.last() else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!(report.us_per_step, 80_000, "2 s for 25 steps");
}

/// A node that finished early waits for slower participants at the all-reduce: as long as the
/// slowest measured one needs for the same steps (and half again), a participant 4x slower
/// while nothing is measured, one slowest step twice over in a paced round.
#[test]
fn the_all_reduce_waits_for_slower_participants() {
    let open = |pace: Option<u64>, slowest: Option<u64>| RoundOpened {
        pace_us_per_step: pace,
        slowest_us_per_step: slowest,
        ..open(1, 0, &[1, 2])
    };
    let trained = Trained {
        steps: 25,
        tokens: 25 * 2048,
        mean_loss: 3.5,
        lr: Some(1e-3),
        seconds: 2.0,
        step: 25,
        consumed: vec![],
    };
    // 25 steps at 0.4 s: 10 s for the slowest, 8 s more than this node's 2 s.
    assert_eq!(
        peer_wait(&open(None, Some(400_000)), &trained),
        Duration::from_secs(12)
    );
    assert_eq!(
        peer_wait(&open(None, Some(50_000)), &trained),
        Duration::ZERO
    );
    assert_eq!(
        peer_wait(&open(None, None), &trained),
        Duration::from_secs(6)
    );
    assert_eq!(
        peer_wait(&open(Some(80_000), Some(400_000)), &trained),
        Duration::from_millis(800)
    );
}

/// A paced round's time counts from the previous round's close for a node that was busy
/// evaluating when the next round opened: a slow evaluator trains that much less.
#[test]
fn a_paced_round_counts_from_the_close_for_a_node_that_was_evaluating() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    note(&mut n, t0, closed(1, committed(1), &[1, 2, 3], None));
    play(&mut n, t0, 2, 1, 50);
    let closed_at = t0 + Duration::from_secs(10);
    assert_eq!(
        note(&mut n, closed_at, closed(2, committed(2), &[1, 2, 3], None)),
        ["apply 2", "evaluate"]
    );
    let evaluated = closed_at + Duration::from_secs(4);
    n.handle(
        evaluated,
        Input::Evaluated {
            loss: 3.0,
            bpb: 1.0,
        },
    );
    let open = RoundOpened {
        pace_us_per_step: Some(1000),
        slowest_us_per_step: Some(2000),
        ..open(3, 2, &[1, 2, 3])
    };
    let actions = n.handle(
        evaluated,
        Input::Note(Notification::Message(CoordinatorMessage::RoundOpened(open))),
    );
    let Some(Action::Train { opened_at, .. }) = actions.last() else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!(*opened_at, closed_at);
}

/// A round with leases: the node trains on its own replica's lease, reports what it read, and
/// records it as read only when the round committed with its contribution.
#[test]
fn a_node_reads_its_replicas_lease_and_records_it_only_when_committed_with_it() {
    use forge_protocol::stream::{DataLease, SeqRange};
    let t0 = Instant::now();
    let leased = |round: u64| {
        let mut open = open(round, round - 1, &[1, 2, 3]);
        // Member m is replica m - 1 (see `peer`).
        open.data = (0..3)
            .map(|r| DataLease {
                replica: ReplicaId(r),
                ranges: vec![SeqRange::new(100 * r, 100 * r + 50)],
            })
            .collect();
        Notification::Message(CoordinatorMessage::RoundOpened(open))
    };
    let read = vec![SeqRange::new(0, 40)];
    let trained_on = |step: u64| {
        Input::Trained(Ok(Trained {
            consumed: read.clone(),
            ..match trained(step) {
                Input::Trained(Ok(t)) => t,
                _ => unreachable!(),
            }
        }))
    };
    let mut n = node(t0);
    let actions = n.handle(t0, Input::Note(leased(1)));
    let Some(Action::Train { lease, .. }) = actions.last() else {
        panic!("{:?}", names(&actions));
    };
    assert_eq!(lease.as_deref(), Some(&[SeqRange::new(0, 50)][..]));
    n.handle(t0, trained_on(25));
    let actions = n.handle(t0, reduced(1));
    let Some(Action::Report(report)) = actions.last() else {
        panic!("{:?}", names(&actions));
    };
    assert_eq!(report.consumed, read);
    let actions = n.handle(t0, Input::Note(closed(1, committed(1), &[1, 2, 3], None)));
    let Some(Action::Record(log)) = actions.last() else {
        panic!("{:?}", names(&actions));
    };
    assert_eq!(log.data, read);
    assert!(
        serde_json::to_string(log)
            .unwrap()
            .contains(r#""data":[{"start":0,"end":40}]"#)
    );

    // Committed without this node: its data counts for nothing.
    note(&mut n, t0, leased(2));
    n.handle(t0, trained_on(50));
    n.handle(t0, reduced(2));
    note(&mut n, t0, closed(2, committed(2), &[2, 3], None));
    let actions = n.handle(
        t0,
        Input::Evaluated {
            loss: 3.0,
            bpb: 1.0,
        },
    );
    let Some(Action::Record(log)) = actions.last() else {
        panic!("{:?}", names(&actions));
    };
    assert!(log.outcome.contains("without this node"), "{}", log.outcome);
    assert!(log.data.is_empty());

    // Rounds without leases (a coordinator without a data plan) read the shard.
    let mut n = node(t0);
    let actions = n.handle(t0, Input::Note(opened(1, 0, &[1, 2, 3])));
    assert!(matches!(
        actions.last(),
        Some(Action::Train { lease: None, .. })
    ));
}

/// A pipeline that breaks off mid-round (another stage's node gone) fails the round for this
/// node, which reports it and stays for the next round: the fault is not its own.
#[test]
fn a_broken_pipeline_fails_the_round_and_the_node_stays() {
    let t0 = Instant::now();
    let mut n = node(t0);
    note(&mut n, t0, opened(1, 0, &[1, 2, 3]));
    let actions = names(&n.handle(
        t0,
        Input::PipelineBroken("stage 1: connection ended".into()),
    ));
    assert_eq!(
        actions,
        [
            "say round 1: all-reduce failed: the pipeline broke off: stage 1: connection ended",
            "report 1 failed"
        ]
    );
    // The next round is played.
    let next = note(&mut n, t0, opened(2, 0, &[1, 2, 3]));
    assert!(next.iter().any(|a| a == "train 2"), "{next:?}");
}

/// The run's control (`forge-coordinator control`): a stop names an earlier final version in
/// the round's close, which the node ends on like on its budget's; an anneal reaches the inner
/// steps with the round's opening.
#[test]
fn a_stop_ends_the_node_on_the_round_it_made_final() {
    let t0 = Instant::now();
    let mut n = node(t0);
    play(&mut n, t0, 1, 0, 25);
    let stopped = RunPlan {
        final_version: 1,
        anneal_from: None,
    };
    let Notification::Message(CoordinatorMessage::RoundClosed(close)) =
        closed(1, committed(1), &[1, 2, 3], Some(1))
    else {
        unreachable!()
    };
    let close = RoundClosed {
        plan: stopped,
        ..close
    };
    let message = Notification::Message(CoordinatorMessage::RoundClosed(close));
    ends_with_its_final_round(&mut n, t0, message, 1);

    let mut annealing = node(t0);
    let plan = RunPlan {
        final_version: 14,
        anneal_from: Some(2),
    };
    let open = RoundOpened {
        plan,
        ..open(3, 0, &[1, 2, 3])
    };
    let actions = annealing.handle(
        t0,
        Input::Note(Notification::Message(CoordinatorMessage::RoundOpened(open))),
    );
    let Some(Action::Train { plan: given, .. }) = actions.last() else {
        panic!("{:?}", names(&actions))
    };
    assert_eq!(*given, plan);
}

fn aborted_note() -> Notification {
    Notification::Message(CoordinatorMessage::RunAborted(RunAborted {
        reason: "aborted by the operator".into(),
    }))
}

const ABORTED: &str = "exit Aborted(\"the run was aborted: aborted by the operator\")";

/// An abort: a node between rounds leaves at once; one that was training skips the all-reduce
/// and leaves; one in the all-reduce gives it up and leaves. None evaluates or writes.
#[test]
fn an_abort_ends_the_node_wherever_it_is() {
    let t0 = Instant::now();
    let mut idle = node(t0);
    assert_eq!(note(&mut idle, t0, aborted_note()), [ABORTED]);

    let mut training = node(t0);
    note(&mut training, t0, opened(1, 0, &[1, 2, 3]));
    assert!(note(&mut training, t0, aborted_note()).is_empty());
    assert_eq!(input(&mut training, t0, trained(3)), ["abort (no peer)"]);
    let given_up = ReduceFailure {
        reason: "given up".into(),
        peer: None,
        rejected: false,
        sync_s: 0.0,
    };
    let actions = input(&mut training, t0, Input::Reduced(Err(given_up.clone())));
    assert_eq!(actions.last().unwrap(), ABORTED, "{actions:?}");

    let mut reducing = node(t0);
    note(&mut reducing, t0, opened(1, 0, &[1, 2, 3]));
    input(&mut reducing, t0, trained(25));
    assert_eq!(note(&mut reducing, t0, aborted_note()), ["abort (no peer)"]);
    let actions = input(&mut reducing, t0, Input::Reduced(Err(given_up)));
    assert_eq!(actions.last().unwrap(), ABORTED, "{actions:?}");
    assert!(!actions.iter().any(|a| a == "evaluate"), "{actions:?}");
}
