//! Corpus statistics and the count-based baselines a trained model must beat: unigram entropy
//! and a smoothed bigram model's validation cross-entropy, in nats per token and bits per byte.
//!
//! Smoothing: the bigram estimate is pulled toward the unigram distribution (Dirichlet / MacKay
//! smoothing, "add-α toward the unigram"),
//! `P(b|a) = (c(a,b) + α·Pu(b)) / (c(a) + α)`, with `Pu(b) = (c(b) + 1) / (N + V)` (add-1 so
//! unseen tokens keep some mass). α is picked from a fixed grid by the loss on the last 10% of
//! the train tokens after fitting on the first 90%, then the counts are refit on all of them;
//! the validation set is never used to tune. Plain add-1 on a 50k vocabulary would spread most
//! of the mass over unseen pairs and make a baseline too weak to mean anything.

use super::Dataset;
use super::cache::{TokenCache, Tokens};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt;

/// Candidate α values (pseudo-counts of unigram mass added to each context).
const ALPHA_GRID: [f64; 9] = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0];
/// Below this many train tokens there is no meaningful held-out split; α = 1 is used.
const MIN_TOKENS_FOR_TUNING: usize = 100;
const CHUNK: usize = 1 << 20;

/// Bits per UTF-8 byte of text for a loss of `nats_per_token` over `tokens` tokens that encode
/// `text_bytes` bytes; lets runs with different tokenizers be compared.
pub fn bits_per_byte(nats_per_token: f64, tokens: u64, text_bytes: u64) -> f64 {
    nats_per_token * tokens as f64 / (text_bytes.max(1) as f64 * std::f64::consts::LN_2)
}

/// Size and unigram entropy of one token cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusStats {
    pub tokens: u64,
    pub documents: u64,
    pub text_bytes: u64,
    /// Distinct token ids that occur.
    pub distinct_tokens: usize,
    /// Entropy of the empirical unigram distribution, nats per token.
    pub unigram_entropy: f64,
}

impl CorpusStats {
    pub fn of(cache: &TokenCache, vocab_size: usize) -> Result<Self> {
        let counts = unigram_counts(cache.tokens(), vocab_size)?;
        let n = cache.len() as f64;
        let entropy = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum();
        Ok(Self {
            tokens: cache.len() as u64,
            documents: cache.documents(),
            text_bytes: cache.text_bytes(),
            distinct_tokens: counts.iter().filter(|&&c| c > 0).count(),
            unigram_entropy: entropy,
        })
    }

    pub fn bytes_per_token(&self) -> f64 {
        self.text_bytes as f64 / self.tokens.max(1) as f64
    }
}

/// Bigram counts with unigram-prior smoothing (see the module docs).
#[derive(Debug, Clone)]
pub struct BigramBaseline {
    counts: Counts,
    alpha: f64,
}

#[derive(Debug, Clone, Default)]
struct Counts {
    vocab: usize,
    /// c(b): occurrences of each token.
    unigram: Vec<u64>,
    /// c(a): occurrences of each token followed by another (the bigram context count).
    context: Vec<u64>,
    /// c(a, b), keyed `a << 32 | b`: a map, not a V×V matrix, so a 50k vocabulary stays small.
    pairs: HashMap<u64, u64>,
    total: u64,
}

impl Counts {
    fn new(vocab: usize) -> Self {
        Self {
            vocab,
            unigram: vec![0; vocab],
            context: vec![0; vocab],
            pairs: HashMap::new(),
            total: 0,
        }
    }

    /// Counts `tokens` in parallel chunks; each chunk also counts the pair across its end.
    fn of(tokens: &Tokens, vocab: usize) -> Result<Self> {
        let n = tokens.len();
        let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
        starts
            .into_par_iter()
            .map(|start| {
                let end = (start + CHUNK).min(n);
                let mut buf = vec![0; (end + 1).min(n) - start];
                tokens.read(start, &mut buf);
                let mut c = Counts::new(vocab);
                for (i, &t) in buf.iter().enumerate() {
                    let t = check_id(t, vocab)?;
                    if start + i < end {
                        c.unigram[t] += 1;
                        c.total += 1;
                    }
                    if i > 0 {
                        let a = buf[i - 1] as usize;
                        c.context[a] += 1;
                        *c.pairs.entry(pair_key(a, t)).or_default() += 1;
                    }
                }
                Ok(c)
            })
            .try_reduce(|| Counts::new(vocab), |a, b| Ok(a.merge(b)))
    }

