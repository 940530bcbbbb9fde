#!/usr/bin/env python3
"""Chaos run: a coordinator and N DiLoCo nodes on 127.0.0.1 train while faults are injected.

For --duration seconds, at seeded random moments, it SIGKILLs a node and starts it again
(same workdir), SIGSTOPs a node long enough for it to be declared dead and SIGCONTs it, and
restarts the coordinator once (same address and state dir). Then it lets the nodes finish their
budget and checks:
  - rounds keep completing after every fault;
  - every round's committed state hash is the same on every node that committed it;
  - every checkpoint shard on disk loads and its tensors match the committed hashes it records;
  - the final validation loss is within --tolerance of a fault-free run of the same config.
It prints the faults, rounds committed and abandoned, and each fault's recovery time (from the
fault to the next round committed with the affected node, or by anyone after a coordinator
restart).

With --netns (root), every process runs in its own Linux network namespace. Each node has two
links, one to a control bridge (the coordinator's side) and one to a peer bridge (the other
nodes), and partitions become faults too: a node's peer link taken down (cut off from the others
but not from the coordinator), its control link taken down (cut off from the coordinator but not
from the others), or both, for longer than the heartbeat timeout. At least one partition of each
of the first two kinds happens in every run. Then the checks above also show that no round was
closed by both sides of a partition: every committed round has one state hash everywhere.

With --full-disk MB (root), node 0's workdir is a tmpfs of that many MB: big enough for its
key and token caches, too small for a checkpoint shard, so its disk fills during the run. The
checks then also show that the others keep committing, and that node 0 neither exits silently
nor stops the run: it reports each shard it could not write and keeps training.

  scripts/chaos.py [--nodes 4] [--duration 90] [--seed 1] [--steps 150] [--small]
                   [--tolerance 0.03] [--pace fixed|auto] [--no-reference] [--netns]
                   [--full-disk MB]

--small shrinks the model input (32-token sequences, 8 per step, H=5) for a CI-sized run.

Both runs use pace = "fixed" (H steps per node per round) unless --pace auto: with auto, nodes
sharing these cores measure different speeds and each does its own number of steps a round,
which depends on the moment's load, and the loss no longer compares faults alone. Two fault-free
runs of the CI configuration with auto ended 4.55 and 4.73 (4% apart, --duration 0); with fixed
the fault-free run is repeatable to the bit, and three faulty netns runs ended within 0.6% of it.
Exit status 0 when every check passes.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --netns: namespaces forge-chaos-*, links on 10.77.1.0/24 (control) and 10.77.2.0/24 (peers).
NS_PREFIX = "forge-chaos-"
COORD_IP = "10.77.1.1"
COORD_PORT = 7701
ROUND = re.compile(r"^round\s+(\d+) \| (\d+) members \|.*\| (committed v\d+ \S+|committed without this node.*|abandoned.*)$")


def log(msg):
    print(f"chaos: {msg}", flush=True)


class Proc:
    """A child process whose stdout lines are kept with the time they arrived."""

    started = []  # every Proc, so none outlives the script however it ends

    def __init__(self, name, args, out_path, env):
        Proc.started.append(self)
        self.name = name
        self.lines = []  # (time, line)
        self.out = open(out_path, "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.out, env=env, text=True, cwd=ROOT)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append((time.monotonic(), line))
            self.out.write(line + "\n")
            self.out.flush()

    def wait_for(self, needle, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)
                for _, line in list(self.lines):
                    if needle in line:
                        return line
                break
            time.sleep(0.05)
        raise SystemExit(f"chaos: {self.name}: no line with {needle!r}; see {self.out.name}")

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()
            self.thread.join(timeout=5)


def write_config(work, nodes, steps, small, pace):
    text = (ROOT / "configs/diloco-tiny-cpu.toml").read_text()
    edits = [
        ('pace = "auto"', f'pace = "{pace}"'),
        ('out_dir = "runs/diloco-tiny-cpu"', f'out_dir = "{work}/unused"'),
        ("max_steps = 300", f"max_steps = {steps}"),
        ("warmup_steps = 60", f"warmup_steps = {max(2, steps // 10)}"),
        ("eval_every_rounds = 20", "eval_every_rounds = 100000"),
        ("heartbeat_interval_ms = 500", "heartbeat_interval_ms = 250"),
        ("heartbeat_timeout_ms = 5000", "heartbeat_timeout_ms = 2000"),
        ("start_replicas = 2", f"start_replicas = {nodes}"),
        ("checkpoint_every_rounds = 0", "checkpoint_every_rounds = 2"),
        ("round_deadline_ms = 600000", "round_deadline_ms = 60000"),
    ]
    if small:
        edits += [
            ("seq_len = 128", "seq_len = 32"),
            ("batch_size = 16", "batch_size = 8"),
            ("micro_batch = 16", "micro_batch = 8"),
            ("inner_steps = 5\n", "inner_steps = 5\n"),
            ("batches = 0", "batches = 4"),
        ]
    else:
        edits += [("inner_steps = 5\n", "inner_steps = 10\n")]
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"chaos: configs/diloco-tiny-cpu.toml no longer has {old!r}")
        text = text.replace(old, new, 1)
    path = work / "run.toml"
    path.write_text(text)
    return path


class Cluster:
    def __init__(self, work, config, nodes, bin_dir, net=None, node_args=()):
        self.work, self.config, self.bin, self.net = work, config, bin_dir, net
        self.node_args = list(node_args)  # more `forge-node join` arguments for every node
        self.env = dict(os.environ, RUST_LOG="warn")
        self.env.pop("LD_LIBRARY_PATH", None)
        self.coordinator = None
        self.addr = self.token = None
        self.nodes = [None] * nodes
        self.history = [[] for _ in range(nodes)]  # every Proc a node slot has had

    def _in(self, ns, argv):
        return argv if self.net is None else ["ip", "netns", "exec", ns] + argv

    def start_coordinator(self):
        default = "127.0.0.1:0" if self.net is None else f"{COORD_IP}:{COORD_PORT}"
        listen = self.addr or default
        self.coordinator = Proc(
            "coordinator",
            self._in(NS_PREFIX + "coord",
                     [str(self.bin / "forge-coordinator"), "serve", "--config", str(self.config),
                      "--listen", listen, "--state-dir", str(self.work / "coord")]),
            self.work / "coord.out", self.env)
        line = self.coordinator.wait_for("forge-node join ", 60)
        words = line.split()
        self.addr, self.token = words[2], words[4]

    def start_node(self, i):
        listen = "127.0.0.1:0" if self.net is None else f"{self.net.peer_ip(i)}:0"
        proc = Proc(
            f"node{i}",
            self._in(self.net.node_ns(i) if self.net else "",
                     [str(self.bin / "forge-node"), "join", self.addr, "--token", self.token,
                      "--workdir", str(self.work / f"node{i}"), "--listen", listen]
                     + self.node_args),
            self.work / f"node{i}.out", self.env)
        self.nodes[i] = proc
        self.history[i].append(proc)

    def stop_all(self):
        for proc in self.nodes + [self.coordinator]:
            if proc is not None:
                if proc.alive():
                    proc.kill(signal.SIGCONT)
                proc.kill()


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Netns:
    """A coordinator namespace and one per node, wired through two bridges in a hub namespace:
    the control bridge (nodes <-> coordinator) and the peer bridge (nodes <-> nodes). A partition
    takes a node's hub-side link down, as if its cable were pulled at the switch."""

    def __init__(self, nodes):
        self.made = set()
        self.nodes = nodes
        self.hub = NS_PREFIX + "hub"
        self.cleanup()
        self._add(self.hub)
        for br in ("brc", "brp"):
            sh("ip", "-n", self.hub, "link", "add", br, "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", br, "up")
        self._attach(NS_PREFIX + "coord", "ctl", "fcc", "brc", f"{COORD_IP}/24")
        for i in range(nodes):
            self._attach(self.node_ns(i), "ctl", f"fc{i}", "brc", f"10.77.1.{10 + i}/24")
            self._attach(self.node_ns(i), "p2p", f"fp{i}", "brp", f"{self.peer_ip(i)}/24")

    def _add(self, ns):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.made.add(ns)

    def _attach(self, ns, dev, hub_dev, bridge, addr):
        if ns not in self.made:
            self._add(ns)
        sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", hub_dev, "netns", self.hub)
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.hub, "link", "set", hub_dev, "master", bridge)
        sh("ip", "-n", self.hub, "link", "set", hub_dev, "up")

    @staticmethod
    def node_ns(i):
        return f"{NS_PREFIX}n{i}"

    @staticmethod
    def peer_ip(i):
        return f"10.77.2.{10 + i}"

    def shape(self, rate_mbit):
        """Caps every node's peer link at rate_mbit in both directions (tc tbf: a bucket of
        ~2 ms at the rate, a queue of ~20 ms, a switch port's buffer)."""
        burst = f"{max(rate_mbit * 1000 // 8 * 2, 16000)}b"
        for ns, dev in [(self.node_ns(i), "p2p") for i in range(self.nodes)] + \
                [(self.hub, f"fp{i}") for i in range(self.nodes)]:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", burst, "latency", "20ms")

    def link(self, i, which, up):
        """which: "peers" or "coordinator"."""
        dev = f"fp{i}" if which == "peers" else f"fc{i}"
        sh("ip", "-n", self.hub, "link", "set", dev, "up" if up else "down")

    def cleanup(self):
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(NS_PREFIX):
                subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)


