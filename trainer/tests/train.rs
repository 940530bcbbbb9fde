//! Single-node training end to end on the shared TinyStories sample: exact resume, skipping a
//! corrupt checkpoint, and the divergence guard.

use forge_trainer::config::{LoadRunConfig, RunConfig};
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

/// The largest difference between two runs' losses, step by step.
fn max_loss_diff(expected: &[f64], got: &[f64]) -> f64 {
    expected
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max)
}

/// An uninterrupted run of `total` steps in `dir`: its losses.
fn straight_losses(dir: &Path, total: u64) -> Vec<f64> {
    let mut straight = Trainer::new(small_config(dir, total)).unwrap();
    losses(&mut straight, total as usize)
}

#[test]
fn resume_is_exact_and_skips_a_corrupt_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 12;

    let expected = straight_losses(&tmp.path().join("a"), total);

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

    let max_diff = max_loss_diff(&expected, &got);
    println!("uninterrupted {expected:?}\nresumed       {got:?}\nmax |Δ| {max_diff:e}");
    assert!(max_diff <= 1e-6, "resumed losses differ by {max_diff}");
    assert!(
        expected.last().unwrap() < expected.first().unwrap(),
        "loss falls"
    );
}

/// Muon and Adafactor save and resume their state like AdamW: a run stopped and resumed from
/// its checkpoint takes the steps of the uninterrupted one, and training with either lowers the
/// loss. A checkpoint of one optimizer does not resume under another: the error says which.
#[test]
fn muon_and_adafactor_resume_exactly_and_other_state_is_refused() {
    use forge_trainer::optim::OptimizerKind;
    let tmp = tempfile::tempdir().unwrap();
    let total = 8;
    let config = |dir: &Path, kind| {
        let mut cfg = small_config(dir, total);
        cfg.train.optimizer.kind = kind;
        cfg
    };
    for (name, kind) in [
        ("muon", OptimizerKind::Muon),
        ("adafactor", OptimizerKind::Adafactor),
    ] {
        let straight = tmp.path().join(format!("{name}-straight"));
        let mut trainer = Trainer::new(config(&straight, kind)).unwrap();
        let expected = losses(&mut trainer, total as usize);
        let run = tmp.path().join(name);
        let mut first = Trainer::new(config(&run, kind)).unwrap();
        let mut got = losses(&mut first, 4);
        first.save_checkpoint().unwrap();
        drop(first);
        let mut resumed = Trainer::new(config(&run, kind)).unwrap();
        assert_eq!(resumed.step(), 4);
        got.extend(losses(&mut resumed, 4));
        let max_diff = max_loss_diff(&expected, &got);
        println!("{name}: uninterrupted {expected:?}\nresumed {got:?}\nmax |Δ| {max_diff:e}");
        assert!(
            max_diff <= 1e-6,
            "{name}: resumed losses differ by {max_diff}"
        );
        assert!(
            expected.last().unwrap() < expected.first().unwrap(),
            "{name}: loss falls"
        );
    }
    // The Muon run's checkpoint under AdamW.
    let err = Trainer::new(config(&tmp.path().join("muon"), OptimizerKind::Adamw))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exp_avg") && err.contains("another optimizer"),
        "{err}"
    );
}

