//! The run's training stream as the coordinator hands it out ([`forge_protocol::stream`]): each
//! round leases every replica the positions it will read, sized by its measured speed; after the
//! round what a committed replica read is consumed for good, and the rest (a paced node's unused
//! tail, the lease of a dead member or of an abandoned round) is leased again before any new
//! position. So the replicas whose work the run keeps read every epoch once, with no gaps and no
//! repeats, whoever comes and goes.

use forge_protocol::stream::{self, SeqRange};
use serde::{Deserialize, Serialize};

/// What the coordinator needs to size leases, from the run config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlan {
    /// Stream positions one inner step of a replica reads (`[train] batch_size`).
    pub sequences_per_step: u64,
    /// H, `[diloco] inner_steps`: an unpaced round's steps.
    pub inner_steps: u64,
}

impl DataPlan {
    /// The positions to lease a replica for one round: H steps' worth, or in a paced round the
    /// steps its speed (`us_per_step`, 0 when not measured) makes in the time the median node
    /// (`pace`) needs for H steps, with a quarter more and one step to spare (speeds drift),
    /// and never more than a paced round allows.
    pub fn lease_len(&self, pace: Option<u64>, us_per_step: u64) -> u64 {
        let h = self.inner_steps.max(1);
        let steps = match pace {
            Some(pace) if pace > 0 => {
                let mine = if us_per_step > 0 { us_per_step } else { pace };
                let expected = (h * pace).div_ceil(mine).max(1);
                (expected + expected / 4 + 1).min(forge_protocol::MAX_PACED_ROUND * h)
            }
            _ => h,
        };
        steps * self.sequences_per_step.max(1)
    }
}

/// Which positions of the stream have been consumed: all below `next` but those in `free`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The first position never leased.
    pub next: u64,
    /// Leased positions nobody consumed (sorted, merged): leased again first.
    pub free: Vec<SeqRange>,
}

impl Ledger {
    /// `n` positions: returned ones first (lowest first), then new ones.
    pub fn lease(&mut self, n: u64) -> Vec<SeqRange> {
        let (mut leased, rest) = stream::split_at(&self.free, n);
        self.free = rest;
        let short = n - stream::total(&leased);
        if short > 0 {
            leased.push(SeqRange::new(self.next, self.next + short));
            self.next += short;
        }
        leased
    }

    /// Positions leased and not consumed, to be leased again.
    pub fn give_back(&mut self, ranges: &[SeqRange]) {
        let mut free = std::mem::take(&mut self.free);
        free.extend(ranges.iter().filter(|r| r.end <= self.next));
        self.free = stream::normalized(free);
    }

    /// Positions consumed for good.
    pub fn consumed(&self) -> u64 {
        self.next - stream::total(&self.free)
    }
}

/// What a replica's report says it consumed of its `lease`, taken as the lease's prefix of that
/// length, and the rest of the lease. The second value is false when the report is not that
/// prefix (a confused or hostile node): the length is all that counts then.
pub fn settle(lease: &[SeqRange], reported: &[SeqRange]) -> (Vec<SeqRange>, Vec<SeqRange>, bool) {
    let (consumed, rest) = stream::split_at(lease, stream::total(reported));
    let exact = stream::normalized(consumed.clone()) == stream::normalized(reported.to_vec());
    (consumed, rest, exact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> SeqRange {
        SeqRange::new(start, end)
    }

    #[test]
    fn returned_positions_are_leased_again_before_new_ones() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.lease(10), vec![r(0, 10)]);
        assert_eq!(ledger.lease(10), vec![r(10, 20)]);
        ledger.give_back(&[r(4, 10)]);
        ledger.give_back(&[r(12, 14), r(10, 12)]);
        assert_eq!(ledger.free, vec![r(4, 14)]);
        assert_eq!(ledger.consumed(), 10);
        assert_eq!(ledger.lease(4), vec![r(4, 8)]);
        assert_eq!(ledger.lease(10), vec![r(8, 14), r(20, 24)]);
        assert_eq!(ledger.next, 24);
        // Positions never leased are not taken back.
        ledger.give_back(&[r(30, 40)]);
        assert!(ledger.free.is_empty());
    }

    #[test]
    fn a_report_settles_a_prefix_of_its_lease() {
        let lease = [r(40, 48), r(0, 16)];
        assert_eq!(
            settle(&lease, &[r(40, 48), r(0, 4)]),
            (vec![r(40, 48), r(0, 4)], vec![r(4, 16)], true)
        );
        // Claiming other positions counts as their number of the lease's own.
        assert_eq!(
            settle(&lease, &[r(100, 110)]),
            (vec![r(40, 48), r(0, 2)], vec![r(2, 16)], false)
        );
        assert_eq!(
            settle(&lease, &[r(0, 999)]),
            (lease.to_vec(), vec![], false)
        );
    }

    #[test]
    fn leases_follow_speed_in_paced_rounds() {
        let plan = DataPlan {
            sequences_per_step: 8,
            inner_steps: 10,
        };
        assert_eq!(plan.lease_len(None, 500), 80);
        // Twice as fast as the median: 20 steps expected, 26 leased.
        assert_eq!(plan.lease_len(Some(1000), 500), 26 * 8);
        // Four times slower: 3 expected, 4 leased.
        assert_eq!(plan.lease_len(Some(1000), 4000), 4 * 8);
        assert_eq!(plan.lease_len(Some(1000), 0), 13 * 8);
        assert_eq!(plan.lease_len(Some(1000), 1), 80 * 8);
    }
}
