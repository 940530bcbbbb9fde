#!/usr/bin/env bash
# The main job: set up, then train a small model with DiLoCo on this machine the way it runs on
# a LAN: a coordinator and two nodes (separate processes talking QUIC over 127.0.0.1) train on
# the TinyStories sample, averaging int8-compressed outer gradients every 25 inner steps. Each
# round prints loss, validation loss, bytes sent and sync time; at the end a node prints a story
# and everything stops. A few minutes on two CPU cores.
# With --pipeline, the same run with the model split in two pipeline stages: four nodes, each
# told it has 38 MB (`--memory-limit`), which holds half the model but not all of it, so the
# coordinator plans two pipelines of two stages; micro-batches of 4 sequences go through each
# pipeline over libp2p, and the nodes holding the same stage average it every round.
# With --compare (the default config only), then the two runs the demo is judged against, at its
# per-node batch, inner steps and seed (scripts/bench_diloco_quality.sh; a few more minutes):
# one node alone, and one node with twice the batch (the synchronous equivalent of two nodes);
# then the three final validation losses and the share of the synchronous gain the demo kept.
#   scripts/demo.sh [--pipeline] [--compare] [CONFIG]     (default configs/diloco-tiny-cpu.toml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

pipeline=0 compare=0
while [[ ${1:-} == --* ]]; do
  case "$1" in
    --pipeline) pipeline=1 ;;
    --compare) compare=1 ;;
    *) echo "demo.sh: unknown option '$1' (--pipeline, --compare)" >&2; exit 2 ;;
  esac
  shift
done
if ((compare)) && { ((pipeline)) || [[ -n ${1:-} ]]; }; then
  echo "demo.sh: --compare runs the baselines of the default config's demo; drop --pipeline and CONFIG" >&2
  exit 2
fi
scripts/setup.sh
bin=target/release
config=${1:-configs/diloco-tiny-cpu.toml}
work=runs/demo
rm -rf "$work"
mkdir -p "$work"
node_count=2
node_args=()
if ((pipeline)); then
  # Micro-batches of 4 sequences: a step's batch flows through a pipeline in parts.
  sed 's/^micro_batch = .*/micro_batch = 4/' "$config" > "$work/run.toml"
  config=$work/run.toml
  node_count=4
  node_args=(--memory-limit 38MB)
fi

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
for ((i = 1; i <= node_count; i++)); do
  echo "== node $i: forge-node join $addr --token ... ${node_args[*]}"
  RUST_LOG=warn "$bin/forge-node" join "$addr" --token "$token" --workdir "$work/node$i" \
    --listen 127.0.0.1:0 "${node_args[@]}" 2> "$work/node$i.log" | sed -u "s/^/[node $i] /" &
  nodes+=($!)
  pids+=($!)
done
status=0
for pid in "${nodes[@]}"; do wait "$pid" || status=1; done
echo
echo "== done: per-round records in $work/node1/run/rounds.jsonl"
((status == 0 && compare)) || exit $status

value() { sed -n "s/^$1 = \([0-9.e-]*\).*/\1/p" "$config" | head -1; }
steps=$(value max_steps) warmup=$(value warmup_steps) lr=$(value lr) seed=$(value seed)
optimizer=$(awk '/^\[/ { t = $0 } t == "[train.optimizer]" && /^kind = / { gsub(/[" ]/, "", $3); print $3 }' "$config")
demo_loss=$(python3 -c "
import json
rounds = [json.loads(l) for l in open('$work/node1/run/rounds.jsonl')]
print(next(r['eval_loss'] for r in reversed(rounds) if 'eval_loss' in r))")
echo "== the baselines: one node alone, and one node with twice the batch ($steps steps each)"
baselines=$(FORGE_BIN=$bin scripts/bench_diloco_quality.sh --skip-diloco --nodes "$node_count" \
  --steps "$steps" --warmup "$warmup" --lr "$lr" --seed "$seed" --optimizer "${optimizer:-adamw}")
one=$(sed -n 's/^one node alone .*: val loss \([0-9.]*\)/\1/p' <<< "$baselines")
sync=$(sed -n 's/^synchronous .*: val loss \([0-9.]*\)/\1/p' <<< "$baselines")
python3 -c "
one, sync, demo = $one, $sync, $demo_loss
print(f'one node alone, batch 16:              {one:.4f}')
print(f'synchronous, one node with batch 32:   {sync:.4f}  (the same tokens as the demo)')
print(f'this demo, 2 nodes with DiLoCo:        {demo:.4f}  ({100 * (demo / one - 1):+.2f}% against one node alone, '
      f'{100 * (demo / sync - 1):+.2f}% against synchronous)')
print(f'share of the synchronous gain kept: {(one - demo) / (one - sync):.2f}  (1: as good as synchronous; 0: no better than one node)')"
