#!/usr/bin/env bash
# The GPU checks of a mixed cluster, in one run of under 9 minutes on a machine with one NVIDIA
# GPU, with release binaries built elsewhere (this script builds nothing):
#   1. DiLoCo with two nodes sharing the GPU and one CPU node: round 1 commits with the same
#      state hash on all three (identical start on any device, every device in one run);
#   2. bf16 on the GPU against fp32 on the CPU: the training losses of the same run side by side
#      (the first 10 must agree within 2%);
#   3. scripts/bench_train_step.sh for `15m` and `gpt2-124m`: Forge against PyTorch eager and
#      torch.compile, tokens/s and MFU;
#   4. wall clock as users feel it: scripts/bench_end_to_end.sh for `15m` (forge-node train
#      against a nanoGPT-style PyTorch loop, evals and checkpoints every 100 steps included) and
#      scripts/bench_steps_after_checkpoint.sh for `gpt2-124m` (steps after a checkpoint exists,
#      and how long a save holds the step: the copy into pinned host memory).
#
#   scripts/gpu_check.sh [--bin DIR] [--data DIR] [--out DIR] [--gpu cuda:0] [--skip-bench]
# --bin holds forge-node and forge-coordinator (default target/release); --data the shared data
# (default ../shared/data); results go to --out (default runs/gpu-check). The binaries find
# libtorch through LD_LIBRARY_PATH: set from the python3 torch on the machine when unset.
# --gpu cpu runs the same plumbing on the CPU alone (fp32 for the "bf16" run, no benchmark): a dry
# run on a machine without a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin=target/release data=../shared/data out=runs/gpu-check bench=1 gpu=cuda:0
while (($#)); do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --skip-bench) bench=0; shift ;;
    --gpu) gpu=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
bin=$(realpath "$bin") data=$(realpath "$data")
half=bf16
[[ "$gpu" == cpu ]] && half=fp32 bench=0
[[ -x "$bin/forge-node" && -x "$bin/forge-coordinator" ]] \
  || { echo "gpu_check.sh: no forge-node/forge-coordinator in $bin (build with cargo build --release, or pass --bin)" >&2; exit 1; }
[[ -f "$data/tinystories/train-sample.txt" ]] \
  || { echo "gpu_check.sh: $data/tinystories/train-sample.txt is missing (pass --data)" >&2; exit 1; }
# Binaries built here find the virtualenv's libtorch through their RUNPATH; elsewhere, the
# machine's own torch (the same 2.11.0).
if [[ -z "${LD_LIBRARY_PATH:-}" ]] && lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
  export LD_LIBRARY_PATH=$lib
fi
# The benchmarks' PyTorch side: the virtualenv's python where there is one, else the machine's.
[[ -x "$root/.venv/bin/python" ]] || export FORGE_PYTHON=${FORGE_PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf "$out"; mkdir -p "$out"
out=$(realpath "$out")
fail=0

# 1. Two GPU nodes and a CPU node in one DiLoCo run.
sed -e "s#\"../shared/data/tinystories/#\"$data/tinystories/#" \
    -e "s#out_dir = \"runs/diloco-tiny-cpu\"#out_dir = \"$out/unused\"#" \
    -e "s/^max_steps = 300/max_steps = 20/" \
    -e "s/^inner_steps = .*/inner_steps = 5/" \
    -e "s/^warmup_steps = .*/warmup_steps = 2/" \
    -e "s/^batches = 0/batches = 4/" \
    -e "s/^start_replicas = 2/start_replicas = 3/" \
    configs/diloco-tiny-cpu.toml > "$out/diloco.toml"
"$bin/forge-coordinator" serve --config "$out/diloco.toml" --listen 127.0.0.1:0 --state-dir "$out/coord" \
  > "$out/coord.out" 2> "$out/coord.log" &
coord=$!
trap 'kill $coord 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "forge-node join " "$out/coord.out" 2>/dev/null && break; sleep 0.1; done
read -r _ _ addr _ token <<< "$(grep "forge-node join " "$out/coord.out")"
pids=()
for spec in "gpu-a $gpu" "gpu-b $gpu" "cpu cpu"; do
  read -r name device <<< "$spec"
  timeout 180 "$bin/forge-node" join "$addr" --token "$token" --device "$device" \
    --workdir "$out/$name" --listen 127.0.0.1:0 > "$out/$name.out" 2> "$out/$name.log" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
echo "== DiLoCo: two nodes on $gpu and one on the CPU"
hashes=()
for name in gpu-a gpu-b cpu; do
  line=$(grep -m1 "^round    1 " "$out/$name.out" || true)
  echo "$name: ${line:-no round 1 (see $out/$name.out, $out/$name.log)}"
  hashes+=("$(sed -n 's/.*committed \(v1 [0-9a-f]*\).*/\1/p' <<< "$line")")
  grep "^final validation loss" "$out/$name.out" || true
done
if [[ -n "${hashes[0]}" && "${hashes[0]}" == "${hashes[1]}" && "${hashes[1]}" == "${hashes[2]}" ]]; then
  echo "round 1 committed with equal hashes on all three: ${hashes[0]}"
else
  echo "FAIL: round 1 did not commit with equal hashes: ${hashes[*]}"; fail=1
fi

# 2. bf16 on the GPU against fp32 on the CPU, same seed and data.
echo "== $half ($gpu) against fp32 (cpu): training losses"
for spec in "cpu cpu fp32" "gpu $gpu $half"; do
  read -r name device precision <<< "$spec"
  sed -e "s#\"../shared/data/tinystories/#\"$data/tinystories/#" \
      -e "s#out_dir = \"runs/tiny-cpu\"#out_dir = \"$out/train-$name\"#" \
      -e "s/^max_steps = 500/max_steps = 30/" \
      -e "s/^warmup_steps = 30/warmup_steps = 5/" \
      -e "s/^device = \"cpu\"/device = \"$device\"/" \
      -e "s/^log_every = .*/log_every = 1/" \
      -e "s/^every = 100$/every = 100000/" \
      configs/tiny-cpu.toml > "$out/train-$name.toml"
  sed -i "s/^# precision = .*/precision = \"$precision\"/" "$out/train-$name.toml"
  timeout 120 "$bin/forge-node" train --config "$out/train-$name.toml" --no-resume \
    > "$out/train-$name.out" 2> "$out/train-$name.log" || fail=1
done
python3 - "$out" <<'PY' || fail=1
import re, sys
out = sys.argv[1]
def losses(name):
    text = open(f"{out}/train-{name}.out").read() + open(f"{out}/train-{name}.log").read()
    return {int(s): float(l) for s, l in re.findall(r"step\s+(\d+)\D+?loss\s+([0-9.]+)", text)}
cpu, gpu = losses("cpu"), losses("gpu")
steps = sorted(set(cpu) & set(gpu))
if not steps:
    sys.exit(f"no common steps in the two logs ({out}/train-*.out)")
worst = 0.0
for s in steps:
    rel = abs(gpu[s] - cpu[s]) / cpu[s]
    if s <= 10:  # later steps drift apart as rounding differences compound
        worst = max(worst, rel)
    print(f"step {s:3}: cpu fp32 {cpu[s]:.4f}  gpu run {gpu[s]:.4f}  ({100 * rel:+.2f}%)")
print(f"largest relative difference over the first 10 steps {100 * worst:.2f}%")
if worst > 0.02:
    sys.exit("FAIL: bf16 on the GPU and fp32 on the CPU differ by more than 2%")
PY

# 3. Forge against PyTorch eager and torch.compile.
if ((bench)); then
  export FORGE_NODE="$bin/forge-node" FORGE_BENCH_OUT="$out/train-step.jsonl"
  echo "== train step, 15m"
  timeout 150 scripts/bench_train_step.sh --preset 15m --batch 64 --seq 256 --device "$gpu" --compile --repeats 2 || fail=1
  echo "== train step, gpt2-124m"
  timeout 150 scripts/bench_train_step.sh --preset gpt2-124m --batch 16 --seq 1024 --device "$gpu" --compile --repeats 2 || fail=1
  # 4. Wall clock end to end, and what checkpoints cost it.
  echo "== end to end against PyTorch, 15m, checkpoints and evals every 100 steps"
  FORGE_BENCH_OUT="$out/end-to-end.jsonl" FORGE_BENCH_WORK="$out/end-to-end" \
    timeout 150 scripts/bench_end_to_end.sh --preset 15m --batch 32 --seq 256 --steps 300 --device "$gpu" --repeats 1 || fail=1
  echo "== steps after a checkpoint, gpt2-124m, a save every 8 steps"
  timeout 120 scripts/bench_steps_after_checkpoint.sh --preset gpt2-124m --batch 8 --every 8 --steps 33 --device "$gpu" --bin "$bin/forge-node" || fail=1
fi
exit $fail
