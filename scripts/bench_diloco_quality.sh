#!/usr/bin/env bash
# DiLoCo quality against what a user had before and what the same tokens buy synchronously,
# measured in the same run at equal per-node batch and inner steps:
#   1. one node alone: configs/tiny-cpu.toml, batch 16, STEPS steps;
#   2. synchronous: one node with NODES x the batch for STEPS steps (the same tokens as 3);
#   3. DiLoCo: a coordinator and NODES nodes train configs/diloco-tiny-cpu.toml for STEPS inner
#      steps each with the given codec, H and outer optimizer.
# Prints the three final validation losses (whole validation sample), DiLoCo / synchronous and
# the share of the synchronous gain kept, (one node - DiLoCo) / (one node - synchronous): 1 when
# DiLoCo matches synchronous training, 0 when adding nodes did not help, negative when it hurt.
#
#   scripts/bench_diloco_quality.sh [--nodes 4] [--steps 150] [--codec int8] [--inner H]
#                                   [--outer-lr LR] [--momentum M] [--scaling none|sqrt-members|norm-ratio]
#                                   [--lr 3e-3] [--sync-warmup 0]
#                                   [--overlap 0] [--pace auto|fixed] [--data tinystories|wikipedia]
#                                   [--diloco 'key = value' ...] [--warmup STEPS]
#                                   [--density 0.015625] [--bits 2]
#                                   [--optimizer adamw|muon|adafactor] [--ns-precision auto|bf16|fp32]
#                                   [--seed 1234 | --seeds "1234 1 2 3"]
#                                   [--skip-baseline | --skip-diloco]
# --inner, --outer-lr and --momentum set [diloco] inner_steps, outer_lr and outer_momentum
# (default: configs/diloco-tiny-cpu.toml's, the demo's), --scaling outer_lr_scaling (default none;
# sqrt-members: the outer lr times the square root of the members, such runs say -sqrtk in their
# directory's name; norm-ratio: times the members' mean norm over their average's, -ratio);
# --diloco (repeatable) sets any other
# [diloco] key (e.g. --diloco 'nesterov = false');
# --density and --bits set topk's share of values kept and bits per value (with --codec topk);
# --overlap sets [diloco] overlap_steps (inner steps that train while the outer sync runs);
# --pace fixed gives every node H steps whatever its speed (runs that do not depend on load);
# --data wikipedia trains on ../shared/data/wikipedia (enwiki-train-1.txt, never read twice in
# runs of up to 4 x 2,000 steps) and validates on 200 batches of enwiki-valid.txt.
# --lr sets the peak inner learning rate of all runs (default: the configs' 3e-3), --warmup their
# warmup steps (default: a fifth of STEPS); --seed sets the seed of all runs (initialisation and
# data order; default: the configs' 1234). --seeds repeats the runs once per seed and then prints
# the means, the ratios of the means and the spread of the per-seed ratios: single runs of this
# size differ by 1-2% from seed to seed. --optimizer sets [train.optimizer] kind of all three runs
# (MuLoCo: DiLoCo with Muon as the inner optimizer); --ns-precision its [train.optimizer.muon]
# ns_precision (default auto: fp32 on a CPU; the Muon records before 2026-12-08 were bf16).
# The two baselines do not depend on the DiLoCo settings: a finished one with the same config
# and the same forge-node binary (runs/quality/base-*) is reused; --skip-baseline leaves them
# out, --skip-diloco runs only them.
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
source "$(dirname "$self")/env.sh"
cd "$FORGE_ROOT"

nodes=4 steps=150 codec=int8 inner="" outer_lr="" momentum="" scaling=none lr=3e-3 warm=0 seed=1234 seeds="" baseline=1 diloco=1 optimizer=adamw
overlap=0 pace=auto data=tinystories warmup="" extras=() density=0.015625 bits=2 ns=""
args=("$@")
while (($#)); do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --codec) codec=$2; shift 2 ;;
    --inner) inner=$2; shift 2 ;;
    --outer-lr) outer_lr=$2; shift 2 ;;
    --momentum) momentum=$2; shift 2 ;;
    --scaling) scaling=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --sync-warmup) warm=$2; shift 2 ;;
    --overlap) overlap=$2; shift 2 ;;
    --density) density=$2; shift 2 ;;
    --bits) bits=$2; shift 2 ;;
    --pace) pace=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --diloco) extras+=("$2"); shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --optimizer) optimizer=$2; shift 2 ;;
    --ns-precision) ns=$2; shift 2 ;;
    --skip-baseline) baseline=0; shift ;;
    --skip-diloco) diloco=0; shift ;;
    -h|--help) sed -n '2,41p' "$self"; exit 0 ;;
    *) echo "bench_diloco_quality.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$codec" in
  fp32|bf16) compression="{ codec = \"$codec\" }" ;;
  int8|int4) compression="{ codec = \"$codec\", block_size = 256, zstd = 3 }" ;;
  topk) compression="{ codec = \"topk\", block_size = 4096, density = $density, bits = $bits }" ;;
  *) echo "bench_diloco_quality.sh: codec must be fp32, bf16, int8, int4 or topk" >&2; exit 2 ;;
