#!/usr/bin/env bash
# All-reduce speed over a shaped LAN: K processes, each in its own Linux network namespace,
# joined by veth pairs to a bridge (in a namespace of its own), every link shaped to the given
# rate in both directions with `tc qdisc ... tbf`. Each process is one member of
# `forge-node bench all-reduce` (fp32, QUIC); the script prints the slowest member's median round
# time divided by the ring bound 2(K-1)/K x payload / bandwidth (1.0 is perfect). With --pace,
# every member caps its upload at the link's rate (`--max-upload-mbps`, as a node does when it
# is told its uplink's rate); the bound stays the same. "cores at bound" adds up the members'
# CPU per round (user + system of their processes) over the bound: the cores all of them would
# keep busy at the bound; "CPU floor" divides that by this machine's cores, the ratio below which
# no round can go here whatever the protocol does (members on machines of their own each need
# their share only).
# With --what state: member 0 is a joiner fetching the global state (parameters + momentum,
# fp32) from the K-1 others (`forge-node bench state-transfer`), timed against the state's
# bytes over its link.
# With --what pipeline: the K members are the K stages of one pipeline (`forge-node bench
# pipeline`, --rounds measured steps of --micro-batches micro-batches each); stage 0 then trains
# the whole model alone on the same batches, and the script prints the pipeline's tokens/s
# against it, with the bytes each stage sent per token.
#
#   sudo scripts/bench_allreduce_netns.sh [--peers "2 4 8"] [--models "15m gpt2-124m"]
#                                         [--rate-mbit 1000] [--rounds 3] [--what allreduce|state|pipeline]
#                                         [--pace] [--micro-batches 4]
#
# Needs root (ip netns, tc). Uses 10.231.0.0/24 inside namespaces named forge-ar-*; touches
# nothing outside them and removes them on exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

peers_list="2 4 8" models="15m gpt2-124m" rate=1000 rounds=3 what=allreduce pace=0 micro=4
while (($#)); do
  case "$1" in
    --peers) peers_list=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --rate-mbit) rate=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --what) what=$2; shift 2 ;;
    --pace) pace=1; shift ;;
    --micro-batches) micro=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "bench_allreduce_netns.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
cap=()
case "$what" in
  allreduce) subcommand=all-reduce; bound="ring bound s"
    if ((pace)); then cap=(--max-upload-mbps "$rate"); fi ;;
  state) subcommand=state-transfer; bound="link bound s" ;;
  pipeline) subcommand=pipeline ;;
  *) echo "bench_allreduce_netns.sh: --what must be allreduce, state or pipeline" >&2; exit 2 ;;
esac
source "$FORGE_ROOT/scripts/netns_lan.sh"
lan_check bench_allreduce_netns.sh
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=${FORGE_BIN:-target/release}/forge-node
work=runs/bench-allreduce-netns
mkdir -p "$work"

max_peers=0
for k in $peers_list; do ((k > max_peers)) && max_peers=$k; done
trap 'lan_down forge-ar "$max_peers"' EXIT
lan_down forge-ar "$max_peers"
lan_up forge-ar "$max_peers" "$rate"

values_of() {
  case "$1" in
    15m) echo 15191712 ;;
    gpt2-124m) echo 124439808 ;;
    4m) echo 4718592 ;;
    *) echo "bench_allreduce_netns.sh: model must be 4m, 15m or gpt2-124m" >&2; exit 2 ;;
  esac
}

if ((pace)); then
  if [[ $what == allreduce ]]; then
    echo "every member caps its upload at $rate Mbit/s on the link (--max-upload-mbps)"
  else
    echo "bench_allreduce_netns.sh: --pace applies to --what allreduce only; the state fetch runs unpaced" >&2
  fi
