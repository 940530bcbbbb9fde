#!/usr/bin/env bash
# What checkpoints cost the wall clock of `forge-node train` on configs/tiny-cpu.toml with another
# preset (micro-batches of --batch sequences of 128 tokens, a checkpoint every --every steps, no
# eval until the end), run twice: saves written in the step ([checkpoint] background = false) and
# in the background (true). Per-step wall clock from metrics.jsonl (`elapsed_s`). Prints: steps
# after the first checkpoint against steps before it, with saves in the step (target 1.0 within
# 5%: nothing on the step path reads checkpoint files); for both, how much longer the step after
# a save takes than an ordinary one (what the save blocks) and what a save costs in all until the
# next one; and the ratio of the runs' wall clocks.
# --threads N sets the step's libtorch threads ([train] threads; default: libtorch's choice, all
# cores): fewer than the cores leaves the background writer a core of its own. --device cuda:0
# trains on a GPU (bf16; the snapshot is then a copy into pinned host memory).
#   scripts/bench_steps_after_checkpoint.sh [--preset gpt2-124m] [--batch 2] [--every 8] [--steps 24]
#                                           [--threads N] [--device cpu] [--bin target/release/forge-node]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"
preset=gpt2-124m batch=2 every=8 steps=24 threads="" device=cpu bin=target/release/forge-node
while (($#)); do
  case $1 in
    --preset) preset=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d /tmp/forge-bench-ckpt.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work" "$preset" "$batch" "$every" "$steps" "$threads" "$device" <<'PY'
import re, sys
work, preset, batch, every, steps, threads, device = sys.argv[1:]
text = open("configs/tiny-cpu.toml").read()
edits = [
    (r'^preset = .*$', f'preset = "{preset}"'),
    (r'^out_dir = .*$', f'out_dir = "{work}/run"'),
    (r'^batch_size = .*$', f'batch_size = {batch}'),
    (r'^micro_batch = .*$', f'micro_batch = {batch}'),
    (r'^max_steps = .*$', f'max_steps = {steps}'),
    (r'^warmup_steps = .*$', 'warmup_steps = 2'),
    (r'^log_every = .*$', 'log_every = 1'),
    (r'^batches = .*$', 'batches = 1'),
    (r'^device = .*$', f'device = "{device}"'),
] + ([(r'^# threads = .*$', f'threads = {threads}')] if threads else []) \
  + ([(r'^# precision = .*$', 'precision = "bf16"')] if device != "cpu" else [])
for pattern, line in edits:
    text, n = re.subn(pattern, line, text, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"configs/tiny-cpu.toml no longer has {pattern}")
# [eval] every (first), then [checkpoint] every.
text = re.sub(r'^every = .*$', 'every = 100000', text, count=1, flags=re.M)
text = re.sub(r'^every = 100$', f'every = {every}', text, count=1, flags=re.M)
for background in ("false", "true"):
    t, n = re.subn(r'^background = .*$', f'background = {background}', text, count=1, flags=re.M)
    if n != 1:
        raise SystemExit("configs/tiny-cpu.toml no longer has [checkpoint] background")
    t = t.replace(f'out_dir = "{work}/run"', f'out_dir = "{work}/run-{background}"')
    open(f"{work}/run-{background}.toml", "w").write(t)
PY
echo "forge-node train on $device: preset $preset, batch $batch x 128 tokens, a checkpoint every $every steps, $steps steps, threads ${threads:-all cores}"
for background in false true; do
  "$bin" train --config "$work/run-$background.toml" --no-resume > "$work/train.out" 2> "$work/train.log" \
    || { cat "$work/train.log" >&2; exit 1; }
done
du -sh "$work"/run-true/checkpoints/* | tail -1 | sed 's/^/checkpoint size: /'
python3 - "$work" "$every" <<'PY'
import json, statistics, sys
work, every = sys.argv[1], int(sys.argv[2])

def steps(background):
    rows = [json.loads(l) for l in open(f"{work}/run-{background}/metrics.jsonl")
            if l.startswith('{"step"')]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    step_s = {s: elapsed[s] - elapsed[s - 1] for s in elapsed if s - 1 in elapsed}
    return step_s, max(elapsed.values())

# Saves written in the step: steps before the first checkpoint against steps after it (the
# save steps left out) say whether anything on the step path reads checkpoint files.
step_s, _ = steps("false")
before = [t for s, t in step_s.items() if 2 <= s <= every]
after = [t for s, t in step_s.items() if s > every + 1 and s % every not in (0, 1)]
if not before or not after:
    raise SystemExit("too few steps around the first checkpoint: raise --steps")
b, a = statistics.median(before), statistics.median(after)
print(f"saves in the step: median wall s/step before the first checkpoint {b:.4f} "
      f"({len(before)} steps), after it {a:.4f} ({len(after)} steps); after / before {a / b:.3f}")
# Each save runs between step s and s + 1 (s a multiple of --every): the step it blocks is s + 1,
# and a background writer slows the steps until it is done. Per save: the first step's excess
# over an ordinary step (before the first checkpoint), and the excess of every step until the
# next save.
walls = {}
for background in ("false", "true"):
    step_s, wall = steps(background)
    walls[background] = wall
    saves = sorted(s for s in step_s if s % every == 1 and s > 1 and s + every - 1 in step_s)
    blocked = statistics.median(step_s[s] - b for s in saves)
    cost = statistics.median(sum(step_s[t] - b for t in range(s, s + every)) for s in saves)
    print(f"background = {background}: the step after a save takes {blocked:.3f} s more than an "
          f"ordinary one; a save costs {cost:.3f} s of wall clock in all (median of {len(saves)}); "
          f"run wall clock {wall:.1f} s")
print(f"run wall clock, background / in the step: {walls['true'] / walls['false']:.3f}")
PY
