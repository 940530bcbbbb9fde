#!/usr/bin/env python3
"""PyTorch reference for `forge-node bench train-step`: the same model and the same step
(forward, cross-entropy, backward, grad-norm clip 1.0, AdamW lr 3e-4 betas (0.9, 0.95)
weight decay 0.1 on matrices) on a fixed random batch, timed the same way. Prints one JSON line
with the fields Forge prints, so scripts/bench_train_step.sh can take the ratio.

With --end-to-end it is instead a whole nanoGPT-style training loop, for
scripts/bench_end_to_end.sh: text tokenized up front with the run's tokenizer (nanoGPT's
prepare.py), random windows of it as batches, warmup + cosine lr, loss read every --log-every
steps, an eval of --eval-batches fixed validation batches and an 80-token sample every
--eval-every steps and at the end, `torch.save` of model and optimizer every
--checkpoint-every steps and at the end. Prints one JSON line: wall-clock tokens/s of the loop
and where its time went.

Written the way a PyTorch user writes it: nn.Module, F.scaled_dot_product_attention,
F.rms_norm / F.layer_norm, torch.optim.AdamW with its defaults for the device, and
torch.autocast(bfloat16) for bf16; GPT-2's projections are Hugging Face's Conv1D (weights
stored (in, out), addmm), as in transformers and in Forge. --compile adds torch.compile.
"""

import argparse
import json
import math
import os
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


def build(args, device):
    """The model and its AdamW, as Forge builds them (seed 0, N(0, 0.02) matrices)."""
    family = args.family or ("gpt2" if args.preset == "gpt2-124m" else "llama")
    c = dict(PRESETS[args.preset])
    if args.vocab:
        c["vocab_size"] = args.vocab
    torch.manual_seed(0)
    model = (Gpt2(c) if family == "gpt2" else Llama(c)).to(device)
    for p in model.parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    return family, c, model, opt


def tokens_of(path, tok, eot):
    """A text file as one token stream: documents split at <|endoftext|> (or, without one, at
    blank lines), each followed by the end-of-text token."""
    import re
    text = open(path, encoding="utf-8").read()
    docs = text.split("<|endoftext|>") if "<|endoftext|>" in text else re.split(r"\n\s*\n", text)
    ids = []
    for enc in tok.encode_batch([d.strip() for d in docs if d.strip()]):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def end_to_end(args):
    from tokenizers import Tokenizer

    precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = Tokenizer.from_file(args.tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    args.vocab = tok.get_vocab_size()
    family, c, model, opt = build(args, device)
    train = tokens_of(args.train, tok, eot)
    val = tokens_of(args.val, tok, eot)
    seq, batch = args.seq, args.batch
    gen = torch.Generator().manual_seed(1234)
    # The fixed eval set: consecutive windows from the start of the validation text.
    windows = (len(val) - 1) // seq
    n_eval = min(args.eval_batches * batch, windows)
    eval_set = [torch.stack([val[j * seq:(j + 1) * seq + 1] for j in range(i, min(i + batch, n_eval))])
                for i in range(0, n_eval, batch)]
    prompt = tok.encode("Once upon a time").ids

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def get_batch():
        ix = torch.randint(len(train) - seq - 1, (batch,), generator=gen)
        x = torch.stack([train[i:i + seq] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + seq] for i in ix])
        return x.to(device), y.to(device)

    def lr_at(step):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
        floor = 0.1 * args.lr
        return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = []
        for w in eval_set:
            w = w.to(device)
            with autocast():
                logits = model(w[:, :-1])
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          w[:, 1:].reshape(-1)).item())
        # A sample: 80 tokens at temperature 0.8, top-k 40, no KV cache (as nanoGPT's).
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.tensor([prompt], device=device)
        for _ in range(80):
            with autocast():
                logits = model(ids[:, -c["max_seq_len"]:])[:, -1, :].float() / 0.8
            kth = torch.topk(logits, 40).values[:, -1:]
            logits[logits < kth] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g)
            if nxt.item() == eot:
                break
            ids = torch.cat([ids, nxt], dim=1)
        model.train()
        return sum(losses) / len(losses)

    os.makedirs(args.out, exist_ok=True)

    def save(step):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   os.path.join(args.out, "ckpt.pt"))

    phases = dict(data_s=0.0, forward_backward_s=0.0, optimizer_s=0.0, eval_s=0.0,
                  checkpoint_s=0.0)

    def lap(name, since):
        sync()
        now = time.perf_counter()
        phases[name] += now - since
        return now

    sync()
    started = time.perf_counter()
    loss = eval_loss = None
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        x, y = get_batch()
        t = lap("data_s", t)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if step % args.log_every == 0:
            loss = loss.item()
        t = lap("forward_backward_s", t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = lap("optimizer_s", t)
        if step % args.eval_every == 0 or step == args.steps:
            eval_loss = evaluate()
            t = lap("eval_s", t)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save(step)
            t = lap("checkpoint_s", t)
    sync()
    wall = time.perf_counter() - started
    phases["other_s"] = wall - sum(phases.values())
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "implementation": "pytorch-eager", "family": family, "params": n, "batch": batch,
        "seq_len": seq, "steps": args.steps, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "threads": torch.get_num_threads(), "wall_s": wall,
        "wall_tokens_per_s": args.steps * batch * seq / wall, "phases": phases,
        "final_eval_loss": eval_loss, "torch": torch.__version__,
    }))


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
    ap.add_argument("--end-to-end", action="store_true", help="a whole training loop (see above)")
    ap.add_argument("--train", help="--end-to-end: training text")
    ap.add_argument("--val", help="--end-to-end: validation text")
    ap.add_argument("--tokenizer", help="--end-to-end: the run's tokenizer.json")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--out", default="runs/bench/pytorch-end-to-end")
    args = ap.parse_args()
    args.vocab = None
    if args.end_to_end:
        return end_to_end(args)

    precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    family, c, model, opt = build(args, device)
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
