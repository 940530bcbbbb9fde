//! The data pipeline end to end on the shared TinyStories sample, as the training loop uses it:
//! prepare a dataset from a `[data]` section, draw batches, and compute the bigram baseline.

use forge_trainer::Error;
use forge_trainer::data::{
    Batches, CorpusFormat, DataConfig, Dataset, EvalBatches, TokenCache, Tokenizer,
    TokenizerConfig, TokenizerOrigin,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn shared(rel: &str) -> PathBuf {
    let root = std::env::var_os("FORGE_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
        PathBuf::from,
    );
    assert!(
        root.is_dir(),
        "shared sample data not found at {}; set FORGE_DATA_DIR",
        root.display()
    );
    root.join(rel)
}

fn tinystories_config(tokenizer: TokenizerConfig, cache_dir: &Path) -> DataConfig {
    DataConfig {
        train: vec![shared("tinystories/train-sample.txt")],
        val: vec![shared("tinystories/valid-sample.txt")],
        format: CorpusFormat::Auto,
        val_format: None,
        text_field: "text".into(),
        tokenizer: Some(tokenizer),
        cache_dir: cache_dir.to_path_buf(),
        mix: vec![],
        curriculum: vec![],
    }
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn tinystories_with_the_gpt2_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tinystories_config(
        TokenizerConfig::Path(shared("gpt2/tokenizer.json")),
        dir.path(),
    );
    let started = Instant::now();
    let ds = Dataset::prepare(&cfg).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("prepared (GPT-2 tokenizer) in {secs:.2} s");
    assert!(secs < 20.0, "tokenizing 2.8 MB took {secs:.1} s");

    assert_eq!(ds.tokenizer.separator_id(), 50256);
    assert_eq!(ds.train[0].documents(), 2317);
    assert!(ds.train[0].len() > 400_000, "{}", ds.train[0].len());
    // The first document decodes back to the text it came from.
    let tokens = ds.train[0].tokens();
    let first_end = (1..tokens.len()).find(|&i| tokens.get(i) == 50256).unwrap();
    let first = ds
        .tokenizer
        .decode(&tokens.slice(1..first_end).to_vec())
        .unwrap();
    assert!(first.starts_with("One day, a little girl named Lily found a needle"));
    assert!(first.ends_with("They both felt happy because they had shared and worked together."));

    // A second prepare reuses both caches without rewriting them.
    let stamps = (modified(ds.train[0].path()), modified(ds.val.path()));
    let again = Dataset::prepare(&cfg).unwrap();
    assert_eq!(
        (modified(again.train[0].path()), modified(again.val.path())),
        stamps
    );
    assert_eq!(again.train[0].len(), ds.train[0].len());

    // What the training loop does: a training shard and the fixed validation set.
    let mut train = Batches::new(ds.train[0].tokens().clone(), 256, 4, 1337, 1, 2).unwrap();
    let batch = train.next_batch();
    assert_eq!(batch.inputs.len(), 4 * 256);
    assert!(batch.inputs.iter().all(|&t| (0..50257).contains(&t)));
    let eval = EvalBatches::new(ds.val.tokens().clone(), 256, 8, None).unwrap();
    assert_eq!(eval.windows(), (ds.val.len() - 1) / 256);

    let report = ds.stats_report().unwrap();
    println!("{report}");
    let ln_v = (50257f64).ln();
    assert!(report.val_bigram_loss < report.val_unigram_loss);
    assert!(report.val_unigram_loss < ln_v);
    assert!(report.train[0].1.unigram_entropy < ln_v);
    assert!(
        (3.0..6.0).contains(&report.val_bigram_loss),
        "{}",
        report.val_bigram_loss
    );
    assert!(
        (1.0..3.0).contains(&report.val_bigram_bpb),
        "{}",
        report.val_bigram_bpb
    );
}

#[test]
fn tinystories_with_a_trained_2048_bpe() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tinystories_config(TokenizerConfig::Train { vocab_size: 2048 }, dir.path());
    let started = Instant::now();
    let ds = Dataset::prepare(&cfg).unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("prepared (trained BPE 2048) in {secs:.2} s");
    assert_eq!(ds.tokenizer.vocab_size(), 2048);
    let TokenizerOrigin::Trained(saved) = &ds.tokenizer_origin else {
        panic!("{:?}", ds.tokenizer_origin)
    };
    assert_eq!(Tokenizer::load(saved).unwrap().hash(), ds.tokenizer.hash());
    // A smaller vocabulary spends more tokens per byte than GPT-2's.
    let bytes_per_token = ds.train[0].text_bytes() as f64 / ds.train[0].len() as f64;
    assert!((2.0..4.5).contains(&bytes_per_token), "{bytes_per_token}");

    // Reused, not retrained, on the next prepare.
    let stamp = modified(saved);
    let again = Dataset::prepare(&cfg).unwrap();
    assert_eq!(again.tokenizer.hash(), ds.tokenizer.hash());
    assert_eq!(modified(saved), stamp);

    // The cache refuses the GPT-2 tokenizer, loudly.
    let gpt2 = Tokenizer::load(&shared("gpt2/tokenizer.json")).unwrap();
    match TokenCache::open(ds.train[0].path(), &gpt2) {
        Err(Error::TokenizerMismatch { .. }) => {}
        other => panic!("expected a tokenizer mismatch, got {other:?}"),
    }

    let report = ds.stats_report().unwrap();
    println!("{report}");
    assert!(report.val_bigram_loss < report.val_unigram_loss);
    assert!(report.val_bigram_loss < (2048f64).ln());
}

#[test]
fn json_corpora_with_a_text_field() {
    let dir = tempfile::tempdir().unwrap();
    let records =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tinystories-records.json");
    let cfg = DataConfig {
        train: vec![shared("tinystories/stories-3000.json")],
        val: vec![records],
        format: CorpusFormat::Json,
        val_format: None,
        text_field: "story".into(),
        tokenizer: Some(TokenizerConfig::Path(shared("gpt2/tokenizer.json"))),
        cache_dir: dir.path().to_path_buf(),
        mix: vec![],
        curriculum: vec![],
    };
    let ds = Dataset::prepare(&cfg).unwrap();
    assert_eq!(ds.train[0].documents(), 3000);
    assert_eq!(ds.val.documents(), 3);
    let val = ds.tokenizer.decode(&ds.val.tokens().to_vec()).unwrap();
    assert!(
        val.starts_with("<|endoftext|>Tom had a red ball.")
            && val.contains("<|endoftext|>Mia liked to paint.")
    );
    // Only the story is tokenized, never the summary or instruction.
    assert!(!val.contains("summary") && !val.contains("Tom loses his ball"));

    let wrong = DataConfig {
        text_field: "text".into(),
        ..cfg
    };
    let err = Dataset::prepare(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("tinystories-records.json")
            && err.contains("record 1 has no \"text\" field")
            && err.contains("story"),
        "{err}"
    );
}
