//! Data mixtures: several token streams interleaved by weight into the one training stream
//! that [`super::Batches`] reads and the coordinator leases by position.
//!
//! The mixed stream is cut into blocks of [`MIX_BLOCK`] positions. Each block gets a number of
//! windows from each source: its share at the block's middle token (`[data] mix` weights or the
//! curriculum, [`DataConfig::mix_weights_at`]) times the block, with what rounding left over
//! carried to the next block, so every source's count stays within one window of its share of
//! the whole stream so far. Inside a block the sources' windows are shuffled by the run's seed.
//! A source's `j`-th window is entry `j % n` of its own seeded permutation for epoch `j / n`
//! (`n`: its windows), so each source is read without repeats until it is used up, then
//! again in another order. Everything follows from the position, so any node, any worker and a
//! resumed run compute the same window for a position; the coordinator's leases of positions
//! therefore follow the mixture over the whole run, whoever reads them.

use super::batches::{Xoshiro256, epoch_seed, permutation};
use super::cache::Tokens;
use crate::error::{Error, Result};
use forge_protocol::run_config::DataConfig;
use std::sync::Arc;

/// Positions per block of the mixed stream.
pub const MIX_BLOCK: u64 = 1024;

/// Salts that keep the blocks' and each source's shuffles apart from the plain stream's.
const BLOCK_SALT: u64 = 0x6D69_7862_6C6F_636B;
const SOURCE_SALT: u64 = 0x6D69_7873_6F75_7263;

/// A mixture's sources and weights: cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Mixture {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    names: Vec<String>,
    sources: Vec<Tokens>,
    /// The `[data]` section, for its weights and curriculum.
    cfg: DataConfig,
}

impl Mixture {
    /// The sources of `cfg.mix` (their tokens, in its order) with its weights.
    pub fn new(cfg: &DataConfig, sources: Vec<Tokens>) -> Result<Self> {
        if cfg.mix.is_empty() || cfg.mix.len() != sources.len() {
            return Err(Error::Data(format!(
                "a mixture needs one token stream per [data] mix source ({} sources, {} streams)",
                cfg.mix.len(),
                sources.len()
            )));
        }
        if sources.len() > usize::from(u16::MAX) {
            return Err(Error::Data(format!(
                "[data] mix lists {} sources; at most {} are supported",
                sources.len(),
                u16::MAX
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                names: cfg.mix.iter().map(|s| s.label()).collect(),
                sources,
                cfg: cfg.clone(),
            }),
        })
    }

    /// The sources' names, in `[data] mix` order.
    pub fn names(&self) -> &[String] {
        &self.inner.names
    }

    /// The sources' tokens, in `[data] mix` order.
    pub fn sources(&self) -> &[Tokens] {
        &self.inner.sources
    }

    /// The sources' shares once `tokens` training tokens have been seen.
    pub fn shares_at(&self, tokens: f64) -> Vec<f64> {
        self.inner.cfg.mix_weights_at(tokens)
    }

    /// The sources' names, weights and curriculum as canonical JSON: what, besides the
    /// sources' tokens, decides the stream.
    pub fn schedule_key(&self) -> String {
        let weights: Vec<Option<f64>> = self.inner.cfg.mix.iter().map(|s| s.weight).collect();
        serde_json::json!({
            "names": self.inner.names,
            "weights": weights,
            "curriculum": self.inner.cfg.curriculum,
        })
        .to_string()
    }

    /// Windows of each source among stream positions `0..p` for `seq_len` and `seed`: what a
    /// run that read that far of the stream took from each.
    pub fn windows_before(&self, seq_len: usize, seed: u64, p: u64) -> Result<Vec<u64>> {
        Ok(MixCursor::new(self.clone(), seq_len, seed)?.windows_before(p))
    }

    /// The first `max_tokens` (or fewer, once every source was read once) tokens of the
    /// mixed stream for `seq_len`, in order: what the run trains on, for statistics.
    pub fn sample(&self, seq_len: usize, seed: u64, max_tokens: usize) -> Result<Tokens> {
        let mut cursor = MixCursor::new(self.clone(), seq_len, seed)?;
        let windows = (max_tokens / seq_len).min(cursor.windows()).max(1);
        let mut out = Vec::with_capacity(windows * seq_len);
        let mut window = vec![0u32; seq_len + 1];
        for p in 0..windows as u64 {
            let (s, w) = cursor.window_at(p);
            self.sources()[s].read(w * seq_len, &mut window);
            out.extend_from_slice(&window[..seq_len]);
        }
        Ok(Tokens::from_vec(out))
    }
}

