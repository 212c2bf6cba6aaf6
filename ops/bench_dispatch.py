"""`jetfleet bench dispatch`: no-op jobs through the whole path, beside the raw
JetStream floor measured on the same server in the same run.

floor: what a skilled engineer writes by hand with nats-py: publish to a
       work-queue stream; a worker *process* fetches 256 at a time, publishes
       every result with `publish_async` (pipelined), waits for their acks,
       then acks the batch; the submitter counts results.
jetfleet: `echo` jobs published to `jobs.submit`, counted as `succeeded`
       events. By default through `jetfleet up` with its defaults (what users
       get: every component, on the server `up` started, where the floor runs
       too); `--via processes` runs just a dispatcher and --workers workers.
Both are measured flat out (jobs/s) and at a fixed offered rate (submit to
result latency p50/p99). Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js import api as js_api

from bus import topology
from bus.connection import Bus, connect
from bus.server import EmbeddedServer
from bus.settings import Settings
from ops.benchkit import percentile, spawn, stop
from schemas.common import new_id

FLOOR_STREAM = "BENCHFLOOR"

_FLOOR_WORKER = r"""
import asyncio, sys, nats
async def main(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe("benchfloor.work", durable="floor", stream="BENCHFLOOR")
    while True:
        try:
            msgs = await sub.fetch(batch=256, timeout=1)
        except Exception:
            continue
        for m in msgs:
            await js.publish_async("benchfloor.result", m.data)
        await js.publish_async_completed()
        for m in msgs:
            await m.ack()
asyncio.run(main(sys.argv[1]))
"""


async def _floor_setup(bus: Bus) -> None:
    await bus.js.add_stream(js_api.StreamConfig(
        name=FLOOR_STREAM, subjects=["benchfloor.work"],
        retention=js_api.RetentionPolicy.WORK_QUEUE, storage=js_api.StorageType.FILE))
    await bus.js.add_stream(js_api.StreamConfig(
        name=FLOOR_STREAM + "R", subjects=["benchfloor.result"], storage=js_api.StorageType.FILE))
    await bus.js.add_consumer(FLOOR_STREAM, js_api.ConsumerConfig(
        durable_name="floor", ack_policy=js_api.AckPolicy.EXPLICIT, max_ack_pending=100_000))


class _Path:
    """One way of running a job: how to submit it and where its result shows."""

    def __init__(self, bus: Bus, kind: str) -> None:
        self.bus = bus
        self.kind = kind
        self.sent: dict[str, float] = {}
        self.latency: list[float] = []
        self.done = 0
        self.target = 0
        self.finished = asyncio.Event()

    async def start(self) -> None:
        subject = "benchfloor.result" if self.kind == "floor" else topology.JOB_EVENTS_ALL
        await self.bus.nc.subscribe(subject, cb=self._on_result)

    async def _on_result(self, msg: Any) -> None:
        if self.kind == "floor":
            job_id = msg.data.decode()
        else:
            if b'"kind":"succeeded"' not in msg.data:
                return
            job_id = msg.subject.rsplit(".", 1)[-1]
        t0 = self.sent.pop(job_id, None)
        if t0 is None:
            return
        self.latency.append(time.perf_counter() - t0)
        self.done += 1
        if self.done >= self.target:
            self.finished.set()

    async def submit(self, job_id: str) -> None:
        self.sent[job_id] = time.perf_counter()
        if self.kind == "floor":
            await self.bus.js.publish_async("benchfloor.work", job_id.encode())
        else:
            body = b'{"job_id":"%s","capability":{"type":"echo"},"payload":{}}' % job_id.encode()
            await self.bus.js.publish_async(topology.SUBMIT, body,
                                            headers={"Nats-Msg-Id": job_id})

    async def run(self, n: int, rate: float | None) -> tuple[float, list[float]]:
        self.done, self.target, self.latency = 0, n, []
        self.finished.clear()
        t0 = time.perf_counter()
        for i in range(n):
            if rate:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.submit(new_id("b"))
        await self.bus.js.publish_async_completed()
        await asyncio.wait_for(self.finished.wait(), timeout=max(60.0, n / 50))
        elapsed = time.perf_counter() - t0
        return n / elapsed, list(self.latency)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--via", choices=("up", "processes"), default="up",
                   help="dispatch: run jetfleet through `jetfleet up` with its defaults (default), "
                        "or as a bare dispatcher and --workers worker processes")


async def _wait_for_echo(bus: Bus, timeout: float = 120.0) -> None:
    from bus.adverts import list_adverts

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.get("type") == "echo" for a in await list_adverts(bus) for c in a.capabilities):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("no worker serving echo came up")


async def _measure(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "JETFLEET_NATS_URL": url, "JETFLEET_LOG": "WARNING"}
    bus = await connect(Settings.from_env(env), name="bench")
    await _floor_setup(bus)
    py = sys.executable
    procs = [spawn([py, "-c", _FLOOR_WORKER, url], env, tmp / "floor.log")]
    if args.via == "processes":
        procs.append(spawn([py, "-m", "ops.cli", "run", "dispatcher"], env,
                           tmp / "dispatcher.log"))
        for i in range(args.workers):
            procs.append(spawn([py, "-m", "ops.cli", "run", "worker", "--no-kernels"], env,
                               tmp / f"worker{i}.log"))
    try:
        await _wait_for_echo(bus)
        paths = {k: _Path(bus, k) for k in ("floor", "jetfleet")}
        for p in paths.values():
            await p.start()
        # Warm up both (imports, consumers, caches) before measuring.
        for p in paths.values():
            await p.run(300, None)
        res: dict[str, Any] = {}
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in paths}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for kind, p in paths.items():
                rate_tp, _l = await p.run(args.jobs, None)
                _r, lats = await p.run(max(200, int(args.rate * 5)), args.rate)
                runs[kind].append((rate_tp, percentile(lats, 0.5), percentile(lats, 0.99)))
        for kind, rs in runs.items():
            res[kind] = {
                "jobs_per_s": statistics.median(r[0] for r in rs),
                "p50_ms": statistics.median(r[1] for r in rs) * 1000,
                "p99_ms": statistics.median(r[2] for r in rs) * 1000,
                "runs": [r[0] for r in rs],
            }
        return res
    finally:
        stop(procs)
        await bus.close()


def _up(tmp: Path) -> tuple[Any, str]:
    """`jetfleet up` with its defaults in a child; its URL once it says it is up."""
    import subprocess

    env = {**os.environ, "JETFLEET_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--data-dir",
                             str(tmp / "up")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "nats at " in line:
            return proc, line.split("nats at ")[1].split(",")[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("jetfleet up did not start")


def main(args: argparse.Namespace) -> int:
    import signal

    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-") as d:
        tmp = Path(d)
        if args.via == "up":
            up, url = _up(tmp)
            try:
                res = asyncio.run(_measure(url, args, tmp))
            finally:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(timeout=60)
                except Exception:
                    up.kill()
            where = "jetfleet up with its defaults"
        else:
            with EmbeddedServer(tmp / "nats") as server:
                res = asyncio.run(_measure(server.url, args, tmp))
            where = f"a dispatcher and {args.workers} worker process(es)"
    floor, jf = res["floor"], res["jetfleet"]
    ratio = jf["jobs_per_s"] / floor["jobs_per_s"]
    if args.json:
        print(json.dumps({**res, "ratio": ratio, "via": args.via}, indent=2))
        return 0
    print(f"dispatch benchmark: {args.jobs} jobs flat out, then {args.rate:.0f} jobs/s offered; "
          f"median of {args.repeats} runs; jetfleet through {where}")
    print(f"{'path':<22}{'jobs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'raw JetStream floor':<22}{floor['jobs_per_s']:>10.0f}{floor['p50_ms']:>10.2f}"
          f"{floor['p99_ms']:>10.2f}")
    print(f"{'jetfleet echo':<22}{jf['jobs_per_s']:>10.0f}{jf['p50_ms']:>10.2f}"
          f"{jf['p99_ms']:>10.2f}")
    print(f"ratio jetfleet/floor jobs/s: {ratio:.2f}x (goal >= 0.2x); at {args.rate:.0f}/s "
          f"p50 {jf['p50_ms']:.1f} ms (goal <= 3), p99 {jf['p99_ms']:.1f} ms (goal <= 10)")
    return 0
