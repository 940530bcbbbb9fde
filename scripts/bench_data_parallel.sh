#!/usr/bin/env bash
# Data parallelism inside one node on the CPU: trains configs/tiny-cpu.toml for STEPS steps
# with 1 worker (all threads) and with W CPU workers (threads split among them), the same batch
# and data, and prints tokens/s of each, their ratio, and the gradient exchange's share of the
# step time of the data-parallel run.
#
#   scripts/bench_data_parallel.sh [--workers 2] [--steps 60] [--threads 2] [--preset tiny]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

workers=2 steps=60 threads=2 preset=tiny
while (($#)); do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "bench_data_parallel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((workers >= 2)) || { echo "bench_data_parallel.sh: --workers must be at least 2" >&2; exit 2; }
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=${FORGE_BIN:-target/release}/forge-node
work=runs/bench-data-parallel
rm -rf "$work"; mkdir -p "$work"

run() { # name workers threads-per-worker
  sed -e "s#out_dir = \"runs/tiny-cpu\"#out_dir = \"$work/$1\"#" \
      -e "s/^preset = \"tiny\"/preset = \"$preset\"/" \
      -e "s/^max_steps = 500/max_steps = $steps/" \
      -e "s/^batch_size = 16/batch_size = $((16 * workers))/" \
      -e "s/^# threads = 2/threads = $3/" \
      -e "s/^cpu_workers = 1/cpu_workers = $2/" \
      -e "s/^every = 100$/every = 100000/" \
      configs/tiny-cpu.toml > "$work/$1.toml"
  RUST_LOG=warn "$bin" train --config "$work/$1.toml" --no-resume > "$work/$1.out" 2> "$work/$1.log"
  python3 - "$work/$1" << 'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"elapsed_s"' in l]
# Skip the first fifth: allocators and caches warm up.
a, b = rows[len(rows) // 5], rows[-1]
print((b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]))
EOF
}
threads_each=$(( threads / workers > 0 ? threads / workers : 1 ))
one=$(run one 1 "$threads")
many=$(run many "$workers" "$threads_each")
comm=$(grep '^data parallelism:' "$work/many.out")
python3 - "$one" "$many" "$workers" "$threads" "$threads_each" "$comm" << 'EOF'
import sys
one, many, w, t, te, comm = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
print(f"1 worker x {t} threads: {one:,.0f} tokens/s")
print(f"{w} CPU workers x {te} threads: {many:,.0f} tokens/s ({many / one:.2f}x)")
print(comm)
EOF
