//! Pipeline speed: one replica's layers in stages joined over `/forge/pipeline/1`, against the
//! whole model trained in one process on the same batches, measured in the same run. Among
//! processes (one per machine or network namespace: member `rank` of `addrs` holds stage
//! `rank`), or among stages in threads of this process on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use forge_protocol::pipeline::StageDtype;
use forge_protocol::rng::SplitMix64;
use forge_trainer::models::{LayerRange, ModelConfig};
use forge_trainer::optim::AdamWConfig;
use forge_trainer::pipeline::{MemoryLink, PipelineStage, ScheduleConfig, StageLink, StreamLink};
use libp2p::PeerId;
use serde::Serialize;
use tch::{Device, Tensor};

use super::bench::{connect_members, local_cluster};
use super::net::PeerNet;

/// What is trained.
#[derive(Debug, Clone)]
pub(crate) struct PipelineBench {
    pub(crate) model: ModelConfig,
    pub(crate) seq_len: i64,
    /// Sequences per step.
    pub(crate) batch: i64,
    pub(crate) micro_batches: usize,
    /// Measured steps, after one warm-up step.
    pub(crate) steps: usize,
    pub(crate) wire: StageDtype,
}

/// What one stage measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StageReport {
    pub(crate) stage: u32,
    pub(crate) stages: u32,
    pub(crate) layers: (u32, u32),
    /// Wall-clock seconds of each measured step.
    pub(crate) step_s: Vec<f64>,
    pub(crate) tokens_per_step: u64,
    /// Bytes this stage sent per step (activations forward, gradients back, scalars, and the
    /// tied embedding's gradient at the ends).
    pub(crate) bytes_sent_per_step: f64,
    /// The whole model in this process on the same batches (stage 0 only).
    pub(crate) whole_step_s: Option<Vec<f64>>,
}

/// The median of `xs` (0 when empty).
pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

impl PipelineBench {
    /// Step `index`'s batch, the same on every stage and for the whole model.
    fn batch(&self, index: u64) -> (Tensor, Tensor) {
        let mut rng = SplitMix64::new(0xbe9c_0000 + index);
        let n = (self.batch * (self.seq_len + 1)) as usize;
        let vocab = self.model.vocab_size as u64;
        let tokens: Vec<i64> = (0..n).map(|_| (rng.next_u64() % vocab) as i64).collect();
        let rows = Tensor::from_slice(&tokens).reshape([self.batch, self.seq_len + 1]);
        (
            rows.narrow(1, 0, self.seq_len),
            rows.narrow(1, 1, self.seq_len),
        )
    }

    /// Trains stage `stage` of `ranges` over `link` for a warm-up step and the measured ones;
    /// returns each measured step's seconds.
    fn run(
        &self,
        ranges: &[LayerRange],
        stage: u32,
        micro_batches: usize,
        link: &mut dyn StageLink,
    ) -> anyhow::Result<Vec<f64>> {
        let stages = ranges.len() as u32;
        let mut me = PipelineStage::new(
            &self.model,
            1,
            ranges[stage as usize],
            stage,
            stages,
            Device::Cpu,
            adamw(),
        )?;
        let schedule = ScheduleConfig {
            micro_batches,
            wire: self.wire,
        };
        let mut times = Vec::with_capacity(self.steps);
        for index in 0..=self.steps as u64 {
            let (ids, targets) = self.batch(index);
            let started = Instant::now();
            me.step(link, Some(&ids), Some(&targets), schedule, 1e-3, 1.0)?;
            if index > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    }

    /// The whole model alone in this process, one micro-batch per step.
    fn whole(&self) -> anyhow::Result<Vec<f64>> {
        let ranges = [LayerRange::whole(self.model.n_layer as u32)];
        let mut link = MemoryLink::mesh(1, Duration::from_secs(1)).remove(0);
        self.run(&ranges, 0, 1, &mut link)
    }

    /// Stage `stage` over a joined link; stage 0 then measures the whole model too.
    fn stage(&self, stage: u32, stages: u32, mut link: StreamLink) -> anyhow::Result<StageReport> {
        let ranges = LayerRange::even_split(self.model.n_layer as u32, stages);
        let step_s = self.run(&ranges, stage, self.micro_batches, &mut link)?;
        let steps = (self.steps + 1) as f64;
        let bytes_sent_per_step = link.bytes_sent() as f64 / steps;
        drop(link);
        let whole_step_s = if stage == 0 {
            Some(self.whole()?)
        } else {
            None
        };
        let layers = ranges[stage as usize];
        Ok(StageReport {
            stage,
            stages,
            layers: (layers.start, layers.end),
            step_s,
            tokens_per_step: (self.batch * self.seq_len) as u64,
            bytes_sent_per_step,
            whole_step_s,
        })
    }
}

/// How long stages have to connect and every message to arrive.
const LINK_TIMEOUT: Duration = Duration::from_secs(300);

async fn joined(net: &PeerNet, stage: u32, peers: &[PeerId]) -> anyhow::Result<StreamLink> {
    Ok(net.pipeline_link(stage, peers, LINK_TIMEOUT).await?)
}

/// This process as stage `rank` of a pipeline whose stage `j` listens on `addrs[j]`.
pub(crate) async fn bench_pipeline_member(
    bench: &PipelineBench,
    rank: usize,
    addrs: &[SocketAddr],
) -> anyhow::Result<StageReport> {
    let (net, ids) = connect_members(rank, addrs, None).await?;
    let link = joined(&net, rank as u32, &ids).await?;
    let report = tokio::task::block_in_place(|| bench.stage(rank as u32, ids.len() as u32, link))?;
    // The others may still be reading this stage's last messages.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(report)
}

/// `stages` stages in threads of this process, joined over QUIC on 127.0.0.1.
pub(crate) async fn bench_pipeline_local(
    bench: &PipelineBench,
    stages: usize,
) -> anyhow::Result<Vec<StageReport>> {
    let nets = local_cluster(stages, |config| config).await?;
    let peers: Vec<PeerId> = nets.iter().map(|(net, _)| net.peer_id()).collect();
    let links = futures::future::try_join_all(
        nets.iter()
            .enumerate()
            .map(|(s, (net, _))| joined(net, s as u32, &peers)),
    )
    .await?;
    let bench = bench.clone();
    let stages = stages as u32;
    tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = links
                .into_iter()
                .enumerate()
                .map(|(s, link)| {
                    let bench = &bench;
                    scope.spawn(move || bench.stage(s as u32, stages, link))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a stage thread panicked"))?
                })
                .collect()
        })
    })
    .await?
}