fi
echo "this machine has $(nproc) cores"
if [[ $what == pipeline ]]; then
  printf '%-6s %6s %6s %10s %12s %12s %16s %8s %14s\n' model stages micro "step s" "tokens/s" \
    "whole step s" "whole tokens/s" ratio "bytes/token"
  for model in $models; do
    for k in $peers_list; do
      addrs=$(for ((i = 0; i < k; i++)); do printf '10.231.0.%d:7700,' $((i + 1)); done)
      addrs=${addrs%,}
      pids=()
      for ((i = 0; i < k; i++)); do
        RUST_LOG=warn ip netns exec "forge-ar-$i" "$bin" bench "$subcommand" --addrs "$addrs" \
          --rank "$i" --preset "$model" --steps "$rounds" --micro-batches "$micro" --threads 1 \
          --json > "$work/pipeline-$model-k$k-r$i.json" 2> "$work/pipeline-$model-k$k-r$i.log" &
        pids+=($!)
      done
      failed=0
      for p in "${pids[@]}"; do wait "$p" || failed=1; done
      if ((failed)); then
        echo "$model $k stages: a stage failed; see $work/pipeline-$model-k$k-r*.log:" >&2
        tail -n 3 "$work/pipeline-$model-k$k"-r*.log >&2
        exit 1
      fi
      python3 - "$work" "$model" "$k" "$micro" << 'EOF'
import json, statistics, sys
work, model, k, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rs = [json.load(open(f"{work}/pipeline-{model}-k{k}-r{i}.json")) for i in range(k)]
step = max(statistics.median(r["step_s"]) for r in rs)
whole = statistics.median(rs[0]["whole_step_s"])
tokens = rs[0]["tokens_per_step"]
sent = max(r["bytes_sent_per_step"] for r in rs) / tokens
print(f"{model:<6} {k:6d} {micro:6d} {step:10.3f} {tokens / step:12.0f} {whole:12.3f} "
      f"{tokens / whole:16.0f} {whole / step:8.2f} {sent:14.0f}")
EOF
    done
  done
  exit 0
fi
printf '%-10s %5s %12s %10s %12s %8s %15s %10s\n' model peers "payload MB" "median s" "$bound" \
  ratio "cores at bound" "CPU floor"
for model in $models; do
  values=$(values_of "$model")
  for k in $peers_list; do
    addrs=$(for ((i = 0; i < k; i++)); do printf '10.231.0.%d:7700,' $((i + 1)); done)
    addrs=${addrs%,}
    pids=()
    for ((i = 0; i < k; i++)); do
      RUST_LOG=warn ip netns exec "forge-ar-$i" "$bin" bench "$subcommand" --addrs "$addrs" --rank "$i" \
        --values "$values" --rounds "$rounds" --bandwidth-mbps "$rate" "${cap[@]}" --json \
        > "$work/$what-$model-k$k-r$i.json" 2> "$work/$what-$model-k$k-r$i.log" &
      pids+=($!)
    done
    failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    if ((failed)); then
      echo "$model $k peers: a member failed; see $work/$what-$model-k$k-r*.log:" >&2
      tail -n 3 "$work/$what-$model-k$k"-r*.log >&2
      exit 1
    fi
    python3 - "$work" "$what" "$model" "$k" "$(nproc)" << 'EOF'
import json, os, sys
work, what, model, k, ncores = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
paths = [f"{work}/{what}-{model}-k{k}-r{i}.json" for i in range(k)]
rs = [json.load(open(p)) for p in paths if os.path.getsize(p) > 0]
slowest = max(rs, key=lambda r: r["median_s"])
size = slowest.get("payload_bytes", slowest.get("state_bytes"))
bound = slowest.get("ring_bound_s", slowest.get("link_bound_s"))
cores, floor = "-", "-"
if all("cores_at_bound" in r for r in rs):
    total = sum(r["cores_at_bound"] for r in rs)
    cores, floor = f"{total:.2f}", f"{total / ncores:.2f}"
print(f"{model:<10} {k:5d} {size / 1e6:12.1f} {slowest['median_s']:10.3f} "
      f"{bound:12.3f} {slowest['ratio']:8.2f} {cores:>15} {floor:>10}")
EOF
  done
done
