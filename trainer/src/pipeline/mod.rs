//! Pipeline stages: one replica's layers split across nodes, each stage holding a contiguous
//! range of the planner's layers (embeddings, blocks, final norm and head).
//!
//! A step runs the GPipe schedule: the batch is cut into micro-batches; every stage runs the
//! forward pass of each in turn, sending its output to the next stage, then the backward pass of
//! each in reverse order, sending the gradient of its input back. The last stage's loss is the
//! sum of the micro-batches' token losses over the batch's tokens, so it equals the whole
//! batch's mean. The two copies of a tied embedding (first and last stage) swap their
//! gradients and both add them, first's plus last's, so they get the same bits and stay tied.
//! Every stage adds its squared gradient norm and its loss to every other's, clips by the norm
//! over all stages and steps its own AdamW: the update a whole replica makes, up to the order
//! of floating-point sums.
//!
//! Stages talk through a [`StageLink`]: in one process ([`MemoryLink`]) or over byte streams
//! ([`StreamLink`]: TCP, or a node's libp2p streams); every message is a [`StageHeader`] and its tensor bytes, checked on arrival
//! against what the schedule expects.

mod tcp;
#[cfg(test)]
mod tests;

use std::sync::mpsc;
use std::time::Duration;

use forge_protocol::pipeline::{StageDtype, StageHeader, StageKind};
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Error, Result};
use crate::models::{
    Family, LayerRange, Model, ModelConfig, cross_entropy_reduced, trainable_by_name,
};
use crate::optim::{AdamWConfig, Optimizer, accumulate, clip_to_norm};

pub use tcp::{StreamLink, StreamPair, TcpLink};

/// How one stage reaches the others of its pipeline. `send` must not wait for the receiver to
/// read (first and last stage send each other their tied gradients at the same time).
pub trait StageLink: Send {
    /// Sends `header` and its `payload` to stage `to`.
    fn send(&mut self, to: u32, header: &StageHeader, payload: &[u8]) -> Result<()>;
    /// The next message from stage `from`, in the order it was sent.
    fn recv(&mut self, from: u32) -> Result<(StageHeader, Vec<u8>)>;
}

type Message = (StageHeader, Vec<u8>);

/// Stages of one process, joined by channels (tests, and a node's local split).
#[derive(Debug)]
pub struct MemoryLink {
    stage: u32,
    to: Vec<Option<mpsc::Sender<Message>>>,
    from: Vec<Option<mpsc::Receiver<Message>>>,
    timeout: Duration,
}

impl MemoryLink {
    /// One link per stage of a pipeline of `stages`, every pair joined both ways.
    pub fn mesh(stages: u32, timeout: Duration) -> Vec<MemoryLink> {
        let n = stages as usize;
        let mut links: Vec<MemoryLink> = (0..stages)
            .map(|stage| MemoryLink {
                stage,
                to: (0..n).map(|_| None).collect(),
                from: (0..n).map(|_| None).collect(),
                timeout,
            })
            .collect();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let (tx, rx) = mpsc::channel();
                    links[a].to[b] = Some(tx);
                    links[b].from[a] = Some(rx);
                }
            }
        }
        links
    }
}

impl StageLink for MemoryLink {
    fn send(&mut self, to: u32, header: &StageHeader, payload: &[u8]) -> Result<()> {
        let tx = self.to.get(to as usize).and_then(Option::as_ref);
        tx.ok_or_else(|| {
            Error::Pipeline(format!("stage {} has no link to stage {to}", self.stage))
        })?
        .send((header.clone(), payload.to_vec()))
        .map_err(|_| Error::Pipeline(format!("stage {to} is gone")))
    }

    fn recv(&mut self, from: u32) -> Result<Message> {
        let rx = self.from.get(from as usize).and_then(Option::as_ref);
        rx.ok_or_else(|| {
            Error::Pipeline(format!(
                "stage {} has no link from stage {from}",
                self.stage
            ))
        })?
        .recv_timeout(self.timeout)
        .map_err(|err| Error::Pipeline(format!("nothing from stage {from}: {err}")))
    }
}