    fn merge(mut self, mut other: Counts) -> Counts {
        if self.pairs.len() < other.pairs.len() {
            std::mem::swap(&mut self, &mut other);
        }
        for (k, v) in other.pairs {
            *self.pairs.entry(k).or_default() += v;
        }
        for (a, b) in self.unigram.iter_mut().zip(&other.unigram) {
            *a += b;
        }
        for (a, b) in self.context.iter_mut().zip(&other.context) {
            *a += b;
        }
        self.total += other.total;
        self
    }

    /// Add-1 unigram probability.
    fn unigram_p(&self, b: usize) -> f64 {
        (self.unigram[b] + 1) as f64 / (self.total + self.vocab as u64) as f64
    }

    fn bigram_p(&self, a: usize, b: usize, alpha: f64) -> f64 {
        let pair = self.pairs.get(&pair_key(a, b)).copied().unwrap_or(0);
        (pair as f64 + alpha * self.unigram_p(b)) / (self.context[a] as f64 + alpha)
    }

    /// Mean −ln P over every consecutive pair of `tokens`, for each α in `alphas`, and the
    /// add-1 unigram loss over the same predicted tokens.
    fn losses(&self, tokens: &Tokens, alphas: &[f64]) -> Result<(Vec<f64>, f64)> {
        let n = tokens.len();
        if n < 2 {
            return Err(Error::Data(format!(
                "{n} tokens hold no token pairs to evaluate a bigram model on"
            )));
        }
        let starts: Vec<usize> = (1..n).step_by(CHUNK).collect();
        let zero = || (vec![0.0; alphas.len()], 0.0);
        let (sums, unigram) = starts
            .into_par_iter()
            .map(|start| {
                let end = (start + CHUNK).min(n);
                let mut buf = vec![0; end - start + 1];
                tokens.read(start - 1, &mut buf);
                let (mut sums, mut unigram) = zero();
                for w in buf.windows(2) {
                    let (a, b) = (check_id(w[0], self.vocab)?, check_id(w[1], self.vocab)?);
                    unigram -= self.unigram_p(b).ln();
                    for (s, &alpha) in sums.iter_mut().zip(alphas) {
                        *s -= self.bigram_p(a, b, alpha).ln();
                    }
                }
                Ok::<_, Error>((sums, unigram))
            })
            .try_reduce(zero, |(mut s1, u1), (s2, u2)| {
                for (a, b) in s1.iter_mut().zip(s2) {
                    *a += b;
                }
                Ok((s1, u1 + u2))
            })?;
        let pairs = (n - 1) as f64;
        Ok((
            sums.into_iter().map(|s| s / pairs).collect(),
            unigram / pairs,
        ))
    }
}

fn pair_key(a: usize, b: usize) -> u64 {
    ((a as u64) << 32) | b as u64
}

fn check_id(t: u32, vocab: usize) -> Result<usize> {
    let t = t as usize;
    if t >= vocab {
        return Err(Error::Data(format!(
            "token id {t} is outside the tokenizer's {vocab} ids: these tokens were made with \
             another tokenizer"
        )));
    }
    Ok(t)
}

fn unigram_counts(tokens: &Tokens, vocab: usize) -> Result<Vec<u64>> {
    let mut counts = vec![0u64; vocab];
    let mut bad = None;
    tokens.for_each_chunk(CHUNK, |_, chunk| {
        for &t in chunk {
            match counts.get_mut(t as usize) {
                Some(c) => *c += 1,
                None => bad = Some(t),
            }
        }
    });
    match bad {
        Some(t) => check_id(t, vocab).map(|_| counts),
        None => Ok(counts),
    }
}

