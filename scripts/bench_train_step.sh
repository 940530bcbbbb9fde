#!/usr/bin/env bash
# Forge vs PyTorch on the identical train step, measured in the same run.
#
#   scripts/bench_train_step.sh [--preset 4m] [--family llama] [--batch 8] [--seq 256]
#       [--device cpu|cuda:0] [--steps 10] [--threads N] [--repeats 3] [--compile]
#
# Runs `forge-node bench train-step` and scripts/bench_pytorch.py alternately --repeats times
# (so drift on a noisy machine hits both), then prints the median tokens/s of each and the
# ratio forge/pytorch. --compile also measures torch.compile. JSON lines go to
# $FORGE_BENCH_OUT (default: runs/bench/train-step-<time>.jsonl).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

preset=4m family="" batch=8 seq=256 device=cpu steps=10 warmup=3 threads="" repeats=3 compile=0 precision=""
while (($#)); do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --family) family=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --compile) compile=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench_train_step.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
threads=${threads:-$(nproc)}

node=${FORGE_NODE:-target/release/forge-node}
if [[ -z "${FORGE_NODE:-}" ]]; then
  scripts/setup.sh >&2
fi
common=(--preset "$preset" --batch "$batch" --seq "$seq" --device "$device" --steps "$steps"
        --warmup "$warmup" --threads "$threads")
[[ -n "$family" ]] && common+=(--family "$family")
[[ -n "$precision" ]] && common+=(--precision "$precision")

out=${FORGE_BENCH_OUT:-runs/bench/train-step-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$out")"
python=${FORGE_PYTHON:-$FORGE_VENV/bin/python}
for ((r = 1; r <= repeats; r++)); do
  echo "repeat $r/$repeats: forge" >&2
  "$node" bench train-step "${common[@]}" --json | tee -a "$out" >/dev/null
  echo "repeat $r/$repeats: pytorch eager" >&2
  "$python" -W ignore scripts/bench_pytorch.py "${common[@]}" | tee -a "$out" >/dev/null
  if ((compile)); then
    echo "repeat $r/$repeats: pytorch compile" >&2
    "$python" -W ignore scripts/bench_pytorch.py "${common[@]}" --compile | tee -a "$out" >/dev/null
  fi
done

"$python" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["implementation"], []).append(r)
f = by["forge"][0]
print(f"train step: {f['family']} {f['params']/1e6:.2f}M params, batch {f['batch']} x seq {f['seq_len']}, "
      f"{f['device']} ({f['device_name']}), {f['precision']}, {f['threads']} threads, {f['steps']} timed steps x {len(by['forge'])} repeats")
tps = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in by.items()}
ms = {k: statistics.median(r["step_ms_median"] for r in v) for k, v in by.items()}
for k in by:
    mfu = by[k][0].get("mfu")
    extra = f", MFU {statistics.median(r['mfu'] for r in by[k]) * 100:.1f}%" if mfu is not None else ""
    print(f"  {k:16s} {tps[k]:10.0f} tokens/s  {ms[k]:8.1f} ms/step{extra}")
for k in by:
    if k != "forge":
        print(f"ratio forge/{k}: {tps['forge'] / tps[k]:.3f}")
print(f"raw results: {sys.argv[1]}")
PY
