//! What the coordinator's web dashboard and `/metrics` show beyond [`Status`]: each member's
//! activity (from its heartbeats), the rounds' loss, validation loss, bytes and sync time (from
//! the members' [`RoundSummary`]s), and the members that died or left.
//!
//! The shell's event loop feeds it; nothing here changes the run. The rounds' rows are written
//! to the state database with the next commit after they change, so the curves survive a
//! restart of the coordinator (members' activity and totals start again). A member's summary is
//! display data and is treated as untrusted: one per member and round, only for rounds the
//! coordinator opened recently, non-finite numbers left out.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use forge_protocol::session::Status;
use forge_protocol::{Activity, Heartbeat, MemberId, RoundId, RoundSummary};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Summaries are taken for the newest this many rounds the coordinator opened.
const OPEN_ROUNDS: u64 = 64;
/// Rounds kept for the curves; the oldest are dropped beyond this.
const MAX_ROUNDS: usize = 100_000;
/// Members that died or left, newest kept.
const MAX_GONE: usize = 64;

/// One round as the dashboard draws it: the members' summaries combined.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    /// From the coordinator's own close (None while open or when the close predates this
    /// coordinator process).
    pub committed: Option<bool>,
    pub included: usize,
    pub closed_at_unix_ms: Option<u64>,
    /// Members whose summary arrived.
    pub summaries: usize,
    /// Mean over the summaries of each member's mean training loss.
    pub loss: Option<f64>,
    /// Summaries with a finite loss (the mean's count).
    pub losses: usize,
    pub eval_loss: Option<f64>,
    pub eval_bpb: Option<f64>,
    /// Tokens the members trained on this round.
    pub tokens: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The slowest member's all-reduce time.
    pub sync_s: f64,
    /// The slowest member's inner steps.
    pub inner_s: f64,
    /// Who sent a summary (emptied once the round is too old to take more).
    #[serde(skip)]
    pub(crate) reporters: Vec<MemberId>,
}

/// What one member did over the run, for `/metrics` counters.
#[derive(Clone, Debug, Default)]
pub struct MemberTotals {
    pub rounds: u64,
    pub tokens: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sync_s: f64,
    pub inner_s: f64,
    /// From its newest summary.
    pub last_loss: Option<f64>,
    pub last_tokens_per_s: Option<f64>,
}

/// A member that is no longer part of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Gone {
    pub member: MemberId,
    pub how: &'static str,
    pub reason: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Default)]
pub struct Dashboard {
    progress: HashMap<MemberId, Heartbeat>,
    totals: HashMap<MemberId, MemberTotals>,
    rounds: BTreeMap<u64, RoundRow>,
    gone: VecDeque<Gone>,
    /// The newest round opened, as the core said.
    newest_round: u64,
    /// Rows changed since they were last taken for the database.
    dirty: BTreeSet<u64>,
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

impl Dashboard {
    /// The dashboard of a restarted coordinator: the rows it stored.
    pub fn restore(rows: impl IntoIterator<Item = RoundRow>) -> Dashboard {
        let mut dashboard = Dashboard::default();
        for row in rows {
            dashboard.newest_round = dashboard.newest_round.max(row.round);
            dashboard.rounds.insert(row.round, row);
        }
        while dashboard.rounds.len() > MAX_ROUNDS {
            dashboard.rounds.pop_first();
        }
        dashboard
    }