def rounds_of(procs):
    """(time, round, members, outcome) of every per-round line of these processes."""
    out = []
    for proc in procs:
        for t, line in proc.lines:
            m = ROUND.match(line)
            if m:
                out.append((t, int(m.group(1)), int(m.group(2)), m.group(3)))
    return out


def progress(procs):
    """The furthest inner step any of these nodes has reported."""
    steps = [0]
    for proc in procs:
        for _, line in list(proc.lines):
            m = re.match(r"^round\s+\d+ \|.*\| steps\s+(\d+) \|", line)
            if m:
                steps.append(int(m.group(1)))
    return max(steps)


def tails(procs, n=15):
    """The last `n` lines each process printed, for a failure's message (the work directory
    of a test run is gone by the time anyone reads it)."""
    out = []
    for proc in procs:
        if proc is not None:
            proc.out.flush()
            out.append(f"--- {proc.name}, last {n} lines of stdout and stderr:")
            out.extend(Path(proc.out.name).read_text(errors="replace").splitlines()[-n:])
    return "\n".join(out)


def final_losses(procs):
    losses = []
    for proc in procs:
        for _, line in proc.lines:
            m = re.match(r"^final validation loss ([0-9.]+)", line)
            if m:
                losses.append(float(m.group(1)))
    return losses


