#!/usr/bin/env python3
"""PyTorch reference for `forge-node bench train-step`: the same model and the same step
(forward, cross-entropy, backward, grad-norm clip 1.0, AdamW lr 3e-4 betas (0.9, 0.95)
weight decay 0.1 on matrices) on a fixed random batch, timed the same way. Prints one JSON line
with the fields Forge prints, so scripts/bench_train_step.sh can take the ratio.

Written the way a PyTorch user writes it: nn.Module, F.scaled_dot_product_attention,
F.rms_norm / F.layer_norm, torch.optim.AdamW with its defaults for the device, and
torch.autocast(bfloat16) for bf16; GPT-2's projections are Hugging Face's Conv1D (weights
stored (in, out), addmm), as in transformers and in Forge. --compile adds torch.compile.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Must match ModelConfig::preset in trainer/src/models/mod.rs.
PRESETS = {
    "tiny": dict(vocab_size=2048, n_layer=4, n_head=4, d_model=128, d_ff=384, max_seq_len=256),
    "4m": dict(vocab_size=2048, n_layer=4, n_head=4, d_model=256, d_ff=1024, max_seq_len=512),
    "15m": dict(vocab_size=32000, n_layer=6, n_head=6, d_model=288, d_ff=768, max_seq_len=256),
    "gpt2-124m": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, d_ff=3072,
                      max_seq_len=1024),
}


class Conv1D(nn.Module):
    """Hugging Face GPT-2's projection: weight stored (in, out), y = addmm(b, x, W)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.size(1),))


class Gpt2Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.n_head = c["n_head"]
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.c_attn = Conv1D(d, 3 * d)
        self.attn_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.c_fc = Conv1D(d, c["d_ff"])
        self.mlp_proj = Conv1D(c["d_ff"], d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["d_model"])
        self.wpe = nn.Embedding(c["max_seq_len"], c["d_model"])
        self.h = nn.ModuleList(Gpt2Block(c) for _ in range(c["n_layer"]))
        self.ln_f = nn.LayerNorm(c["d_model"], eps=1e-5)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f = c["d_model"], c["d_ff"]
        self.nh, self.hd = c["n_head"], d // c["n_head"]
        self.input_layernorm = nn.RMSNorm(d, eps=1e-5)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=1e-5)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, t, self.nh, self.hd).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c["n_layer"]))
        self.norm = nn.RMSNorm(c["d_model"], eps=1e-5)
        hd = c["d_model"] // c["n_head"]
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.arange(c["max_seq_len"]).float()[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, self.cos[:t], self.sin[:t])
        return self.norm(x) @ self.embed_tokens.weight.T


def main():
    ap = argparse.ArgumentParser(description="PyTorch eager train-step reference")
    ap.add_argument("--preset", default="4m", choices=sorted(PRESETS))
    ap.add_argument("--family", default=None, choices=["gpt2", "llama"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    args = ap.parse_args()

    family = args.family or ("gpt2" if args.preset == "gpt2-124m" else "llama")
    precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    c = PRESETS[args.preset]
    model = (Gpt2(c) if family == "gpt2" else Llama(c)).to(device)
    for p in model.parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    step_model = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, c["vocab_size"], (args.batch, args.seq + 1), device=device)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, loss = [], None
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = step_model(ids)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    times.sort()
    median = times[len(times) // 2]
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "implementation": "pytorch-compile" if args.compile else "pytorch-eager",
        "family": family, "params": n, "batch": args.batch, "seq_len": args.seq,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "threads": torch.get_num_threads(), "steps": args.steps,
        "step_ms_median": median * 1e3, "step_ms_mean": sum(times) / len(times) * 1e3,
        "tokens_per_s": args.batch * args.seq / median, "final_loss": loss.item(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
