"""`jetfleet bench dispatch`: no-op jobs through the whole path, beside the raw
JetStream floor measured on the same server in the same run.

floor: publish to a work-queue stream; a worker *process* fetches, publishes a
       result and acks; the submitter counts results.
jetfleet: `echo` jobs published to `jobs.submit`, through a dispatcher process
       and a worker process, counted as `succeeded` events.
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
            await js.publish("benchfloor.result", m.data)
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


async def _measure(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "JETFLEET_NATS_URL": url, "JETFLEET_LOG": "WARNING"}
    bus = await connect(Settings.from_env(env), name="bench")
    await _floor_setup(bus)
    py = sys.executable
    procs = [
        spawn([py, "-c", _FLOOR_WORKER, url], env, tmp / "floor.log"),
        spawn([py, "-m", "ops.cli", "run", "dispatcher"], env, tmp / "dispatcher.log"),
    ]
    for i in range(args.workers):
        procs.append(spawn([py, "-m", "ops.cli", "run", "worker", "--no-kernels",
                             "--capacity", "256"], env, tmp / f"worker{i}.log"))
    try:
        paths = {k: _Path(bus, k) for k in ("floor", "jetfleet")}
        for p in paths.values():
            await p.start()
        # Warm up both (imports, consumers, caches) before measuring.
        for _ in range(100):
            kv = await bus.kv(topology.KV_CAPABILITIES)
            try:
                if await kv.keys():
                    break
            except Exception:
                await asyncio.sleep(0.2)
        for p in paths.values():
            await p.run(200, None)
        res: dict[str, Any] = {}
        for kind, p in paths.items():
            tput, lat = [], []
            for _ in range(args.repeats):
                rate_tp, _l = await p.run(args.jobs, None)
                tput.append(rate_tp)
                _r, lats = await p.run(max(200, int(args.rate * 5)), args.rate)
                lat.append((percentile(lats, 0.5), percentile(lats, 0.99)))
            res[kind] = {
                "jobs_per_s": statistics.median(tput),
                "p50_ms": statistics.median(x[0] for x in lat) * 1000,
                "p99_ms": statistics.median(x[1] for x in lat) * 1000,
                "runs": tput,
            }
        return res
    finally:
        stop(procs)
        await bus.close()


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-") as d:
        tmp = Path(d)
        with EmbeddedServer(tmp / "nats") as server:
            res = asyncio.run(_measure(server.url, args, tmp))
    floor, jf = res["floor"], res["jetfleet"]
    ratio = jf["jobs_per_s"] / floor["jobs_per_s"]
    if args.json:
        print(json.dumps({**res, "ratio": ratio}, indent=2))
    else:
        print(f"dispatch benchmark: {args.jobs} jobs flat out, then {args.rate:.0f} jobs/s offered; "
              f"median of {args.repeats} runs; {args.workers} worker process(es)")
        print(f"{'path':<22}{'jobs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        print(f"{'raw JetStream floor':<22}{floor['jobs_per_s']:>10.0f}{floor['p50_ms']:>10.2f}"
              f"{floor['p99_ms']:>10.2f}")
        print(f"{'jetfleet echo':<22}{jf['jobs_per_s']:>10.0f}{jf['p50_ms']:>10.2f}"
              f"{jf['p99_ms']:>10.2f}")
        print(f"ratio jetfleet/floor jobs/s: {ratio:.2f}x (target >= 0.5x); "
              f"p99 at {args.rate:.0f}/s: {jf['p99_ms']:.1f} ms (target <= 20 ms)")
    return 0