/// Reads a [`Mixture`] by stream position for windows of `seq_len + 1` tokens, keeping what it
/// computed for the positions it read last (the blocks' counts, the current block's order and
/// each source's current epoch).
#[derive(Clone, Debug)]
pub(crate) struct MixCursor {
    mix: Mixture,
    seq_len: usize,
    seed: u64,
    /// Windows in each source.
    windows: Vec<u64>,
    /// `counts[b · sources + s]`: windows of source `s` in the blocks before block `b`.
    counts: Vec<u64>,
    /// What rounding left over after the last counted block, per source.
    carry: Vec<f64>,
    block: Option<Block>,
    /// Per source: the epoch whose order is kept, and that order.
    orders: Vec<Option<(u64, Vec<u32>)>>,
    /// Windows read of each source through this cursor.
    drawn: Vec<u64>,
}

/// One block's sources in order, and for each position the number of windows of its source
/// before it in the block.
#[derive(Clone, Debug)]
struct Block {
    index: u64,
    labels: Vec<u16>,
    ranks: Vec<u32>,
}

impl MixCursor {
    pub(crate) fn new(mix: Mixture, seq_len: usize, seed: u64) -> Result<Self> {
        let windows = mix
            .sources()
            .iter()
            .zip(mix.names())
            .map(|(tokens, name)| {
                let n = tokens.len().saturating_sub(1) / seq_len;
                if n == 0 {
                    return Err(Error::Data(format!(
                        "[data] mix source {name} has {} tokens, not one window of seq_len + 1 \
                         = {}; give it more data or lower seq_len",
                        tokens.len(),
                        seq_len + 1
                    )));
                }
                Ok(n as u64)
            })
            .collect::<Result<Vec<u64>>>()?;
        let k = windows.len();
        Ok(Self {
            mix,
            seq_len,
            seed,
            windows,
            counts: vec![0; k],
            carry: vec![0.0; k],
            block: None,
            orders: vec![None; k],
            drawn: vec![0; k],
        })
    }

    /// Windows in all sources together (the stream's nominal epoch).
    pub(crate) fn windows(&self) -> usize {
        self.windows.iter().sum::<u64>() as usize
    }

    /// The sources' tokens, in `[data] mix` order.
    pub(crate) fn sources(&self) -> &[Tokens] {
        self.mix.sources()
    }

    pub(crate) fn mixture(&self) -> &Mixture {
        &self.mix
    }

    /// Windows read of each source through this cursor.
    pub(crate) fn drawn(&self) -> &[u64] {
        &self.drawn
    }

    /// The source and the window of it at stream position `p`.
    pub(crate) fn window_at(&mut self, p: u64) -> (usize, usize) {
        let b = p / MIX_BLOCK;
        self.count_through(b + 1);
        if self.block.as_ref().is_none_or(|block| block.index != b) {
            self.block = Some(self.shuffled_block(b));
        }
        let block = self.block.as_ref().expect("set above");
        let at = (p % MIX_BLOCK) as usize;
        let s = usize::from(block.labels[at]);
        let k = self.windows.len();
        let j = self.counts[b as usize * k + s] + u64::from(block.ranks[at]);
        let n = self.windows[s];
        let epoch = j / n;
        if self.orders[s].as_ref().is_none_or(|(e, _)| *e != epoch) {
            let seed = epoch_seed(self.seed ^ SOURCE_SALT.wrapping_mul(s as u64 + 1), epoch);
            self.orders[s] = Some((epoch, permutation(n as usize, seed)));
        }
        let (_, order) = self.orders[s].as_ref().expect("set above");
        self.drawn[s] += 1;
        (s, order[(j % n) as usize] as usize)
    }

    /// Windows of each source among positions `0..p`.
    pub(crate) fn windows_before(&mut self, p: u64) -> Vec<u64> {
        let (b, at) = (p / MIX_BLOCK, (p % MIX_BLOCK) as usize);
        self.count_through(b + 1);
        let k = self.windows.len();
        let mut counts = self.counts[b as usize * k..(b as usize + 1) * k].to_vec();
        if at > 0 {
            for &s in &self.shuffled_block(b).labels[..at] {
                counts[usize::from(s)] += 1;
            }
        }
        counts
    }