def read_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"chaos: {path}: {name} is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        out[name] = body[start:end]
    return out


def check_checkpoints(work, nodes):
    """Every checkpoint shard: its outer tensors hash to the committed hashes it records."""
    checked, bad = 0, []
    for i in range(nodes):
        root = work / f"node{i}" / "run" / "diloco-checkpoints"
        if not root.is_dir():
            continue
        for ckpt in sorted(root.glob("step-*")):
            # A node killed while rotating old shards away (remove_dir_all) leaves one partly
            # deleted; nodes skip a shard whose files do not match its manifest, and so do we.
            if not (ckpt / "manifest.json").is_file() or not (ckpt / "outer.json").is_file():
                print(f"chaos: skipping incomplete shard {ckpt}")
                continue
            meta = json.loads((ckpt / "outer.json").read_text())
            committed = {}
            for t in meta["tensor_hashes"]:
                digest = t["digest"]
                committed[t["name"]] = bytes(digest) if isinstance(digest, list) else bytes.fromhex(digest)
            tensors = read_safetensors(ckpt / "outer.safetensors")
            for name, raw in tensors.items():
                plain = name[len("global."):] if name.startswith("global.") else name
                if committed.get(plain) != hashlib.sha256(raw).digest():
                    bad.append(f"{ckpt}: {name}")
            checked += 1
    return checked, bad


SHARD_SAID = re.compile(r"^round (\d+): checkpoint shard \d+ (written|not written)")


def check_full_disk(cluster):
    """Node 0 (its workdir on a tiny tmpfs) could not write a shard, said so, trained to the
    end, and another node wrote a later checkpoint."""
    failed = [int(m.group(1)) for _, line in cluster.history[0][0].lines
              if (m := SHARD_SAID.match(line)) and m.group(2) == "not written"]
    if not failed:
        return ["node 0 never failed to write a shard: its disk did not fill (lower --full-disk)"]
    print(f"node 0 could not write its checkpoint shard in rounds {failed}")
    problems = []
    if len(cluster.history[0]) != 1 or not any("final validation loss" in line for _, line in cluster.history[0][0].lines):
        problems.append("node 0 did not train to the end of the run after its disk filled")
    later = sorted({int(m.group(1)) for i in range(1, len(cluster.nodes)) for p in cluster.history[i]
                    for _, line in p.lines
                    if (m := SHARD_SAID.match(line)) and m.group(2) == "written" and int(m.group(1)) > failed[0]})
    print(f"checkpoint shards written by the other nodes after round {failed[0]}: rounds {later}")
    if not later:
        problems.append(f"no other node wrote a checkpoint after node 0 failed to in round {failed[0]}")
    return problems


