//! Pipeline stages compute what one whole model does: the `tiny` model of both families split
//! into 2 and 4 stages, in threads of one process and in processes joined over TCP on
//! 127.0.0.1, against the whole model on the same batch: the loss and every parameter's
//! gradient (several micro-batches), and every parameter after 5 clipped AdamW steps (one
//! micro-batch: more reorder the gradient sums, which AdamW amplifies where gradients are near
//! zero). fp32 throughout, within 1e-5.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use forge_protocol::pipeline::StageDtype;
use forge_protocol::rng::SplitMix64;
use forge_trainer::models::{Family, LayerRange, Model, ModelConfig, trainable_by_name};
use forge_trainer::optim::{AdamWConfig, Optimizer, clip_grad_norm};
use forge_trainer::pipeline::{MemoryLink, PipelineStage, ScheduleConfig, StageLink, TcpLink};
use tch::{Device, Tensor, nn};

const SEED: u64 = 77;
const LR: f64 = 3e-3;
const CLIP: f64 = 0.5;
const STEPS: usize = 5;

fn adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

/// Batch `index` (drawn without libtorch's process-wide generator, which other threads use): a
/// few targets ignored (-1), so the loss is over the counted tokens only.
fn batch(cfg: &ModelConfig, index: i64) -> (Tensor, Tensor) {
    let mut rng = SplitMix64::new(1000 + index as u64);
    let mut draw = |n: usize| -> Vec<i64> {
        (0..n)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as i64)
            .collect()
    };
    let ids = Tensor::from_slice(&draw(64)).reshape([4, 16]);
    let targets = Tensor::from_slice(&draw(64)).reshape([4, 16]);
    let _ = targets.narrow(0, 1, 1).narrow(1, 0, 3).fill_(-1);
    (ids, targets)
}

/// One libtorch thread in every process of this test: the reference and the stage processes
/// then sum in the same order (AdamW amplifies reordered sums where gradients are near zero).
fn one_thread() {
    tch::set_num_threads(1);
}

/// What one run yields: batch 0's loss and gradients, then the parameters after STEPS steps on
/// batches 1..=STEPS, all by parameter name.
struct Outcome {
    loss: f64,
    grads: BTreeMap<String, Tensor>,
    params: BTreeMap<String, Tensor>,
}

fn reference(cfg: &ModelConfig) -> Outcome {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Model::seeded(&mut vs, cfg, SEED).unwrap();
    let mut opt = Optimizer::adamw(&vs, adamw());
    let names: Vec<String> = trainable_by_name(&vs).into_iter().map(|(n, _)| n).collect();
    let (ids, targets) = batch(cfg, 0);
    let loss = model.loss(&ids, &targets);
    let value = f64::try_from(&loss).unwrap();
    let grads = names.into_iter().zip(opt.gradients(&loss)).collect();
    for index in 1..=STEPS {
        let (ids, targets) = batch(cfg, index as i64);
        let grads = opt.gradients(&model.loss(&ids, &targets));
        clip_grad_norm(&grads, CLIP);
        opt.step(LR, &grads);
    }
    Outcome {
        loss: value,
        grads,
        params: trainable_by_name(&vs).into_iter().collect(),
    }
}

/// Stage `stage` of `ranges.len()` over `link`: its part of an [`Outcome`] (the loss is the
/// last stage's).
fn run_stage(
    cfg: &ModelConfig,
    ranges: &[LayerRange],
    stage: u32,
    micro_batches: usize,
    link: &mut dyn StageLink,
) -> Outcome {
    let stages = ranges.len() as u32;
    let mut me = PipelineStage::new(
        cfg,
        SEED,
        ranges[stage as usize],
        stage,
        stages,
        Device::Cpu,
        adamw(),
    )
    .unwrap();
    let schedule = ScheduleConfig {
        micro_batches,
        wire: StageDtype::F32,
    };
    let (ids, targets) = batch(cfg, 0);
    let (grads, loss) = me
        .gradients(link, Some(&ids), Some(&targets), schedule)
        .unwrap();
    let names = trainable_by_name(&me.vs).into_iter().map(|(n, _)| n);
    let grads = names.zip(grads).collect();
    for index in 1..=STEPS {
        let (ids, targets) = batch(cfg, index as i64);
        me.step(link, Some(&ids), Some(&targets), schedule, LR, CLIP)
            .unwrap();
    }
    Outcome {
        loss,
        grads,
        params: trainable_by_name(&me.vs).into_iter().collect(),
    }
}

fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{what}: shapes differ");
    let diff = f64::try_from((a - b).abs().max()).unwrap();
    assert!(diff <= 1e-5, "{what}: differs by {diff}");
}

/// Every stage's outcome against the whole model's: each parameter is held by some stage (the
/// tied embedding by both ends) and every held one agrees.
fn check(what: &str, whole: &Outcome, stages: &[Outcome], micro_batches: usize) {
    let last = stages.last().unwrap();
    assert!(
        (last.loss - whole.loss).abs() < 1e-5,
        "{what}: loss {} vs {}",
        last.loss,
        whole.loss
    );
    let mut held = std::collections::BTreeSet::new();
    for stage in stages {
        for (name, g) in &stage.grads {
            held.insert(name.clone());
            close(
                &format!("{what}: gradient of {name}"),
                g,
                &whole.grads[name],
            );
            if micro_batches == 1 {
                let p = &stage.params[name];
                close(
                    &format!("{what}: {name} after {STEPS} steps"),
                    p,
                    &whole.params[name],
                );
            }
        }
    }
    assert_eq!(
        held.len(),
        whole.grads.len(),
        "{what}: parameters held by no stage"
    );
}

