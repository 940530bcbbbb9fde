#!/usr/bin/env bash
# Wall-clock seconds per training step before and after the run's first checkpoint exists, and
# their ratio (target: 1.0 within 5%; nothing on the step path may read checkpoint files).
# `forge-node train` on configs/tiny-cpu.toml with another preset, micro-batches of --batch
# sequences of 128 tokens, a checkpoint every --every steps, no eval until the end; the per-step
# wall clock comes from metrics.jsonl (`elapsed_s`), the save steps themselves left out.
#   scripts/bench_steps_after_checkpoint.sh [--preset gpt2-124m] [--batch 2] [--every 8] [--steps 24]
#                                           [--bin target/release/forge-node]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"
preset=gpt2-124m batch=2 every=8 steps=24 bin=target/release/forge-node
while (($#)); do
  case $1 in
    --preset) preset=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d /tmp/forge-bench-ckpt.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work" "$preset" "$batch" "$every" "$steps" <<'PY'
import re, sys
work, preset, batch, every, steps = sys.argv[1:]
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
]
for pattern, line in edits:
    text, n = re.subn(pattern, line, text, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"configs/tiny-cpu.toml no longer has {pattern}")
# [eval] every (first), then [checkpoint] every.
text = re.sub(r'^every = .*$', 'every = 100000', text, count=1, flags=re.M)
text = re.sub(r'^every = 100$', f'every = {every}', text, count=1, flags=re.M)
open(f"{work}/run.toml", "w").write(text)
PY
echo "forge-node train: preset $preset, batch $batch x 128 tokens, a checkpoint every $every steps, $steps steps"
"$bin" train --config "$work/run.toml" --no-resume > "$work/train.out" 2> "$work/train.log" \
  || { cat "$work/train.log" >&2; exit 1; }
du -sh "$work"/run/checkpoints/* | tail -1 | sed 's/^/checkpoint size: /'
python3 - "$work/run/metrics.jsonl" "$every" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"step"')]
every = int(sys.argv[2])
elapsed = {r["step"]: r["elapsed_s"] for r in rows}
step_s = {s: elapsed[s] - elapsed[s - 1] for s in elapsed if s - 1 in elapsed}
before = [t for s, t in step_s.items() if 2 <= s <= every]
after = [t for s, t in step_s.items() if s > every + 1 and s % every not in (0, 1)]
if not before or not after:
    raise SystemExit("too few steps around the first checkpoint: raise --steps")
b, a = statistics.median(before), statistics.median(after)
print(f"median wall s/step: before the first checkpoint {b:.4f} ({len(before)} steps), "
      f"after it {a:.4f} ({len(after)} steps); after / before {a / b:.3f}")
PY
