"""Makes small random Hugging Face model folders with transformers' `save_pretrained`, as a
user's would be, for the `hf_import` integration test (and the DiLoCo test that starts from
one), and reports what transformers computes from each folder as saved: the logits for fixed
token ids, and the token ids of a prompt.

    python tests/hf_import.py OUT_DIR CORPUS PROMPT

Writes OUT_DIR/<name>/ for every folder below and OUT_DIR/reference.json:
{name: {"ids": [...], "logits": [[...], ...], "prompt_ids": [...], "prompt_ids_special": [...],
        "bos_token_id": int, "eos_token_id": int}}.

- gpt2:       GPT2LMHeadModel (tied head), fp32, one model.safetensors, a byte-level BPE
              with <|endoftext|>.
- llama:      LlamaForCausalLM, tied head, grouped-query attention, RoPE base 500000, fp32,
              sharded (model.safetensors.index.json), a Llama-style tokenizer: <unk>, <s>, </s>,
              BOS prepended by its post-processor, no <|endoftext|>.
- llama-bf16: LlamaForCausalLM, untied head, saved in bf16 in one file, the same tokenizer.
"""

import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


def documents(corpus):
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()][:400]


def bpe(docs, vocab_size, specials):
    """A byte-level BPE trained on `docs`, with `specials` first in its vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def randomize(model, seed):
    """Weights far from transformers' small init (std 0.02), so that logits differ clearly
    between any two models and a wrong load shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "weight" in name:
                p.copy_(1.0 + 0.2 * noise)  # norm gains
            else:
                p.copy_(0.08 * noise)


def save(name, model, tokenizer, out, **kwargs):
    folder = os.path.join(out, name)
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def report(folder, prompt, seed):
    model = LlamaForCausalLM if "llama" in folder else GPT2LMHeadModel
    model = model.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = [tokenizer.bos_token_id] + torch.randint(0, vocab, (14,), generator=gen).tolist()
    ids += [len(tokenizer) - 1, vocab - 1]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return {
        "ids": ids,
        "logits": logits.tolist(),
        "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
        "prompt_ids_special": tokenizer(prompt)["input_ids"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def main():
    out, corpus, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    docs = documents(corpus)
    torch.manual_seed(0)

    gpt2_tok = bpe(docs, 320, ["<|endoftext|>"])
    gpt2_fast = PreTrainedTokenizerFast(
        tokenizer_object=gpt2_tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            vocab_size=gpt2_tok.get_vocab_size(),
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    randomize(gpt2, 1)

    llama_tok = bpe(docs, 384, ["<unk>", "<s>", "</s>"])
    llama_tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    llama_fast = PreTrainedTokenizerFast(
        tokenizer_object=llama_tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=400,  # past the tokenizer's 384, as Hub models pad their vocabularies
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            **common,
        )
    )
    randomize(llama, 2)
    llama_bf16 = LlamaForCausalLM(
        LlamaConfig(tie_word_embeddings=False, rms_norm_eps=1e-5, **common)
    )
    randomize(llama_bf16, 3)

    folders = {
        "gpt2": save("gpt2", gpt2, gpt2_fast, out),
        "llama": save("llama", llama, llama_fast, out, max_shard_size="40KB"),
        "llama-bf16": save("llama-bf16", llama_bf16.to(torch.bfloat16), llama_fast, out),
    }
    assert os.path.exists(os.path.join(folders["llama"], "model.safetensors.index.json"))
    reference = {name: report(folder, prompt, i) for i, (name, folder) in enumerate(folders.items())}
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f)


if __name__ == "__main__":
    main()
