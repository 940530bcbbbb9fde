#!/usr/bin/env bash
# Compute utilisation of a DiLoCo run over home uplinks: a coordinator and NODES nodes, each node
# in its own Linux network namespace on a LAN whose every link is shaped to RATE Mbit/s in both
# directions (scripts/netns_lan.sh), train configs/diloco-tiny-cpu.toml with the MODEL preset for
# ROUNDS rounds of H inner steps (pace fixed: H steps on every node), once per rate, codec and
# overlap_steps setting. Each node tells the run its uplink (--max-upload-mbps RATE).
# Prints, per setting, the share of the nodes' wall clock spent in inner steps over rounds 2 to
# ROUNDS-1 (the first round holds the start, the run's last round never overlaps), from each
# node's rounds.jsonl: the lowest node and the mean, with the mean outer sync and wait per round
# and the bytes each node sent per round.
#
#   sudo scripts/bench_utilisation_netns.sh [--rates "20 100"] [--codecs "int8 topk"]
#                                           [--overlaps "0 auto"] [--model 15m] [--nodes 4]
#                                           [--inner 30] [--rounds 4] [--batch 8] [--threads 1]
#
# Needs root (ip netns, tc). Uses 10.231.0.0/24 inside namespaces named forge-ut-*; touches
# nothing outside them and removes them on exit. On one machine the nodes share its cores: an
# inner step takes NODES / cores times longer than on a machine of its own, which hides that much
# more of the sync; the table says how long a step took.
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
source "$(dirname "$self")/env.sh"
cd "$FORGE_ROOT"
source "$FORGE_ROOT/scripts/netns_lan.sh"

rates="20 100" codecs="int8 topk" overlaps="0 auto" model=15m nodes=4 inner=30 rounds=4 batch=8 threads=1
while (($#)); do
  case "$1" in
    --rates) rates=$2; shift 2 ;;
    --codecs) codecs=$2; shift 2 ;;
    --overlaps) overlaps=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --inner) inner=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$self"; exit 0 ;;
    *) echo "bench_utilisation_netns.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((rounds >= 3)) || { echo "bench_utilisation_netns.sh: --rounds must be at least 3" >&2; exit 2; }
lan_check bench_utilisation_netns.sh
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=${FORGE_BIN:-target/release}
work=runs/bench-utilisation-netns
rm -rf "$work"; mkdir -p "$work"

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  lan_down forge-ut "$nodes"
}
trap stop_all EXIT

echo "this machine has $(nproc) cores; $nodes nodes, $model, H=$inner, $rounds rounds, batch $batch x 128, $threads thread(s) each"
printf '%-6s %-6s %-8s %10s %10s %8s %8s %12s %10s\n' Mbit/s codec overlap "util min" "util mean" \
  "sync s" "wait s" "MB sent" "step s"
for rate in $rates; do
  lan_down forge-ut "$nodes"
  lan_up forge-ut "$nodes" "$rate"
  for codec in $codecs; do
    case "$codec" in
      int8) compression='{ codec = "int8", block_size = 256, zstd = 3 }' ;;
      topk) compression='{ codec = "topk", block_size = 4096, density = 0.015625, bits = 2 }' ;;
      fp32) compression='{ codec = "fp32" }' ;;
      *) echo "bench_utilisation_netns.sh: codec must be int8, topk or fp32" >&2; exit 2 ;;
    esac
    for overlap in $overlaps; do
      [[ $overlap == auto ]] && overlap_value='"auto"' || overlap_value=$overlap
      run=$work/r$rate-$codec-o$overlap
      mkdir -p "$run"
      sed -e "s/^preset = \"tiny\"/preset = \"$model\"/" \
          -e "s/^batch_size = 16/batch_size = $batch/" \
          -e "s/^micro_batch = 16/micro_batch = $batch/" \
          -e "s/^max_steps = 300/max_steps = $((inner * rounds))/" \
          -e "s/^warmup_steps = .*/warmup_steps = $((inner * rounds / 5))/" \
          -e "s/^inner_steps = .*/inner_steps = $inner/" \
          -e "s/^pace = \"auto\"/pace = \"fixed\"/" \
          -e "s#^compression = .*#compression = $compression#" \
          -e "s/^overlap_steps = 0/overlap_steps = $overlap_value/" \
          -e "s/^eval_every_rounds = .*/eval_every_rounds = 100000/" \
          -e "s/^min_replicas = 2/min_replicas = $nodes/" \
          -e "s/^start_replicas = 2/start_replicas = $nodes/" \
          configs/diloco-tiny-cpu.toml > "$run/run.toml"
      pids=()
      RUST_LOG=warn ip netns exec forge-ut-sw "$bin/forge-coordinator" serve --config "$run/run.toml" \
        --listen 10.231.0.254:7400 --state-dir "$run/coord" > "$run/coord.out" 2> "$run/coord.log" &
      pids+=($!)
      for _ in $(seq 300); do grep -q "forge-node join " "$run/coord.out" 2> /dev/null && break; sleep 0.1; done
      if ! grep -q "forge-node join " "$run/coord.out"; then
        echo "bench_utilisation_netns.sh: the coordinator did not start; see $run/coord.log:" >&2
        tail -n 5 "$run/coord.out" "$run/coord.log" >&2
        exit 1
      fi
      read -r _ _ addr _ token <<< "$(grep "forge-node join " "$run/coord.out")"
      node_pids=()
      for ((i = 0; i < nodes; i++)); do
        RUST_LOG=warn ip netns exec "forge-ut-$i" "$bin/forge-node" join "$addr" --token "$token" \
          --workdir "$run/node$i" --listen "10.231.0.$((i + 1)):7700" --max-upload-mbps "$rate" \
          --threads "$threads" > "$run/node$i.out" 2> "$run/node$i.log" &
        node_pids+=($!); pids+=($!)
      done
      failed=0
      for p in "${node_pids[@]}"; do wait "$p" || failed=1; done
      kill "${pids[0]}" 2> /dev/null || true
      if ((failed)); then
        echo "$rate Mbit/s $codec overlap $overlap: a node failed; see $run/node*.log:" >&2
        tail -n 3 "$run"/node*.out "$run"/node*.log >&2
        exit 1
      fi
      python3 - "$run" "$nodes" "$rate" "$codec" "$overlap" << 'PY'
import json, statistics, sys
run, nodes, rate, codec, overlap = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
parts = ["step_s", "eval_s", "checkpoint_s", "outer_sync_s", "waiting_s", "state_fetch_s", "other_s"]
utils, syncs, waits, sent, steps = [], [], [], [], []
for i in range(nodes):
    rows = [json.loads(l) for l in open(f"{run}/node{i}/run/rounds.jsonl")]
    first, last = rows[0]["phases"], rows[-2]["phases"]
    span = {k: last[k] - first[k] for k in parts}
    n = len(rows) - 2
    utils.append(span["step_s"] / sum(span.values()))
    syncs.append(span["outer_sync_s"] / n)
    waits.append(span["waiting_s"] / n)
    sent.append(statistics.mean(r["bytes_sent"] for r in rows[1:-1]) / 1e6)
    inner = sum(r["inner_steps"] for r in rows[1:-1])
    steps.append(span["step_s"] / inner)
print(f"{rate:<6} {codec:<6} {overlap:<8} {100 * min(utils):9.1f}% {100 * statistics.mean(utils):9.1f}% "
      f"{statistics.mean(syncs):8.2f} {statistics.mean(waits):8.2f} {statistics.mean(sent):12.2f} "
      f"{statistics.mean(steps):10.3f}")
PY
    done
  done
done
