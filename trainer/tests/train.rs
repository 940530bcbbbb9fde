//! Single-node training end to end on the shared TinyStories sample: exact resume, skipping a
//! corrupt checkpoint, and the divergence guard.

use forge_trainer::config::RunConfig;
use forge_trainer::train::Trainer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

fn shared_data() -> PathBuf {
    std::env::var_os("FORGE_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
        PathBuf::from,
    )
}

/// The shipped tiny CPU config, made smaller and pointed at `out_dir`: 32-token sequences,
/// 8 per step in 2 micro-batches (so gradient accumulation is exercised).
fn small_config(out_dir: &Path, max_steps: u64) -> RunConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml");
    let mut cfg = RunConfig::load(&path).unwrap();
    let data = shared_data().join("tinystories");
    cfg.data.train = vec![data.join("train-sample.txt")];
    cfg.data.val = vec![data.join("valid-sample.txt")];
    // One cache for every test in this crate: the BPE is trained and the corpus tokenized once.
    cfg.data.cache_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("forge-data-cache");
    cfg.train.out_dir = out_dir.to_path_buf();
    cfg.train.seq_len = 32;
    cfg.train.batch_size = 8;
    cfg.train.micro_batch = 4;
    cfg.train.max_steps = Some(max_steps);
    cfg.train.threads = Some(1);
    cfg.train.schedule = forge_trainer::schedule::Schedule::Cosine {
        warmup_steps: 2,
        min_lr_ratio: 0.1,
    };
    cfg.eval.every = 1000;
    cfg.eval.batches = 2;
    cfg.checkpoint.every = 1000;
    cfg
}

fn losses(trainer: &mut Trainer, steps: usize) -> Vec<f64> {
    (0..steps)
        .map(|_| trainer.train_step().unwrap().0)
        .collect()
}

#[test]
fn resume_is_exact_and_skips_a_corrupt_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 12;

    let mut straight = Trainer::new(small_config(&tmp.path().join("a"), total)).unwrap();
    let expected = losses(&mut straight, total as usize);

    let run_b = tmp.path().join("b");
    let mut first = Trainer::new(small_config(&run_b, total)).unwrap();
    let mut got = losses(&mut first, 6);
    first.save_checkpoint().unwrap();
    got.extend(losses(&mut first, 2));
    let newest = first.save_checkpoint().unwrap();
    drop(first);
    // The newest checkpoint is damaged (a torn write): resume must skip it and use step 6.
    let model = newest.join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    got.truncate(6);

    let mut resumed = Trainer::new(small_config(&run_b, total)).unwrap();
    assert_eq!(resumed.step(), 6, "resumed from the last valid checkpoint");
    got.extend(losses(&mut resumed, 6));

    let max_diff = expected
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!("uninterrupted {expected:?}\nresumed       {got:?}\nmax |Δ| {max_diff:e}");
    assert!(max_diff <= 1e-6, "resumed losses differ by {max_diff}");
    assert!(
        expected.last().unwrap() < expected.first().unwrap(),
        "loss falls"
    );
}

#[test]
fn divergence_stops_the_run_and_names_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = small_config(tmp.path(), 40);
    cfg.train.lr = 50.0;
    cfg.train.grad_clip = 0.0;
    cfg.checkpoint.every = 1;
    let mut trainer = Trainer::new(cfg).unwrap();
    let err = trainer
        .run(&Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("training diverged"), "{err}");
    assert!(err.contains("Lower [train] lr"), "{err}");
    assert!(
        err.contains("last good checkpoint is") || err.contains("no checkpoint"),
        "{err}"
    );
}
