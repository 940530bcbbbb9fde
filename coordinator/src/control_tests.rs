//! The operator's run control in the core ([`Coordinator::control`]): save, stop, abort and
//! anneal at a round's close, refusals, and pending actions kept across a restart.

use forge_protocol::run_config::AnnealPlan;
use forge_protocol::session::{ControlAction, ControlReply, ControlRequest, PendingControl};
use forge_protocol::{CoordinatorMessage, Digest, RoundClosed, RoundId, RunPlan};

use crate::core::{Coordinator, Event, Millis, Output};
use crate::sim::{Driver, config, events, messages_to};

/// Two members (connections 1 and 2) in a run of `final_version` rounds, checkpointing only its
/// final state; round 1 is open.
fn two_members(final_version: u64, anneal: Option<AnnealPlan>) -> Driver {
    let mut cfg = config(2);
    cfg.checkpoint_every_rounds = 0;
    cfg.final_version = final_version;
    cfg.anneal = anneal;
    let mut driver = Driver::new(cfg);
    driver.join(1, 1 << 40);
    driver.join(2, 1 << 40);
    assert_eq!(driver.coordinator.open_round(), Some(RoundId(1)));
    driver
}

fn control(
    driver: &mut Driver,
    action: ControlAction,
    at: Option<u64>,
) -> (ControlReply, Vec<Output>) {
    let request = ControlRequest {
        action,
        at_round: at.map(RoundId),
    };
    driver.coordinator.control(Millis(driver.now), request)
}

/// What the operator is told, for an accepted request.
fn accepted(reply: &ControlReply) -> String {
    match reply {
        ControlReply::Accepted { what, .. } => what.clone(),
        ControlReply::Refused(refused) => panic!("refused: {}", refused.message),
    }
}

fn refused(reply: &ControlReply) -> String {
    match reply {
        ControlReply::Refused(refused) => refused.message.clone(),
        ControlReply::Accepted { what, .. } => panic!("accepted: {what}"),
    }
}

/// Both members report agreeing hashes for the open round; returns its close as member 1
/// hears it.
fn play_round(driver: &mut Driver) -> (RoundClosed, Vec<Output>) {
    let round = driver.coordinator.open_round().expect("a round is open");
    driver.report(1, round, Digest([round.0 as u8; 32]));
    let outputs = driver.report(2, round, Digest([round.0 as u8; 32]));
    let closed = messages_to(&outputs, 1)
        .into_iter()
        .find_map(|m| match m {
            CoordinatorMessage::RoundClosed(closed) => Some(closed.clone()),
            _ => None,
        })
        .expect("the round closes");
    (closed, outputs)
}

fn run_aborted(outputs: &[Output], conn: u64) -> bool {
    messages_to(outputs, conn)
        .iter()
        .any(|m| matches!(m, CoordinatorMessage::RunAborted(_)))
}

#[test]
fn stop_makes_the_round_under_way_final_and_checkpointed() {
    let mut driver = two_members(10, None);
    let (reply, _) = control(&mut driver, ControlAction::Stop, None);
    assert!(accepted(&reply).contains("round 1 commits"), "{reply:?}");
    assert_eq!(
        driver.coordinator.pending_control(),
        vec![PendingControl {
            action: ControlAction::Stop,
            at_round: RoundId(1),
        }]
    );
    // A second stop is fine.
    let (again, _) = control(&mut driver, ControlAction::Stop, None);
    assert!(accepted(&again).contains("already pending"), "{again:?}");
    let (closed, outputs) = play_round(&mut driver);
    assert!(
        closed.checkpoint.is_some(),
        "the final state is checkpointed"
    );
    assert_eq!(
        closed.plan,
        RunPlan {
            final_version: 1,
            anneal_from: None
        }
    );
    assert!(
        events(&outputs)
            .iter()
            .any(|e| matches!(e, Event::Finished { version: 1, .. })),
        "{outputs:?}"
    );
    assert!(driver.coordinator.finished());
    assert!(driver.coordinator.pending_control().is_empty());
    driver.advance(10_000);
    assert_eq!(
        driver.coordinator.open_round(),
        None,
        "no round after a stop"
    );
    let (late, _) = control(&mut driver, ControlAction::Save, None);
    assert!(refused(&late).contains("the run is finished"), "{late:?}");
}

#[test]
fn a_stop_waits_for_a_round_that_commits() {
    let mut driver = two_members(10, None);
    control(&mut driver, ControlAction::Stop, None);
    // Round 1 is abandoned (the members disagree): the stop moves on to the next commit.
    driver.report(1, RoundId(1), Digest([1; 32]));
    let outputs = driver.report(2, RoundId(1), Digest([2; 32]));
    assert!(!driver.coordinator.finished(), "{outputs:?}");
    assert_eq!(driver.coordinator.open_round(), Some(RoundId(2)));
    let (closed, _) = play_round(&mut driver);
    assert_eq!(closed.round, RoundId(2));
    assert!(closed.checkpoint.is_some());
    assert_eq!(closed.plan.final_version, 1);
}

#[test]
fn save_checkpoints_its_round_and_the_run_goes_on() {
    let mut driver = two_members(10, None);
    let (reply, _) = control(&mut driver, ControlAction::Save, Some(2));
    assert!(accepted(&reply).contains("round 2"), "{reply:?}");
    let (first, _) = play_round(&mut driver);
    assert!(
        first.checkpoint.is_none(),
        "round 1 is not the one asked for"
    );
    let (second, _) = play_round(&mut driver);
    assert!(second.checkpoint.is_some(), "round 2 is checkpointed");
    assert_eq!(second.plan.final_version, 10);
    assert_eq!(driver.coordinator.open_round(), Some(RoundId(3)));
    let (third, _) = play_round(&mut driver);
    assert!(third.checkpoint.is_none(), "a save is taken once");
}

