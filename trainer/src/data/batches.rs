//! Batches: the token stream cut into `seq_len + 1` windows, shuffled per epoch by seed, split
//! into disjoint shards (one per replica × local worker), with a resumable position; and the
//! fixed, in-order validation windows.
//!
//! Window `w` is tokens `w·seq_len ..= w·seq_len + seq_len`: inputs are its first `seq_len`
//! tokens, targets the last `seq_len`. Consecutive windows share one token, so every token but
//! the first is a target exactly once per epoch.

use super::cache::Tokens;
use super::mix::{MixCursor, Mixture};
use crate::error::{Error, Result};
use forge_protocol::rng::SplitMix64;
use forge_protocol::stream::{self, SeqRange};
use serde::{Deserialize, Serialize};

/// Where a [`Batches`] stream stands: `index` windows of this shard's `epoch` are consumed.
/// Stored in checkpoints; seeking to it continues exactly where the stream stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: u64,
}

/// `rows` windows as plain token ids; the training loop turns them into `[rows, seq_len]`
/// tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[rows, seq_len]`, row-major.
    pub inputs: Vec<i64>,
    /// `[rows, seq_len]`: `inputs` shifted left by one token.
    pub targets: Vec<i64>,
    pub rows: usize,
    pub seq_len: usize,
}

/// The shard a local worker reads: replicas take contiguous blocks of `workers_per_replica`
/// shards, so `shard = replica · W + worker` of `R · W` shards.
pub fn shard_index(replica: usize, worker: usize, workers_per_replica: usize) -> usize {
    replica * workers_per_replica + worker
}

/// What part of the stream a local worker reads of a replica's lease ([`forge_protocol::stream`]):
/// each inner step takes the next `block` positions of the lease (the run's batch size), of
/// which this worker reads `take` from `offset` (the workers before it read the ones before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseShare {
    pub ranges: Vec<SeqRange>,
    pub block: u64,
    pub offset: u64,
    pub take: u64,
}

impl LeaseShare {
    /// Whole steps the lease holds.
    pub fn steps(&self) -> u64 {
        stream::total(&self.ranges) / self.block.max(1)
    }
}

/// What the training stream is made of: one corpus, or a mixture of sources.
#[derive(Debug, Clone)]
pub enum TrainStream {
    Corpus(Tokens),
    Mix(Mixture),
}

impl From<Tokens> for TrainStream {
    fn from(tokens: Tokens) -> Self {
        TrainStream::Corpus(tokens)
    }
}

impl From<Mixture> for TrainStream {
    fn from(mix: Mixture) -> Self {
        TrainStream::Mix(mix)
    }
}

/// An endless stream of training batches for one shard, or the positions of a lease.
#[derive(Debug, Clone)]
pub struct Batches {
    /// The corpus (with a mixture: its first source, unused).
    tokens: Tokens,
    /// Set with a mixture: position → source and window.
    mix: Option<MixCursor>,
    /// With a mixture: the windows of each source [`Batches::take_source_windows`] reported.
    reported: Vec<u64>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    shard: usize,
    n_shards: usize,
    n_windows: usize,
    position: DataPosition,
    /// This shard's windows in `order_epoch`'s order (all windows with a lease).
    order: Vec<u32>,
    order_epoch: Option<u64>,
    /// Set: the stream positions of a lease, not the shard (`position.index` counts the windows
    /// read of it).
    lease: Option<LeaseShare>,
    window: Vec<u32>,
}

