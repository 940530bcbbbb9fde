//! GPT-2: pre-LayerNorm blocks, GELU (tanh) MLP, learned positions, head tied to `wte`.
//!
//! Parameter names follow Hugging Face `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`,
//! ...). Like HF's `Conv1D`, projection weights are stored (in, out), so `y = x @ W + b`.

use super::{ModelConfig, embed, to_compute};
use forge_protocol::LayerRange;
use tch::{Kind, Tensor, nn, nn::Init};

const INIT_STD: f64 = 0.02;

#[derive(Debug)]
struct Conv1D {
    weight: Tensor, // (in, out)
    bias: Tensor,   // (out)
}

impl Conv1D {
    fn new(p: nn::Path<'_>, d_in: i64, d_out: i64, std: f64) -> Self {
        Conv1D {
            weight: p.var(
                "weight",
                &[d_in, d_out],
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            ),
            bias: p.var("bias", &[d_out], Init::Const(0.0)),
        }
    }

    /// `x @ W + b` through `aten::linear` (one fused addmm, as `nn.Linear` does).
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        x.linear(
            &to_compute(&self.weight, kind).tr(),
            Some(to_compute(&self.bias, kind)),
        )
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path<'_>, d: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[d], Init::Const(1.0)),
            bias: p.var("bias", &[d], Init::Const(0.0)),
            eps,
        }
    }

    /// Normalises in fp32 whatever the input dtype.
    fn forward(&self, x: &Tensor) -> Tensor {
        let d = self.weight.size()[0];
        // bf16-pure keeps the gain and bias in bf16.
        let weight = to_compute(&self.weight, Kind::Float);
        let bias = to_compute(&self.bias, Kind::Float);
        x.to_kind(Kind::Float)
            .layer_norm([d], Some(&weight), Some(&bias), self.eps, true)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    n_head: i64,
}

impl Block {
    fn new(p: nn::Path<'_>, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        // Residual projections scaled by 1/sqrt(2L) (GPT-2 paper).
        let proj_std = INIT_STD / ((2 * cfg.n_layer) as f64).sqrt();
        Block {
            ln_1: LayerNorm::new(&p / "ln_1", d, cfg.norm_eps),
            c_attn: Conv1D::new(&p / "attn" / "c_attn", d, 3 * d, INIT_STD),
            attn_proj: Conv1D::new(&p / "attn" / "c_proj", d, d, proj_std),
            ln_2: LayerNorm::new(&p / "ln_2", d, cfg.norm_eps),
            c_fc: Conv1D::new(&p / "mlp" / "c_fc", d, cfg.d_ff, INIT_STD),
            mlp_proj: Conv1D::new(&p / "mlp" / "c_proj", cfg.d_ff, d, proj_std),
            n_head: cfg.n_head,
        }
    }

    /// `x`: (B, T, d) fp32 residual stream.
    fn forward(&self, x: &Tensor, compute: Kind) -> Tensor {
        let (b, t, d) = x.size3().expect("residual stream is (B, T, d)");
        let hd = d / self.n_head;
        let h = to_compute(&self.ln_1.forward(x), compute);
        let qkv = self.c_attn.forward(&h); // (B, T, 3d)
        let heads = |t_: &Tensor| t_.view([b, t, self.n_head, hd]).transpose(1, 2);
        let parts = qkv.split(d, 2);
        let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, true, None, false,
        );
        let y = y.transpose(1, 2).contiguous().view([b, t, d]);
        let x = x + self.attn_proj.forward(&y).to_kind(Kind::Float);
        let h = to_compute(&self.ln_2.forward(&x), compute);
        let h = self.c_fc.forward(&h).gelu("tanh");
        &x + self.mlp_proj.forward(&h).to_kind(Kind::Float)
    }
}

/// GPT-2 language model, or the layers of it one pipeline stage holds.
#[derive(Debug)]
pub struct Gpt2 {
    pub(crate) cfg: ModelConfig,
    pub(crate) compute: Kind,
    /// (vocab, d): the token embedding of the first stage and the output head of the last (a
    /// last stage that is not also the first holds its own copy; the pipeline adds the two
    /// copies' gradients, so they stay equal).
    wte: Option<Tensor>,
    wpe: Option<Tensor>, // (max_seq_len, d), first stage
    blocks: Vec<Block>,
    ln_f: Option<LayerNorm>, // last stage
    pub(crate) embeds: bool,
    pub(crate) heads: bool,
}

impl Gpt2 {
    pub fn new(root: &nn::Path<'_>, cfg: &ModelConfig) -> Self {
        Gpt2::stage(root, cfg, LayerRange::whole(cfg.n_layer as u32))
    }

    /// The parameters of planner layers `layers` only, under their whole-model names.
    pub fn stage(root: &nn::Path<'_>, cfg: &ModelConfig, layers: LayerRange) -> Self {
        let p = root / "transformer";
        let randn = Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        };
        let n = cfg.n_layer as u32;
        let (embeds, heads) = (layers.has_embedding(), layers.has_head(n));
        Gpt2 {
            cfg: cfg.clone(),
            compute: Kind::Float,
            wte: (embeds || heads)
                .then(|| (&p / "wte").var("weight", &[cfg.vocab_size, cfg.d_model], randn)),
            wpe: embeds.then(|| (&p / "wpe").var("weight", &[cfg.max_seq_len, cfg.d_model], randn)),
            blocks: layers
                .blocks(n)
                .map(|i| Block::new(&p / "h" / i, cfg))
                .collect(),
            ln_f: heads.then(|| LayerNorm::new(&p / "ln_f", cfg.d_model, cfg.norm_eps)),
            embeds,
            heads,
        }
    }

    /// The first stage takes `ids` (B, T) int64, the others the previous stage's output
    /// (B, T, d) fp32; the last returns logits (B, T, vocab) fp32, the others (B, T, d) fp32.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = self.embed_input(input);
        for i in 0..self.blocks.len() {
            x = self.block(i, &x);
        }
        self.head(&x)
    }

    /// The residual stream (B, T, d) fp32 entering the first block: the embeddings of `input`
    /// on a first stage, `input` itself on the others.
    pub(crate) fn embed_input(&self, input: &Tensor) -> Tensor {
        match (&self.wte, &self.wpe) {
            (Some(wte), Some(wpe)) if self.embeds => {
                let t = input.size()[1];
                assert!(
                    t <= self.cfg.max_seq_len,
                    "sequence length {t} exceeds max_seq_len {}",
                    self.cfg.max_seq_len
                );
                let pos = Tensor::arange(t, (Kind::Int64, input.device()));
                embed(wte, input) + embed(wpe, &pos)
            }
            _ => input.shallow_clone(),
        }
    }

    pub(crate) fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` of the stage on the residual stream `x`.
    pub(crate) fn block(&self, i: usize, x: &Tensor) -> Tensor {
        self.blocks[i].forward(x, self.compute)
    }

    /// Logits (B, T, vocab) fp32 from the last block's output on a last stage, that output
    /// itself on the others.
    pub(crate) fn head(&self, x: &Tensor) -> Tensor {
        match (&self.ln_f, &self.wte) {
            (Some(ln_f), Some(wte)) if self.heads => {
                let x = to_compute(&ln_f.forward(x), self.compute);
                x.matmul(&to_compute(wte, self.compute).tr())
                    .to_kind(Kind::Float)
            }
            _ => x.shallow_clone(),
        }
    }
}