/// A tensor as pipeline bytes: its shape and its values, little-endian, in `dtype`.
pub fn to_wire(tensor: &Tensor, dtype: StageDtype) -> Result<(Vec<u64>, Vec<u8>)> {
    let shape = tensor.size().iter().map(|&d| d as u64).collect();
    let flat = tensor.detach().to_device(Device::Cpu).reshape([-1]);
    let bytes = match dtype {
        StageDtype::F32 => Vec::<f32>::try_from(flat.to_kind(Kind::Float))
            .map_err(Error::torch("reading a tensor to send"))?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        StageDtype::Bf16 => {
            Vec::<i16>::try_from(flat.to_kind(Kind::BFloat16).view_dtype(Kind::Int16))
                .map_err(Error::torch("reading a tensor to send"))?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
    };
    Ok((shape, bytes))
}

/// The fp32 tensor on `device` that a checked header and its payload carry.
pub fn from_wire(header: &StageHeader, payload: &[u8], device: Device) -> Result<Tensor> {
    header
        .check()
        .map_err(|err| Error::Pipeline(err.to_string()))?;
    if payload.len() as u64 != header.payload_len {
        return Err(Error::Pipeline(format!(
            "{} payload bytes where the header declared {}",
            payload.len(),
            header.payload_len
        )));
    }
    let shape: Vec<i64> = header.shape.iter().map(|&d| d as i64).collect();
    let flat = match header.dtype {
        StageDtype::F32 => {
            let values: Vec<f32> = payload
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_slice(&values)
        }
        StageDtype::Bf16 => {
            let values: Vec<i16> = payload
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            Tensor::from_slice(&values)
                .view_dtype(Kind::BFloat16)
                .to_kind(Kind::Float)
        }
    };
    Ok(flat.reshape(shape.as_slice()).to_device(device))
}

/// How stages run a step.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleConfig {
    /// Micro-batches per step (the batch is cut along its first dimension).
    pub micro_batches: usize,
    /// How activations and their gradients travel.
    pub wire: StageDtype,
}

/// What every stage knows after a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageStep {
    /// The batch's mean token loss (computed by the last stage).
    pub loss: f64,
    /// The gradient norm over every stage's parameters, before clipping.
    pub grad_norm: f64,
}

/// A stage's place in its pipeline and the schedule's bookkeeping; works on a model, its
/// `VarStore` and its optimizer held elsewhere (a [`PipelineStage`], or a trainer's worker).
#[derive(Debug)]
pub struct StageRunner {
    stage: u32,
    stages: u32,
    /// Index (in [`trainable_by_name`] order) of the tied embedding this stage shares with the
    /// other end of the pipeline, if it holds one and the pipeline has more than one stage.
    tied: Option<usize>,
    /// Exchanges so far (training steps and evaluations), counted alike on every stage: the
    /// `step` of every message, so one from another exchange is refused.
    exchange: u64,
}

/// The parameter a tied output head shares with the embedding.
fn tied_name(cfg: &ModelConfig) -> Option<&'static str> {
    match cfg.family {
        Family::Gpt2 => Some("transformer.wte.weight"),
        Family::Llama if cfg.tie_embeddings => Some("model.embed_tokens.weight"),
        Family::Llama => None,
    }
}

/// Explains why `layers` cannot be stage `stage` of `stages`.
pub fn check_stage(cfg: &ModelConfig, layers: LayerRange, stage: u32, stages: u32) -> Result<()> {
    let n = cfg.n_layer as u32;
    layers
        .check(n)
        .map_err(|err| Error::Pipeline(err.to_string()))?;
    if stage >= stages {
        return Err(Error::Pipeline(format!(
            "stage {stage} of a pipeline of {stages}"
        )));
    }
    if (stage == 0) != layers.has_embedding() || (stage + 1 == stages) != layers.has_head(n) {
        return Err(Error::Pipeline(format!(
            "stage {stage} of {stages} holds layers {}..{}: the first stage must hold the \
             embeddings (layer 0) and only the last the head (layer {})",
            layers.start,
            layers.end,
            n + 1
        )));
    }
    Ok(())
}

