"""PyTorch's side of the inner-optimizer reference test (`tests/optimizers.rs`): a few steps of
torch.optim.Muon (+ AdamW for the other parameters), torch.optim.Adafactor or torch.optim.AdamW
on parameters named like a Llama's, with fixed random gradients and a changing learning rate.

    python tests/optimizers.py CASE.json OUT.safetensors

CASE: {"kind": "muon" | "adafactor" | "adamw", "lrs": [float, ...], "adamw": {...},
       "muon": {...}, "adafactor": {...}} (Forge's config keys).
OUT: "init.<name>", "grad.<step>.<name>", "final.<name>" and "state.<name>.<part>" tensors.
"""

import json
import sys

import torch
from safetensors.torch import save_file

# Shapes of a small Llama: an embedding and a head (AdamW under Muon), hidden matrices of both
# orientations and a square one (Muon), and norm gains (vectors).
SHAPES = {
    "model.embed_tokens.weight": (48, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (40, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 40),
    "model.norm.weight": (16,),
    "lm_head.weight": (48, 16),
}


def muon_takes(name, p):
    return p.dim() == 2 and not any(
        name.endswith(s) for s in ("embed_tokens.weight", "lm_head.weight")
    )


def main():
    case = json.load(open(sys.argv[1]))
    torch.manual_seed(7)
    names = sorted(SHAPES)
    params = {n: torch.nn.Parameter(torch.randn(SHAPES[n]) * 0.5) for n in names}
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    a = case["adamw"]
    betas, eps, wd = (a["beta1"], a["beta2"]), a["eps"], a["weight_decay"]

    def adamw(ps):
        decay = [p for p in ps if p.dim() >= 2]
        rest = [p for p in ps if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": wd},
                              {"params": rest, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=1.0, betas=betas, eps=eps)

    kind = case["kind"]
    if kind == "muon":
        m = case["muon"]
        adjust = {"original": "original", "match_rms_adamw": "match_rms_adamw",
                  "none": "none"}[m["adjust_lr_fn"]]
        muon = [params[n] for n in names if muon_takes(n, params[n])]
        others = [params[n] for n in names if not muon_takes(n, params[n])]
        opts = [
            torch.optim.Muon(muon, lr=1.0, weight_decay=m["weight_decay"],
                             momentum=m["momentum"], nesterov=m["nesterov"],
                             ns_steps=m["ns_steps"], adjust_lr_fn=adjust),
            adamw(others),
        ]
    elif kind == "adafactor":
        f = case["adafactor"]
        opts = [torch.optim.Adafactor(list(params.values()), lr=1.0,
                                      beta2_decay=f["beta2_decay"],
                                      eps=(f["eps1"], f["eps2"]), d=f["d"],
                                      weight_decay=f["weight_decay"])]
    else:
        opts = [adamw(list(params.values()))]

    for step, lr in enumerate(case["lrs"]):
        for n in names:
            g = torch.randn(SHAPES[n])
            out[f"grad.{step}.{n}"] = g.clone()
            params[n].grad = g
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()

    for n in names:
        out[f"final.{n}"] = params[n].detach().clone()
    for opt in opts:
        for p, state in opt.state.items():
            n = next(k for k, v in params.items() if v is p)
            for part, t in state.items():
                if torch.is_tensor(t) and part != "step":
                    out[f"state.{n}.{part}"] = t.detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])


main()