impl BigramBaseline {
    /// Fits on `train`, choosing α on its last 10% (see the module docs).
    pub fn fit(train: &Tokens, vocab_size: usize) -> Result<Self> {
        let n = train.len();
        let alpha = if n < MIN_TOKENS_FOR_TUNING {
            1.0
        } else {
            let cut = n - n / 10;
            let fit = Counts::of(&train.slice(0..cut), vocab_size)?;
            // The held-out slice starts one token early so its first pair crosses the cut.
            let (losses, _) = fit.losses(&train.slice(cut - 1..n), &ALPHA_GRID)?;
            let best = losses
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            ALPHA_GRID[best]
        };
        Ok(Self {
            counts: Counts::of(train, vocab_size)?,
            alpha,
        })
    }

    /// The smoothing strength chosen on held-out train tokens.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Mean cross-entropy of every token of `tokens` after the first, in nats per token.
    pub fn cross_entropy(&self, tokens: &Tokens) -> Result<f64> {
        Ok(self.counts.losses(tokens, &[self.alpha])?.0[0])
    }

    /// Add-1 unigram cross-entropy over the same tokens, in nats per token.
    pub fn unigram_cross_entropy(&self, tokens: &Tokens) -> Result<f64> {
        Ok(self.counts.losses(tokens, &[])?.1)
    }
}

/// With a mixture, the bigram baseline is fitted on up to this many tokens of the mixed
/// stream, read in windows of `MIX_SAMPLE_SEQ`.
const MIX_SAMPLE_TOKENS: usize = 16 << 20;
const MIX_SAMPLE_SEQ: usize = 1024;

/// What `forge-node data stats` prints: both corpora and the baselines on validation.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineReport {
    pub vocab_size: usize,
    /// The training corpus, or each `[data] mix` source by name.
    pub train: Vec<(String, CorpusStats)>,
    pub val: CorpusStats,
    pub alpha: f64,
    /// Validation cross-entropy, nats per token.
    pub val_unigram_loss: f64,
    pub val_bigram_loss: f64,
    /// The same in bits per byte of validation text.
    pub val_unigram_bpb: f64,
    pub val_bigram_bpb: f64,
}