impl Batches {
    /// Batches of `batch_size` windows of `seq_len + 1` tokens for `shard` of `n_shards`. Every
    /// shard computes the same seeded permutation of all windows and takes every
    /// `n_shards`-th one from position `shard`, so shards are disjoint and together cover
    /// every window each epoch; their lengths differ by at most one window. With a mixture
    /// ([`super::mix`]) the stream has no epochs: shard `shard` reads positions `shard`,
    /// `shard + n_shards`, … of the mixed stream.
    pub fn new(
        stream: impl Into<TrainStream>,
        seq_len: usize,
        batch_size: usize,
        seed: u64,
        shard: usize,
        n_shards: usize,
    ) -> Result<Self> {
        let (tokens, mix) = match stream.into() {
            TrainStream::Corpus(tokens) => (tokens, None),
            TrainStream::Mix(mix) => {
                let tokens = mix.sources()[0].clone();
                (tokens, Some(MixCursor::new(mix, seq_len.max(1), seed)?))
            }
        };
        if seq_len == 0 || batch_size == 0 {
            return Err(Error::Data(format!(
                "seq_len ({seq_len}) and batch_size ({batch_size}) must both be at least 1"
            )));
        }
        if n_shards == 0 || shard >= n_shards {
            return Err(Error::Data(format!(
                "data shard {shard} of {n_shards} does not exist; shards are numbered \
                 replica × workers + worker, below replicas × workers"
            )));
        }
        let n_windows = match &mix {
            Some(mix) => mix.windows(),
            None => windows_in(&tokens, seq_len)?,
        };
        if n_windows > u32::MAX as usize {
            return Err(Error::Data(format!(
                "{n_windows} windows of {seq_len} tokens are more than one stream indexes \
                 ({}); use a longer seq_len or split the corpus",
                u32::MAX
            )));
        }
        if n_windows < n_shards {
            return Err(Error::Data(format!(
                "{} tokens make {n_windows} windows of {} tokens, fewer than the {n_shards} data \
                 shards (replicas × workers); use more data, a shorter seq_len or fewer workers",
                tokens.len(),
                seq_len + 1
            )));
        }
        Ok(Self {
            tokens,
            mix,
            reported: Vec::new(),
            seq_len,
            batch_size,
            seed,
            shard,
            n_shards,
            n_windows,
            position: DataPosition::default(),
            order: Vec::new(),
            order_epoch: None,
            lease: None,
            window: vec![0; seq_len + 1],
        })
    }

    /// Reads `share` of a lease from its start instead of the shard (until the next
    /// [`Batches::reshard`]).
    pub fn lease(&mut self, share: LeaseShare) -> Result<()> {
        if share.block == 0 || share.take == 0 || share.offset + share.take > share.block {
            return Err(Error::Data(format!(
                "a worker's share of a data lease must lie inside one step's {} positions \
                 (offset {}, {} positions)",
                share.block, share.offset, share.take
            )));
        }
        self.lease = Some(share);
        self.position = DataPosition::default();
        self.order_epoch = None;
        Ok(())
    }

    /// With a lease: the inner steps it has left (every worker of a replica has the same).
    pub fn lease_steps_left(&self) -> Option<u64> {
        let lease = self.lease.as_ref()?;
        Some(lease.steps() - self.lease_steps_done(lease))
    }

    /// With a lease: the positions its steps so far read (a prefix of the lease), for the
    /// whole replica.
    pub fn lease_consumed(&self) -> Option<Vec<SeqRange>> {
        self.lease_consumed_after(0)
    }

    /// [`Batches::lease_consumed`] once `more` further steps have read the lease (as far as it
    /// holds them).
    pub fn lease_consumed_after(&self, more: u64) -> Option<Vec<SeqRange>> {
        let lease = self.lease.as_ref()?;
        let done = (self.lease_steps_done(lease) + more).min(lease.steps());
        Some(stream::split_at(&lease.ranges, done * lease.block).0)
    }

    fn lease_steps_done(&self, lease: &LeaseShare) -> u64 {
        self.position.index / lease.take
    }

    /// Windows in the whole stream (with a mixture: in all its sources).
    pub fn windows(&self) -> usize {
        self.n_windows
    }

    /// Windows this shard reads per epoch (a mixture's stream has no epochs: `usize::MAX`).
    pub fn shard_len(&self) -> usize {
        if self.mix.is_some() {
            return usize::MAX;
        }
        (self.n_windows - self.shard).div_ceil(self.n_shards)
    }

    /// With a mixture: the windows read of each source since the last call (empty without).
    pub fn take_source_windows(&mut self) -> Vec<u64> {
        let Some(mix) = &self.mix else {
            return Vec::new();
        };
        let drawn = mix.drawn();
        self.reported.resize(drawn.len(), 0);
        let read = drawn
            .iter()
            .zip(&self.reported)
            .map(|(d, r)| d - r)
            .collect();
        self.reported = drawn.to_vec();
        read
    }