/// A checkpoint written in the background while training goes on holds the step it was started
/// at (the state was copied out, not read while later steps change it): resuming from it equals
/// the uninterrupted run.
#[test]
fn a_checkpoint_written_in_the_background_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 10;
    let expected = straight_losses(&tmp.path().join("a"), total);

    let run_b = tmp.path().join("b");
    let mut first = Trainer::new(small_config(&run_b, total)).unwrap();
    let mut got = losses(&mut first, 5);
    // Held back until three more steps have changed every parameter and optimizer state.
    first.hold_checkpoint_writes(true);
    first.save_checkpoint_async().unwrap();
    losses(&mut first, 3);
    first.hold_checkpoint_writes(false);
    let written = first
        .wait_for_checkpoint()
        .unwrap()
        .expect("a checkpoint was written");
    assert!(written.ends_with("step-00000005"), "{}", written.display());
    assert_eq!(
        first.wait_for_checkpoint().unwrap(),
        None,
        "nothing left to wait for"
    );
    drop(first);

    let mut resumed = Trainer::new(small_config(&run_b, total)).unwrap();
    assert_eq!(resumed.step(), 5);
    got.extend(losses(&mut resumed, 5));
    let max_diff = max_loss_diff(&expected, &got);
    assert!(
        max_diff <= 1e-6,
        "resumed losses differ by {max_diff}: {expected:?} {got:?}"
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

/// `metrics.jsonl` says where the wall clock went: every line has the wall-clock tokens/s since
/// the previous one and the phases so far, which add up to the run's elapsed time and count the
/// evaluation and the checkpoints, and the step's data, forward and backward and optimizer.
#[test]
fn metrics_account_for_the_wall_clock() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = small_config(tmp.path(), 6);
    cfg.eval.every = 3;
    cfg.checkpoint.every = 2;
    let mut trainer = Trainer::new(cfg).unwrap();
    trainer.run(&Arc::new(AtomicBool::new(false))).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for line in &lines {
        assert!(line["wall_tokens_per_s"].as_f64().unwrap() > 0.0, "{line}");
        let phases = &line["phases"];
        let sum: f64 = ["step_s", "eval_s", "checkpoint_s", "other_s"]
            .iter()
            .map(|k| phases[k].as_f64().unwrap())
            .sum();
        let elapsed = line["elapsed_s"].as_f64().unwrap();
        assert!(
            (sum - elapsed).abs() < 0.05,
            "phases {sum} s, elapsed {elapsed} s: {line}"
        );
        assert!(phases["other_s"].as_f64().unwrap() >= -1e-6, "{line}");
        // The step's parts: each measured, together within the step.
        let part = |k: &str| phases[k].as_f64().unwrap();
        let parts = part("data_s") + part("forward_backward_s") + part("optimizer_s");
        assert!(part("data_s") > 0.0 && part("optimizer_s") > 0.0, "{line}");
        assert!(part("forward_backward_s") > part("data_s"), "{line}");
        assert!(parts <= part("step_s") + 1e-9, "{line}");
        assert!(parts > 0.8 * part("step_s"), "{line}");
    }
    // The evaluation of step 3 and the saves of steps 2 and 4 show in step 6's line.
    let last = &lines[5]["phases"];
    assert!(last["eval_s"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["checkpoint_s"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["step_s"].as_f64().unwrap() > 0.0, "{last}");
}

/// Worker 0's parameters, flattened in name order.
fn flat_params(trainer: &Trainer) -> tch::Tensor {
    let params: Vec<tch::Tensor> = forge_trainer::models::trainable_by_name(trainer.var_store())
        .into_iter()
        .map(|(_, p)| p.detach().reshape([-1]))
        .collect();
    tch::Tensor::cat(&params, 0)
}

fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Trains `steps` steps of 8 sequences with `workers` CPU workers and the given micro-batch.
fn data_parallel_run(
    dir: &Path,
    workers: usize,
    micro_batch: usize,
    steps: u64,
) -> (Vec<f64>, tch::Tensor) {
    let mut cfg = small_config(dir, steps);
    cfg.train.micro_batch = micro_batch;
    cfg.train.parallel.cpu_workers = workers;
    // A lower peak lr than the config's 3e-3: AdamW's first steps move every parameter by about
    // lr x sign(gradient), so a parameter whose gradient is a near-cancellation (float rounding
    // of a differently split batch decides its sign) moves by up to 1e-5 at 3e-3 even in exact
    // data parallelism; at 1e-3 the comparison measures the data-parallel machinery.
    cfg.train.lr = 1e-3;
    let mut trainer = Trainer::new(cfg).unwrap();
    assert_eq!(trainer.workers(), workers);
    let losses = losses(&mut trainer, steps as usize);
    (losses, flat_params(&trainer))
}

#[test]
fn two_cpu_workers_match_one_worker_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 8;
    // Two workers of 4 sequences read, between them, the windows one worker with 8 reads.
    let (two_losses, two) = data_parallel_run(&tmp.path().join("two"), 2, 4, steps);
    let (one_losses, one) = data_parallel_run(&tmp.path().join("one"), 1, 8, steps);
    // One worker, micro-batches of 4 accumulated twice: the same batch of 8.
    let (acc_losses, acc) = data_parallel_run(&tmp.path().join("acc"), 1, 4, steps);
    let params = max_abs_diff(&two, &one);
    let accumulated = max_abs_diff(&acc, &one);
    let loss = two_losses
        .iter()
        .chain(&acc_losses)
        .zip(one_losses.iter().chain(&one_losses))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!(
        "after {steps} steps: 2 workers x 4 vs 1 x 8: max |Δ param| {params:e}; accumulation 2 x 4 \
         vs 8: {accumulated:e}; max |Δ loss| {loss:e}"
    );
    assert!(params <= 1e-5, "2 workers differ from 1 by {params}");
    assert!(accumulated <= 1e-5, "accumulation differs by {accumulated}");
    assert!(loss <= 1e-5, "losses differ by {loss}");
    assert!(one_losses.last() < one_losses.first(), "loss falls");
}

/// A round's lease, read by two CPU workers, trains like one worker reading it whole: the inner
/// steps stop when it runs out and report the positions read. Measuring the node's speed first
/// (a probe) changes nothing of the run.
#[test]
fn a_lease_read_by_two_workers_trains_like_one_and_a_probe_changes_nothing() {
    use forge_protocol::stream::SeqRange;
    use forge_trainer::train::ScheduleSpan;
    let tmp = tempfile::tempdir().unwrap();
    let lease = [SeqRange::new(100, 124), SeqRange::new(7, 35)];
    let run = |name: &str, workers: usize, micro_batch: usize, probe: bool| {
        let mut cfg = small_config(&tmp.path().join(name), 100);
        cfg.train.micro_batch = micro_batch;
        cfg.train.parallel.cpu_workers = workers;
        cfg.train.lr = 1e-3;
        let mut trainer = Trainer::new(cfg).unwrap();
        if probe {
            let before = flat_params(&trainer);
            let us = trainer.probe_us_per_step().unwrap();
            assert!(us > 0);
            assert_eq!(max_abs_diff(&before, &flat_params(&trainer)), 0.0);
        }
        // 52 positions: 6 steps of 8, the last 4 left over.
        assert_eq!(trainer.set_data_lease(&lease).unwrap(), 6);
        let stop = AtomicBool::new(false);
        let schedule = ScheduleSpan {
            start: 0,
            per_step: 1.0,
        };
        let summary = trainer.inner_steps(10, None, &stop, schedule).unwrap();
        assert_eq!(summary.steps, 6);
        assert_eq!(
            trainer.data_consumed(),
            [SeqRange::new(100, 124), SeqRange::new(7, 31)]
        );
        (summary.mean_loss(), flat_params(&trainer))
    };
    let (one_loss, one) = run("one", 1, 8, true);
    let (two_loss, two) = run("two", 2, 4, false);
    let params = max_abs_diff(&one, &two);
    println!("lease of 6 steps: max |Δ param| {params:e}, losses {one_loss} / {two_loss}");
    assert!(params <= 1e-5, "2 workers differ from 1 by {params}");
    assert!((one_loss - two_loss).abs() <= 1e-5);
}

#[test]
fn data_parallel_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let total = 8;
    let config = |dir: &Path| {
        let mut cfg = small_config(dir, total);
        cfg.train.parallel.cpu_workers = 2;
        cfg
    };
    let mut straight = Trainer::new(config(&tmp.path().join("a"))).unwrap();
    let expected = losses(&mut straight, total as usize);
    let mut first = Trainer::new(config(&tmp.path().join("b"))).unwrap();
    let mut got = losses(&mut first, 4);
    first.save_checkpoint().unwrap();
    drop(first);
    let mut resumed = Trainer::new(config(&tmp.path().join("b"))).unwrap();
    assert_eq!(resumed.step(), 4);
    got.extend(losses(&mut resumed, 4));
    let diff = max_abs_diff(&flat_params(&straight), &flat_params(&resumed));
    println!("2 workers, resumed at step 4: losses {got:?}, max |Δ param| {diff:e}");
    assert_eq!(expected, got);
    assert!(diff == 0.0, "parameters differ by {diff}");
}

