#!/usr/bin/env bash
# Mixed-speed DiLoCo on one machine: three nodes whose CPU quotas are 100%, 50% and 25% of a core
# (cgroup v1 cpu.cfs_quota_us, or systemd-run --scope -p CPUQuota= where v2 is in use) train the
# `tiny` model on the Wikipedia sample with `[diloco] pace = "fixed"` (H steps everywhere) and then
# with `pace = "auto"` (speed-aware rounds), for the same wall time each. SIGTERM ends both runs;
# every node finishes its round and prints the final validation loss of the run's model.
#
# Mode `alone` is the baseline a cluster must beat: the fastest node training by itself
# (`forge-node train`, same model, batch and peak lr, constant lr after warmup as the cluster's
# runs effectively have) for as many steps as it takes in about the same wall time
# (--alone-steps; default: its speed in the auto run times --seconds).
#
# Prints, per run and node: tokens contributed, inner steps, the share of its wall time spent in
# the all-reduce (waiting for slower nodes plus the transfer itself); per run: the final
# validation loss at equal wall time and the wall time to reach the worse of the two runs' final
# losses (from the evaluations every few rounds).
#
#   scripts/bench_heterogeneous.sh [--seconds 240] [--quotas "100 50 25"] [--inner 25]
#                                  [--modes "fixed auto alone"] [--alone-steps N] [--report-only]
# --report-only prints the summary of the runs already in runs/heterogeneous.
# Needs root (cgroups). Nothing else should run on the machine meanwhile.
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
source "$(dirname "$self")/env.sh"
cd "$FORGE_ROOT"

seconds=240 quotas="100 50 25" inner=25 modes="fixed auto alone" report_only=0 alone_steps=""
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --quotas) quotas=$2; shift 2 ;;
    --inner) inner=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --report-only) report_only=1; shift ;;
    --alone-steps) alone_steps=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$self"; exit 0 ;;
    *) echo "bench_heterogeneous.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
work=$FORGE_ROOT/runs/heterogeneous
report() {
  python3 - "$work" "$quotas" $modes <<'PY'
import json, re, sys
work, quotas, modes = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
runs = {}
alone = None
if "alone" in modes:
    modes.remove("alone")
    d = f"{work}/alone"
    out = open(f"{d}/train.out").read()
    loss = float(re.search(r"^validation loss ([0-9.]+)", out, re.M).group(1))
    steps = int(re.search(r"^finished at step (\d+)", out, re.M).group(1))
    wall = (int(open(f"{d}/stop_ms").read()) - int(open(f"{d}/start_ms").read())) / 1000
    alone = (loss, steps, wall)
for mode in modes:
    d = f"{work}/{mode}"
    start, stop = (int(open(f"{d}/{f}_ms").read()) for f in ("start", "stop"))
    nodes = []
    for i, quota in enumerate(quotas, 1):
        rounds = [json.loads(l) for l in open(f"{d}/node{i}/run/rounds.jsonl")]
        out = open(f"{d}/node{i}.out").read()
        final = re.search(r"^final validation loss ([0-9.]+)", out, re.M)
        def share(rs):
            # Wall time from the first of `rs` starting to the last one's record.
            begin = rs[0]["unix_ms"] - 1000 * (rs[0]["inner_s"] + rs[0]["sync_s"])
            return sum(r["sync_s"] for r in rs) / ((rs[-1]["unix_ms"] - begin) / 1000)
        nodes.append({
            "quota": quota,
            "rounds": len(rounds),
            "steps": sum(r["inner_steps"] for r in rounds),
            "tokens": sum(r["tokens"] for r in rounds),
            "share": share(rounds),
            "later": share(rounds[1:]) if len(rounds) > 1 else float("nan"),
            "final": float(final.group(1)) if final else float("nan"),
        })
    evals = [((r["unix_ms"] - start) / 1000, r["eval_loss"])
             for r in (json.loads(l) for l in open(f"{d}/node1/run/rounds.jsonl"))
             if "eval_loss" in r]
    # The final evaluation (of the last committed version) counts at the stop.
    evals.append(((stop - start) / 1000, nodes[0]["final"]))
    runs[mode] = {"nodes": nodes, "evals": evals, "final": nodes[0]["final"]}
target = max((r["final"] for r in runs.values()), default=float("nan"))
for mode, run in runs.items():
    print(f"pace = {mode}: final validation loss {run['final']:.4f} at equal wall time")
    for n in run["nodes"]:
        print(f"  node at {n['quota']:>3}% of a core: {n['tokens'] / 1e6:6.2f}M tokens, "
              f"{n['steps']:5} inner steps in {n['rounds']} rounds, "
              f"{100 * n['share']:5.1f}% of its wall time in the all-reduce "
              f"({100 * n['later']:.1f}% after round 1)")
    reached = next((t for t, loss in run["evals"] if loss <= target), None)
    when = f"{reached:.0f} s" if reached is not None else "not reached"
    print(f"  wall time to validation loss {target:.4f}: {when}")
if len(runs) == 2:
    a, b = (runs[m]["final"] for m in modes)
    print(f"final validation loss {modes[1]} / {modes[0]}: {b / a:.4f}")
if alone:
    loss, steps, wall = alone
    print(f"the fastest node alone: validation loss {loss:.4f} after {steps} steps "
          f"({steps * 2048 / 1e6:.2f}M tokens) in {wall:.0f} s")
    for mode, run in runs.items():
        print(f"  pace = {mode} with all {len(quotas)} nodes / alone: {run['final'] / loss:.4f}")
PY
}
if ((report_only)); then report; exit 0; fi
wiki=$(realpath "$FORGE_ROOT/../shared/data/wikipedia")
[[ -f "$wiki/enwiki-train-1.txt" ]] || { echo "bench_heterogeneous.sh: $wiki/enwiki-train-1.txt is missing (see ../shared/data/README.md)" >&2; exit 1; }
cpu_cg=/sys/fs/cgroup/cpu
if [[ -w "$cpu_cg" && -f "$cpu_cg/cpu.cfs_period_us" ]]; then
  limiter=v1
