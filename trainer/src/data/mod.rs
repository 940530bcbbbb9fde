//! Data pipeline: corpus files → documents → token ids → a memory-mapped token cache →
//! shuffled, sharded `seq_len + 1` windows for training and fixed windows for validation.
//! Plain Rust throughout (no tch): the training loop turns batches into tensors.
//!
//! - `tokenizer`: load a Hugging Face `tokenizer.json` or train a byte-level BPE; stable hash.
//! - `corpus`: streaming readers for text, JSON, JSONL and llm.c token shards.
//! - `cache`: tokenize once (in parallel) into a cache reused until sources or tokenizer change.
//! - `batches`: packed windows, seeded shuffle, replica × worker shards, resumable positions.
//! - `mix`: several sources interleaved by weight (and a curriculum) into one stream.
//! - `stats`: corpus statistics and the bigram baseline a model must beat.
//!
//! The training loop calls [`Dataset::prepare`] with the run's `[data]` section ([`DataConfig`],
//! defined with the run config in `forge_protocol::run_config`), then builds a [`Batches`] over
//! `dataset.train_stream()` and an [`EvalBatches`] over `dataset.val.tokens()`.

mod batches;
mod cache;
mod corpus;
mod mix;
mod stats;
mod tokenizer;

pub use batches::{
    Batch, Batches, DataPosition, EvalBatches, LeaseShare, TrainStream, shard_index,
};
pub use cache::{TokenCache, Tokens};
pub use corpus::{CorpusFormat, Documents, LlmcShard, detect_format, documents, write_llmc_shard};
pub use forge_protocol::run_config::{CurriculumPoint, DataConfig, MixSource, TokenizerConfig};
pub use mix::{MIX_BLOCK, Mixture};
pub use stats::{BaselineReport, BigramBaseline, CorpusStats, bits_per_byte};
pub use tokenizer::{END_OF_TEXT, SpecialToken, Tokenizer, TokenizerOrigin};

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A tokenizer and the train and validation token caches made with it.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub tokenizer: Tokenizer,
    pub tokenizer_origin: TokenizerOrigin,
    /// The training corpus: one token cache, or one per `[data] mix` source in its order.
    pub train: Vec<TokenCache>,
    pub val: TokenCache,
    /// With `[data] mix`: its sources and weights.
    pub mixture: Option<Mixture>,
}

/// Files read into one token stream, in one layout.
struct Source<'a> {
    files: &'a [PathBuf],
    format: CorpusFormat,
    text_field: &'a str,
}

/// The training sources of `cfg`: `train`, or each `mix` source with its own layout and field.
fn sources(cfg: &DataConfig) -> Vec<Source<'_>> {
    if cfg.mix.is_empty() {
        return vec![Source {
            files: &cfg.train,
            format: cfg.format,
            text_field: &cfg.text_field,
        }];
    }
    cfg.mix
        .iter()
        .map(|m| Source {
            files: &m.train,
            format: m.format.unwrap_or(cfg.format),
            text_field: m.text_field.as_deref().unwrap_or(&cfg.text_field),
        })
        .collect()
}