    /// What the stream is made of.
    pub fn stream(&self) -> TrainStream {
        match &self.mix {
            Some(mix) => TrainStream::Mix(mix.mixture().clone()),
            None => TrainStream::Corpus(self.tokens.clone()),
        }
    }

    /// The same stream over shard `shard` of `n_shards`, from its start.
    pub fn reshard(&mut self, shard: usize, n_shards: usize) -> Result<()> {
        *self = Batches::new(
            self.stream(),
            self.seq_len,
            self.batch_size,
            self.seed,
            shard,
            n_shards,
        )?;
        Ok(())
    }

    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Continues from `position` (from [`Batches::position`] of a stream with the same tokens,
    /// seq_len, seed and shards).
    pub fn seek(&mut self, position: DataPosition) -> Result<()> {
        if position.index > self.shard_len() as u64 {
            return Err(Error::Data(format!(
                "data position epoch {} index {} is past the end of shard {} of {} ({} windows \
                 of {} tokens); was the checkpoint written with another corpus, seq_len or \
                 number of workers?",
                position.epoch,
                position.index,
                self.shard,
                self.n_shards,
                self.shard_len(),
                self.seq_len + 1
            )));
        }
        self.position = position;
        Ok(())
    }

    /// The next `batch_size` windows; epochs roll over inside a batch when they end.
    pub fn next_batch(&mut self) -> Batch {
        let mut batch = Batch {
            inputs: Vec::with_capacity(self.batch_size * self.seq_len),
            targets: Vec::with_capacity(self.batch_size * self.seq_len),
            rows: self.batch_size,
            seq_len: self.seq_len,
        };
        for _ in 0..self.batch_size {
            let (source, w) = self.next_source_window();
            let tokens = match &self.mix {
                Some(mix) => &mix.sources()[source],
                None => &self.tokens,
            };
            tokens.read(w * self.seq_len, &mut self.window);
            push_window(&self.window, &mut batch);
        }
        batch
    }

    /// The next window this shard (or lease) reads, as its source (0 without a mixture) and
    /// window index, advancing the position.
    fn next_source_window(&mut self) -> (usize, usize) {
        if self.mix.is_none() {
            return (0, self.next_window());
        }
        let position = match &self.lease {
            Some(lease) => Self::lease_position(lease, self.position.index),
            None => self.position.index * self.n_shards as u64 + self.shard as u64,
        };
        self.position.index += 1;
        self.mix
            .as_mut()
            .expect("checked above")
            .window_at(position)
    }

    /// The stream position of the `k`-th window a worker reads of its share of a lease.
    fn lease_position(lease: &LeaseShare, k: u64) -> u64 {
        let offset = k / lease.take * lease.block + lease.offset + k % lease.take;
        stream::position_at(&lease.ranges, offset)
            .expect("the trainer stops a round's inner steps when its data lease has no step left")
    }

    /// Index of the next window this shard (or lease) reads, advancing the position (one
    /// corpus; [`Batches::next_source_window`] reads mixtures).
    pub(crate) fn next_window(&mut self) -> usize {
        if let Some(lease) = &self.lease {
            let position = Self::lease_position(lease, self.position.index);
            let n = self.n_windows as u64;
            let epoch = position / n;
            if self.order_epoch != Some(epoch) {
                self.order = self.permutation(epoch);
                self.order_epoch = Some(epoch);
            }
            self.position.index += 1;
            return self.order[(position % n) as usize] as usize;
        }
        if self.position.index >= self.shard_len() as u64 {
            self.position.epoch += 1;
            self.position.index = 0;
        }
        if self.order_epoch != Some(self.position.epoch) {
            self.order = self.shard_order(self.position.epoch);
            self.order_epoch = Some(self.position.epoch);
        }
        let w = self.order[self.position.index as usize] as usize;
        self.position.index += 1;
        w
    }

    /// This shard's windows for `epoch`: positions `shard, shard + n_shards, …` of the
    /// epoch's permutation of all windows.
    fn shard_order(&self, epoch: u64) -> Vec<u32> {
        self.permutation(epoch)
            .into_iter()
            .skip(self.shard)
            .step_by(self.n_shards)
            .collect()
    }

    /// Every window in `epoch`'s seeded order: the stream's positions of that epoch.
    fn permutation(&self, epoch: u64) -> Vec<u32> {
        permutation(self.n_windows, epoch_seed(self.seed, epoch))
    }
}

/// `0..n` in the order a Fisher–Yates shuffle seeded with `seed` gives.
pub(super) fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut all: Vec<u32> = (0..n as u32).collect();
    let mut rng = Xoshiro256::new(seed);
    for i in (1..all.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        all.swap(i, j);
    }
    all
}