#[test]
fn a_crashed_or_hung_worker_fails_the_step_naming_it() {
    use forge_trainer::parallel::Fault;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    for (name, fault, expect) in [
        ("panic", Fault::Panic, "worker 1 panicked"),
        (
            "hang",
            Fault::Hang(Duration::from_secs(30)),
            "worker 1 did not reach the gradient all-reduce",
        ),
    ] {
        let mut cfg = small_config(&tmp.path().join(name), 10);
        cfg.train.parallel.cpu_workers = 2;
        cfg.train.parallel.timeout_s = 1.0;
        let mut trainer = Trainer::new(cfg).unwrap();
        trainer.train_step().unwrap();
        trainer.inject_fault(1, fault).unwrap();
        let started = Instant::now();
        let err = trainer.train_step().unwrap_err().to_string();
        let took = started.elapsed();
        println!("{name}: failed after {took:?}: {err}");
        assert!(err.contains(expect), "{err}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        // No more steps: the workers are out of step.
        let again = trainer.train_step().unwrap_err().to_string();
        assert!(again.contains("stopped earlier"), "{again}");
    }
}

/// A run's model in two pipeline stages (two trainers joined in memory, each reading the run's
/// data) trains as the whole model does: the same losses step by step, the same evaluation, and
/// a probe of each stage leaves the run as it was.
#[test]
fn two_stage_trainers_train_like_the_whole_model() {
    use forge_trainer::models::LayerRange;
    use forge_trainer::pipeline::MemoryLink;
    use forge_trainer::train::StageSpec;

    let tmp = tempfile::tempdir().unwrap();
    let steps = 4;
    let mut whole = Trainer::new(small_config(&tmp.path().join("whole"), steps as u64)).unwrap();
    let expected = losses(&mut whole, steps);
    let expected_eval = whole.evaluate().0;

    let n = 4; // the tiny preset's blocks: planner layers 0..6
    let specs = [
        (0, LayerRange { start: 0, end: 3 }),
        (
            1,
            LayerRange {
                start: 3,
                end: n + 2,
            },
        ),
    ];
    let links = MemoryLink::mesh(2, std::time::Duration::from_secs(120));
    let results: Vec<(Vec<f64>, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = links
            .into_iter()
            .zip(specs)
            .map(|(link, (stage, layers))| {
                let dir = tmp.path().join(format!("stage-{stage}"));
                scope.spawn(move || {
                    let spec = StageSpec {
                        layers,
                        stage,
                        stages: 2,
                    };
                    let mut trainer =
                        Trainer::with_stage(small_config(&dir, steps as u64), Some(spec)).unwrap();
                    assert_eq!(trainer.stage(), Some(spec));
                    trainer.probe_us_per_step().unwrap();
                    trainer.set_stage_link(Box::new(link)).unwrap();
                    let got = losses(&mut trainer, steps);
                    let eval = trainer.evaluate().0;
                    // A stop on one stage ends both stages' inner steps after the same step.
                    let stop = AtomicBool::new(stage == 1);
                    let span = forge_trainer::train::ScheduleSpan {
                        start: steps as u64,
                        per_step: 1.0,
                    };
                    let inner = trainer.inner_steps(3, None, &stop, span).unwrap();
                    assert_eq!(inner.steps, 1, "stage {stage} took {} steps", inner.steps);
                    (got, eval)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (stage, (got, eval)) in results.iter().enumerate() {
        for (step, (a, b)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "stage {stage}, step {step}: loss {a} vs the whole model's {b}"
            );
        }
        assert!(
            (eval - expected_eval).abs() < 1e-4,
            "stage {stage}: eval {eval} vs {expected_eval}"
        );
    }
}

/// A stage whose neighbour is replaced (its node started again, or the plan gave the stage to
/// another node) joins a new link and trains on with the newcomer, which counts exchanges
/// from 0 as it does; both then leave the pipeline after a last evaluation, each waiting until
/// the other is done with it.
#[test]
fn a_stage_trains_on_with_a_new_neighbour_and_both_leave_in_step() {
    use forge_trainer::models::LayerRange;
    use forge_trainer::pipeline::MemoryLink;
    use forge_trainer::train::StageSpec;

    let tmp = tempfile::tempdir().unwrap();
    let spec = |stage: u32| StageSpec {
        layers: if stage == 0 {
            LayerRange { start: 0, end: 3 }
        } else {
            LayerRange { start: 3, end: 6 }
        },
        stage,
        stages: 2,
    };
    let timeout = std::time::Duration::from_secs(120);
    let [first_a, second_a]: [MemoryLink; 2] = MemoryLink::mesh(2, timeout).try_into().unwrap();
    let [first_b, second_b]: [MemoryLink; 2] = MemoryLink::mesh(2, timeout).try_into().unwrap();
    let stage_trainer = |name: &str, stage: u32| {
        Trainer::with_stage(small_config(&tmp.path().join(name), 10), Some(spec(stage))).unwrap()
    };
    std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            let mut trainer = stage_trainer("first", 0);
            trainer.set_stage_link(Box::new(first_a)).unwrap();
            losses(&mut trainer, 2);
            trainer.set_stage_link(Box::new(first_b)).unwrap();
            losses(&mut trainer, 2);
            let eval = trainer.evaluate().0;
            trainer.leave_pipeline();
            eval
        });
        let gone = scope.spawn(|| {
            let mut trainer = stage_trainer("gone", 1);
            trainer.set_stage_link(Box::new(second_a)).unwrap();
            losses(&mut trainer, 2);
        });
        let newcomer = scope.spawn(|| {
            let mut trainer = stage_trainer("newcomer", 1);
            trainer.set_stage_link(Box::new(second_b)).unwrap();
            losses(&mut trainer, 2);
            let eval = trainer.evaluate().0;
            trainer.leave_pipeline();
            eval
        });
        gone.join().unwrap();
        let (a, b) = (first.join().unwrap(), newcomer.join().unwrap());
        assert!(a.is_finite() && a == b, "{a} vs {b}");
    });
}

/// Nothing on the step path reads checkpoint files: steps after a checkpoint exists do not
/// verify it again (every step used to hash the newest checkpoint to name it in a divergence
/// message: steps twice as slow after a 1 GB one), even once it is damaged; a resume checks it
/// and skips it.
#[test]
fn steps_read_no_checkpoint_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(small_config(tmp.path(), 20)).unwrap();
    losses(&mut trainer, 2);
    let dir = trainer.save_checkpoint().unwrap();
    assert_eq!(trainer.last_checkpoint(), Some(dir.clone()));
    // Damaged after it was written: a step that verified it would warn every time.
    std::fs::write(dir.join("model.safetensors"), b"damaged").unwrap();
    let before = trainer.checkpoints().verifications();
    let stop = AtomicBool::new(false);
    let span = forge_trainer::train::ScheduleSpan {
        start: 2,
        per_step: 1.0,
    };
    let inner = trainer.inner_steps(3, None, &stop, span).unwrap();
    assert_eq!(inner.steps, 3);
    losses(&mut trainer, 2);
    assert_eq!(trainer.checkpoints().verifications(), before);

    let resumed = Trainer::new(small_config(tmp.path(), 20)).unwrap();
    assert!(resumed.checkpoints().verifications() >= 1);
    assert_eq!(resumed.step(), 0, "the damaged checkpoint is skipped");
}