esac
case "$optimizer" in adamw|muon|adafactor) ;; *) echo "bench_diloco_quality.sh: --optimizer must be adamw, muon or adafactor" >&2; exit 2 ;; esac
# The inner optimizer of all three runs: [train.optimizer] appended to each config, in place of
# any the config has.
with_optimizer() {
  awk '/^\[/ { skip = ($0 == "[train.optimizer]") } !skip'
  [[ "$optimizer" == adamw ]] || printf '\n[train.optimizer]\nkind = "%s"\n' "$optimizer"
  [[ -z "$ns" ]] || printf '\n[train.optimizer.muon]\nns_precision = "%s"\n' "$ns"
}
case "$ns" in ""|auto|bf16|fp32) ;; *) echo "bench_diloco_quality.sh: --ns-precision must be auto, bf16 or fp32" >&2; exit 2 ;; esac
case "$pace" in auto|fixed) ;; *) echo "bench_diloco_quality.sh: --pace must be auto or fixed" >&2; exit 2 ;; esac
for e in "${extras[@]}"; do
  [[ "$e" =~ ^[a-z_]+\ *=\ *[^=]+$ ]] || { echo "bench_diloco_quality.sh: --diloco takes 'key = value', got '$e'" >&2; exit 2; }
done
# sed edits that point a config at the corpus.
case "$data" in
  tinystories) data_edits=() ;;
  wikipedia) data_edits=(-e "s#^train = .*#train = \"../shared/data/wikipedia/enwiki-train-1.txt\"#"
                         -e "s#^val = .*#val = \"../shared/data/wikipedia/enwiki-valid.txt\"#"
                         -e "s/^batches = 0/batches = 200/") ;;
  *) echo "bench_diloco_quality.sh: --data must be tinystories or wikipedia" >&2; exit 2 ;;
esac
[[ -n "${FORGE_BIN:-}" ]] || scripts/setup.sh >&2
bin=${FORGE_BIN:-target/release}
if [[ -n "$seeds" ]]; then
  ((baseline && diloco)) || { echo "bench_diloco_quality.sh: --seeds compares the runs; drop --skip-*" >&2; exit 2; }
  log=$(mktemp); trap 'rm -f "$log"' EXIT
  # The trailing --seeds "" makes each run a single-seed one; FORGE_BIN skips the setup there.
  for s in $seeds; do FORGE_BIN=$bin "$self" "${args[@]}" --seed "$s" --seeds "" | tee -a "$log"; done
  python3 - "$log" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
def losses(pattern):
    return {s: float(v) for s, v in re.findall(pattern, text, re.M)}
dil = losses(r"^diloco .* seed=(\S+): val loss ([0-9.]+)")
syn = losses(r"^synchronous .* seed (\S+)\): val loss ([0-9.]+)")
one = losses(r"^one node alone .* seed (\S+)\): val loss ([0-9.]+)")
seeds = [s for s in dil if s in syn and s in one]
n = len(seeds)
mean = lambda xs: statistics.mean(xs)
d, y, o = (mean(x[s] for s in seeds) for x in (dil, syn, one))
ratios = [100 * (dil[s] / syn[s] - 1) for s in seeds]
shares = [(one[s] - dil[s]) / (one[s] - syn[s]) for s in seeds]
print(f"over {n} seeds ({' '.join(seeds)}): one node alone {o:.4f}, synchronous {y:.4f}, diloco {d:.4f}")
print(f"means: diloco / synchronous {d / y:.4f} ({100 * (d / y - 1):+.2f}%), diloco / one node "
      f"{d / o:.4f} ({100 * (d / o - 1):+.2f}%), share of the synchronous gain kept {(o - d) / (o - y):.2f}")