fn configs() -> Vec<ModelConfig> {
    [Family::Gpt2, Family::Llama]
        .into_iter()
        .map(|family| ModelConfig::preset("tiny", Some(family)).unwrap())
        .collect()
}

#[test]
fn stages_in_threads_compute_what_one_model_does() {
    one_thread();
    for cfg in configs() {
        let whole = reference(&cfg);
        for (stages, micro) in [(2, 1), (4, 1), (2, 2), (4, 4)] {
            let ranges = LayerRange::even_split(cfg.n_layer as u32, stages);
            let links = MemoryLink::mesh(stages, Duration::from_secs(60));
            let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
                let handles: Vec<_> = links
                    .into_iter()
                    .enumerate()
                    .map(|(s, mut link)| {
                        let (cfg, ranges) = (&cfg, &ranges);
                        scope.spawn(move || run_stage(cfg, ranges, s as u32, micro, &mut link))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            check(
                &format!("{} in {stages} threads, {micro} micro-batches", cfg.family),
                &whole,
                &outcomes,
                micro,
            );
        }
    }
}

/// One stage as its own process (run by the test below; it reads its part from the
/// environment and writes its outcome as safetensors).
#[test]
#[ignore = "a stage process of stages_in_processes_over_tcp_compute_what_one_model_does"]
fn stage_process() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run by stages_in_processes_over_tcp_compute_what_one_model_does"
            )
        })
    };
    one_thread();
    let family: Family = var("FORGE_STAGE_FAMILY").parse().unwrap();
    let cfg = ModelConfig::preset("tiny", Some(family)).unwrap();
    let stage: u32 = var("FORGE_STAGE").parse().unwrap();
    let micro: usize = var("FORGE_STAGE_MICRO").parse().unwrap();
    let addrs: Vec<SocketAddr> = var("FORGE_STAGE_ADDRS")
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let ranges = LayerRange::even_split(cfg.n_layer as u32, addrs.len() as u32);
    let listener = TcpListener::bind(addrs[stage as usize]).unwrap();
    let mut link = TcpLink::mesh(stage, &addrs, listener, Duration::from_secs(60)).unwrap();
    let outcome = run_stage(&cfg, &ranges, stage, micro, &mut link);
    let mut named: Vec<(String, Tensor)> = vec![("loss".into(), Tensor::from(outcome.loss))];
    named.extend(
        outcome
            .grads
            .into_iter()
            .map(|(n, g)| (format!("grad/{n}"), g)),
    );
    named.extend(
        outcome
            .params
            .into_iter()
            .map(|(n, p)| (format!("param/{n}"), p)),
    );
    Tensor::write_safetensors(&named, var("FORGE_STAGE_OUT")).unwrap();
}

fn read_outcome(path: &Path) -> Outcome {
    let mut outcome = Outcome {
        loss: 0.0,
        grads: BTreeMap::new(),
        params: BTreeMap::new(),
    };
    for (name, t) in Tensor::read_safetensors(path).unwrap() {
        if name == "loss" {
            outcome.loss = f64::try_from(&t).unwrap();
        } else if let Some(n) = name.strip_prefix("grad/") {
            outcome.grads.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("param/") {
            outcome.params.insert(n.to_string(), t);
        }
    }
    outcome
}

/// Stage processes, killed when the test ends before they do (one failed, or a check panicked),
/// so that the others, waiting for it, do not outlive the test.
struct Stages(Vec<std::process::Child>);

impl Stages {
    /// Waits for every stage to exit successfully; panics naming the first that fails, or when
    /// they are still running after `limit`.
    fn wait_all(&mut self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut running: Vec<usize> = (0..self.0.len()).collect();
        while !running.is_empty() {
            let mut still = Vec::new();
            for i in running {
                match self.0[i].try_wait().unwrap() {
                    Some(status) => assert!(status.success(), "stage process {i} failed: {status}"),
                    None => still.push(i),
                }
            }
            running = still;
            assert!(
                std::time::Instant::now() < deadline,
                "stage processes {running:?} still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn stages_in_processes_over_tcp_compute_what_one_model_does() {
    one_thread();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for cfg in configs() {
        let whole = reference(&cfg);
        for (stages, micro) in [(2, 1), (4, 2)] {
            // All bound at once, so that no two stages get the same port (one dropped before
            // the next bind could hand it out again); freed for the stage processes to bind.
            let listeners: Vec<TcpListener> = (0..stages)
                .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            let addrs: Vec<String> = listeners
                .iter()
                .map(|l| l.local_addr().unwrap().to_string())
                .collect();
            drop(listeners);
            let mut outs = Vec::new();
            let mut children = Stages(Vec::new());
            for s in 0..stages {
                let out = dir
                    .path()
                    .join(format!("{}-{stages}-{s}.safetensors", cfg.family));
                let child = Command::new(&exe)
                    .args([
                        "--ignored",
                        "--exact",
                        "stage_process",
                        "--test-threads",
                        "1",
                    ])
                    .env("FORGE_STAGE_FAMILY", cfg.family.to_string())
                    .env("FORGE_STAGE", s.to_string())
                    .env("FORGE_STAGE_MICRO", micro.to_string())
                    .env("FORGE_STAGE_ADDRS", addrs.join(","))
                    .env("FORGE_STAGE_OUT", &out)
                    .spawn()
                    .unwrap();
                children.0.push(child);
                outs.push(out);
            }
            children.wait_all(Duration::from_secs(300));
            let outcomes: Vec<Outcome> = outs.iter().map(|out| read_outcome(out)).collect();
            check(
                &format!(
                    "{} in {stages} processes, {micro} micro-batches",
                    cfg.family
                ),
                &whole,
                &outcomes,
                micro,
            );
        }
    }
}