/// `[data] mix`: two sources in different layouts (TinyStories text, and the JSON records'
/// `story` field), weights 0.75 and 0.25. Two workers read 1,024 windows in 16 steps: each
/// source's tokens are within 1% of its weight (a mixture is exact at every 1,024 windows), and
/// a run resumed at step 8 takes the uninterrupted run's steps and counts. A curriculum that
/// switches from the first source to the second at 32,768 tokens (step 16) reads only the
/// first before the switch and only the second after it.
#[test]
fn a_mixture_reads_its_weights_resumes_exactly_and_a_curriculum_switches() {
    use forge_trainer::data::{CorpusFormat, CurriculumPoint, MixSource};
    let tmp = tempfile::tempdir().unwrap();
    let data = shared_data().join("tinystories");
    let source = |file: &str, weight: Option<f64>, json: bool| MixSource {
        train: vec![data.join(file)],
        weight,
        name: Some(if json { "records" } else { "text" }.into()),
        format: json.then_some(CorpusFormat::Json),
        text_field: json.then(|| "story".to_string()),
    };
    let config = |dir: &Path, total: u64, curriculum: bool| {
        let mut cfg = small_config(dir, total);
        cfg.train.batch_size = 64;
        cfg.train.micro_batch = 32;
        cfg.train.parallel.cpu_workers = 2;
        cfg.data.train = vec![];
        let (a, b) = if curriculum {
            (None, None)
        } else {
            (Some(0.75), Some(0.25))
        };
        cfg.data.mix = vec![
            source("train-sample.txt", a, false),
            source("stories-3000.json", b, true),
        ];
        if curriculum {
            let point = |tokens, weights: [f64; 2]| CurriculumPoint {
                tokens,
                weights: weights.to_vec(),
            };
            cfg.data.curriculum = vec![
                point(0, [1.0, 0.0]),
                point(32_768, [1.0, 0.0]),
                point(32_768, [0.0, 1.0]),
            ];
        }
        cfg
    };
    let tokens = |trainer: &Trainer| {
        let t = trainer.source_tokens().unwrap();
        (t["text"], t["records"])
    };
    let total = 16;
    let mut straight = Trainer::new(config(&tmp.path().join("a"), total, false)).unwrap();
    let expected = losses(&mut straight, total as usize);
    let (text, records) = tokens(&straight);
    println!("16 steps of 64 x 32 tokens: text {text}, records {records}");
    assert_eq!(text + records, 16 * 64 * 32);
    let share = text as f64 / (text + records) as f64;
    assert!((share - 0.75).abs() < 0.01, "text's share {share}");

    let run = tmp.path().join("b");
    let mut first = Trainer::new(config(&run, total, false)).unwrap();
    let mut got = losses(&mut first, 8);
    first.save_checkpoint().unwrap();
    drop(first);
    let mut resumed = Trainer::new(config(&run, total, false)).unwrap();
    assert_eq!(resumed.step(), 8);
    got.extend(losses(&mut resumed, 8));
    assert_eq!(expected, got);
    assert_eq!(tokens(&resumed), (text, records));

    let mut curriculum = Trainer::new(config(&tmp.path().join("c"), 24, true)).unwrap();
    losses(&mut curriculum, 16);
    assert_eq!(tokens(&curriculum), (32_768, 0));
    losses(&mut curriculum, 8);
    assert_eq!(tokens(&curriculum), (32_768, 8 * 64 * 32));
}

