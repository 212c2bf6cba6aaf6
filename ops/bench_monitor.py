"""`jetfleet bench monitor`: how many simulated nodes the monitor handles, how
fast it notices the silent ones, and that it never cries wolf.

On an embedded nats-server, for each node count in --monitor-nodes, a
simulated fleet (this process; a heartbeat a second per node, GPU/process/jobs
telemetry every 10 s, one discovered job per node) runs against, in turn:

jetfleet  the real monitor process (`jetfleet run monitor --lost-after L`),
          which decodes every heartbeat, checks the stream before deciding,
          records each verdict by compare-and-set, loses the node's jobs and
          frees its leases
baseline  what a skilled engineer writes by hand: one core subscription on
          the heartbeat subject, a dict of last-seen times, a scan every
          100 ms, a plain message when a node passes L seconds of silence

After a warm-up, --monitor-silent nodes fall silent one by one across the
measuring window. Figures: heartbeats offered and handled per second (the
detector's own count), its CPU use and the nodes per CPU-second that implies,
detection latency from a node's last heartbeat the server confirmed to the
lost event arriving here (p50, p99; the ideal is L), missed detections, and
false alarms (lost events for nodes that never went silent: must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ops.benchkit import percentile, spawn

ROOT = Path(__file__).resolve().parent.parent
# Subjects private to the hand-written baseline detector (not part of jetfleet).
BASELINE_LOST = "benchbaseline.lost"
BASELINE_STATS = "benchbaseline.stats"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor-nodes", default="1000,2000", metavar="N,N",
                   help="monitor: simulated node counts, one run each (default 1000,2000)")
    p.add_argument("--monitor-lost-after", type=float, default=5.0, metavar="S",
                   help="monitor: --lost-after of the detectors (default 5)")
    p.add_argument("--monitor-window", type=float, default=20.0, metavar="S",
                   help="monitor: seconds measured per run (default 20)")
    p.add_argument("--monitor-silent", type=int, default=20, metavar="K",
                   help="monitor: nodes that fall silent per run (default 20)")


@dataclass
class Run:
    detector: str
    nodes: int
    offered: float = 0.0
    handled: float = 0.0
    cpu: float = 0.0  # fraction of one core
    latencies: list[float] = field(default_factory=list)
    missed: int = 0
    false_alarms: int = 0


# ---- the hand-written baseline detector (run as its own process) ----------------------------


async def _baseline(url: str, lost_after: float) -> None:
    import nats

    nc = await nats.connect(url)
    last: dict[str, float] = {}
    lost: set[str] = set()
    count = 0

    async def on(msg: Any) -> None:
        nonlocal count
        node = msg.subject.split(".")[1]
        last[node] = time.monotonic()
        lost.discard(node)
        count += 1

    async def stats(msg: Any) -> None:
        await msg.respond(json.dumps({"heartbeats": count}).encode())

    await nc.subscribe("telemetry.*.heartbeat", cb=on, pending_msgs_limit=1 << 20)
    await nc.subscribe(BASELINE_STATS, cb=stats)
    await nc.flush()
    print("ready", flush=True)
    while True:
        await asyncio.sleep(0.1)
        t = time.monotonic()
        for node, at in last.items():
            if t - at > lost_after and node not in lost:
                lost.add(node)
                await nc.publish(f"{BASELINE_LOST}.{node}", b"")


# ---- one run -----------------------------------------------------------------------------


async def _counter(bus: Any, detector: str, instance: str) -> int:
    from bus.control import request

    if detector == "baseline":
        msg = await bus.nc.request(BASELINE_STATS, b"", timeout=5)
        return int(json.loads(msg.data)["heartbeats"])
    info = await request(bus, "monitor", instance, "info", timeout=5)
    return int(info["heartbeats"])


async def _ready(bus: Any, detector: str, instance: str, proc: subprocess.Popen[bytes]) -> None:
    from bus.control import request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {detector} exited with {proc.returncode}")
        try:
            if detector == "baseline":
                await bus.nc.request(BASELINE_STATS, b"", timeout=1)
                return
            if (await request(bus, "monitor", instance, "info", timeout=1)).get("ready"):
                return
        except Exception:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the {detector} did not get ready")


async def _run(bus: Any, url: str, detector: str, nodes: int, args: argparse.Namespace,
               logs: Path) -> Run:
    from agents.node.fleet import FleetSimulator
    from bus import topology

    lost_after = args.monitor_lost_after
    instance = f"bench-{detector}-{nodes}-{random.randrange(16**4):04x}"
    env = {**os.environ, "JETFLEET_NATS_URL": url, "PYTHONPATH": str(ROOT),
           "JETFLEET_LOG": "WARNING"}
    argv = ([sys.executable, "-m", "ops.bench_monitor", "--baseline", url, str(lost_after)]
            if detector == "baseline" else
            [sys.executable, "-m", "ops.cli", "run", "monitor", "--instance-id", instance,
             "--lost-after", str(lost_after)])
    proc = spawn(argv, env, logs / f"{instance}.log")
    run = Run(detector, nodes)
    seen: dict[str, float] = {}

    async def on_lost(msg: Any) -> None:
        if detector == "baseline":
            node = msg.subject.rsplit(".", 1)[1]
        else:
            event = json.loads(msg.data)
            if event.get("kind") != "lost":
                return
            node = event["node"]
        seen.setdefault(node, time.monotonic())

    sub = await bus.nc.subscribe(f"{BASELINE_LOST}.*" if detector == "baseline"
                                 else topology.NODE_EVENTS_ALL, cb=on_lost)
    stop = asyncio.Event()
    sim = FleetSimulator(bus, nodes=nodes, gpus=8, interval=1.0,
                         prefix=f"b{detector[0]}{nodes}-{random.randrange(16**3):03x}",
                         metrics_every=10, jobs_per_node=1, job_churn=0.0, flap_per_min=0)
    try:
        await _ready(bus, detector, instance, proc)
        await sim.setup()
        task = asyncio.create_task(sim.run(stop))
        await asyncio.sleep(lost_after + 2)  # every node joined and heard
        cpu0 = sum(psutil.Process(proc.pid).cpu_times()[:2])
        hb0, handled0, t0 = sim.stats.heartbeats, await _counter(bus, detector, instance), \
            time.monotonic()
        silent = random.Random(nodes).sample(sim.nodes, min(args.monitor_silent, nodes))
        gap = args.monitor_window / max(1, len(silent))
        for node in silent:
            sim.silence(node, 10 * args.monitor_window)
            await asyncio.sleep(gap)
        t1 = time.monotonic()
        hb1, handled1 = sim.stats.heartbeats, await _counter(bus, detector, instance)
        cpu1 = sum(psutil.Process(proc.pid).cpu_times()[:2])
        await asyncio.sleep(lost_after + 3)  # the last one's detection
        stop.set()
        await task
        span = t1 - t0
        run.offered, run.handled = (hb1 - hb0) / span, (handled1 - handled0) / span
        run.cpu = (cpu1 - cpu0) / span
        names = {n.name for n in silent}
        ours = {n.name for n in sim.nodes}  # an earlier run's stopped fleet is lost too
        run.latencies = [seen[n.name] - n.last_beat for n in silent if n.name in seen]
        run.missed = sum(1 for n in silent if n.name not in seen)
        run.false_alarms = sum(1 for name in seen if name in ours and name not in names)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return run


async def _bench(args: argparse.Namespace) -> list[Run]:
    from bus.connection import connect
    from bus.server import EmbeddedServer
    from bus.settings import Settings

    counts = [int(n) for n in str(args.monitor_nodes).split(",") if n.strip()]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-monitor-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            bus = await connect(Settings(nats_url=server.url), name="bench-monitor")
            try:
                for n in counts:
                    for detector in ("baseline", "jetfleet"):
                        print(f"  {detector}: {n} nodes ...", flush=True)
                        runs.append(await _run(bus, server.url, detector, n, args, Path(tmp)))
            finally:
                await bus.close()
        finally:
            server.stop()
    return runs


def main(args: argparse.Namespace) -> int:
    print(f"monitor benchmark: heartbeats every 1 s, --lost-after {args.monitor_lost_after:g}, "
          f"{args.monitor_silent} nodes silenced per run over {args.monitor_window:g} s, "
          f"{os.cpu_count()} cores")
    runs = asyncio.run(_bench(args))
    print("\n| detector | nodes | offered hb/s | handled hb/s | CPU % of a core "
          "| nodes per CPU-s | lost p50 s | lost p99 s | missed | false alarms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        per_cpu = r.handled / r.cpu if r.cpu > 0 else float("inf")
        print(f"| {r.detector} | {r.nodes} | {r.offered:.0f} | {r.handled:.0f} | "
              f"{100 * r.cpu:.1f} | {per_cpu:.0f} | {percentile(r.latencies, 0.5):.2f} | "
              f"{percentile(r.latencies, 0.99):.2f} | {r.missed} | {r.false_alarms} |")
    mine = [r for r in runs if r.detector == "jetfleet"]
    ok = all(r.false_alarms == 0 and r.missed == 0 and r.handled >= 0.95 * r.offered for r in mine)
    bound = args.monitor_lost_after + 1.0
    within = all(percentile(r.latencies, 0.99) <= bound for r in mine)
    print(f"\njetfleet monitor: {'kept up' if ok else 'DID NOT keep up'} with every fleet "
          f"(handled >= 95% of offered, nothing missed, no false alarm); p99 detection "
          f"{'within' if within else 'BEYOND'} --lost-after + one heartbeat ({bound:g} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--baseline":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_baseline(sys.argv[2], float(sys.argv[3])))