impl Dataset {
    /// Loads or trains the tokenizer, then builds (or reuses) both token caches. Patterns in
    /// `train` and `val` (`data/*.jsonl.zst`) stand for the files they match, in name order.
    pub fn prepare(cfg: &DataConfig) -> Result<Self> {
        cfg.validate()?;
        let mut mix = cfg.mix.clone();
        for (i, source) in mix.iter_mut().enumerate() {
            source.train = expand_patterns(&source.train, &format!("mix[{i}].train"))?;
        }
        let expanded = DataConfig {
            train: expand_patterns(&cfg.train, "train")?,
            val: expand_patterns(&cfg.val, "val")?,
            mix,
            ..cfg.clone()
        };
        // Again with the files the patterns stand for (a validation file a train pattern
        // also matches).
        expanded.validate()?;
        let cfg = &expanded;
        std::fs::create_dir_all(&cfg.cache_dir).map_err(|e| {
            Error::Data(format!(
                "cannot create cache_dir {} ({e}); set data.cache_dir to a writable directory",
                cfg.cache_dir.display()
            ))
        })?;
        let (tokenizer, tokenizer_origin) = match &cfg.tokenizer {
            Some(TokenizerConfig::Path(path)) => (
                Tokenizer::load(path)?,
                TokenizerOrigin::Loaded(path.clone()),
            ),
            Some(TokenizerConfig::Train { vocab_size }) => trained_tokenizer(cfg, *vocab_size)?,
            None => {
                return Err(Error::Data(
                    "no tokenizer: set data.tokenizer (a path or train), or start from a \
                     Hugging Face folder ([model] init_from), whose tokenizer.json is then used"
                        .into(),
                ));
            }
        };
        let train = sources(cfg)
            .iter()
            .map(|source| {
                TokenCache::build_or_open(
                    source.files,
                    source.format,
                    source.text_field,
                    &tokenizer,
                    &cfg.cache_dir,
                    "train",
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mixture = if cfg.mix.is_empty() {
            None
        } else {
            let tokens = train.iter().map(|c| c.tokens().clone()).collect();
            let mix = Mixture::new(cfg, tokens)?;
            let shares = mix.shares_at(0.0);
            let sources: Vec<String> = mix
                .names()
                .iter()
                .zip(&train)
                .zip(&shares)
                .map(|((name, cache), share)| {
                    format!("{name} ({} tokens, {:.1}%)", cache.len(), 100.0 * share)
                })
                .collect();
            let curriculum = match cfg.curriculum.len() {
                0 => String::new(),
                n => format!(" at the start of a curriculum of {n} points"),
            };
            tracing::info!(
                "training on a mixture of {} sources{curriculum}: {}",
                sources.len(),
                sources.join(", ")
            );
            Some(mix)
        };
        let val = TokenCache::build_or_open(
            &cfg.val,
            cfg.val_format.unwrap_or(cfg.format),
            &cfg.text_field,
            &tokenizer,
            &cfg.cache_dir,
            "val",
        )?;
        Ok(Self {
            tokenizer,
            tokenizer_origin,
            train,
            val,
            mixture,
        })
    }

    /// The training stream: the corpus, or the mixture of its sources.
    pub fn train_stream(&self) -> TrainStream {
        match &self.mixture {
            Some(mix) => mix.clone().into(),
            None => self.train[0].tokens().clone().into(),
        }
    }

    /// Corpus statistics and the unigram and bigram baselines on the validation set.
    pub fn stats_report(&self) -> Result<BaselineReport> {
        BaselineReport::of(self)
    }
}

/// `paths` with every glob pattern (a path with `*`, `?` or `[`) replaced by the files it
/// matches, sorted; a pattern that matches no file is an error naming `data.{which}`.
fn expand_patterns(paths: &[PathBuf], which: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        let text = path.to_string_lossy();
        if !text.contains(['*', '?', '[']) {
            out.push(path.clone());
            continue;
        }
        let bad = |why: String| Error::Data(format!("data.{which} pattern {text}: {why}"));
        let mut matched: Vec<PathBuf> = glob::glob(&text)
            .map_err(|e| bad(format!("{e}; use * ? [..] as in data/*.jsonl.gz")))?
            .filter_map(|entry| entry.ok())
            .filter(|p| p.is_file())
            .collect();
        if matched.is_empty() {
            return Err(bad(
                "matches no file; check the folder (relative paths are taken from where                  forge-node runs, or its --data-root) and the pattern"
                    .into(),
            ));
        }
        matched.sort();
        out.extend(matched);
    }
    Ok(out)
}

/// Bumped when the BPE training recipe changes, so saved tokenizers are retrained.
const BPE_RECIPE: &str = "byte-level-bpe-v1";

/// The BPE for `cfg.train`: reused from `cache_dir` when one was trained on the same files
/// (same paths, sizes and contents at both ends), trained and saved otherwise.
fn trained_tokenizer(cfg: &DataConfig, vocab_size: usize) -> Result<(Tokenizer, TokenizerOrigin)> {
    let mut key = Sha256::new();
    key.update(BPE_RECIPE.as_bytes());
    key.update(vocab_size.to_le_bytes());
    for source in sources(cfg) {
        key.update(cache::content_key(
            source.files,
            source.format,
            source.text_field,
        )?);
    }
    let file = cfg.cache_dir.join(format!(
        "tokenizer-bpe{vocab_size}-{}.json",
        &hex::encode(key.finalize())[..16]
    ));
    if file.exists() {
        match Tokenizer::load(&file) {
            Ok(tok) => {
                tracing::info!("reusing trained tokenizer {}", file.display());
                return Ok((tok, TokenizerOrigin::Trained(file)));
            }
            Err(e) => tracing::warn!("retraining the tokenizer: {e}"),
        }
    }
    let started = Instant::now();
    let sources = self::sources(cfg);
    tracing::info!(
        "training a byte-level BPE of {vocab_size} tokens on {:?}",
        sources.iter().flat_map(|s| s.files).collect::<Vec<_>>()
    );
    let mut documents = Vec::new();
    for source in &sources {
        for path in source.files {
            documents.push(corpus::documents(path, source.format, source.text_field)?);
        }
    }
    let tok = Tokenizer::train(documents.into_iter().flatten(), vocab_size)?;
    tok.save(&file)?;
    tracing::info!(
        "trained tokenizer saved to {} in {:.1} s",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok((tok, TokenizerOrigin::Trained(file)))
}

pub(crate) fn cache_error(path: &Path, why: impl Into<String>) -> Error {
    Error::TokenCache {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// A file written under a temporary name and renamed into place by [`AtomicFile::commit`]
/// after an fsync, so readers see the old file or the whole new one, never a part. Dropped
/// without a commit, it removes the temporary file.
pub(crate) struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Unique per process and per call, so concurrent writers of one path never share a
        // temporary file; the last rename wins with a complete file either way.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(Error::io(format!(
            "cannot create {} (is its directory writable?)",
            tmp.display()
        )))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub(crate) fn final_path(&self) -> &Path {
        &self.path
    }

    fn writer(&mut self) -> std::io::Result<&mut BufWriter<File>> {
        self.out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("file already committed"))
    }

