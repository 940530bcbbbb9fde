#!/usr/bin/env bash
# Peak memory and step time of one training run with and without activation checkpointing and
# pure bf16, in the manner of Forgather's peak-memory comparison: `forge-node train` on the
# TinyStories sample with the GPT-2 tokenizer, the same steps for each variant, each in its own
# process. On the CPU the peak is the process's maximum resident set size (GNU time); on a GPU
# (--device cuda:N) the most device memory in use that nvidia-smi reported, sampled every
# 0.2 s while the run lasted (libtorch's caching allocator included), the RSS beside it.
#
#   scripts/bench_memory.sh [--preset gpt2-124m] [--seq 1024] [--batch 2] [--steps 3]
#                           [--device cpu] [--precision fp32]
#                           [--variants "plain checkpointed bf16-pure both"]
#
# Variants: plain (--precision), checkpointed (activation checkpointing), bf16-pure (precision
# bf16-pure), both (the two together). Prints one line per variant (peak, mean time of the steps
# after the first) and each variant's ratios over plain. Target (issue 26): activation
# checkpointing at least 40% less peak memory at no more than 35% more step time.
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
source "$(dirname "$self")/env.sh"
cd "$FORGE_ROOT"

preset=gpt2-124m seq=1024 batch=2 steps=3 device=cpu precision=fp32
variants="plain checkpointed bf16-pure both"
while (($#)); do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --variants) variants=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$self"; exit 0 ;;
    *) echo "bench_memory.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((steps >= 2)) || { echo "bench_memory.sh: --steps must be at least 2 (the first step is not timed)" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "bench_memory.sh: needs GNU time (/usr/bin/time; Debian: apt-get install time)" >&2; exit 1; }
[[ -n "${FORGE_NODE:-}" ]] || scripts/setup.sh >&2
node=${FORGE_NODE:-target/release/forge-node}
data=$(realpath "$FORGE_ROOT/../shared/data")
work=runs/bench-memory
rm -rf "$work"; mkdir -p "$work"

# One run: peak RSS (KiB) and mean seconds per step after the first.
run() {
  local name=$1 recompute=$2 precision=$3 dir=$work/$1
  mkdir -p "$dir"
  local sampler=""
  if [[ "$device" == cuda:* ]]; then
    # The device's memory in use, in MiB, every 0.2 s: the largest sample is the peak.
    command -v nvidia-smi > /dev/null || { echo "bench_memory.sh: --device $device needs nvidia-smi for the peak" >&2; exit 1; }
    (while :; do nvidia-smi --id="${device#cuda:}" --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done > "$dir/device_mib") &
    sampler=$!
  fi
  /usr/bin/time -f "%M" -o "$dir/maxrss" env RUST_LOG=warn "$node" train \
    --config configs/tiny-cpu.toml --no-resume \
    --set "model.preset=\"$preset\"" --set 'model.family="gpt2"' \
    --set "data.train=\"$data/tinystories/train-sample.txt\"" \
    --set "data.val=\"$data/tinystories/valid-sample.txt\"" \
    --set "data.tokenizer={ path = \"$data/gpt2/tokenizer.json\" }" \
    --set "train.out_dir=\"$dir/run\"" --set "train.seq_len=$seq" \
    --set "train.batch_size=$batch" --set "train.micro_batch=$batch" \
    --set "train.max_steps=$steps" --set "train.device=\"$device\"" \
    --set "train.precision=\"$precision\"" \
    --set "train.activation_checkpointing=$recompute" \
    --set 'train.schedule={ kind = "constant", warmup_steps = 0 }' \
    --set 'eval.every=1000000' --set 'eval.batches=1' --set 'checkpoint.every=1000000' \
    > "$dir/out" 2> "$dir/log" || { [[ -n "$sampler" ]] && kill "$sampler"; echo "bench_memory.sh: the $name run failed; see $dir/log" >&2; tail -5 "$dir/log" >&2; exit 1; }
  [[ -z "$sampler" ]] || { kill "$sampler"; wait "$sampler" 2> /dev/null || true; }
  python3 - "$name" "$dir" <<'PY'
import json, sys
name, d = sys.argv[1], sys.argv[2]
rss_kib = int(open(f"{d}/maxrss").read().split()[-1])
steps = [json.loads(l) for l in open(f"{d}/run/metrics.jsonl") if '"step"' in l and '"loss"' in l]
times = [s["phases"]["step_s"] for s in steps[1:]]
try:
    samples = [int(l) for l in open(f"{d}/device_mib") if l.strip().isdigit()]
except FileNotFoundError:
    samples = []
peak_dev = max(samples) * 1024**2 if samples else 0
line = f"{name}: peak RSS {rss_kib / 1024**2:.2f} GiB"
if peak_dev:
    line += f", peak device memory {peak_dev / 1024**3:.2f} GiB"
line += f", {sum(times) / len(times):.2f} s per step (mean of {len(times)} after the first)"
print(line)
open(f"{d}/result", "w").write(json.dumps({"rss_kib": rss_kib, "step_s": sum(times) / len(times), "peak_dev": peak_dev}))
PY
}

echo "== $preset, seq $seq, batch $batch, $steps steps, $device, $precision ($node)"
for v in $variants; do
  case "$v" in
    plain) run plain false "$precision" ;;
    checkpointed) run checkpointed true "$precision" ;;
    bf16-pure) run bf16-pure false bf16-pure ;;
    both) run both true bf16-pure ;;
    *) echo "bench_memory.sh: unknown variant '$v' (plain, checkpointed, bf16-pure, both)" >&2; exit 2 ;;
  esac
done
python3 - "$work" $variants <<'PY'
import json, os, sys
w, names = sys.argv[1], sys.argv[2:]
results = {n: json.load(open(f"{w}/{n}/result")) for n in names}
if "plain" not in results:
    sys.exit(0)
p = results["plain"]
for name, r in results.items():
    if name == "plain":
        continue
    key = "peak_dev" if p["peak_dev"] and r["peak_dev"] else "rss_kib"
    mem = r[key] / p[key]
    time = r["step_s"] / p["step_s"]
    print(f"{name} / plain: peak memory {mem:.3f} ({100 * (1 - mem):.1f}% less), step time {time:.3f} "
          f"({100 * (time - 1):+.1f}%)")
    if name == "checkpointed":
        print(f"target (>= 40% less memory at <= 35% more time): "
              f"{'met' if mem <= 0.60 and time <= 1.35 else 'not met'}")
PY
