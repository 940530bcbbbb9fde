#!/usr/bin/env bash
# Forge vs a PyTorch training loop end to end: wall-clock tokens/s with evals, samples and
# checkpoints included, measured in the same run.
#
#   scripts/bench_end_to_end.sh [--preset 4m] [--batch 8] [--seq 256] [--steps 300]
#       [--eval-every 100] [--eval-batches 8] [--checkpoint-every 100] [--device cpu|cuda:0]
#       [--threads N] [--repeats 2]
#
# Both train the same model on the TinyStories sample with the same batch, lr schedule, eval
# (--eval-batches validation batches and an 80-token sample every --eval-every steps and at the
# end) and checkpoint cadence (every --checkpoint-every steps and at the end): Forge with
# `forge-node train` (configs/tiny-cpu.toml with these settings; its checkpoints hashed, synced
# and committed by rename, periodic ones in the background), PyTorch with
# `scripts/bench_pytorch.py --end-to-end` (a nanoGPT-style loop, `torch.save` of model and
# optimizer) on the tokenizer Forge trained. Forge and PyTorch alternate --repeats times; the
# script prints the median wall-clock tokens/s of each, the ratio forge/pytorch and where each
# one's wall clock went. Neither counts its start (tokenizing the text, building the model).
# JSON lines go to $FORGE_BENCH_OUT (default: runs/bench/end-to-end-<time>.jsonl).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

preset=4m batch=8 seq=256 steps=300 eval_every=100 eval_batches=8 checkpoint_every=100
device=cpu threads="" repeats=2
while (($#)); do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --eval-every) eval_every=$2; shift 2 ;;
    --eval-batches) eval_batches=$2; shift 2 ;;
    --checkpoint-every) checkpoint_every=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench_end_to_end.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
threads=${threads:-$(nproc)}
# The tokenizer each preset's TinyStories config trains.
case "$preset" in
  15m) vocab=8192 ;;
  *) vocab=2048 ;;
esac

node=${FORGE_NODE:-target/release/forge-node}
if [[ -z "${FORGE_NODE:-}" ]]; then
  scripts/setup.sh >&2