    /// Flushes, fsyncs, renames over the final name and fsyncs the directory.
    pub(crate) fn commit(mut self) -> Result<()> {
        let context = format!(
            "cannot finish writing {} (disk full?); the previous version, if any, is untouched",
            self.path.display()
        );
        let out = self.out.take().expect("commit runs once");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(context.clone())(e.into_error()))?;
        file.sync_all().map_err(Error::io(context.clone()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(Error::io(context.clone()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Makes the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::io(context))?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer()?.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer()?.flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.writer()?.seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Not committed: the partial file must not outlive the failed write.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(Error::io(format!(
        "cannot write {} (free disk space and retry)",
        path.display()
    )))?;
    file.commit()
}

/// Paths of the shared sample data used by tests: `$FORGE_DATA_DIR` or `../shared/data` next
/// to the repository.
#[cfg(test)]
pub(crate) mod test_data {
    use std::path::PathBuf;

    fn root() -> PathBuf {
        let root = std::env::var_os("FORGE_DATA_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
            PathBuf::from,
        );
        assert!(
            root.is_dir(),
            "shared sample data not found at {}; set FORGE_DATA_DIR to the directory holding \
             gpt2/ and tinystories/",
            root.display()
        );
        root
    }

    pub(crate) fn gpt2_tokenizer() -> PathBuf {
        root().join("gpt2/tokenizer.json")
    }

    pub(crate) fn tinystories(name: &str) -> PathBuf {
        root().join("tinystories").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_leaves_nothing_behind_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Patterns stand for the files they match, in name order, among plain paths kept as
    /// they are; a pattern matching nothing is an error naming the key; a validation file that
    /// a train pattern also matches is refused once the patterns are expanded.
    #[test]
    fn patterns_in_train_and_val_expand_to_the_files_they_match() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b-2.jsonl.gz", "b-1.jsonl.gz", "b-10.jsonl.gz", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("b-dir.jsonl.gz")).unwrap();
        let plain = dir.path().join("notes.txt");
        let pattern = dir.path().join("b-*.jsonl.gz");
        let got = expand_patterns(&[plain.clone(), pattern.clone()], "train").unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["notes.txt", "b-1.jsonl.gz", "b-10.jsonl.gz", "b-2.jsonl.gz"]
        );
        let none = dir.path().join("c-*.parquet");
        let err = expand_patterns(&[none], "val").unwrap_err().to_string();
        assert!(
            err.contains("data.val pattern")
                && err.contains("c-*.parquet")
                && err.contains("matches no file"),
            "{err}"
        );
        let cfg = DataConfig {
            train: vec![dir.path().join("*.txt")],
            val: vec![plain],
            cache_dir: dir.path().join("cache"),
            ..toml::from_str::<DataConfig>(
                "train = [\"x\"]\nval = [\"y\"]\ntokenizer = { train = { vocab_size = 256 } }",
            )
            .unwrap()
        };
        let err = Dataset::prepare(&cfg).unwrap_err().to_string();
        assert!(err.contains("both a train and a val file"), "{err}");
    }
}
