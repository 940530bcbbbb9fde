#!/usr/bin/env bash
# The main job: set up, then train a small model with DiLoCo on this machine the way it runs on
# a LAN: a coordinator and two nodes (separate processes talking QUIC over 127.0.0.1) train on
# the TinyStories sample, averaging int8-compressed outer gradients every 25 inner steps. Each
# round prints loss, validation loss, bytes sent and sync time; at the end a node prints a story
# and everything stops. A few minutes on two CPU cores.
#   scripts/demo.sh [CONFIG]     (default configs/diloco-tiny-cpu.toml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

scripts/setup.sh
bin=target/release
config=${1:-configs/diloco-tiny-cpu.toml}
work=runs/demo
rm -rf "$work"
mkdir -p "$work"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== coordinator ($config)"
"$bin/forge-coordinator" serve --config "$config" --listen 127.0.0.1:0 --state-dir "$work/coordinator" \
  > "$work/coordinator.out" 2> "$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q "forge-node join " "$work/coordinator.out" 2>/dev/null && break
  sleep 0.1
done
join_line=$(grep "forge-node join " "$work/coordinator.out") \
  || { cat "$work/coordinator.log" >&2; echo "demo: the coordinator did not start" >&2; exit 1; }
read -r _ _ addr _ token <<< "$join_line"
echo "coordinator at $addr; logs in $work/"

nodes=()
for i in 1 2; do
  echo "== node $i: forge-node join $addr --token ..."
  RUST_LOG=warn "$bin/forge-node" join "$addr" --token "$token" --workdir "$work/node$i" \
    --listen 127.0.0.1:0 2> "$work/node$i.log" | sed -u "s/^/[node $i] /" &
  nodes+=($!)
  pids+=($!)
done
status=0
for pid in "${nodes[@]}"; do wait "$pid" || status=1; done
echo
echo "== done: per-round records in $work/node1/run/rounds.jsonl"
exit $status