#[test]
fn a_round_in_the_past_is_refused_naming_the_current_one() {
    let mut driver = two_members(10, None);
    play_round(&mut driver);
    let (reply, outputs) = control(&mut driver, ControlAction::Save, Some(1));
    let message = refused(&reply);
    assert!(
        message.contains("round 1 is past: round 2 is under way"),
        "{message}"
    );
    assert!(outputs.is_empty());
    assert!(driver.coordinator.pending_control().is_empty());
}

#[test]
fn anneal_starts_the_decay_after_its_round_and_moves_the_end() {
    // 300 inner steps in rounds of 5 (60 rounds), a decay phase of 60 steps.
    let plan = AnnealPlan {
        total_steps: 300,
        decay_steps: 60,
        inner_steps: 5,
        sync_warmup_steps: 0,
    };
    let mut driver = two_members(60, Some(plan));
    let (reply, _) = control(&mut driver, ControlAction::Anneal, Some(2));
    assert!(
        accepted(&reply).contains("60 inner steps (about 12 rounds)"),
        "{reply:?}"
    );
    let (first, _) = play_round(&mut driver);
    assert_eq!(first.plan.anneal_from, None);
    let (second, outputs) = play_round(&mut driver);
    // Version 2 is inner step 10: the decay runs to step 70, version 14.
    let annealed = RunPlan {
        final_version: 14,
        anneal_from: Some(2),
    };
    assert_eq!(second.plan, annealed);
    let opened = messages_to(&outputs, 1)
        .into_iter()
        .find_map(|m| match m {
            CoordinatorMessage::RoundOpened(open) => Some(open.plan),
            _ => None,
        })
        .expect("round 3 opens");
    assert_eq!(opened, annealed, "every round after it carries the decay");
    assert_eq!(driver.coordinator.run_plan(), annealed);
    let (again, _) = control(&mut driver, ControlAction::Anneal, None);
    assert!(accepted(&again).contains("already started"), "{again:?}");
    for _ in 3..14 {
        play_round(&mut driver);
    }
    let (last, _) = play_round(&mut driver);
    assert_eq!(last.round, RoundId(14));
    assert!(
        last.checkpoint.is_some(),
        "the decay's end is the final state"
    );
    assert!(driver.coordinator.finished());
}

#[test]
fn anneal_is_refused_without_a_decay_phase() {
    let mut driver = two_members(10, None);
    let (reply, _) = control(&mut driver, ControlAction::Anneal, None);
    assert!(refused(&reply).contains("no decay phase"), "{reply:?}");
}

#[test]
fn abort_abandons_the_open_round_and_tells_everyone() {
    let mut driver = two_members(10, None);
    control(&mut driver, ControlAction::Save, Some(3));
    let (reply, outputs) = control(&mut driver, ControlAction::Abort, None);
    let what = accepted(&reply);
    assert!(what.contains("round 1 abandoned"), "{what}");
    assert!(what.contains("dropped: save at round 3"), "{what}");
    for conn in [1, 2] {
        assert!(run_aborted(&outputs, conn), "{outputs:?}");
        assert!(messages_to(&outputs, conn).iter().any(|m| matches!(
            m,
            CoordinatorMessage::RoundClosed(RoundClosed {
                checkpoint: None,
                ..
            })
        )));
    }
    assert!(driver.coordinator.aborted());
    assert!(driver.coordinator.pending_control().is_empty());
    driver.report(1, RoundId(1), Digest([1; 32]));
    driver.report(2, RoundId(1), Digest([1; 32]));
    driver.advance(10_000);
    assert_eq!(
        driver.coordinator.open_round(),
        None,
        "no round after an abort"
    );
    assert_eq!(driver.coordinator.global().version, 0);
    // A node that joins later hears of it at once.
    let (_, joined) = driver.join(3, 1 << 40);
    assert!(run_aborted(&joined, 3), "{joined:?}");
    let (late, _) = control(&mut driver, ControlAction::Stop, None);
    assert!(refused(&late).contains("aborted"), "{late:?}");
}

#[test]
fn abort_at_a_round_ends_the_run_as_it_closes_without_a_checkpoint() {
    let mut driver = two_members(2, None);
    // Round 2 would be the final one, checkpointed: an abort at round 2 saves nothing.
    let (reply, _) = control(&mut driver, ControlAction::Abort, Some(2));
    assert!(accepted(&reply).contains("as round 2 closes"), "{reply:?}");
    let (first, _) = play_round(&mut driver);
    assert!(!driver.coordinator.aborted(), "{first:?}");
    let (second, outputs) = play_round(&mut driver);
    assert!(second.checkpoint.is_none(), "{second:?}");
    assert!(run_aborted(&outputs, 1) && run_aborted(&outputs, 2));
    assert!(driver.coordinator.aborted());
}

#[test]
fn pending_actions_survive_a_restart() {
    let mut driver = two_members(10, None);
    control(&mut driver, ControlAction::Stop, Some(4));
    control(&mut driver, ControlAction::Save, Some(2));
    let before = driver.coordinator.pending_control();
    assert_eq!(
        before.iter().map(|p| p.at_round.0).collect::<Vec<_>>(),
        vec![2, 4]
    );
    let snapshot = driver.coordinator.to_snapshot().unwrap();
    driver.coordinator = Coordinator::from_snapshot(&snapshot, Millis(driver.now)).unwrap();
    assert_eq!(driver.coordinator.pending_control(), before);
    // A stop asked again for another round replaces the first.
    let (reply, _) = control(&mut driver, ControlAction::Stop, Some(3));
    assert!(
        accepted(&reply).contains("replaces the stop pending for round 4"),
        "{reply:?}"
    );
}
