#!/usr/bin/env bash
# The main job, for now: set up, show the model presets, then benchmark a training step of the
# 4m model on this machine against the identical PyTorch step and print the ratio.
# (Later this becomes the multi-node DiLoCo demo.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

scripts/setup.sh
node=target/release/forge-node
for preset in tiny 4m 15m gpt2-124m; do
  echo "== $preset"
  "$node" model info --preset "$preset"
done
echo
FORGE_NODE=$node scripts/bench_train_step.sh --preset 4m --batch 8 --seq 256 --steps 5 --repeats 2 "$@"
