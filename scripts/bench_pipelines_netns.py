#!/usr/bin/env python3
"""DiLoCo with pipelines against whole replicas, in network namespaces on shaped links (root).

Two runs of the same config per link rate, each a coordinator and its nodes in namespaces of
their own (scripts/chaos.py's wiring), every node's peer link capped with tc tbf:
  - whole: --whole nodes, each holding the whole model (one replica each);
  - pipelines: --stages x --whole nodes at --memory-limit, which holds a stage but not the whole
    model, so the coordinator plans --whole pipelines of --stages stages (micro-batches of
    --micro-batch sequences go through each pipeline).
Both train to the config's budget. Per run it prints the plan, the rounds committed, the wall
clock from the first round's start to the last commit, tokens/s over all replicas (from
node0's rounds.jsonl: the group's tokens per round), inner and sync seconds per round, the final
validation loss, and the pipelines' tokens/s as a ratio of the whole replicas'.

  sudo scripts/bench_pipelines_netns.py [--rates 1000,100] [--config configs/diloco-tiny-cpu.toml]
        [--whole 2] [--stages 2] [--memory-limit 38MB] [--micro-batch 4] [--max-steps 300]
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402  (the cluster and namespace wiring)

ROOT = chaos.ROOT


def write_config(work, config, micro_batch, max_steps):
    text = (ROOT / config).read_text()
    out = []
    for line in text.splitlines():
        if line.startswith("micro_batch = ") and micro_batch:
            line = f"micro_batch = {micro_batch}"
        if line.startswith("max_steps = ") and max_steps:
            line = f"max_steps = {max_steps}"
        out.append(line)
    text = "\n".join(out) + "\n"
    # Paths in the config are relative to the repository root, where the processes run.
    path = work / "run.toml"
    path.write_text(text)
    return path


def one_run(name, work, config, nodes, bin_dir, rate, node_args, timeout):
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    net = chaos.Netns(nodes)
    try:
        net.shape(rate)
        cluster = chaos.Cluster(work, config, nodes, bin_dir, net, node_args)
        cluster.start_coordinator()
        for i in range(nodes):
            cluster.start_node(i)
        deadline = time.monotonic() + timeout
        for proc in cluster.nodes:
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        cluster.stop_all()
        lines = [line for p in cluster.nodes for _, line in p.lines]
    finally:
        for proc in chaos.Proc.started:
            if proc.alive():
                proc.kill()
        net.cleanup()
    plan = sorted({line.split("gives this node ")[1] for line in lines if "gives this node " in line})
    finals = sorted({line.split()[3] for line in lines if line.startswith("final validation loss")})
    rows = [json.loads(l) for l in (work / "node0" / "run" / "rounds.jsonl").read_text().splitlines()]
    committed = [r for r in rows if r["outcome"].startswith("committed")]
    start = rows[0]["unix_ms"] / 1000 - rows[0]["inner_s"] - rows[0]["sync_s"]
    wall = committed[-1]["unix_ms"] / 1000 - start
    tokens = sum(r["group_tokens"] for r in committed)
    return {
        "name": name,
        "rate": rate,
        "plan": plan,
        "rounds": f"{len(committed)} of {len(rows)}",
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "inner_s": sum(r["inner_s"] for r in rows) / len(rows),
        "sync_s": sum(r["sync_s"] for r in rows) / len(rows),
        "final": finals,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1000,100", help="link rates in Mbit/s, comma-separated")
    p.add_argument("--config", default="configs/diloco-tiny-cpu.toml")
    p.add_argument("--whole", type=int, default=2, help="whole replicas, and pipelines")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--memory-limit", default="38MB")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=0, help="override [train] max_steps")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default="runs/bench-pipelines")
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("bench: network namespaces and tc need root and iproute2")
    bin_dir = Path(os.environ.get("FORGE_BIN", ROOT / "target/release"))
    if not (bin_dir / "forge-node").exists():
        raise SystemExit(f"bench: {bin_dir}/forge-node not found; run scripts/setup.sh or set FORGE_BIN")
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # The same micro-batches for both layouts, so they train on the same batches.
    config = write_config(work, args.config, args.micro_batch, args.max_steps)
    results = []
    for rate in [int(r) for r in args.rates.split(",")]:
        whole = one_run("whole", work / f"whole-{rate}", config, args.whole, bin_dir, rate, [], args.timeout)
        piped = one_run("pipelines", work / f"pipelines-{rate}", config, args.whole * args.stages, bin_dir,
                        rate, ["--memory-limit", args.memory_limit], args.timeout)
        piped["ratio"] = piped["tokens_per_s"] / whole["tokens_per_s"]
        for r in (whole, piped):
            results.append(r)
            print(f"{r['rate']:>5} Mbit/s {r['name']:<9} rounds {r['rounds']:<8} wall {r['wall_s']:7.1f} s "
                  f"tokens/s {r['tokens_per_s']:8.0f} inner {r['inner_s']:5.2f} s sync {r['sync_s']:5.2f} s "
                  f"final {','.join(r['final'])}" + (f"  ratio {r['ratio']:.2f}" if "ratio" in r else ""),
                  flush=True)
            for stage in r["plan"]:
                print(f"        {stage}")
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