print("per seed, diloco / synchronous: " + ", ".join(f"{r:+.2f}%" for r in ratios)
      + "; share kept: " + ", ".join(f"{r:.2f}" for r in shares))
if n > 1:
    # Student's t, two-sided 95%, for n - 1 degrees of freedom.
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}.get(n - 1, 2.23)
    for name, xs, unit in (("diloco / synchronous", ratios, "%"), ("share kept", shares, "")):
        m, half = statistics.mean(xs), t * statistics.stdev(xs) / n ** 0.5
        print(f"95% interval of the mean {name}: {m - half:+.2f}{unit} .. {m + half:+.2f}{unit}")
PY
  exit 0
fi
((baseline || diloco)) || { echo "bench_diloco_quality.sh: --skip-baseline and --skip-diloco leave nothing to run" >&2; exit 2; }
suffix=""
[[ "$data" == tinystories ]] || suffix=$suffix-$data
[[ "$seed" == 1234 ]] || suffix=$suffix-seed$seed
[[ "$optimizer" == adamw ]] || suffix=$suffix-$optimizer
[[ -z "$ns" ]] || suffix=$suffix-ns$ns
[[ -z "$warmup" || "$warmup" == $(( steps / 5 )) ]] || suffix=$suffix-wu$warmup
warmup=${warmup:-$(( steps / 5 ))}

# One node training configs/tiny-cpu.toml with batch 16 x $1 for $steps steps; prints its final
# validation loss. A finished run of the same config is reused.
baseline_loss() {
  local batch=$((16 * $1)) dir=runs/quality/base-b$((16 * $1))-ilr$lr-s$steps$suffix
  local toml
  toml=$(sed -e "s#out_dir = \"runs/tiny-cpu\"#out_dir = \"$dir/run\"#" \
      -e "s/^batch_size = .*/batch_size = $batch/" \
      -e "s/^max_steps = .*/max_steps = $steps/" \
      -e "s/^lr = .*/lr = $lr/" \
      -e "s/^seed = 1234/seed = $seed/" \
      -e "s/^warmup_steps = .*/warmup_steps = $warmup/" \
      -e "s/^every = 100$/every = 100000/" \
      "${data_edits[@]}" \
      configs/tiny-cpu.toml | with_optimizer)
  # The same config trained by another build may end elsewhere (a change in the arithmetic):
  # a baseline is reused only from the same forge-node binary.
  local build
  build=$(sha256sum "$bin/forge-node" | cut -d' ' -f1)
  if [[ -f "$dir/run.out" && "$(cat "$dir/run.toml" 2>/dev/null)" == "$toml" ]] \
      && [[ "$(cat "$dir/build" 2>/dev/null)" == "$build" ]] \
      && grep -q "^validation loss" "$dir/run.out"; then
    echo "== one node, batch $batch x 128, $steps steps, lr $lr: reusing $dir" >&2
  else
    rm -rf "$dir"; mkdir -p "$dir"
    printf '%s\n' "$toml" > "$dir/run.toml"
    echo "$build" > "$dir/build"
    echo "== one node, batch $batch x 128, $steps steps, lr $lr" >&2
    RUST_LOG=warn "$bin/forge-node" train --config "$dir/run.toml" --no-resume > "$dir/run.out" 2> "$dir/run.log"
  fi
  sed -n 's/^validation loss \([0-9.]*\).*/\1/p' "$dir/run.out"
}

if ((baseline)); then
  one_loss=$(baseline_loss 1)
  one_line="one node alone (batch 16, lr $lr, seed $seed): val loss $one_loss"
  sync_loss=$(baseline_loss "$nodes")
  sync_line="synchronous (1 node, ${nodes}x batch, lr $lr, seed $seed): val loss $sync_loss"
  ((diloco)) || { echo "$one_line"; echo "$sync_line"; exit 0; }
fi

# The demo config's outer settings unless given.
config_value() { sed -n "s/^$1 = \(.*\)/\1/p" configs/diloco-tiny-cpu.toml; }
inner=${inner:-$(config_value inner_steps)}
outer_lr=${outer_lr:-$(config_value outer_lr)}
momentum=${momentum:-$(config_value outer_momentum)}
tag=""
for e in "${extras[@]}"; do tag=$tag-$(tr -d ' ' <<< "$e" | tr '=' '_'); done
work=runs/quality/$codec-h$inner-lr$outer_lr-m$momentum-n$nodes-ilr$lr-s$steps-w$warm$tag
case $scaling in
    sqrt-members) work=$work-sqrtk ;;
    norm-ratio) work=$work-ratio ;;
