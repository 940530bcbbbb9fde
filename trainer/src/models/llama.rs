//! Llama: pre-RMSNorm blocks, SwiGLU MLP, rotary positions (Hugging Face `rotate_half`
//! layout), optional grouped-query attention, optionally tied embeddings.
//!
//! Parameter names follow Hugging Face `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
//! ...); linear weights are (out, in) as in `nn.Linear`.

use super::{ModelConfig, embed, to_compute};
use forge_protocol::LayerRange;
use tch::{Kind, Tensor, nn, nn::Init};

const INIT_STD: f64 = 0.02;

fn linear(p: nn::Path<'_>, d_in: i64, d_out: i64, std: f64) -> Tensor {
    p.var(
        "weight",
        &[d_out, d_in],
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )
}

/// `x` (..., in) @ `w`ᵀ with `w` (out, in), in `x`'s dtype.
fn apply(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&to_compute(w, x.kind()).tr())
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let d = weight.size()[0];
    // In fp32 whatever the dtypes (bf16-pure keeps the gain in bf16).
    let weight = to_compute(weight, Kind::Float);
    x.to_kind(Kind::Float).rms_norm([d], Some(&weight), eps)
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Layer {
    fn new(p: nn::Path<'_>, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        let kv = cfg.n_kv_head * cfg.head_dim();
        let proj_std = INIT_STD / ((2 * cfg.n_layer) as f64).sqrt();
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        Layer {
            input_layernorm: (&p / "input_layernorm").var("weight", &[d], Init::Const(1.0)),
            q_proj: linear(&attn / "q_proj", d, d, INIT_STD),
            k_proj: linear(&attn / "k_proj", d, kv, INIT_STD),
            v_proj: linear(&attn / "v_proj", d, kv, INIT_STD),
            o_proj: linear(&attn / "o_proj", d, d, proj_std),
            post_attention_layernorm: (&p / "post_attention_layernorm").var(
                "weight",
                &[d],
                Init::Const(1.0),
            ),
            gate_proj: linear(&mlp / "gate_proj", d, cfg.d_ff, INIT_STD),
            up_proj: linear(&mlp / "up_proj", d, cfg.d_ff, INIT_STD),
            down_proj: linear(&mlp / "down_proj", cfg.d_ff, d, proj_std),
        }
    }
}

/// Llama language model, or the layers of it one pipeline stage holds.
#[derive(Debug)]
pub struct Llama {
    pub(crate) cfg: ModelConfig,
    pub(crate) compute: Kind,
    /// (vocab, d): on the first stage, and on the last when the head is tied to it (a last
    /// stage that is not also the first holds its own copy; the pipeline adds the two copies'
    /// gradients, so they stay equal).
    embed_tokens: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Option<Tensor>,    // last stage
    lm_head: Option<Tensor>, // (vocab, d); last stage, None when tied to embed_tokens
    pub(crate) embeds: bool,
    pub(crate) heads: bool,
    cos: Tensor, // (max_seq_len, head_dim), fp32, not a parameter
    sin: Tensor,
}

impl Llama {
    pub fn new(root: &nn::Path<'_>, cfg: &ModelConfig) -> Self {
        Llama::stage(root, cfg, LayerRange::whole(cfg.n_layer as u32))
    }

    /// The parameters of planner layers `layers` only, under their whole-model names.
    pub fn stage(root: &nn::Path<'_>, cfg: &ModelConfig, layers: LayerRange) -> Self {
        let p = root / "model";
        let (cos, sin) = rope_tables(cfg, root.device());
        let n = cfg.n_layer as u32;
        let (embeds, heads) = (layers.has_embedding(), layers.has_head(n));
        Llama {
            cfg: cfg.clone(),
            compute: Kind::Float,
            embed_tokens: (embeds || (heads && cfg.tie_embeddings)).then(|| {
                (&p / "embed_tokens").var(
                    "weight",
                    &[cfg.vocab_size, cfg.d_model],
                    Init::Randn {
                        mean: 0.0,
                        stdev: INIT_STD,
                    },
                )
            }),
            layers: layers
                .blocks(n)
                .map(|i| Layer::new(&p / "layers" / i, cfg))
                .collect(),
            norm: heads.then(|| (&p / "norm").var("weight", &[cfg.d_model], Init::Const(1.0))),
            lm_head: (heads && !cfg.tie_embeddings)
                .then(|| linear(root / "lm_head", cfg.d_model, cfg.vocab_size, INIT_STD)),
            embeds,
            heads,
            cos,
            sin,
        }
    }

