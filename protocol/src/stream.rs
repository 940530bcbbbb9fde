//! The run's training stream as the coordinator hands it out: every epoch is one seeded
//! permutation of the corpus's `seq_len + 1` windows, and position `p` of the stream is entry
//! `p % windows` of epoch `p / windows`'s permutation. The coordinator leases ranges of positions
//! to replicas per round and keeps what they did not consume for the next ones, so the live
//! replicas read every epoch once, with no gaps and no repeats, as they come and go.

use crate::messages::{Digest, ReplicaId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Positions `start..end` of the training stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqRange {
    pub start: u64,
    pub end: u64,
}

impl SeqRange {
    pub fn new(start: u64, end: u64) -> SeqRange {
        SeqRange { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for SeqRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Positions in `ranges` together.
pub fn total(ranges: &[SeqRange]) -> u64 {
    ranges.iter().map(SeqRange::len).sum()
}

/// The first `n` positions of `ranges` (in their order) and the rest.
pub fn split_at(ranges: &[SeqRange], n: u64) -> (Vec<SeqRange>, Vec<SeqRange>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = n;
    for range in ranges.iter().filter(|r| !r.is_empty()) {
        if left >= range.len() {
            head.push(*range);
            left -= range.len();
        } else if left > 0 {
            head.push(SeqRange::new(range.start, range.start + left));
            tail.push(SeqRange::new(range.start + left, range.end));
            left = 0;
        } else {
            tail.push(*range);
        }
    }
    (head, tail)
}

/// The stream position `n` positions into `ranges` (in their order); None past their end.
pub fn position_at(ranges: &[SeqRange], n: u64) -> Option<u64> {
    let mut left = n;
    for range in ranges {
        if left < range.len() {
            return Some(range.start + left);
        }
        left -= range.len();
    }
    None
}

/// `ranges` sorted, with touching and overlapping ranges merged and empty ones dropped.
pub fn normalized(mut ranges: Vec<SeqRange>) -> Vec<SeqRange> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable();
    let mut out: Vec<SeqRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match out.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => out.push(range),
        }
    }
    out
}

/// `ranges` as `a..b, c..d`.
pub fn describe(ranges: &[SeqRange]) -> String {
    if ranges.is_empty() {
        return "none".to_string();
    }
    ranges
        .iter()
        .map(SeqRange::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a node's training stream is made of, sent once its data is tokenized
/// ([`crate::NodeMessage::Ready`]): the coordinator takes the first as the run's and refuses
/// a member whose stream differs, since a position would name other tokens on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDigest {
    /// SHA-256 of the training tokens (u32 little-endian, in corpus order).
    pub corpus: Digest,
    /// SHA-256 of the tokenizer's canonical JSON.
    pub tokenizer: Digest,
    /// Windows of `seq_len + 1` tokens per epoch.
    pub windows: u64,
}

/// The stream positions a replica reads in a round: its inner steps take them in order, the
/// run's `batch_size` per step, and stop when they run out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLease {
    pub replica: ReplicaId,
    pub ranges: Vec<SeqRange>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> SeqRange {
        SeqRange::new(start, end)
    }

    #[test]
    fn split_at_takes_a_prefix_across_ranges() {
        let ranges = [r(10, 14), r(0, 3), r(20, 30)];
        assert_eq!(split_at(&ranges, 0), (vec![], ranges.to_vec()));
        assert_eq!(
            split_at(&ranges, 6),
            (vec![r(10, 14), r(0, 2)], vec![r(2, 3), r(20, 30)])
        );
        assert_eq!(split_at(&ranges, 17), (ranges.to_vec(), vec![]));
        assert_eq!(split_at(&ranges, 99), (ranges.to_vec(), vec![]));
        assert_eq!(total(&ranges), 17);
        assert_eq!(position_at(&ranges, 0), Some(10));
        assert_eq!(position_at(&ranges, 5), Some(1));
        assert_eq!(position_at(&ranges, 16), Some(29));
        assert_eq!(position_at(&ranges, 17), None);
    }

    #[test]
    fn normalized_sorts_and_merges() {
        assert_eq!(
            normalized(vec![r(8, 9), r(0, 2), r(5, 5), r(2, 4), r(3, 6)]),
            vec![r(0, 6), r(8, 9)]
        );
        assert_eq!(describe(&[r(0, 6), r(8, 9)]), "0..6, 8..9");
    }
}