esac
((overlap == 0)) || work=$work-o$overlap
[[ "$density $bits" == "0.015625 2" ]] || work=$work-d$density-b$bits
[[ "$pace" == auto ]] || work=$work-$pace
work=$work$suffix
rm -rf "$work"; mkdir -p "$work"
extra_edits=()
for e in "${extras[@]}"; do
  key=${e%%=*}; key=${key// /}
  extra_edits+=(-e "/^$key = /d" -e "s/^\[diloco\]$/[diloco]\n$e/")
done
sed -e "s#out_dir = \"runs/diloco-tiny-cpu\"#out_dir = \"$work/diloco\"#" \
    -e "s/^max_steps = .*/max_steps = $steps/" \
    -e "s/^lr = .*/lr = $lr/" \
    -e "s/^seed = 1234/seed = $seed/" \
    -e "s/^warmup_steps = .*/warmup_steps = $warmup/" \
    -e "s/^inner_steps = .*/inner_steps = $inner/" \
    -e "s/^outer_lr = .*/outer_lr = $outer_lr/" \
    -e "s/^outer_momentum = .*/outer_momentum = $momentum/" \
    -e "s/^outer_lr_scaling = .*/outer_lr_scaling = \"$scaling\"/" \
    -e "s#^compression = .*#compression = $compression#" \
    -e "s/^eval_every_rounds = .*/eval_every_rounds = 100000/" \
    -e "s/^sync_warmup_steps = .*/sync_warmup_steps = $warm/" \
    -e "s/^min_replicas = .*/min_replicas = $nodes/" \
    -e "s/^start_replicas = .*/start_replicas = $nodes/" \
    -e "s/^overlap_steps = .*/overlap_steps = $overlap/" \
    -e "s/^pace = .*/pace = \"$pace\"/" \
    "${extra_edits[@]}" \
    "${data_edits[@]}" \
    configs/diloco-tiny-cpu.toml | with_optimizer > "$work/diloco.toml"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
"$bin/forge-coordinator" serve --config "$work/diloco.toml" --listen 127.0.0.1:0 --state-dir "$work/coord" \
  > "$work/coord.out" 2> "$work/coord.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "forge-node join " "$work/coord.out" 2>/dev/null && break; sleep 0.1; done
read -r _ _ addr _ token <<< "$(grep "forge-node join " "$work/coord.out")" \
  || { cat "$work/coord.log" >&2; echo "bench_diloco_quality.sh: the coordinator did not start" >&2; exit 1; }
echo "== $nodes nodes, $codec, H=$inner, outer lr $outer_lr, momentum $momentum ${extras[*]}, $steps inner steps each" >&2
node_pids=()
for i in $(seq "$nodes"); do
  RUST_LOG=warn "$bin/forge-node" join "$addr" --token "$token" --workdir "$work/node$i" \
    --listen 127.0.0.1:0 > "$work/node$i.out" 2> "$work/node$i.log" &
  node_pids+=($!); pids+=($!)
done
for p in "${node_pids[@]}"; do wait "$p"; done
diloco_loss=$(sed -n 's/^final validation loss \([0-9.]*\).*/\1/p' "$work/node1.out")
sent=$(python3 -c "
import json; r=[json.loads(l) for l in open('$work/node1/run/rounds.jsonl')]
print(f\"{sum(x['bytes_sent'] for x in r)/len(r)/1e6:.2f} MB per outer step ({100*sum(x['bytes_sent'] for x in r)/sum(x['fp32_bytes'] for x in r):.1f}% of fp32), {sum(x['sync_s'] for x in r)/len(r):.2f} s sync\")")
echo "diloco $nodes nodes $codec H=$inner outer_lr=$outer_lr scaling=$scaling momentum=$momentum ${extras[*]:+${extras[*]} }lr=$lr sync_warmup=$warm overlap=$overlap pace=$pace data=$data seed=$seed: val loss $diloco_loss; $sent"
if ((baseline)); then
  echo "$one_line"
  echo "$sync_line"
  python3 -c "
d, y, o = $diloco_loss, $sync_loss, $one_loss
print(f'diloco / synchronous: {d / y:.4f} ({100 * (d / y - 1):+.2f}%); diloco / one node alone: {d / o:.4f} ({100 * (d / o - 1):+.2f}%); share of the synchronous gain kept: {(o - d) / (o - y):.2f}')"
fi