    /// The first stage takes `ids` (B, T) int64, the others the previous stage's output
    /// (B, T, d) fp32; the last returns logits (B, T, vocab) fp32, the others (B, T, d) fp32.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = self.embed_input(input);
        for i in 0..self.layers.len() {
            x = self.block(i, &x);
        }
        self.head(&x)
    }

    /// The residual stream (B, T, d) fp32 entering the first layer: the embeddings of `input`
    /// on a first stage, `input` itself on the others.
    pub(crate) fn embed_input(&self, input: &Tensor) -> Tensor {
        let t = input.size()[1];
        assert!(
            t <= self.cfg.max_seq_len,
            "sequence length {t} exceeds max_seq_len {}",
            self.cfg.max_seq_len
        );
        match &self.embed_tokens {
            Some(table) if self.embeds => embed(table, input), // (B, T, d) fp32
            _ => input.shallow_clone(),
        }
    }

    pub(crate) fn n_blocks(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i` of the stage on the residual stream `x` (B, T, d) fp32.
    pub(crate) fn block(&self, i: usize, x: &Tensor) -> Tensor {
        let layer = &self.layers[i];
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim());
        let cos = self.cos.narrow(0, 0, t);
        let sin = self.sin.narrow(0, 0, t);
        let eps = self.cfg.norm_eps;
        let h = to_compute(&rms_norm(x, &layer.input_layernorm, eps), self.compute);
        let q = apply(&h, &layer.q_proj)
            .view([b, t, nh, hd])
            .transpose(1, 2);
        let k = apply(&h, &layer.k_proj)
            .view([b, t, nkv, hd])
            .transpose(1, 2);
        let v = apply(&h, &layer.v_proj)
            .view([b, t, nkv, hd])
            .transpose(1, 2);
        let q = rotate(&q, &cos, &sin);
        let k = rotate(&k, &cos, &sin);
        let y = Tensor::scaled_dot_product_attention::<Tensor>(
            &q,
            &k,
            &v,
            None,
            0.0,
            true,
            None,
            nkv != nh,
        );
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hd]);
        let x = x + apply(&y, &layer.o_proj).to_kind(Kind::Float);
        let h = to_compute(
            &rms_norm(&x, &layer.post_attention_layernorm, eps),
            self.compute,
        );
        let gated = apply(&h, &layer.gate_proj).silu() * apply(&h, &layer.up_proj);
        &x + apply(&gated, &layer.down_proj).to_kind(Kind::Float)
    }

    /// Logits (B, T, vocab) fp32 from the last layer's output on a last stage, that output
    /// itself on the others.
    pub(crate) fn head(&self, x: &Tensor) -> Tensor {
        let (Some(norm), true) = (&self.norm, self.heads) else {
            return x.shallow_clone();
        };
        let h = to_compute(&rms_norm(x, norm, self.cfg.norm_eps), self.compute);
        let head = self
            .lm_head
            .as_ref()
            .or(self.embed_tokens.as_ref())
            .expect("a last stage holds its head");
        apply(&h, head).to_kind(Kind::Float)
    }
}

/// cos and sin of the rotary angles, (max_seq_len, head_dim), halves repeated as in HF.
fn rope_tables(cfg: &ModelConfig, device: tch::Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim();
    let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, device)) / hd as f64
        * -(cfg.rope_theta.ln()))
    .exp(); // theta^(-2i/hd)
    let pos = Tensor::arange(cfg.max_seq_len, (Kind::Float, device));
    let angles = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // (T, hd/2)
    let angles = Tensor::cat(&[&angles, &angles], 1); // (T, hd)
    (angles.cos(), angles.sin())
}

/// Rotary embedding on (B, H, T, hd): x·cos + rotate_half(x)·sin, computed in fp32.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    let x = x.to_kind(Kind::Float);
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    (x * cos + rotated * sin).to_kind(kind)
}
