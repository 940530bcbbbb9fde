#!/usr/bin/env python3
"""Writes the reference-numerics fixtures that trainer/tests/reference.rs checks Forge against.

For each family (gpt2, llama) this builds a tiny model from seeded random weights with an
independent, explicit PyTorch implementation (plain matmuls, explicit softmax attention,
hand-written norms, RoPE and GELU; no fused kernels), runs it in float64, and writes:

  trainer/tests/fixtures/reference/<family>/config.json          the ModelConfig (Forge's fields)
  trainer/tests/fixtures/reference/<family>/weights.safetensors  weights, Hugging Face key names
  trainer/tests/fixtures/reference/<family>/expected.safetensors input_ids, targets, logits,
                                                                 loss, grad.<param> (float32)

Run with the project's virtualenv: .venv/bin/python scripts/make_reference.py
"""

import argparse
import ctypes
import json
import math
import os
import struct

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "trainer", "tests", "fixtures", "reference")

CONFIGS = {
    "gpt2": dict(family="gpt2", vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, d_model=32,
                 d_ff=80, max_seq_len=16, norm_eps=1e-5, rope_theta=10000.0,
                 tie_embeddings=True),
    # Grouped-query attention (2 kv heads for 4 heads) and an untied head, to exercise both.
    "llama": dict(family="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                  d_ff=48, max_seq_len=16, norm_eps=1e-5, rope_theta=10000.0,
                  tie_embeddings=False),
}


def gpt2_param_shapes(c):
    d, f = c["d_model"], c["d_ff"]
    shapes = {"transformer.wte.weight": (c["vocab_size"], d),
              "transformer.wpe.weight": (c["max_seq_len"], d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def llama_param_shapes(c):
    d, f = c["d_model"], c["d_ff"]
    kv = c["n_kv_head"] * (d // c["n_head"])
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    for i in range(c["n_layer"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    return shapes


def random_weights(shapes, gen):
    """Norm gains near 1, everything else N(0, 0.15): large enough that errors would show."""
    weights = {}
    for name, shape in sorted(shapes.items()):
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.15
        if len(shape) == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            w = 1.0 + w
        weights[name] = w.requires_grad_(True)
    return weights


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_attention(q, k, v):
    """q, k, v: (B, H, T, hd) with equal head counts."""
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def gpt2_forward(c, w, ids):
    b, t = ids.shape
    d, nh = c["d_model"], c["n_head"]
    hd = d // nh
    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][torch.arange(t)]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], c["norm_eps"])
        qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (z.reshape(b, t, nh, hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
        y = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], c["norm_eps"])
        h = gelu_tanh(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], c["norm_eps"])
    return x @ w["transformer.wte.weight"].T


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def llama_forward(c, w, ids):
    b, t = ids.shape
    d, nh, nkv = c["d_model"], c["n_head"], c["n_kv_head"]
    hd = d // nh
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["n_layer"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], c["norm_eps"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, nh, hd).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, nkv, hd).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        y = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c["norm_eps"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], c["norm_eps"])
    head = w["model.embed_tokens.weight"] if c["tie_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def cross_entropy(logits, targets):
    """Mean negative log-likelihood over targets != -1."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    flat = targets.reshape(-1)
    keep = flat != -1
    picked = logp[keep].gather(1, flat[keep][:, None]).squeeze(1)
    return -picked.mean()


def write_safetensors(path, tensors, metadata=None):
    """Minimal safetensors writer (8-byte little-endian header size, JSON header, raw data)."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        blobs.append(ctypes.string_at(t.data_ptr(), nbytes))
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def make(family, out_dir, seed):
    c = CONFIGS[family]
    gen = torch.Generator().manual_seed(seed)
    shapes = gpt2_param_shapes(c) if family == "gpt2" else llama_param_shapes(c)
    w = random_weights(shapes, gen)
    batch, t = 2, 12
    ids = torch.randint(0, c["vocab_size"], (batch, t), generator=gen)
    targets = torch.randint(0, c["vocab_size"], (batch, t), generator=gen)
    targets[1, -3:] = -1  # ignored positions, as at the end of a padded batch
    forward = gpt2_forward if family == "gpt2" else llama_forward
    logits = forward(c, w, ids)
    loss = cross_entropy(logits, targets)
    loss.backward()

    d = os.path.join(out_dir, family)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(d, "weights.safetensors"),
                      {k: v.float() for k, v in w.items()})
    expected = {"input_ids": ids, "targets": targets, "logits": logits.float(),
                "loss": loss.float().reshape(1)}
    expected.update({f"grad.{k}": v.grad.float() for k, v in w.items()})
    write_safetensors(os.path.join(d, "expected.safetensors"), expected,
                      {"torch": torch.__version__, "seed": str(seed), "precision": "float64"})
    print(f"{family}: loss {loss.item():.6f}, {len(w)} tensors -> {d}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    for family in CONFIGS:
        make(family, os.path.abspath(args.out), args.seed)


if __name__ == "__main__":
    main()