elif command -v systemd-run >/dev/null && [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
  limiter=systemd
else
  echo "bench_heterogeneous.sh: no writable cgroup v1 cpu controller and no systemd-run on cgroup v2; run as root on Linux" >&2
  exit 1
fi
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=$(realpath "${FORGE_BIN:-target/release}")
nodes=$(wc -w <<< "$quotas")
mkdir -p "$work"

# One config per mode: the tiny model on Wikipedia (no text read twice in a few minutes), a
# budget no run reaches (SIGTERM ends it), evaluations every 4 rounds on 16 batches, and the
# outer step its record (docs/benchmarks/heterogeneous.md) was measured with (outer lr 0.5,
# Nesterov 0.9: the demo's before it moved to plain averaging).
config() {
  sed -e "s#out_dir = \"runs/diloco-tiny-cpu\"#out_dir = \"runs/unused\"#" \
      -e "s#^train = .*#train = \"$wiki/enwiki-train-1.txt\"#" \
      -e "s#^val = .*#val = \"$wiki/enwiki-valid.txt\"#" \
      -e "s#^cache_dir = .*#cache_dir = \"$work/cache\"#" \
      -e "s/^max_steps = 300/max_steps = 1000000/" \
      -e "s/^warmup_steps = .*/warmup_steps = 100/" \
      -e "s/^batches = 0/batches = 16/" \
      -e "s/^inner_steps = .*/inner_steps = $inner/" \
      -e "s/^outer_lr = .*/outer_lr = 0.5/" \
      -e "s/^outer_momentum = .*/outer_momentum = 0.9/" \
      -e "s/^pace = \"auto\"/pace = \"$1\"/" \
      -e "s/^eval_every_rounds = .*/eval_every_rounds = 4/" \
      -e "s/^min_replicas = 2/min_replicas = 2/" \
      -e "s/^start_replicas = 2/start_replicas = $nodes/" \
      configs/diloco-tiny-cpu.toml
}
# Tokenize once, outside the quotas; every node's cache links to it.
config fixed > "$work/prepare.toml"
echo "== tokenizing the Wikipedia sample (once)" >&2
"$bin/forge-node" data stats --config "$work/prepare.toml" >&2

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [[ $limiter == v1 ]]; then
    for i in $(seq "$nodes"); do rmdir "$cpu_cg/forge-bench-$i" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT

# Starts node $1 with a quota of $2% of a core; its stdout/stderr in $3.{out,log}.
start_node() {
  local i=$1 quota=$2 dir=$3 addr=$4 token=$5
  local cmd=("$bin/forge-node" join "$addr" --token "$token" --workdir "$dir/node$i"
             --listen 127.0.0.1:0 --threads 1)
  mkdir -p "$dir/node$i"
  ln -sfn "$work/cache" "$dir/node$i/cache"
  if [[ $limiter == v1 ]]; then
    local cg=$cpu_cg/forge-bench-$i
    mkdir -p "$cg"
    echo 100000 > "$cg/cpu.cfs_period_us"
    echo $((quota * 1000)) > "$cg/cpu.cfs_quota_us"
    RUST_LOG=warn sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$cg" "${cmd[@]}" \
      > "$dir/node$i.out" 2> "$dir/node$i.log" &
  else
    RUST_LOG=warn systemd-run --quiet --scope -p "CPUQuota=${quota}%" "${cmd[@]}" \
      > "$dir/node$i.out" 2> "$dir/node$i.log" &
  fi
  pids+=($!)
}

for mode in $modes; do
  dir=$work/$mode
  if [[ $mode == alone ]]; then
    if [[ -z "$alone_steps" ]]; then
      alone_steps=$(python3 -c "
import json, sys
rs = [json.loads(l) for l in open('$work/auto/node1/run/rounds.jsonl')][1:]
print(int($seconds * sum(r['inner_steps'] for r in rs) / sum(r['inner_s'] for r in rs)))")
    fi
    rm -rf "$dir"; mkdir -p "$dir"
    sed -e "s#out_dir = \"runs/tiny-cpu\"#out_dir = \"$dir/run\"#" \
        -e "s#^train = .*#train = \"$wiki/enwiki-train-1.txt\"#" \
        -e "s#^val = .*#val = \"$wiki/enwiki-valid.txt\"#" \
        -e "s#^cache_dir = .*#cache_dir = \"$work/cache\"#" \
        -e "s/^max_steps = 500/max_steps = $alone_steps/" \
        -e "s/^kind = \"cosine\"/kind = \"constant\"/" \
        -e "/^min_lr_ratio = /d" \
        -e "s/^warmup_steps = 30/warmup_steps = 100/" \
        -e "s/^batches = 0/batches = 16/" \
        -e "s/^every = 100$/every = 1000000/" \
        -e "s/^threads = .*/threads = 1/" \
        configs/tiny-cpu.toml > "$dir/train.toml"
    grep -q "^threads = 1" "$dir/train.toml" || sed -i "s/^device = \"cpu\"/device = \"cpu\"\nthreads = 1/" "$dir/train.toml"
    quota=${quotas%% *}
    echo "== the fastest node alone ($quota% of a core): $alone_steps steps" >&2
    date +%s%3N > "$dir/start_ms"
    if [[ $limiter == v1 ]]; then
      cg=$cpu_cg/forge-bench-1
      mkdir -p "$cg"; echo 100000 > "$cg/cpu.cfs_period_us"; echo $((quota * 1000)) > "$cg/cpu.cfs_quota_us"
      RUST_LOG=warn sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$cg" "$bin/forge-node" train \
        --config "$dir/train.toml" --no-resume > "$dir/train.out" 2> "$dir/train.log"
    else
      RUST_LOG=warn systemd-run --quiet --scope -p "CPUQuota=${quota}%" "$bin/forge-node" train \
        --config "$dir/train.toml" --no-resume > "$dir/train.out" 2> "$dir/train.log"
    fi
    date +%s%3N > "$dir/stop_ms"
    continue
  fi
  rm -rf "$dir"; mkdir -p "$dir"
  config "$mode" > "$dir/run.toml"
  "$bin/forge-coordinator" serve --config "$dir/run.toml" --listen 127.0.0.1:0 --state-dir "$dir/coord" \
    > "$dir/coord.out" 2> "$dir/coord.log" &
  coord=$!; pids+=($coord)
  for _ in $(seq 100); do grep -q "forge-node join " "$dir/coord.out" 2>/dev/null && break; sleep 0.1; done
  read -r _ _ addr _ token <<< "$(grep "forge-node join " "$dir/coord.out")"
  echo "== pace = $mode: $nodes nodes at $quotas % of a core, H=$inner, $seconds s" >&2
  i=0
  node_pids=()
  for quota in $quotas; do
    i=$((i + 1))
    start_node "$i" "$quota" "$dir" "$addr" "$token"
    node_pids+=($!)
  done
  # The clock starts when the first round opens (every node joined and tokenized).
  for _ in $(seq 1200); do
    [[ -s "$dir/node1/run/rounds.jsonl" ]] && break
    sleep 0.5
  done
  date +%s%3N > "$dir/start_ms"
  sleep "$seconds"
  date +%s%3N > "$dir/stop_ms"
  for p in "${node_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${node_pids[@]}"; do wait "$p" || true; done
  kill "$coord" 2>/dev/null || true; wait "$coord" 2>/dev/null || true
done

report
