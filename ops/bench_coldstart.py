"""`jetfleet bench coldstart`: job submitted -> handler entered, for a worker the
node agent starts on demand, beside workers that need no agent.

All on one embedded nats-server with a dispatcher process, the same tiny app
(its own import time is measured and taken out, as the goal excludes it):

running   the baseline: a worker already up and idle (`jetfleet run worker
          --app`), as a fleet that keeps everything warm would have it
by hand   the floor for a process started on demand: the same worker command
          spawned by the benchmark itself the moment it submits (no agent, no
          detection delay): what starting a Python worker costs on this host
agent     `jetfleet run agent --apps` with min = 0: the job waits on the bus,
          the agent sees it (doorbell or stream counts), spawns the worker,
          which connects, advertises and takes the job; between rounds the
          worker is stopped by the idle rule (idle_stop_s) and the next round
          starts cold again

The agent rows are split by its app_started events: submit -> spawn (the
agent's reaction), spawn -> ready (process start, imports, connect, advert,
on_start), ready -> handler (the first fetch). Goal: agent p50 under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.benchkit import percentile, spawn, stop

GOAL_S = 2.0
APP = """\
import time
_T0 = time.perf_counter()
from agents.worker import App, JobContext

app = App("coldbench")


@app.capability(type="bench.cold")
async def cold(ctx: JobContext, payload: dict) -> dict:
    return {"entered": time.time(), "worker": ctx.worker_id, "import_s": IMPORT_S}