def run_reference(args, work, bin_dir, net):
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    config = write_config(ref, args.nodes, args.steps, args.small, args.pace)
    cluster = Cluster(ref, config, args.nodes, bin_dir, net)
    cluster.start_coordinator()
    for i in range(args.nodes):
        cluster.start_node(i)
    deadline = time.monotonic() + args.finish_timeout
    for proc in cluster.nodes:
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    cluster.stop_all()
    losses = final_losses(cluster.nodes)
    if not losses:
        raise SystemExit(f"chaos: the fault-free reference run produced no final loss; see {ref}\n"
                         + tails([cluster.coordinator] + cluster.nodes))
    return sorted(losses)[len(losses) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--duration", type=float, default=90)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--small", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--pace", choices=["fixed", "auto"], default="fixed",
                   help="[diloco] pace of both runs (see the module docstring)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--finish-timeout", type=float, default=600)
    p.add_argument("--work", default="runs/chaos")
    p.add_argument("--netns", action="store_true", help="network namespaces and partitions (root)")
    p.add_argument("--full-disk", type=float, metavar="MB", help="node 0's workdir on a tmpfs this small (root)")
    args = p.parse_args()
    if args.nodes < 3:
        raise SystemExit("chaos: --nodes must be at least 3 (two must stay up while a third is hit)")
    bin_dir = Path(os.environ.get("FORGE_BIN", ROOT / "target/release"))
    if not (bin_dir / "forge-node").exists():
        raise SystemExit(f"chaos: {bin_dir}/forge-node not found; run scripts/setup.sh or set FORGE_BIN")
    work = (ROOT / args.work).resolve()
    small_disk = work / "faulty" / "node0"
    if args.full_disk is not None:
        if os.geteuid() != 0:
            raise SystemExit("chaos: --full-disk needs root (it mounts a tmpfs)")
        subprocess.run(["umount", str(small_disk)], stderr=subprocess.DEVNULL)
    shutil.rmtree(work / "faulty", ignore_errors=True)
    (work / "faulty").mkdir(parents=True)
    if args.full_disk is not None:
        small_disk.mkdir()
        sh("mount", "-t", "tmpfs", "-o", f"size={int(args.full_disk * 1024)}k", "tmpfs", str(small_disk))
    rng = random.Random(args.seed)
    net = None
    if args.netns:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise SystemExit("chaos: --netns needs root and iproute2 (ip netns, veth, bridges)")
        net = Netns(args.nodes)
    try:
        run(args, work, bin_dir, rng, net)
    finally:
        for proc in Proc.started:
            if proc.alive():
                proc.kill(signal.SIGCONT)
                proc.kill()
        if net is not None:
            net.cleanup()
        if args.full_disk is not None:
            subprocess.run(["umount", str(small_disk)], stderr=subprocess.DEVNULL)