impl StageRunner {
    /// Stage `stage` of `stages` over the parameters of `vs` (built for its layers).
    pub fn new(cfg: &ModelConfig, vs: &nn::VarStore, stage: u32, stages: u32) -> StageRunner {
        let tied = tied_name(cfg).filter(|_| stages > 1).and_then(|name| {
            trainable_by_name(vs)
                .iter()
                .position(|(param, _)| param == name)
        });
        StageRunner {
            stage,
            stages,
            tied,
            exchange: 0,
        }
    }

    /// Starts counting exchanges anew: the stage is joined to a new link, on which every stage
    /// starts from 0 (a node that changed pipelines, or whose neighbour was started again).
    pub fn restart_exchanges(&mut self) {
        self.exchange = 0;
    }

    pub fn stage(&self) -> u32 {
        self.stage
    }

    pub fn stages(&self) -> u32 {
        self.stages
    }

    pub fn first(&self) -> bool {
        self.stage == 0
    }

    pub fn last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    fn send(
        &self,
        link: &mut dyn StageLink,
        to: u32,
        kind: StageKind,
        micro: u32,
        tensor: &Tensor,
        wire: StageDtype,
    ) -> Result<()> {
        let (shape, bytes) = to_wire(tensor, wire)?;
        let header = StageHeader::new(self.exchange, micro, kind, wire, shape);
        link.send(to, &header, &bytes)
    }

    /// The next message from `from`, which must be `kind` for micro-batch `micro` of this
    /// exchange.
    fn recv(
        &self,
        link: &mut dyn StageLink,
        from: u32,
        kind: StageKind,
        micro: u32,
        device: Device,
    ) -> Result<Tensor> {
        let (header, payload) = link.recv(from)?;
        if header.kind != kind || header.step != self.exchange || header.micro != micro {
            return Err(Error::Pipeline(format!(
                "stage {from} sent {:?} of exchange {} micro-batch {} where stage {} expected \
                 {kind:?} of exchange {} micro-batch {micro}",
                header.kind, header.step, header.micro, self.stage, self.exchange
            )));
        }
        from_wire(&header, &payload, device)
    }

    /// The micro-batches this stage feeds its layers: the first stage's `ids`, cut.
    fn inputs(&self, ids: Option<&Tensor>, micro: usize) -> Result<Vec<Tensor>> {
        match (self.first(), ids) {
            (false, _) => Ok(Vec::new()),
            (true, Some(ids)) => cut(ids, micro),
            (true, None) => Err(Error::Pipeline(
                "the first stage needs the batch's ids".into(),
            )),
        }
    }

    /// The last stage's targets, cut, and the batch's counted tokens (-1 is ignored).
    fn targets(&self, targets: Option<&Tensor>, micro: usize) -> Result<(Vec<Tensor>, f64)> {
        match (self.last(), targets) {
            (false, _) => Ok((Vec::new(), 1.0)),
            (true, Some(targets)) => {
                let tokens = f64::try_from(targets.ne(-1).sum(Kind::Int64)).unwrap_or(0.0);
                Ok((cut(targets, micro)?, tokens.max(1.0)))
            }
            (true, None) => Err(Error::Pipeline(
                "the last stage needs the batch's targets".into(),
            )),
        }
    }

    /// Micro-batch `m`'s input: ids on the first stage, the previous stage's output elsewhere.
    fn input(
        &self,
        link: &mut dyn StageLink,
        inputs: &[Tensor],
        m: usize,
        device: Device,
    ) -> Result<Tensor> {
        match inputs.get(m) {
            Some(ids) => Ok(ids.shallow_clone()),
            None => self.recv(
                link,
                self.stage - 1,
                StageKind::Activation,
                m as u32,
                device,
            ),
        }
    }