    /// The rows changed since the last call, to be stored.
    pub fn take_changed(&mut self) -> Vec<RoundRow> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|round| self.rounds.get(&round).cloned())
            .collect()
    }

    pub fn heartbeat(&mut self, member: MemberId, heartbeat: Heartbeat) {
        self.progress.insert(member, heartbeat);
    }

    pub fn round_opened(&mut self, round: RoundId) {
        self.newest_round = self.newest_round.max(round.0);
        self.row(round.0);
    }

    pub fn round_closed(
        &mut self,
        round: RoundId,
        committed: bool,
        included: usize,
        at_unix_ms: u64,
    ) {
        self.newest_round = self.newest_round.max(round.0);
        let row = self.row(round.0);
        row.committed = Some(committed);
        row.included = included;
        row.closed_at_unix_ms = Some(at_unix_ms);
    }

    /// A member left, died or was removed: its activity and totals go, a line is kept.
    pub fn member_gone(&mut self, member: MemberId, how: &'static str, reason: String, at: u64) {
        self.progress.remove(&member);
        self.totals.remove(&member);
        if self.gone.len() == MAX_GONE {
            self.gone.pop_front();
        }
        self.gone.push_back(Gone {
            member,
            how,
            reason,
            at_unix_ms: at,
        });
    }

    /// Takes a member's summary of a round; false when it is refused (a round not opened
    /// recently, or a second summary of the same round).
    pub fn summary(&mut self, member: MemberId, summary: &RoundSummary) -> bool {
        let round = summary.round.0;
        if round > self.newest_round || round + OPEN_ROUNDS <= self.newest_round {
            return false;
        }
        let row = self.row(round);
        if row.reporters.contains(&member) {
            return false;
        }
        row.reporters.push(member);
        row.summaries += 1;
        let loss = finite(summary.loss.get());
        if let Some(loss) = loss {
            let before = row.loss.unwrap_or(0.0) * row.losses as f64;
            row.losses += 1;
            row.loss = Some((before + loss) / row.losses as f64);
        }
        // Every member evaluates the same committed model; the first figure is shown.
        if row.eval_loss.is_none() {
            row.eval_loss = summary.eval_loss.and_then(|l| finite(l.get()));
            row.eval_bpb = summary.eval_bpb.and_then(|b| finite(b.get()));
        }
        row.tokens = row.tokens.saturating_add(summary.tokens);
        row.bytes_sent = row.bytes_sent.saturating_add(summary.bytes_sent);
        row.bytes_received = row.bytes_received.saturating_add(summary.bytes_received);
        row.sync_s = row.sync_s.max(summary.sync_ms as f64 / 1e3);
        row.inner_s = row.inner_s.max(summary.inner_ms as f64 / 1e3);
        let totals = self.totals.entry(member).or_default();
        totals.rounds += 1;
        totals.tokens = totals.tokens.saturating_add(summary.tokens);
        totals.bytes_sent = totals.bytes_sent.saturating_add(summary.bytes_sent);
        totals.bytes_received = totals.bytes_received.saturating_add(summary.bytes_received);
        totals.sync_s += summary.sync_ms as f64 / 1e3;
        totals.inner_s += summary.inner_ms as f64 / 1e3;
        totals.last_loss = loss.or(totals.last_loss);
        totals.last_tokens_per_s = finite(summary.wall_tokens_per_s.get()).filter(|t| *t >= 0.0);
        true
    }

    fn row(&mut self, round: u64) -> &mut RoundRow {
        self.dirty.insert(round);
        if !self.rounds.contains_key(&round) {
            if self.rounds.len() == MAX_ROUNDS {
                self.rounds.pop_first();
            }
            // Rounds too old to take summaries forget who sent them.
            let stale = self.newest_round.saturating_sub(OPEN_ROUNDS);
            for row in self
                .rounds
                .range_mut(..=stale)
                .rev()
                .take(4)
                .map(|(_, r)| r)
            {
                row.reporters = Vec::new();
            }
        }
        self.rounds.entry(round).or_insert_with(|| RoundRow {
            round,
            ..RoundRow::default()
        })
    }

    pub fn rounds(&self) -> impl Iterator<Item = &RoundRow> {
        self.rounds.values()
    }

    pub fn totals(&self, member: MemberId) -> Option<&MemberTotals> {
        self.totals.get(&member)
    }

    /// What a member is doing: its heartbeat's activity, or `standby` / `disconnected` where
    /// the coordinator knows better.
    pub fn state(&self, member: MemberId, assigned: bool, connected: bool) -> &'static str {
        if !connected {
            "disconnected"
        } else if !assigned {
            "standby"
        } else {
            self.progress
                .get(&member)
                .map_or(Activity::Idle, |p| p.activity)
                .as_str()
        }
    }

    /// The newest round with a validation loss: (round, loss).
    pub fn last_eval(&self) -> Option<(u64, f64)> {
        self.rounds
            .values()
            .rev()
            .find_map(|row| row.eval_loss.map(|loss| (row.round, loss)))
    }

    /// The newest round with a training loss: (round, loss).
    pub fn last_loss(&self) -> Option<(u64, f64)> {
        self.rounds
            .values()
            .rev()
            .find_map(|row| row.loss.map(|loss| (row.round, loss)))
    }

    /// The dashboard's `/api/status` answer: the coordinator's status with each member's state
    /// and totals, the rounds, and the members gone.
    pub fn view(&self, status: &Status, run: Value) -> Value {
        let members: Vec<Value> = status
            .members
            .iter()
            .map(|m| {
                let totals = self.totals.get(&m.member);
                let progress = self.progress.get(&m.member);
                json!({
                    "member": m.member.0,
                    "peer_id": m.peer_id,
                    "devices": m.devices,
                    "state": self.state(m.member, m.assignment.is_some(), m.connected),
                    "round": progress.and_then(|p| p.round).map(|r| r.0),
                    "assignment": m.assignment,
                    "tokens_per_s": totals
                        .and_then(|t| t.last_tokens_per_s)
                        .unwrap_or(m.tokens_per_s),
                    "measured_tokens_per_s": m.tokens_per_s,
                    "upload_bytes_per_s": m.upload_bytes_per_s,
                    "download_bytes_per_s": m.download_bytes_per_s,
                    "connected": m.connected,
                    "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
                    "rounds": totals.map_or(0, |t| t.rounds),
                    "bytes_sent": totals.map_or(0, |t| t.bytes_sent),
                    "sync_s": totals.map_or(0.0, |t| t.sync_s),
                    "last_loss": totals.and_then(|t| t.last_loss),
                })
            })
            .collect();
        let rounds: Vec<&RoundRow> = self.rounds.values().collect();
        json!({
            "software_version": status.software_version,
            "run": run,
            "global_version": status.global_version,
            "rounds_committed": status.rounds_committed,
            "rounds_abandoned": status.rounds_abandoned,
            "last_round": status.last_round.map(|r| r.0),
            "last_checkpoint": status.last_checkpoint.map(|r| r.0),
            "open_round": status.open_round.as_ref().map(|o| json!({
                "round": o.round.0,
                "participants": o.participants,
                "reported": o.reported,
                "deadline_in_ms": o.deadline_in_ms,
            })),
            "data": status.data,
            "members": members,
            "replicas": status.replicas,
            "standby": status.standby,
            "gone": self.gone,
            "rounds": rounds,
            "pending_control": status.pending_control,
            "aborted": status.aborted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forge_protocol::F64Bits;

    fn summary(round: u64, loss: f64, eval: Option<f64>) -> RoundSummary {
        RoundSummary {
            round: RoundId(round),
            committed: true,
            inner_steps: 5,
            tokens: 1000,
            loss: F64Bits::new(loss),
            eval_loss: eval.map(F64Bits::new),
            eval_bpb: None,
            bytes_sent: 300,
            bytes_received: 200,
            sync_ms: 1500,
            inner_ms: 4000,
            wall_tokens_per_s: F64Bits::new(250.0),
        }
    }

    #[test]
    fn summaries_combine_per_round_once_per_member() {
        let mut d = Dashboard::default();
        d.round_opened(RoundId(1));
        assert!(d.summary(MemberId(1), &summary(1, 4.0, Some(3.5))));
        assert!(d.summary(MemberId(2), &summary(1, 5.0, Some(9.0))));
        assert!(
            !d.summary(MemberId(2), &summary(1, 1.0, None)),
            "a second summary"
        );
        d.round_closed(RoundId(1), true, 2, 7);
        let row = d.rounds().next().unwrap();
        assert_eq!(row.summaries, 2);
        assert_eq!(row.loss, Some(4.5));
        assert_eq!(row.eval_loss, Some(3.5));
        assert_eq!((row.tokens, row.bytes_sent, row.sync_s), (2000, 600, 1.5));
        assert_eq!(row.committed, Some(true));
        let totals = d.totals(MemberId(2)).unwrap();
        assert_eq!((totals.rounds, totals.bytes_sent), (1, 300));
        assert_eq!(d.last_eval(), Some((1, 3.5)));
    }

    #[test]
    fn summaries_of_unopened_or_old_rounds_and_non_finite_numbers_are_left_out() {
        let mut d = Dashboard::default();
        assert!(
            !d.summary(MemberId(1), &summary(3, 4.0, None)),
            "not opened yet"
        );
        d.round_opened(RoundId(200));
        assert!(!d.summary(MemberId(1), &summary(100, 4.0, None)), "too old");
        assert!(d.summary(MemberId(1), &summary(199, f64::NAN, Some(f64::INFINITY))));
        let row = d.rounds().find(|r| r.round == 199).unwrap();
        assert_eq!((row.loss, row.eval_loss, row.summaries), (None, None, 1));
        assert_eq!(d.rounds().count(), 2);
        // Serialisable as JSON (no NaN reaches the page).
        serde_json::to_string(row).unwrap();
    }

    /// A restarted coordinator's dashboard starts from the stored rows; only the rows that
    /// change afterwards are taken for the database, once.
    #[test]
    fn a_restored_dashboard_goes_on_from_its_rows_and_stores_what_changes() {
        let mut before = Dashboard::default();
        for round in 1..=3 {
            before.round_opened(RoundId(round));
            before.summary(MemberId(1), &summary(round, 5.0 - round as f64 * 0.1, None));
            before.round_closed(RoundId(round), true, 1, 10 + round);
        }
        let stored = before.take_changed();
        assert_eq!(stored.len(), 3);
        assert!(before.take_changed().is_empty());
        let mut after = Dashboard::restore(stored.clone());
        assert_eq!(after.rounds().cloned().collect::<Vec<_>>(), stored);
        assert!(after.take_changed().is_empty());
        after.round_opened(RoundId(4));
        assert!(
            after.summary(MemberId(2), &summary(3, 6.0, Some(4.0))),
            "a late summary"
        );
        let changed = after.take_changed();
        assert_eq!(
            changed.iter().map(|r| r.round).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!((changed[0].loss.unwrap() - (4.7 + 6.0) / 2.0).abs() < 1e-12);
        assert_eq!(after.last_eval(), Some((3, 4.0)));
    }

    #[test]
    fn a_member_gone_leaves_a_line_and_no_state() {
        let mut d = Dashboard::default();
        d.heartbeat(
            MemberId(4),
            Heartbeat {
                round: Some(RoundId(2)),
                inner_steps_done: 0,
                activity: Activity::Syncing,
            },
        );
        assert_eq!(d.state(MemberId(4), true, true), "syncing");
        assert_eq!(d.state(MemberId(4), false, true), "standby");
        assert_eq!(d.state(MemberId(4), true, false), "disconnected");
        for i in 0..MAX_GONE + 3 {
            d.member_gone(MemberId(4), "dead", format!("silent {i}"), 1);
        }
        assert_eq!(d.state(MemberId(4), true, true), "idle");
        assert_eq!(d.gone.len(), MAX_GONE);
        assert_eq!(
            d.gone.back().unwrap().reason,
            format!("silent {}", MAX_GONE + 2)
        );
    }
}