    /// Extends the blocks' counts until those before block `b` are known.
    fn count_through(&mut self, b: u64) {
        let k = self.windows.len();
        while (self.counts.len() / k) as u64 <= b {
            let next = (self.counts.len() / k - 1) as u64;
            let middle = (next * MIX_BLOCK + MIX_BLOCK / 2) as f64 * self.seq_len as f64;
            let shares = self.mix.shares_at(middle);
            let start = self.counts.len() - k;
            let mut block = apportion(&shares, &mut self.carry);
            for (s, n) in block.iter_mut().enumerate() {
                *n += self.counts[start + s];
            }
            self.counts.extend(block);
        }
    }

    /// Block `b`'s sources in a seeded order.
    fn shuffled_block(&self, b: u64) -> Block {
        let k = self.windows.len();
        let row = b as usize * k;
        let mut labels = Vec::with_capacity(MIX_BLOCK as usize);
        for s in 0..k {
            let n = self.counts[row + k + s] - self.counts[row + s];
            labels.extend(std::iter::repeat_n(s as u16, n as usize));
        }
        let mut rng = Xoshiro256::new(epoch_seed(self.seed ^ BLOCK_SALT, b));
        for i in (1..labels.len()).rev() {
            labels.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut seen = vec![0u32; k];
        let ranks = labels
            .iter()
            .map(|&s| {
                let r = seen[usize::from(s)];
                seen[usize::from(s)] += 1;
                r
            })
            .collect();
        Block {
            index: b,
            labels,
            ranks,
        }
    }
}

/// Windows of each source in one block of [`MIX_BLOCK`]: `shares` of the block plus what the
/// blocks before left over (`carry`, updated), rounded so that they sum to the block: each
/// source gets the whole part of its due, and the windows left go to the largest remainders
/// (the lower source first on a tie). A source's carry stays within one window.
fn apportion(shares: &[f64], carry: &mut [f64]) -> Vec<u64> {
    let due: Vec<f64> = shares
        .iter()
        .zip(carry.iter())
        .map(|(share, c)| share * MIX_BLOCK as f64 + c)
        .collect();
    let mut counts: Vec<u64> = due.iter().map(|d| d.floor().max(0.0) as u64).collect();
    let left = MIX_BLOCK.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..due.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (due[a] - counts[a] as f64, due[b] - counts[b] as f64);
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &s in order.iter().take(left as usize) {
        counts[s] += 1;
    }
    for (s, c) in carry.iter_mut().enumerate() {
        *c = due[s] - counts[s] as f64;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use forge_protocol::run_config::{CurriculumPoint, MixSource};
    use std::collections::HashSet;
    use std::path::PathBuf;

    fn config(weights: &[Option<f64>], curriculum: Vec<CurriculumPoint>) -> DataConfig {
        DataConfig {
            train: vec![],
            val: vec![PathBuf::from("v")],
            format: Default::default(),
            val_format: None,
            text_field: "text".into(),
            tokenizer: None,
            cache_dir: PathBuf::from("."),
            mix: weights
                .iter()
                .enumerate()
                .map(|(i, w)| MixSource {
                    train: vec![PathBuf::from(format!("s{i}"))],
                    weight: *w,
                    name: None,
                    format: None,
                    text_field: None,
                })
                .collect(),
            curriculum,
        }
    }

    /// Sources of `lens` tokens, source `s`'s tokens starting at `s · 1e6`.
    fn cursor(cfg: &DataConfig, lens: &[u32], seq_len: usize, seed: u64) -> MixCursor {
        let sources = lens
            .iter()
            .enumerate()
            .map(|(s, &n)| Tokens::from_vec((0..n).map(|t| s as u32 * 1_000_000 + t).collect()))
            .collect();
        MixCursor::new(Mixture::new(cfg, sources).unwrap(), seq_len, seed).unwrap()
    }

    #[test]
    fn sources_get_their_weights_within_one_window_at_every_block() {
        let cfg = config(&[Some(0.7), Some(0.2), Some(0.1)], vec![]);
        let mut c = cursor(&cfg, &[4000, 900, 50_000], 4, 7);
        let mut seen = [0u64; 3];
        let mut windows: Vec<HashSet<usize>> = vec![HashSet::new(); 3];
        for p in 0..40 * MIX_BLOCK {
            let (s, w) = c.window_at(p);
            seen[s] += 1;
            // Until a source is used up, its windows do not repeat.
            if windows[s].len() < c.windows[s] as usize {
                assert!(windows[s].insert(w), "source {s} window {w} read twice");
            }
            if (p + 1) % MIX_BLOCK == 0 {
                for (s, share) in [0.7, 0.2, 0.1].iter().enumerate() {
                    let due = share * (p + 1) as f64;
                    assert!(
                        (seen[s] as f64 - due).abs() < 1.0,
                        "{s}: {} vs {due}",
                        seen[s]
                    );
                }
            }
        }
        assert_eq!(c.drawn(), seen);
        let mut fresh = cursor(&cfg, &[4000, 900, 50_000], 4, 7);
        assert_eq!(fresh.windows_before(40 * MIX_BLOCK), seen);
        let first: Vec<usize> = (0..1500).map(|p| c.window_at(p).0).collect();
        for s in 0..3 {
            let n = first.iter().filter(|&&x| x == s).count() as u64;
            assert_eq!(fresh.windows_before(1500)[s], n);
        }
        // Source 1 (224 windows) was read 37 times over, each time every window once.
        assert_eq!(windows[1].len(), 224);
    }

    #[test]
    fn a_position_names_the_same_window_whoever_reads_it_and_in_any_order() {
        let cfg = config(&[Some(1.0), Some(2.0)], vec![]);
        let mut forward = cursor(&cfg, &[3000, 5000], 8, 11);
        let all: Vec<(usize, usize)> = (0..5 * MIX_BLOCK).map(|p| forward.window_at(p)).collect();
        let mut other = cursor(&cfg, &[3000, 5000], 8, 11);
        for p in (0..5 * MIX_BLOCK).rev().step_by(7) {
            assert_eq!(other.window_at(p), all[p as usize], "position {p}");
        }
        // Another seed, another order of the same shares.
        let mut reseeded = cursor(&cfg, &[3000, 5000], 8, 12);
        let again: Vec<(usize, usize)> =
            (0..5 * MIX_BLOCK).map(|p| reseeded.window_at(p)).collect();
        assert_ne!(again, all);
        let count = |v: &[(usize, usize)]| v.iter().filter(|(s, _)| *s == 0).count();
        assert_eq!(count(&again), count(&all));
    }

    #[test]
    fn a_curriculum_switches_and_ramps_where_its_points_say() {
        // 4 tokens per window: a block is 4,096 tokens. Source 0 alone until 40,960 tokens
        // (block 10), then source 1 alone; from block 20 a ramp to half and half at block 40.
        let point = |tokens, weights: [f64; 2]| CurriculumPoint {
            tokens,
            weights: weights.to_vec(),
        };
        let cfg = config(
            &[None, None],
            vec![
                point(0, [1.0, 0.0]),
                point(40_960, [1.0, 0.0]),
                point(40_960, [0.0, 1.0]),
                point(81_920, [0.0, 1.0]),
                point(163_840, [1.0, 1.0]),
            ],
        );
        cfg.validate().unwrap();
        let mut c = cursor(&cfg, &[100_000, 100_000], 4, 3);
        let per_block: Vec<u64> = (0..60)
            .map(|b| {
                (b * MIX_BLOCK..(b + 1) * MIX_BLOCK)
                    .filter(|&p| c.window_at(p).0 == 0)
                    .count() as u64
            })
            .collect();
        assert!(
            per_block[..10].iter().all(|&n| n == MIX_BLOCK),
            "{per_block:?}"
        );
        assert!(per_block[10..20].iter().all(|&n| n == 0), "{per_block:?}");
        // The ramp: block b's middle is at (b + 0.5) / 20 of the way, half of it source 0.
        for b in 20..40 {
            let due = (b as f64 + 0.5 - 20.0) / 20.0 * 0.5 * MIX_BLOCK as f64;
            assert!(
                (per_block[b] as f64 - due).abs() <= 1.0,
                "block {b}: {per_block:?}"
            );
        }
        assert!(
            per_block[40..]
                .iter()
                .all(|&n| n.abs_diff(MIX_BLOCK / 2) <= 1),
            "{per_block:?}"
        );
    }

    #[test]
    fn apportioning_keeps_every_source_within_a_window_of_its_due() {
        let mut carry = vec![0.0; 3];
        let mut total = [0u64; 3];
        let shares = [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        for block in 1..=50u64 {
            let counts = apportion(&shares, &mut carry);
            assert_eq!(counts.iter().sum::<u64>(), MIX_BLOCK);
            for s in 0..3 {
                total[s] += counts[s];
                let due = shares[s] * (block * MIX_BLOCK) as f64;
                assert!((total[s] as f64 - due).abs() < 1.0);
            }
        }
        // A source whose share drops to 0 gets at most what it was still owed.
        let counts = apportion(&[0.0, 0.5, 0.5], &mut carry);
        assert!(counts[0] <= 1 && counts.iter().sum::<u64>() == MIX_BLOCK);
        assert!(carry.iter().all(|c| c.abs() < 1.0));
    }
}