def run(args, work, bin_dir, rng, net):
    reference = None if args.no_reference else run_reference(args, work, bin_dir, net)
    if reference is not None:
        log(f"fault-free reference: final validation loss {reference:.4f}")

    faulty = work / "faulty"
    config = write_config(faulty, args.nodes, args.steps, args.small, args.pace)
    cluster = Cluster(faulty, config, args.nodes, bin_dir, net)
    cluster.start_coordinator()
    for i in range(args.nodes):
        cluster.start_node(i)
        if i == 0 and args.full_disk is not None:
            # The first member is the first replica, which writes the first checkpoint.
            cluster.nodes[0].wait_for("joined ", 60)
    for proc in cluster.nodes:
        proc.wait_for("round    1 |", 120)

    faults = []  # (kind, node or None, time)
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.duration:
            time.sleep(rng.uniform(3, 8))
            # The coordinator restart comes first, unconditionally: the run is young, every node
            # lives through it, and a short or fast run cannot end before it happens.
            if not faults:
                kind = "coordinator"
            elif not all(p.alive() for p in cluster.nodes) or progress(cluster.nodes) > 0.75 * args.steps:
                break  # the run is ending: a node hit now would find nobody left to rejoin
            elif net is not None and len(faults) <= 2:
                kind = ["cut from peers", "cut from coordinator"][len(faults) - 1]
            elif net is not None:
                kind = rng.choice(["kill", "stop", "cut from peers", "cut from coordinator", "cut off"])
            else:
                kind = rng.choice(["kill", "stop"])
            if kind == "coordinator":
                log("restarting the coordinator")
                cluster.coordinator.kill()
                t = time.monotonic()
                cluster.start_coordinator()
                faults.append(("coordinator restart", None, t))
            elif kind == "kill":
                i = rng.randrange(args.nodes)
                log(f"SIGKILL node {i}, then start it again")
                cluster.nodes[i].kill()
                t = time.monotonic()
                time.sleep(rng.uniform(0.5, 3))
                cluster.start_node(i)
                faults.append(("kill + restart", i, t))
            elif kind.startswith("cut"):
                i = rng.randrange(args.nodes)
                links = {"cut from peers": ["peers"], "cut from coordinator": ["coordinator"],
                         "cut off": ["peers", "coordinator"]}[kind]
                # Cut from the peers longer than an all-reduce's timeout (so a round fails and
                # the coordinator benches the node), from the coordinator longer than the
                # heartbeat timeout (so it is declared dead while its peers still reach it).
                length = {"cut from peers": rng.uniform(13, 17), "cut from coordinator": rng.uniform(4, 8),
                          "cut off": rng.uniform(6, 10)}[kind]
                log(f"partition: node {i} {kind} for {length:.1f} s")
                for which in links:
                    net.link(i, which, up=False)
                time.sleep(length)
                for which in links:
                    net.link(i, which, up=True)
                # Recovery counts from the moment the link is back.
                faults.append((kind, i, time.monotonic()))
            else:
                i = rng.randrange(args.nodes)
                pause = rng.uniform(3, 5)
                log(f"SIGSTOP node {i} for {pause:.1f} s")
                t = time.monotonic()
                cluster.nodes[i].kill(signal.SIGSTOP)
                time.sleep(pause)
                cluster.nodes[i].kill(signal.SIGCONT)
                faults.append(("stop / continue", i, t))
        log(f"faults over after {time.monotonic() - started:.0f} s; letting the nodes finish")
        deadline = time.monotonic() + args.finish_timeout
        for proc in cluster.nodes:
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        stuck = [p.name for p in cluster.nodes if p.alive()]
    finally:
        cluster.stop_all()

    all_procs = [p for h in cluster.history for p in h]
    rounds = rounds_of(all_procs)
    committed = {}
    mismatched = []
    for _, rnd, _, outcome in rounds:
        if outcome.startswith("committed v"):
            h = outcome.split()[2]
            if committed.setdefault(rnd, h) != h:
                mismatched.append(rnd)
    abandoned = {rnd for _, rnd, _, o in rounds if o.startswith("abandoned")}
    failures = []
    if stuck:
        failures.append(f"still running at the end: {', '.join(stuck)}")
    if mismatched:
        failures.append(f"rounds committed with different state hashes on different nodes: {sorted(set(mismatched))}")

    print()
    print(f"faults injected: {len(faults)}")
    for kind, node, t in faults:
        procs = all_procs if node is None else cluster.history[node]
        later = [rt for rt, _, _, o in rounds_of(procs) if rt > t and o.startswith("committed v")]
        others = {r for rt, r, _, o in rounds if rt > t and o.startswith("committed v")}
        who = f"node {node}" if node is not None else "coordinator"
        if later:
            since = " after the link came back" if kind.startswith("cut") else ""
            print(f"  {kind:<20} {who:<12} recovered in {min(later) - t:6.1f} s{since}")
        elif len(others) < 2:
            print(f"  {kind:<20} {who:<12} the run ended before it could rejoin")
        else:
            print(f"  {kind:<20} {who:<12} did NOT recover ({len(others)} rounds committed without it)")
            failures.append(f"no round committed with {who} after its {kind}")
    print(f"rounds committed: {len(committed)}, abandoned: {len(abandoned - set(committed))}")
    checked, bad = check_checkpoints(faulty, args.nodes)
    print(f"checkpoint shards checked against their committed hashes: {checked}, bad: {len(bad)}")
    if checked == 0:
        failures.append("no checkpoint shard was written")
    failures += [f"checkpoint does not match its hashes: {b}" for b in bad]
    if args.full_disk is not None:
        failures += check_full_disk(cluster)
    losses = final_losses(cluster.nodes)
    if losses:
        final = sorted(losses)[len(losses) // 2]
        line = f"final validation loss (median of {len(losses)} nodes): {final:.4f}"
        if reference is not None:
            ratio = final / reference
            line += f"; fault-free {reference:.4f}; ratio {ratio:.4f}"
            if ratio > 1 + args.tolerance:
                failures.append(f"final loss {final:.4f} is more than {100 * args.tolerance:.0f}% above the fault-free {reference:.4f}")
        print(line)
    else:
        failures.append("no node reported a final validation loss")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        print(f"logs: {faulty}")
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