    /// Forward and backward of one batch through the whole pipeline. The first stage needs
    /// `ids` (B, T), the last `targets` (B, T) (-1 ignored); the others neither. Returns this
    /// stage's gradients, in [`trainable_by_name`] order with the tied embedding's complete,
    /// and this stage's share of the loss (the last stage's: the batch's; the others' 0).
    pub fn gradients(
        &mut self,
        model: &Model,
        vs: &nn::VarStore,
        link: &mut dyn StageLink,
        ids: Option<&Tensor>,
        targets: Option<&Tensor>,
        schedule: ScheduleConfig,
    ) -> Result<(Vec<Tensor>, f64)> {
        let micro = schedule.micro_batches.max(1);
        let wire = schedule.wire;
        let device = vs.device();
        let inputs = self.inputs(ids, micro)?;
        let (targets, tokens) = self.targets(targets, micro)?;
        let count = micro;
        let params: Vec<Tensor> = trainable_by_name(vs).into_iter().map(|(_, t)| t).collect();
        let mut grads: Vec<Tensor> = (0..params.len()).map(|_| Tensor::new()).collect();
        let mut loss = 0.0;

        // Forward: every micro-batch, its graph kept for the backward pass.
        let mut saved: Vec<(Option<Tensor>, Tensor)> = Vec::with_capacity(count);
        for m in 0..count {
            let x = self.input(link, &inputs, m, device)?;
            let input = (!self.first()).then(|| x.set_requires_grad(true));
            let out = model.forward(input.as_ref().unwrap_or(&x));
            if let Some(target) = targets.get(m) {
                let sum = token_loss_sum(&out, target) / tokens;
                loss += f64::try_from(&sum).unwrap_or(f64::NAN);
                saved.push((input, sum));
            } else {
                self.send(
                    link,
                    self.stage + 1,
                    StageKind::Activation,
                    m as u32,
                    &out,
                    wire,
                )?;
                saved.push((input, out));
            }
        }

        // Backward, last micro-batch first.
        for m in (0..count).rev() {
            let (input, out) = saved.pop().expect("one saved graph per micro-batch");
            let root = if self.last() {
                out
            } else {
                let g = self.recv(link, self.stage + 1, StageKind::Gradient, m as u32, device)?;
                // d(sum(out · g))/dθ = Jᵀg: the backward pass of `out` seeded with g, exactly.
                (out * g).sum(Kind::Float)
            };
            let mut wrt: Vec<&Tensor> = params.iter().collect();
            if let Some(x) = &input {
                wrt.push(x);
            }
            let mut got = Tensor::run_backward(&[&root], &wrt, false, false);
            if input.is_some() {
                let dx = got.pop().expect("a gradient for the input");
                self.send(
                    link,
                    self.stage - 1,
                    StageKind::Gradient,
                    m as u32,
                    &dx,
                    wire,
                )?;
            }
            accumulate(&mut grads, got);
        }

        // The tied embedding: first's gradient plus last's, on both.
        if let Some(at) = self.tied {
            let other = if self.first() { self.stages - 1 } else { 0 };
            let mine = if grads[at].defined() {
                grads[at].shallow_clone()
            } else {
                params[at].zeros_like()
            };
            self.send(
                link,
                other,
                StageKind::TiedGradient,
                0,
                &mine,
                StageDtype::F32,
            )?;
            let theirs = self.recv(link, other, StageKind::TiedGradient, 0, device)?;
            grads[at] = tch::no_grad(|| {
                if self.first() {
                    &mine + &theirs
                } else {
                    &theirs + &mine
                }
            });
        }
        Ok((grads, loss))
    }