/// `precision = "bf16-pure"` on the CPU: parameters, gradients and AdamW's moments in bf16,
/// updates rounded stochastically. Its losses follow the fp32 run's (the last within 2%), its
/// parameters and optimizer state are bf16, it resumes exactly (the rounding noise is a
/// function of the step), and two data-parallel workers train like one.
#[test]
fn bf16_pure_trains_like_fp32_resumes_exactly_and_keeps_workers_identical() {
    use forge_trainer::models::Precision;
    let tmp = tempfile::tempdir().unwrap();
    let total = 16;
    let config = |dir: &Path, precision| {
        let mut cfg = small_config(dir, total);
        cfg.train.precision = Some(precision);
        cfg
    };
    let mut fp32 = Trainer::new(config(&tmp.path().join("fp32"), Precision::Fp32)).unwrap();
    let reference = losses(&mut fp32, total as usize);
    let mut pure = Trainer::new(config(&tmp.path().join("pure"), Precision::Bf16Pure)).unwrap();
    let expected = losses(&mut pure, total as usize);
    println!("fp32      {reference:?}\nbf16-pure {expected:?}");
    let (a, b) = (reference.last().unwrap(), expected.last().unwrap());
    assert!(
        (a - b).abs() / a < 0.02,
        "last loss: fp32 {a}, bf16-pure {b}"
    );
    assert!(b < &expected[0], "loss falls");
    assert!(
        forge_trainer::models::trainable_by_name(pure.var_store())
            .iter()
            .all(|(_, p)| p.kind() == tch::Kind::BFloat16)
    );

    let run = tmp.path().join("resumed");
    let mut first = Trainer::new(config(&run, Precision::Bf16Pure)).unwrap();
    let mut got = losses(&mut first, 8);
    let checkpoint = first.save_checkpoint().unwrap();
    drop(first);
    let state = tch::Tensor::read_safetensors(checkpoint.join("optimizer.safetensors")).unwrap();
    assert!(
        state
            .iter()
            .filter(|(name, _)| name.ends_with("exp_avg"))
            .all(|(_, t)| t.kind() == tch::Kind::BFloat16)
    );
    let mut resumed = Trainer::new(config(&run, Precision::Bf16Pure)).unwrap();
    got.extend(losses(&mut resumed, 8));
    assert_eq!(expected, got);

    // Two workers (whose gradients are reduced in another order) follow one.
    let mut cfg = config(&tmp.path().join("two"), Precision::Bf16Pure);
    cfg.train.parallel.cpu_workers = 2;
    let mut two = Trainer::new(cfg).unwrap();
    let both = losses(&mut two, total as usize);
    let c = both.last().unwrap();
    assert!(
        (b - c).abs() / b < 0.02,
        "last loss: 1 worker {b}, 2 workers {c}"
    );
}
