//! Train-step benchmark: forward + backward + grad clip + AdamW on a fixed random batch,
//! timed per step. `scripts/bench_pytorch.py` runs the identical step in PyTorch so the two
//! can be compared in one run (`scripts/bench_train_step.sh`).

use crate::device::device_name;
use crate::error::{Error, Result};
use crate::flops;
use crate::models::{Model, ModelConfig, Precision};
use crate::optim::{AdamWConfig, Optimizer, clip_grad_norm};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainStepBench {
    pub model: ModelConfig,
    pub batch: i64,
    pub seq_len: i64,
    pub device: Device,
    pub precision: Precision,
    pub warmup: usize,
    pub steps: usize,
    /// Intra-op threads for CPU kernels (libtorch's default when `None`).
    pub threads: Option<i32>,
    /// Overrides the peak-FLOPs table (TFLOP/s), e.g. for CPUs, which it does not list.
    pub peak_tflops: Option<f64>,
    pub seed: i64,
}

/// What was measured. Field names match the PyTorch script's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct TrainStepResult {
    pub implementation: &'static str,
    pub family: String,
    pub params: i64,
    pub batch: i64,
    pub seq_len: i64,
    pub device: String,
    pub device_name: String,
    pub precision: Precision,
    pub threads: i32,
    pub steps: usize,
    pub step_ms_median: f64,
    pub step_ms_mean: f64,
    pub tokens_per_s: f64,
    pub flops_per_token: f64,
    pub achieved_tflops: f64,
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    pub final_loss: f64,
}

impl TrainStepBench {
    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidBench(why));
        if self.batch <= 0 || self.seq_len <= 0 {
            return bad(format!(
                "batch ({}) and seq ({}) must be positive",
                self.batch, self.seq_len
            ));
        }
        if self.seq_len > self.model.max_seq_len {
            return bad(format!(
                "seq {} exceeds the model's max_seq_len {}; pass a shorter --seq",
                self.seq_len, self.model.max_seq_len
            ));
        }
        if self.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if self.precision == Precision::Bf16 && self.device == Device::Cpu {
            return bad("bf16 is for CUDA devices; use --precision fp32 on cpu".into());
        }
        Ok(())
    }

    pub fn run(&self) -> Result<TrainStepResult> {
        self.check()?;
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let vs = VarStore::new(self.device);
        let shape = [self.batch, self.seq_len + 1];
        let (mut model, tokens) = {
            let _rng = crate::rng();
            tch::manual_seed(self.seed);
            let model = Model::new(&vs.root(), &self.model)?;
            let tokens = Tensor::randint(self.model.vocab_size, shape, (Kind::Int64, self.device));
            (model, tokens)
        };
        model.set_precision(self.precision);
        let mut opt = Optimizer::adamw(&vs, AdamWConfig::default());
        let ids = tokens.narrow(1, 0, self.seq_len);
        let targets = tokens.narrow(1, 1, self.seq_len);
        let sync = || {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
        };

        let mut times = Vec::with_capacity(self.steps);
        let mut last_loss = Tensor::zeros([], (Kind::Float, self.device));
        for i in 0..self.warmup + self.steps {
            sync();
            let start = Instant::now();
            let loss = model.loss(&ids, &targets);
            let grads = opt.gradients(&loss);
            clip_grad_norm(&grads, 1.0);
            opt.step(3e-4, &grads);
            sync();
            if i >= self.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
            last_loss = loss.detach();
        }
        let final_loss = f64::try_from(&last_loss).map_err(Error::torch("reading the loss"))?;

        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let tokens_per_step = (self.batch * self.seq_len) as f64;
        let tokens_per_s = tokens_per_step / median;
        let flops_per_token = self.model.train_flops_per_token(self.seq_len);
        let achieved_tflops = flops_per_token * tokens_per_s / 1e12;
        let (name, table_peak) = match self.device {
            Device::Cuda(i) => {
                let name = flops::cuda_device_name(i).unwrap_or_else(|| "unknown GPU".into());
                let peak = flops::gpu_peak_tflops(&name, self.precision.bf16_compute());
                (name, peak)
            }
            _ => (cpu_name(), None),
        };
        let peak_tflops = self.peak_tflops.or(table_peak);
        Ok(TrainStepResult {
            implementation: "forge",
            family: self.model.family.to_string(),
            params: self.model.param_count(),
            batch: self.batch,
            seq_len: self.seq_len,
            device: device_name(self.device),
            device_name: name,
            precision: self.precision,
            threads: tch::get_num_threads(),
            steps: self.steps,
            step_ms_median: median * 1e3,
            step_ms_mean: mean * 1e3,
            tokens_per_s,
            flops_per_token,
            achieved_tflops,
            peak_tflops,
            mfu: peak_tflops.map(|p| achieved_tflops / p),
            final_loss,
        })
    }
}

/// The CPU model name from /proc/cpuinfo, for benchmark records.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TrainStepBench {
        TrainStepBench {
            model: ModelConfig::preset("tiny", None).unwrap(),
            batch: 2,
            seq_len: 32,
            device: Device::Cpu,
            precision: Precision::Fp32,
            warmup: 1,
            steps: 3,
            threads: Some(1),
            peak_tflops: Some(1.0),
            seed: 0,
        }
    }

    #[test]
    fn measures_and_reports_mfu_against_a_given_peak() {
        let r = tiny().run().unwrap();
        assert_eq!(r.steps, 3);
        assert!(r.tokens_per_s > 0.0 && r.step_ms_median > 0.0);
        let mfu = r.mfu.unwrap();
        assert!((mfu - r.achieved_tflops).abs() < 1e-12);
        assert!(r.final_loss.is_finite());
    }

    #[test]
    fn bad_settings_are_explained() {
        let mut b = tiny();
        b.seq_len = 100_000;
        assert!(b.run().unwrap_err().to_string().contains("max_seq_len"));
        let mut b = tiny();
        b.precision = Precision::Bf16;
        assert!(
            b.run()
                .unwrap_err()
                .to_string()
                .contains("--precision fp32")
        );
    }
}