/// The validation windows in order, unshuffled: the same fixed set at every evaluation.
#[derive(Debug, Clone)]
pub struct EvalBatches {
    tokens: Tokens,
    seq_len: usize,
    batch_size: usize,
    n_windows: usize,
    next: usize,
    window: Vec<u32>,
}

impl EvalBatches {
    /// The first `max_windows` windows (all when `None`), `batch_size` at a time; the last
    /// batch may have fewer rows.
    pub fn new(
        tokens: Tokens,
        seq_len: usize,
        batch_size: usize,
        max_windows: Option<usize>,
    ) -> Result<Self> {
        if seq_len == 0 || batch_size == 0 {
            return Err(Error::Data(format!(
                "seq_len ({seq_len}) and eval batch_size ({batch_size}) must both be at least 1"
            )));
        }
        let all = windows_in(&tokens, seq_len)?;
        let n_windows = max_windows.map_or(all, |m| m.min(all));
        if n_windows == 0 {
            return Err(Error::Data(
                "max_windows = 0 leaves no validation windows".into(),
            ));
        }
        Ok(Self {
            tokens,
            seq_len,
            batch_size,
            n_windows,
            next: 0,
            window: vec![0; seq_len + 1],
        })
    }

    /// Windows in the set.
    pub fn windows(&self) -> usize {
        self.n_windows
    }

    /// Starts again from the first window.
    pub fn reset(&mut self) {
        self.next = 0;
    }
}

impl Iterator for EvalBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.n_windows {
            return None;
        }
        let rows = self.batch_size.min(self.n_windows - self.next);
        let mut batch = Batch {
            inputs: Vec::with_capacity(rows * self.seq_len),
            targets: Vec::with_capacity(rows * self.seq_len),
            rows,
            seq_len: self.seq_len,
        };
        for w in self.next..self.next + rows {
            self.tokens.read(w * self.seq_len, &mut self.window);
            push_window(&self.window, &mut batch);
        }
        self.next += rows;
        Some(batch)
    }
}

fn windows_in(tokens: &Tokens, seq_len: usize) -> Result<usize> {
    let n = tokens.len().saturating_sub(1) / seq_len;
    if n == 0 {
        return Err(Error::Data(format!(
            "{} tokens cannot fill one window of seq_len + 1 = {} tokens; use more data or a \
             shorter seq_len",
            tokens.len(),
            seq_len + 1
        )));
    }
    Ok(n)
}

fn push_window(window: &[u32], batch: &mut Batch) {
    let n = window.len() - 1;
    batch
        .inputs
        .extend(window[..n].iter().map(|&t| i64::from(t)));
    batch
        .targets
        .extend(window[1..].iter().map(|&t| i64::from(t)));
}