fi
python=${FORGE_PYTHON:-$FORGE_VENV/bin/python}
work=${FORGE_BENCH_WORK:-runs/bench/end-to-end-work}
out=${FORGE_BENCH_OUT:-runs/bench/end-to-end-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$work" "$(dirname "$out")"
lr=3e-3 warmup=$(( steps > 300 ? 30 : steps / 10 ))

# Forge's config: configs/tiny-cpu.toml with this benchmark's settings, key by key in its
# section (a key that is not there is an error, not a silent default).
"$python" - "$work/forge.toml" <<PY
import re, sys
sets = {
    "model": {"preset": '"$preset"'},
    "data": {"tokenizer": "{ train = { vocab_size = $vocab } }"},
    "train": {"out_dir": '"$work/forge-run"', "seq_len": "$seq", "batch_size": "$batch",
              "micro_batch": "$batch", "max_steps": "$steps", "lr": "$lr", "device": '"$device"',
              "# threads": "$threads"},
    "train.schedule": {"warmup_steps": "$warmup"},
    "eval": {"every": "$eval_every", "batches": "$eval_batches"},
    "checkpoint": {"every": "$checkpoint_every", "resume": "false"},
}
section, done, lines = None, set(), []
for line in open("configs/tiny-cpu.toml"):
    m = re.match(r"^\[(.+)\]", line)
    if m:
        section = m.group(1)
    for key, value in sets.get(section, {}).items():
        if re.match(rf"^{re.escape(key)} = ", line):
            line = f"{key.lstrip('# ')} = {value}\n"
            done.add((section, key))
    lines.append(line)
missing = [f"[{s}] {k}" for s, keys in sets.items() for k in keys if (s, k) not in done]
if missing:
    sys.exit(f"bench_end_to_end.sh: configs/tiny-cpu.toml has no {', '.join(missing)}")
open(sys.argv[1], "w").write("".join(lines))
PY

for ((r = 1; r <= repeats; r++)); do
  echo "repeat $r/$repeats: forge-node train" >&2
  rm -rf "$work/forge-run"
  "$node" train --config "$work/forge.toml" > "$work/forge.log" 2>&1 \
    || { tail -20 "$work/forge.log" >&2; exit 1; }
  "$python" - "$work/forge.log" "$steps" "$batch" "$seq" \
    "$device" "$threads" >> "$out" <<'PY'
import json, re, sys
log, steps, batch, seq, device, threads = sys.argv[1:]
text = open(log).read()
m = re.search(r"wall clock ([0-9.]+) s for (\d+) steps, (\d+) tokens/s: (.*)", text)
if not m:
    sys.exit(f"no wall-clock line in {log}:\n{text[-2000:]}")
# The run's totals, as its last line gives them ("forward+backward 70.1%, optimizer 8.0%, ...").
keys = {"forward+backward": "forward_backward_s", "optimizer": "optimizer_s", "data": "data_s",
        "gradient exchange": "exchange_s", "eval": "eval_s", "checkpoint": "checkpoint_s"}
wall = float(m.group(1))
phases = {}
for item in m.group(4).strip().rstrip("%").split("%, "):
    name, share = item.rsplit(" ", 1)
    phases[keys.get(name, name)] = wall * float(share) / 100
evals = re.findall(r"eval_loss ([0-9.]+)", text)
print(json.dumps({
    "implementation": "forge", "batch": int(batch), "seq_len": int(seq), "steps": int(m.group(2)),
    "device": device, "threads": int(threads), "wall_s": float(m.group(1)),
    "wall_tokens_per_s": int(steps) * int(batch) * int(seq) / float(m.group(1)),
    "phases": phases, "final_eval_loss": float(evals[-1]) if evals else None,
}))
PY
  tokenizer=$(ls -d "$work"/forge-run/checkpoints/step-*/ | tail -1)tokenizer.json
  echo "repeat $r/$repeats: pytorch eager loop" >&2
  "$python" -W ignore scripts/bench_pytorch.py --end-to-end --preset "$preset" --batch "$batch" \
    --seq "$seq" --steps "$steps" --device "$device" --threads "$threads" --lr "$lr" \
    --warmup-steps "$warmup" --eval-every "$eval_every" --eval-batches "$eval_batches" \
    --checkpoint-every "$checkpoint_every" --tokenizer "$tokenizer" --out "$work/pytorch-run" \
    --train ../shared/data/tinystories/train-sample.txt \
    --val ../shared/data/tinystories/valid-sample.txt >> "$out"
done

"$python" - "$out" "$preset" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["implementation"], []).append(r)
f = by["forge"][0]
print(f"end to end: {sys.argv[2]}, batch {f['batch']} x seq {f['seq_len']}, {f['steps']} steps, "
      f"{f['device']}, {f['threads']} threads, {len(by['forge'])} repeats")
tps = {k: statistics.median(r["wall_tokens_per_s"] for r in v) for k, v in by.items()}
names = [("forward_backward_s", "fwd+bwd"), ("optimizer_s", "optimizer"), ("data_s", "data"),
         ("eval_s", "eval"), ("checkpoint_s", "checkpoint")]
for k, v in by.items():
    r = min(v, key=lambda r: abs(r["wall_tokens_per_s"] - tps[k]))
    p = r["phases"]
    wall = r["wall_s"]
    shares = ", ".join(f"{n} {100 * p.get(key, 0.0) / wall:.1f}%" for key, n in names)
    rest = 100 - sum(100 * p.get(key, 0.0) / wall for key, _ in names)
    loss = r.get("final_eval_loss")
    print(f"  {k:14s} {tps[k]:9.0f} tokens/s of wall clock ({wall:.1f} s; {shares}, "
          f"rest {rest:.1f}%), final val loss {loss if loss is None else round(loss, 4)}")
print(f"ratio forge/pytorch: {tps['forge'] / tps['pytorch-eager']:.3f}")
print(f"raw results: {sys.argv[1]}")
PY