IMPORT_S = time.perf_counter() - _T0
"""
APPS_TOML = """\
[[app]]
app = "coldbench:app"
min = 0
max = 1
idle_stop_s = 0.5
stop_grace_s = 5
"""
NODE = "bench-cold"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cold-rounds", type=int, default=5, metavar="N",
                   help="coldstart: cold starts measured per row (default 5)")


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)


def _env(url: str, folder: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (str(folder), root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "JETFLEET_NATS_URL": url, "PYTHONPATH": path,
            "JETFLEET_LOG": "WARNING"}


def _worker_argv(worker_id: str) -> list[str]:
    return [sys.executable, "-m", "ops.cli", "run", "worker", "--app", "coldbench:app",
            "--no-builtin", "--no-kernels", "--no-nvml", "--worker-id", worker_id]


async def _entered(client: Any, job_id: str, submitted: float) -> float:
    state = await client.wait(job_id, timeout=60)
    if state.state != "succeeded":
        raise RuntimeError(f"bench job {job_id} ended {state.state}: {state.error}")
    result = state.result
    return float(result["entered"]) - submitted - float(result["import_s"])


async def _gone(client: Any, prefix: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [a for a in await client.workers() if a.worker_id.startswith(prefix)]:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"workers {prefix}* still advertised after {timeout:g}s")


async def _advertised(client: Any, worker_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(a.worker_id == worker_id for a in await client.workers()):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"worker {worker_id} did not start within {timeout:g}s")


async def _running(client: Any, env: dict[str, str], folder: Path, rounds: int) -> Row:
    row = Row("worker already running (baseline)")
    proc = spawn(_worker_argv("bench-warm"), env, folder / "warm.log")
    try:
        await _advertised(client, "bench-warm")
        for _ in range(rounds + 1):
            t = time.time()
            row.seconds.append(await _entered(client, await client.submit("bench.cold", {}), t))
        row.seconds = row.seconds[1:]  # the first job also warms the client's path
    finally:
        stop([proc])
    await _gone(client, "bench-warm")
    return row


async def _by_hand(client: Any, env: dict[str, str], folder: Path, rounds: int) -> Row:
    row = Row("worker spawned by hand at submit (floor)")
    for i in range(rounds):
        t = time.time()
        proc = spawn(_worker_argv(f"bench-hand-{i}"), env, folder / f"hand-{i}.log")
        try:
            row.seconds.append(await _entered(client, await client.submit("bench.cold", {}), t))
        finally:
            stop([proc])
        await _gone(client, f"bench-hand-{i}")
    return row


async def _agent(client: Any, events: list[dict[str, Any]], rounds: int) -> Row:
    row = Row("started on demand by the agent")
    row.parts = {"submit -> spawn": [], "spawn -> ready": [], "ready -> handler": []}
    for _ in range(rounds):
        await _gone(client, f"{NODE}-")
        starts = len([e for e in events if e["kind"] == "app_started"])
        t = time.time()
        job = await client.submit("bench.cold", {})
        state = await client.wait(job, timeout=60)
        if state.state != "succeeded":
            raise RuntimeError(f"bench job {job} ended {state.state}: {state.error}")
        entered = float(state.result["entered"])
        row.seconds.append(entered - t - float(state.result["import_s"]))
        while len([e for e in events if e["kind"] == "app_started"]) <= starts:
            await asyncio.sleep(0.02)
        started = [e for e in events if e["kind"] == "app_started"][-1]
        spawned = started["spawned_at"]
        row.parts["submit -> spawn"].append(spawned - t)
        row.parts["spawn -> ready"].append(started["start_s"])
        row.parts["ready -> handler"].append(entered - spawned - started["start_s"])
        # The idle rule stops it: the next round starts cold.
        while not any(e["kind"] == "app_stopped" and e["ts"] > entered for e in events):
            await asyncio.sleep(0.05)
    return row


async def _measure(url: str, folder: Path, rounds: int) -> list[Row]:
    from nats.js.api import DeliverPolicy

    from bus import topology
    from sdk import Client

    env = _env(url, folder)
    dispatcher = spawn([sys.executable, "-m", "ops.cli", "run", "dispatcher"], env,
                       folder / "dispatcher.log")
    children = [dispatcher]
    try:
        async with await Client.connect(url) as client:
            rows = [await _running(client, env, folder, rounds),
                    await _by_hand(client, env, folder, rounds)]
            events: list[dict[str, Any]] = []

            async def on(msg: Any) -> None:
                events.append(json.loads(msg.data))

            sub = await client.bus.js.subscribe(topology.node_events(NODE), cb=on,
                                                ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.NEW)
            children.append(spawn([sys.executable, "-m", "ops.cli", "run", "agent", "--node",
                                   NODE, "--apps", str(folder / "apps.toml"), "--no-nvml",
                                   "--metrics-interval", "30"], env, folder / "agent.log"))
            await asyncio.sleep(2.0)  # the agent has probed the app (its one-time import)
            rows.append(await _agent(client, events, rounds))
            await sub.unsubscribe()
            return rows
    finally:
        stop(children)


def _fmt(values: list[float]) -> str:
    return f"{percentile(values, 0.5):7.3f}  {percentile(values, 0.9):7.3f}  {max(values):7.3f}"


def main(args: argparse.Namespace) -> int:
    from bus.server import EmbeddedServer

    rounds = max(1, args.cold_rounds)
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-coldstart-") as tmp:
        folder = Path(tmp)
        (folder / "coldbench.py").write_text(APP)
        (folder / "apps.toml").write_text(APPS_TOML)
        server = EmbeddedServer(folder / "nats")
        server.start()
        try:
            rows = asyncio.run(_measure(server.url, folder, rounds))
        finally:
            server.stop()
    print(f"cold start: job submitted -> handler entered, app import excluded "
          f"({rounds} rounds each, seconds; {os.cpu_count()} CPUs)")
    print(f"{'':44s}{'p50':>7s}  {'p90':>7s}  {'max':>7s}")
    for row in rows:
        print(f"{row.name:44s}{_fmt(row.seconds)}")
        for part, values in row.parts.items():
            print(f"  {part:42s}{_fmt(values)}")
    base, floor, agent = rows
    p50 = percentile(agent.seconds, 0.5)
    print(f"agent cold start p50 {p50:.3f}s: {p50 / percentile(base.seconds, 0.5):.0f}x a running "
          f"worker, +{p50 - percentile(floor.seconds, 0.5):.3f}s over spawning by hand; goal "
          f"under {GOAL_S:g}s: {'met' if p50 < GOAL_S else 'NOT met'}")
    return 0 if p50 < GOAL_S else 1
