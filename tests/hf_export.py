"""Loads Forge's Hugging Face exports with transformers, as a user would, and reports what the
`hf_export` integration test compares with Forge: how loading went, the logits for fixed token
ids, the token ids of a prompt, and greedy generation from it.

    python tests/hf_export.py REQUEST.json RESULT.json

REQUEST: {"exports": [{"folder": str, "ids": [int, ...]}, ...], "prompt": str,
          "max_new_tokens": int}
RESULT:  one object per folder, in order (see `report` below).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def report(folder, ids, request):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # (T, vocab)
        prompt_ids = tokenizer(request["prompt"])["input_ids"]
        prompt = torch.tensor([prompt_ids])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=request["max_new_tokens"],
            do_sample=False,
        )
    new = out[0, len(prompt_ids) :].tolist()
    # generate keeps the end-of-text token it stopped at; Forge's sampler leaves it out.
    if new and new[-1] == model.generation_config.eos_token_id:
        new = new[:-1]
    return {
        "class": type(model).__name__,
        "dtype": str(model.dtype),
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": sorted(str(k) for k in info["mismatched_keys"]),
        "logits": logits.tolist(),
        "prompt_ids": prompt_ids,
        "greedy": new,
        "decoded": tokenizer.decode(new),
        "eos_token_id": tokenizer.eos_token_id,
    }


def main():
    with open(sys.argv[1]) as f:
        request = json.load(f)
    results = [report(e["folder"], e["ids"], request) for e in request["exports"]]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