/// Each epoch's shuffle seed: the run seed and the epoch mixed through splitmix64, so epochs
/// (and runs) get unrelated orders.
pub(super) fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let run = SplitMix64::new(seed).next_u64();
    SplitMix64::new(run ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// xoshiro256** (Blackman, Vigna 2018). Written out here because the shuffle order is part of
/// the resume format: a dependency upgrade must never change which window comes next.
pub(super) struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    pub(super) fn new(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        Self {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` without modulo bias (Lemire 2019).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn stream(n: u32) -> Tokens {
        Tokens::from_vec((0..n).collect())
    }

    /// The windows shard `shard` reads in one epoch.
    fn epoch_windows(b: &mut Batches) -> Vec<usize> {
        (0..b.shard_len()).map(|_| b.next_window()).collect()
    }

    #[test]
    fn epoch_seeds_never_change() {
        // Every run's data order, and where a resumed run continues, follow from these values.
        assert_eq!(epoch_seed(0, 0), 0xA706_DD2F_4D19_7E6F);
        assert_eq!(epoch_seed(0, 1), 0xF161_3462_2437_0DF2);
        assert_eq!(epoch_seed(1234, 0), 0x9E17_E35F_6D92_38ED);
        assert_eq!(epoch_seed(1234, 7), 0xD49B_441C_C79D_B39E);
    }

    #[test]
    fn prng_matches_reference_values() {
        // xoshiro256** with state [1, 2, 3, 4]: reference outputs.
        let mut x = Xoshiro256 { s: [1, 2, 3, 4] };
        let first: Vec<u64> = (0..3).map(|_| x.next_u64()).collect();
        assert_eq!(first, [11520, 0, 1509978240]);
        let mut r = Xoshiro256::new(7);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            seen[r.below(3) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (900..1100).contains(&c)), "{seen:?}");
    }

    #[test]
    fn windows_carry_inputs_and_shifted_targets() {
        let mut b = Batches::new(stream(100), 4, 3, 1, 0, 1).unwrap();
        assert_eq!(b.windows(), 24);
        let batch = b.next_batch();
        assert_eq!((batch.rows, batch.seq_len), (3, 4));
        assert_eq!(batch.inputs.len(), 12);
        for r in 0..3 {
            let inputs = &batch.inputs[r * 4..r * 4 + 4];
            let targets = &batch.targets[r * 4..r * 4 + 4];
            assert_eq!(inputs[0] % 4, 0, "windows start at multiples of seq_len");
            for i in 0..4 {
                assert_eq!(inputs[i], inputs[0] + i as i64);
                assert_eq!(targets[i], inputs[i] + 1);
            }
        }
    }

    /// A mixture of two sources (tokens of source `s` start at `s · 1e6`), weights 0.7 and 0.3.
    fn mixture() -> Mixture {
        let cfg: forge_protocol::run_config::DataConfig = toml::from_str(
            "val = \"v\"\nmix = [{ train = \"a\", weight = 0.7 }, { train = \"b\", weight = 0.3 }]",
        )
        .unwrap();
        let sources = (0..2u32)
            .map(|s| Tokens::from_vec((0..40_001).map(|t| s * 1_000_000 + t).collect()))
            .collect();
        Mixture::new(&cfg, sources).unwrap()
    }

    /// Which source each row of `batch` came from.
    fn sources_of(batch: &Batch) -> Vec<usize> {
        (0..batch.rows)
            .map(|r| (batch.inputs[r * batch.seq_len] / 1_000_000) as usize)
            .collect()
    }

    #[test]
    fn a_mixture_resumes_exactly_and_its_leases_read_the_stream_s_windows() {
        // Two workers in shard mode: together they read positions 0.. of the mixed stream.
        let mut workers = [0, 1].map(|w| Batches::new(mixture(), 4, 8, 5, w, 2).unwrap());
        let mut rows = [0usize; 2];
        let mut before = Vec::new();
        for step in 0..600 {
            if step == 300 {
                before = workers.iter().map(|b| b.position()).collect();
            }
            for b in &mut workers {
                for s in sources_of(&b.next_batch()) {
                    rows[s] += 1;
                }
            }
        }
        // 9,600 windows: each source within 1% of its weight, and exactly what the stream's
        // first 9,600 positions hold.
        let total = (rows[0] + rows[1]) as f64;
        assert!((rows[0] as f64 / total - 0.7).abs() < 0.01, "{rows:?}");
        assert_eq!(
            mixture().windows_before(4, 5, 9_600).unwrap(),
            rows.map(|n| n as u64)
        );
        let drawn: u64 = workers.iter_mut().map(|b| b.take_source_windows()[1]).sum();
        assert_eq!(drawn, rows[1] as u64);
        assert!(
            workers
                .iter_mut()
                .all(|b| b.take_source_windows() == [0, 0])
        );
        // Resuming at step 300 continues with the same batches.
        let mut resumed = [0, 1].map(|w| {
            let mut b = Batches::new(mixture(), 4, 8, 5, w, 2).unwrap();
            b.seek(before[w]).unwrap();
            b
        });
        let mut again = [0, 1].map(|w| {
            let mut b = Batches::new(mixture(), 4, 8, 5, w, 2).unwrap();
            for _ in 0..300 {
                b.next_batch();
            }
            b
        });
        for _ in 0..50 {
            for w in 0..2 {
                assert_eq!(resumed[w].next_batch(), again[w].next_batch());
            }
        }
        // A lease of positions 96..112 for one worker reads what positions 96..112 hold in
        // shard mode with one shard.
        let mut whole = Batches::new(mixture(), 4, 16, 5, 0, 1).unwrap();
        for _ in 0..6 {
            whole.next_batch();
        }
        let mut leased = Batches::new(mixture(), 4, 16, 5, 0, 1).unwrap();
        leased
            .lease(LeaseShare {
                ranges: vec![SeqRange::new(96, 112)],
                block: 16,
                offset: 0,
                take: 16,
            })
            .unwrap();
        assert_eq!(leased.next_batch(), whole.next_batch());
        // Resharding keeps the mixture.
        leased.reshard(0, 1).unwrap();
        assert_eq!(leased.take_source_windows(), [0, 0]);
    }

    #[test]
    fn all_shards_are_disjoint_and_cover_every_window() {
        // 2 replicas × 3 local workers, over a window count that does not divide evenly.
        let (replicas, workers) = (2, 3);
        let n_shards = replicas * workers;
        let tokens = stream(4 * 101 + 1);
        let mut covered = Vec::new();
        for replica in 0..replicas {
            for worker in 0..workers {
                let shard = shard_index(replica, worker, workers);
                let mut b = Batches::new(tokens.clone(), 4, 2, 42, shard, n_shards).unwrap();
                assert!((16..=17).contains(&b.shard_len()), "{}", b.shard_len());
                covered.extend(epoch_windows(&mut b));
            }
        }
        let distinct: HashSet<usize> = covered.iter().copied().collect();
        assert_eq!(distinct.len(), covered.len(), "a window is in two shards");
        assert_eq!(distinct, (0..101).collect::<HashSet<_>>());
    }

    #[test]
    fn a_lease_reads_each_position_s_window_whichever_worker_and_epoch() {
        // 101 windows; steps of 6 positions, split 4 + 2 over two workers; three leases that
        // cover epoch 1 out of order, one of them straddling into epoch 2.
        let tokens = stream(4 * 101 + 1);
        let lease = |ranges: Vec<SeqRange>, offset, take| LeaseShare {
            ranges,
            block: 6,
            offset,
            take,
        };
        let leases = [
            vec![SeqRange::new(160, 202)],
            vec![SeqRange::new(101, 131), SeqRange::new(202, 208)],
            vec![SeqRange::new(131, 160)],
        ];
        let mut read = Vec::new();
        for ranges in &leases {
            let mut workers = [0, 1].map(|w| {
                let mut b = Batches::new(tokens.clone(), 4, 2, 42, 0, 1).unwrap();
                let (offset, take) = [(0, 4), (4, 2)][w];
                b.lease(lease(ranges.clone(), offset, take)).unwrap();
                b
            });
            let steps = workers[0].lease_steps_left().unwrap();
            assert_eq!(steps, stream::total(ranges) / 6);
            for _ in 0..steps {
                for (w, b) in workers.iter_mut().enumerate() {
                    for _ in 0..[4, 2][w] {
                        read.push(b.next_window());
                    }
                }
            }
            assert_eq!(workers[1].lease_steps_left(), Some(0));
            let consumed = workers[0].lease_consumed().unwrap();
            assert_eq!(stream::total(&consumed), steps * 6);
            assert_eq!(consumed, stream::split_at(ranges, steps * 6).0);
        }
        // Every position is its epoch's window at that place, whichever lease and worker read
        // it; the third lease's last 5 positions make no whole step and are not read.
        let mut reference = Batches::new(tokens.clone(), 4, 2, 42, 0, 1).unwrap();
        let (epoch1, epoch2) = (reference.permutation(1), reference.permutation(2));
        let expected: Vec<usize> = [
            &epoch1[59..101],
            &epoch1[0..30],
            &epoch2[0..6],
            &epoch1[30..54],
        ]
        .concat()
        .into_iter()
        .map(|w| w as usize)
        .collect();
        assert_eq!(read, expected);
        assert!(reference.lease(lease(vec![], 4, 4)).is_err());
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let make = |seed| Batches::new(stream(4001), 4, 8, seed, 0, 1).unwrap();
        let (mut a, mut b, mut c) = (make(1), make(1), make(2));
        let a0 = epoch_windows(&mut a);
        assert_eq!(a0, epoch_windows(&mut b));
        assert_ne!(a0, epoch_windows(&mut c));
        let a1 = epoch_windows(&mut a);
        assert_ne!(a0, a1, "the second epoch repeated the first order");
        assert_eq!(
            a0.iter().copied().collect::<HashSet<_>>(),
            a1.iter().copied().collect::<HashSet<_>>()
        );
        assert_ne!(a0, (0..1000).collect::<Vec<_>>(), "not shuffled");
        assert_eq!(
            a.position(),
            DataPosition {
                epoch: 1,
                index: 1000
            }
        );
    }

    #[test]
    fn seek_resumes_exactly_across_epochs() {
        let make = || Batches::new(stream(997), 8, 5, 9, 1, 3).unwrap();
        let mut straight = make();
        let mut expected = Vec::new();
        let mut positions = Vec::new();
        for _ in 0..20 {
            positions.push(straight.position());
            expected.push(straight.next_batch());
        }
        assert!(straight.position().epoch >= 2, "{:?}", straight.position());
        for (k, &pos) in positions.iter().enumerate() {
            let mut resumed = make();
            resumed.seek(pos).unwrap();
            // Positions survive a round trip through a checkpoint's JSON.
            let json = serde_json::to_string(&pos).unwrap();
            assert_eq!(serde_json::from_str::<DataPosition>(&json).unwrap(), pos);
            for want in &expected[k..] {
                assert_eq!(&resumed.next_batch(), want);
            }
        }
        let err = make()
            .seek(DataPosition {
                epoch: 0,
                index: 999,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the end of shard 1 of 3"), "{err}");
    }

    #[test]
    fn too_little_data_is_an_error() {
        let err = Batches::new(stream(4), 4, 1, 0, 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 tokens cannot fill one window"), "{err}");
        let err = Batches::new(stream(9), 4, 1, 0, 0, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fewer than the 3 data shards"), "{err}");
        let err = Batches::new(stream(99), 4, 1, 0, 3, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shard 3 of 3 does not exist"), "{err}");
        assert!(Batches::new(stream(99), 0, 1, 0, 0, 1).is_err());
        assert!(EvalBatches::new(stream(3), 4, 1, None).is_err());
    }

    #[test]
    fn eval_batches_walk_every_window_in_order() {
        let mut eval = EvalBatches::new(stream(23), 4, 2, None).unwrap();
        assert_eq!(eval.windows(), 5);
        let batches: Vec<Batch> = eval.by_ref().collect();
        assert_eq!(
            batches.iter().map(|b| b.rows).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        let inputs: Vec<i64> = batches.iter().flat_map(|b| b.inputs.clone()).collect();
        let targets: Vec<i64> = batches.iter().flat_map(|b| b.targets.clone()).collect();
        assert_eq!(inputs, (0..20).collect::<Vec<_>>());
        assert_eq!(targets, (1..21).collect::<Vec<_>>());
        eval.reset();
        assert_eq!(eval.next().unwrap(), batches[0]);
        let limited = EvalBatches::new(stream(23), 4, 2, Some(3)).unwrap();
        assert_eq!(limited.map(|b| b.rows).sum::<usize>(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn shards_partition_windows_for_any_sizes(
            n_tokens in 2u32..400,
            seq_len in 1usize..9,
            n_shards in 1usize..7,
            seed in any::<u64>(),
            epoch in 0u64..3,
        ) {
            let tokens = stream(n_tokens);
            let n_windows = (n_tokens as usize - 1) / seq_len;
            prop_assume!(n_windows >= n_shards);
            let mut all = Vec::new();
            for shard in 0..n_shards {
                let mut b = Batches::new(tokens.clone(), seq_len, 1, seed, shard, n_shards).unwrap();
                b.seek(DataPosition { epoch, index: 0 }).unwrap();
                all.extend(epoch_windows(&mut b));
            }
            all.sort_unstable();
            prop_assert_eq!(all, (0..n_windows).collect::<Vec<_>>());
        }
    }
}