impl BaselineReport {
    pub fn of(dataset: &Dataset) -> Result<Self> {
        let vocab = dataset.tokenizer.vocab_size();
        let val = CorpusStats::of(&dataset.val, vocab)?;
        let (train, model) = match &dataset.mixture {
            None => {
                let cache = &dataset.train[0];
                let train = vec![("train".to_string(), CorpusStats::of(cache, vocab)?)];
                (train, BigramBaseline::fit(cache.tokens(), vocab)?)
            }
            Some(mix) => {
                let train = mix
                    .names()
                    .iter()
                    .zip(&dataset.train)
                    .map(|(name, cache)| {
                        Ok((format!("train {name}"), CorpusStats::of(cache, vocab)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Fitted on what the run reads: the first windows of the mixed stream.
                let sample = mix.sample(MIX_SAMPLE_SEQ, 0, MIX_SAMPLE_TOKENS)?;
                (train, BigramBaseline::fit(&sample, vocab)?)
            }
        };
        let val_tokens = dataset.val.tokens();
        let val_bigram_loss = model.cross_entropy(val_tokens)?;
        let val_unigram_loss = model.unigram_cross_entropy(val_tokens)?;
        let bpb = |loss| bits_per_byte(loss, val.tokens, val.text_bytes);
        Ok(Self {
            vocab_size: vocab,
            alpha: model.alpha(),
            val_unigram_bpb: bpb(val_unigram_loss),
            val_bigram_bpb: bpb(val_bigram_loss),
            val_unigram_loss,
            val_bigram_loss,
            train,
            val,
        })
    }
}

impl fmt::Display for BaselineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "vocab size {}", self.vocab_size)?;
        let corpora = self.train.iter().map(|(name, s)| (name.as_str(), s));
        for (name, s) in corpora.chain([("val", &self.val)]) {
            writeln!(
                f,
                "{name:5}  {} documents, {} tokens, {} bytes ({:.3} bytes/token), {} distinct \
                 tokens, unigram entropy {:.4} nats ({:.4} bits)",
                s.documents,
                s.tokens,
                s.text_bytes,
                s.bytes_per_token(),
                s.distinct_tokens,
                s.unigram_entropy,
                s.unigram_entropy / std::f64::consts::LN_2
            )?;
        }
        writeln!(
            f,
            "val unigram (add-1)         {:.4} nats/token  {:.4} bits/byte",
            self.val_unigram_loss, self.val_unigram_bpb
        )?;
        write!(
            f,
            "val bigram (alpha = {:<6}) {:.4} nats/token  {:.4} bits/byte  <- the model must beat this",
            self.alpha, self.val_bigram_loss, self.val_bigram_bpb
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(v: &[u32]) -> Tokens {
        Tokens::from_vec(v.to_vec())
    }

    #[test]
    fn bigram_probabilities_are_normalised() {
        let train: Vec<u32> = (0..500).map(|i| [0, 1, 2, 1, 3][i % 5]).collect();
        let model = BigramBaseline::fit(&tokens(&train), 6).unwrap();
        for a in 0..6 {
            let total: f64 = (0..6)
                .map(|b| model.counts.bigram_p(a, b, model.alpha))
                .sum();
            assert!((total - 1.0).abs() < 1e-12, "P(·|{a}) sums to {total}");
        }
        let unigram: f64 = (0..6).map(|b| model.counts.unigram_p(b)).sum();
        assert!((unigram - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bigram_beats_unigram_on_structured_text_and_matches_hand_counts() {
        // A deterministic cycle: the bigram model should be nearly certain.
        let train: Vec<u32> = (0..1000).map(|i| (i % 4) as u32).collect();
        let model = BigramBaseline::fit(&tokens(&train), 8).unwrap();
        let val = tokens(&[0, 1, 2, 3, 0, 1]);
        let bigram = model.cross_entropy(&val).unwrap();
        let unigram = model.unigram_cross_entropy(&val).unwrap();
        assert!(bigram < 0.01, "{bigram}");
        assert!(
            (unigram - (1008.0f64 / 251.0).ln()).abs() < 1e-9,
            "{unigram}"
        );
        assert_eq!(
            model.alpha(),
            ALPHA_GRID[0],
            "a perfect cycle wants the least smoothing"
        );

        // By hand, small train (no tuning, α = 1): train 0 1 0 1 0, V = 3.
        let model = BigramBaseline::fit(&tokens(&[0, 1, 0, 1, 0]), 3).unwrap();
        assert_eq!(model.alpha(), 1.0);
        // c(0,1) = 2, c(0) as context = 2, Pu(1) = (2 + 1) / (5 + 3).
        let p = (2.0 + 3.0 / 8.0) / (2.0 + 1.0);
        let loss = model.cross_entropy(&tokens(&[0, 1])).unwrap();
        assert!(
            (loss + f64::ln(p)).abs() < 1e-12,
            "{loss} vs {}",
            -f64::ln(p)
        );
    }

    #[test]
    fn chunked_counting_matches_a_single_pass() {
        let n = CHUNK + CHUNK / 2 + 3;
        let train: Vec<u32> = (0..n).map(|i| ((i * 31 + i / 7) % 97) as u32).collect();
        let counts = Counts::of(&tokens(&train), 97).unwrap();
        assert_eq!(counts.total, n as u64);
        assert_eq!(counts.pairs.values().sum::<u64>(), n as u64 - 1);
        assert_eq!(counts.context.iter().sum::<u64>(), n as u64 - 1);
        let mut direct: HashMap<u64, u64> = HashMap::new();
        for w in train.windows(2) {
            *direct
                .entry(pair_key(w[0] as usize, w[1] as usize))
                .or_default() += 1;
        }
        assert_eq!(counts.pairs, direct);
    }

    #[test]
    fn foreign_ids_and_tiny_inputs_are_errors() {
        let err = BigramBaseline::fit(&tokens(&[0, 1, 9]), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token id 9 is outside the tokenizer's 4 ids"),
            "{err}"
        );
        let model = BigramBaseline::fit(&tokens(&[0, 1, 2]), 4).unwrap();
        assert!(model.cross_entropy(&tokens(&[1])).is_err());
        assert!(model.cross_entropy(&tokens(&[1, 7])).is_err());
    }

    #[test]
    fn bits_per_byte_converts_units() {
        // ln 2 nats per token at one byte per token is one bit per byte.
        assert!((bits_per_byte(std::f64::consts::LN_2, 10, 10) - 1.0).abs() < 1e-12);
        assert!((bits_per_byte(1.0, 100, 400) - 0.25 / std::f64::consts::LN_2).abs() < 1e-12);
    }
}