    /// The tied embedding this stage holds but whose value the first stage's state sets: the
    /// last stage's copy (None elsewhere).
    pub fn derived_param(&self, cfg: &ModelConfig) -> Option<&'static str> {
        if self.last() && !self.first() && self.tied.is_some() {
            tied_name(cfg)
        } else {
            None
        }
    }

    /// Makes the last stage's copy of the tied embedding the first stage's (after an outer step
    /// changed the first's): the first sends it, the last takes it; others do nothing.
    /// Every stage calls it at the same points (it counts as an exchange on each).
    pub fn sync_tied(&mut self, vs: &nn::VarStore, link: &mut dyn StageLink) -> Result<()> {
        if let Some(at) = self.tied {
            let (_, mut param) = trainable_by_name(vs).swap_remove(at);
            if self.first() {
                let last = self.stages - 1;
                self.send(
                    link,
                    last,
                    StageKind::TiedParameters,
                    0,
                    &param,
                    StageDtype::F32,
                )?;
            } else {
                let first = self.recv(link, 0, StageKind::TiedParameters, 0, vs.device())?;
                tch::no_grad(|| param.copy_(&first.to_kind(param.kind())));
            }
        }
        self.exchange += 1;
        Ok(())
    }

    /// Returns once every stage has called it (an exchange of nothing with every stage): after
    /// it, no stage still waits for anything this one sent before.
    pub fn barrier(&mut self, link: &mut dyn StageLink) -> Result<()> {
        self.all_reduce(link, &[0.0])?;
        self.exchange += 1;
        Ok(())
    }

    /// Adds `values` over every stage of the pipeline; every stage gets the same bits (sums in
    /// stage order).
    pub fn all_reduce(&self, link: &mut dyn StageLink, values: &[f64]) -> Result<Vec<f64>> {
        // fp32 on the wire, and this stage's own part rounded the same, so every stage adds the
        // same numbers in the same order.
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect();
        let shape = vec![values.len() as u64];
        let header = StageHeader::new(self.exchange, 0, StageKind::Scalars, StageDtype::F32, shape);
        let exact: Vec<f64> = values.iter().map(|v| f64::from(*v as f32)).collect();
        for to in (0..self.stages).filter(|&s| s != self.stage) {
            link.send(to, &header, &bytes)?;
        }
        let mut sum = vec![0.0; values.len()];
        for from in 0..self.stages {
            let part = if from == self.stage {
                exact.clone()
            } else {
                let t = self.recv(link, from, StageKind::Scalars, 0, Device::Cpu)?;
                Vec::<f32>::try_from(&t)
                    .map_err(Error::torch("reading a stage's scalars"))?
                    .into_iter()
                    .map(f64::from)
                    .collect()
            };
            if part.len() != sum.len() {
                return Err(Error::Pipeline(format!(
                    "stage {from} sent {} scalars, expected {}",
                    part.len(),
                    sum.len()
                )));
            }
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
        }
        Ok(sum)
    }

    /// The rest of a training step after [`StageRunner::gradients`]: the norm over all stages,
    /// clipping to `grad_clip` (0: none), `opt`'s step at `lr`, and `more`, this stage's wish to
    /// take another step, agreed: the pipeline goes on only if every stage wants to.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_step(
        &mut self,
        link: &mut dyn StageLink,
        grads: &[Tensor],
        loss: f64,
        opt: &mut Optimizer,
        lr: f64,
        grad_clip: f64,
        more: bool,
    ) -> Result<(StageStep, bool)> {
        // The tied embedding counts once, on the first stage.
        let counted = |i: usize| self.first() || Some(i) != self.tied;
        let sq: f64 = tch::no_grad(|| {
            grads
                .iter()
                .enumerate()
                .filter(|(i, g)| g.defined() && counted(*i))
                .map(|(_, g)| f64::try_from(g.square().sum(Kind::Double)).unwrap_or(f64::NAN))
                .sum()
        });
        let totals = self.all_reduce(link, &[sq, loss, f64::from(u8::from(!more))])?;
        let grad_norm = totals[0].sqrt();
        clip_to_norm(grads, grad_clip, grad_norm);
        opt.step(lr, grads);
        self.exchange += 1;
        Ok((
            StageStep {
                loss: totals[1],
                grad_norm,
            },
            totals[2] == 0.0,
        ))
    }

    /// The pipeline's summed token loss and counted tokens over `batches` ((ids, targets) of
    /// the validation set, the same on every stage), forward only.
    pub fn evaluate(
        &mut self,
        model: &Model,
        device: Device,
        link: &mut dyn StageLink,
        batches: &[(Tensor, Tensor)],
    ) -> Result<(f64, f64)> {
        let _guard = tch::no_grad_guard();
        let (mut sum, mut tokens) = (0.0, 0.0);
        for (m, (ids, targets)) in batches.iter().enumerate() {
            let x = match self.first() {
                true => ids.shallow_clone(),
                false => self.recv(
                    link,
                    self.stage - 1,
                    StageKind::Activation,
                    m as u32,
                    device,
                )?,
            };
            let out = model.forward(&x);
            if self.last() {
                sum += f64::try_from(token_loss_sum(&out, targets)).unwrap_or(f64::NAN);
                tokens += f64::try_from(targets.ne(-1).sum(Kind::Int64)).unwrap_or(0.0);
            } else {
                self.send(
                    link,
                    self.stage + 1,
                    StageKind::Activation,
                    m as u32,
                    &out,
                    StageDtype::F32,
                )?;
            }
        }
        let totals = self.all_reduce(link, &[sum, tokens])?;
        self.exchange += 1;
        Ok((totals[0], totals[1]))
    }
}

