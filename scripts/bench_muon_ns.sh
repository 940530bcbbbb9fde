#!/usr/bin/env bash
# Muon's Newton–Schulz in bf16 (torch.optim.Muon's arithmetic, `ns_precision = "bf16"`) against
# fp32 (what the default `ns_precision = "auto"` picks off CUDA), as a user feels it: one node
# trains configs/tiny-cpu.toml with Muon for STEPS steps (its evals and checkpoints included),
# once per precision, alternately REPEATS times so that drift on a shared machine hits both.
# Prints each run's tokens over its whole wall time (start-up, evals and checkpoints included)
# and final validation loss, then the ratio of the median tokens/s (fp32 / bf16) and the two
# losses (same seed, same data: they differ only by rounding).
#
#   scripts/bench_muon_ns.sh [--steps 100] [--repeats 2] [--threads N] [--preset tiny]
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
source "$(dirname "$self")/env.sh"
cd "$FORGE_ROOT"

steps=100 repeats=2 threads="" preset=tiny
while (($#)); do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$self"; exit 0 ;;
    *) echo "bench_muon_ns.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=${FORGE_BIN:-target/release}
work=runs/bench-muon-ns
rm -rf "$work"; mkdir -p "$work"

# One run: prints "<wall tokens/s> <final validation loss>".
run() {
  local precision=$1 dir=$work/$1-$2
  mkdir -p "$dir"
  {
    sed -e "s#out_dir = \"runs/tiny-cpu\"#out_dir = \"$dir/run\"#" \
        -e "s/^preset = .*/preset = \"$preset\"/" \
        -e "s/^max_steps = .*/max_steps = $steps/" \
        -e "s/^warmup_steps = .*/warmup_steps = $((steps / 5))/" \
        ${threads:+-e "s/^# threads = .*/threads = $threads/"} \
        configs/tiny-cpu.toml | awk '/^\[/ { skip = ($0 ~ /^\[train\.optimizer/) } !skip'
    printf '\n[train.optimizer]\nkind = "muon"\n\n[train.optimizer.muon]\nns_precision = "%s"\n' "$precision"
  } > "$dir/run.toml"
  local start; start=$(date +%s.%N)
  RUST_LOG=warn "$bin/forge-node" train --config "$dir/run.toml" --no-resume > "$dir/run.out" 2> "$dir/run.log" \
    || { tail -5 "$dir/run.log" >&2; echo "bench_muon_ns.sh: the $precision run failed (see $dir/run.log)" >&2; exit 1; }
  python3 - "$dir/run/metrics.jsonl" "$dir/run.out" "$start" "$(date +%s.%N)" <<'PY'
import json, re, sys
tokens = [json.loads(l) for l in open(sys.argv[1])][-1]["tokens"]
loss = re.search(r"^validation loss ([0-9.]+)", open(sys.argv[2]).read(), re.M).group(1)
print(f"{tokens / (float(sys.argv[4]) - float(sys.argv[3])):.1f} {loss}")
PY
}

declare -A speeds losses
for r in $(seq "$repeats"); do
  for precision in bf16 fp32; do
    read -r speed loss <<< "$(run "$precision" "$r")"
    echo "$precision, run $r: $speed tokens/s (wall clock), final validation loss $loss"
    speeds[$precision]+="$speed "; losses[$precision]=$loss
  done
done
python3 - "${speeds[bf16]}" "${speeds[fp32]}" "${losses[bf16]}" "${losses[fp32]}" <<'PY'
import statistics, sys
bf16, fp32 = (statistics.median(map(float, s.split())) for s in sys.argv[1:3])
print(f"median wall tokens/s: bf16 {bf16:.1f}, fp32 {fp32:.1f}; fp32 / bf16 = {fp32 / bf16:.2f}")
print(f"final validation loss: bf16 {sys.argv[3]}, fp32 {sys.argv[4]}")
PY