/// `batch` cut along its first dimension into `micro` parts of near-equal size (every stage
/// counts `micro` micro-batches, so the first and last must make exactly that many).
fn cut(batch: &Tensor, micro: usize) -> Result<Vec<Tensor>> {
    let rows = batch.size().first().copied().unwrap_or(0);
    let micro = micro as i64;
    if rows < micro {
        return Err(Error::Pipeline(format!(
            "a batch of {rows} sequences cannot be cut into {micro} micro-batches"
        )));
    }
    let sizes: Vec<i64> = (0..micro)
        .map(|m| rows / micro + i64::from(m < rows % micro))
        .collect();
    Ok(batch.split_with_sizes(sizes.as_slice(), 0))
}

/// The summed next-token loss of logits (B, T, V) against targets (B, T), -1 ignored.
fn token_loss_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    cross_entropy_reduced(logits, targets, tch::Reduction::Sum)
}

/// One stage of a pipeline with its own layers and optimizer.
#[derive(Debug)]
pub struct PipelineStage {
    pub vs: nn::VarStore,
    pub model: Model,
    pub opt: Optimizer,
    pub runner: StageRunner,
}

impl PipelineStage {
    /// Stage `stage` of `stages`, holding planner layers `layers`, with the parameters of the
    /// whole model seeded with `seed`.
    pub fn new(
        cfg: &ModelConfig,
        seed: u64,
        layers: LayerRange,
        stage: u32,
        stages: u32,
        device: Device,
        adamw: AdamWConfig,
    ) -> Result<PipelineStage> {
        check_stage(cfg, layers, stage, stages)?;
        let mut vs = nn::VarStore::new(device);
        let model = Model::seeded_stage(&mut vs, cfg, seed, layers)?;
        let opt = Optimizer::adamw(&vs, adamw);
        let runner = StageRunner::new(cfg, &vs, stage, stages);
        Ok(PipelineStage {
            vs,
            model,
            opt,
            runner,
        })
    }

    /// [`StageRunner::gradients`] of this stage.
    pub fn gradients(
        &mut self,
        link: &mut dyn StageLink,
        ids: Option<&Tensor>,
        targets: Option<&Tensor>,
        schedule: ScheduleConfig,
    ) -> Result<(Vec<Tensor>, f64)> {
        self.runner
            .gradients(&self.model, &self.vs, link, ids, targets, schedule)
    }

    /// One training step: gradients through the pipeline, the norm over all stages, clipping
    /// to `grad_clip` (0: none), and this stage's AdamW step at `lr`.
    pub fn step(
        &mut self,
        link: &mut dyn StageLink,
        ids: Option<&Tensor>,
        targets: Option<&Tensor>,
        schedule: ScheduleConfig,
        lr: f64,
        grad_clip: f64,
    ) -> Result<StageStep> {
        let (grads, loss) = self.gradients(link, ids, targets, schedule)?;
        let (step, _) =
            self.runner
                .finish_step(link, &grads, loss, &mut self.opt, lr, grad_clip, true)?;
        Ok(step)
    }
}
