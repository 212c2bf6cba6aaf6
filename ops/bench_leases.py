"""`jetfleet bench leases`: device-lease latency under contention beside the
raw KV round trip it is built on, then a short chaos run, all on an embedded
nats-server started for the run.

raw:    nats-py KeyValue create / update(last=rev) / delete(last=rev), each
        task on its own key (no contention), same concurrency.
leases: bus.leases.LeaseTable acquire / renew / release, `holders` tasks on
        their own connections contending for `keys` keys; a failed acquire
        (the key is held) is timed separately as `acquire-miss`.
chaos:  worker *processes* with simulated GPUs on one node run GPU-leasing
        sleep jobs while some are killed with -9 and replaced; counted at the
        end: lost jobs (not succeeded) and duplicates (more than one
        `succeeded` event for a job), both of which must be 0.

Latency figures are medians over --repeats runs of each run's p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js import api as js_api
from nats.js.api import DeliverPolicy

from bus import topology
from bus.connection import Bus, connect
from bus.leases import LeaseTable
from bus.server import EmbeddedServer
from bus.settings import Settings
from ops.benchkit import percentile

RAW_BUCKET = "benchraw"
HOLDERS, KEYS, RENEWS = 8, 4, 2
ROOT = Path(__file__).resolve().parent.parent


async def _raw_round(buses: list[Bus], cycles: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create": [], "update": [], "delete": []}

    async def one(i: int, bus: Bus) -> None:
        kv = await bus.js.key_value(RAW_BUCKET)
        key = f"raw.k{i}"
        for _ in range(cycles):
            t = time.perf_counter()
            rev = await kv.create(key, b"x")
            out["create"].append(time.perf_counter() - t)
            for _ in range(RENEWS):
                t = time.perf_counter()
                rev = await kv.update(key, b"y", last=rev)
                out["update"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await kv.delete(key, last=rev)
            out["delete"].append(time.perf_counter() - t)

    await asyncio.gather(*(one(i, b) for i, b in enumerate(buses)))
    return out


async def _lease_round(buses: list[Bus], cycles: int) -> dict[str, Any]:
    out: dict[str, Any] = {"acquire": [], "acquire-miss": [], "renew": [], "release": []}
    held: dict[str, str] = {}
    violations = 0

    async def one(i: int, bus: Bus) -> None:
        nonlocal violations
        table = LeaseTable(bus, "bench")
        rng = random.Random(i)
        done = 0
        while done < cycles:
            key = f"bench.gpu{rng.randrange(KEYS)}"
            t = time.perf_counter()
            lease = await table.acquire(key, f"h{i}", f"job{i}-{done}")
            dt = time.perf_counter() - t
            if lease is None:
                out["acquire-miss"].append(dt)
                await asyncio.sleep(0)
                continue
            out["acquire"].append(dt)
            if key in held:
                violations += 1  # two holders at once: must never happen
            held[key] = f"h{i}"
            for _ in range(RENEWS):
                t = time.perf_counter()
                await table.renew(lease)
                out["renew"].append(time.perf_counter() - t)
            held.pop(key, None)
            t = time.perf_counter()
            ok = await table.release(lease)
            out["release"].append(time.perf_counter() - t)
            assert ok, "a held lease could not be released"
            done += 1

    await asyncio.gather(*(one(i, b) for i, b in enumerate(buses)))
    out["violations"] = violations
    return out


async def _latency(url: str, settings: Settings, cycles: int, repeats: int) -> dict[str, Any]:
    buses = [await connect(settings, url=url, name=f"bench-{i}") for i in range(HOLDERS)]
    try:
        with contextlib.suppress(Exception):
            await buses[0].js.create_key_value(js_api.KeyValueConfig(
                bucket=RAW_BUCKET, history=8, ttl=settings.lease_ttl_s,
                storage=js_api.StorageType.FILE))
        runs: list[dict[str, Any]] = []
        for _ in range(repeats):
            raw = await _raw_round(buses, cycles)
            lease = await _lease_round(buses, cycles)
            runs.append({"raw": raw, "lease": lease})
    finally:
        for b in buses:
            await b.close()

    def med(kind: str, op: str, q: float) -> float:
        return statistics.median(percentile(r[kind][op], q) for r in runs) * 1000

    rows: list[dict[str, Any]] = []
    for op, raw_op in (("acquire", "create"), ("acquire-miss", "create"), ("renew", "update"),
                       ("release", "delete")):
        p50, raw_p50 = med("lease", op, 0.5), med("raw", raw_op, 0.5)
        rows.append({
            "op": op, "raw_op": raw_op,
            "n": sum(len(r["lease"][op]) for r in runs),
            "p50_ms": p50, "p99_ms": med("lease", op, 0.99),
            "raw_p50_ms": raw_p50, "raw_p99_ms": med("raw", raw_op, 0.99),
            "ratio_p50": p50 / raw_p50 if raw_p50 else None,
        })
    return {"holders": HOLDERS, "keys": KEYS, "cycles_per_holder": cycles, "repeats": repeats,
            "violations": sum(r["lease"]["violations"] for r in runs), "rows": rows}


# ---- chaos ------------------------------------------------------------------------------------


async def _chaos(url: str, settings: Settings, env: dict[str, str], logdir: Path, workers: int,
                 jobs: int, kills: int, seconds: float, seed: int) -> dict[str, Any]:
    from sdk import Client
    from services.dispatcher import Dispatcher

    rng = random.Random(seed)
    dbus = await connect(settings, url=url, name="bench-dispatcher")
    dispatcher = Dispatcher(dbus)
    dtask = asyncio.create_task(dispatcher.run())
    client = Client(await connect(settings, url=url, name="bench-client"))
    succeeded: dict[str, int] = {}
    running_after_kill: list[float] = []
    kill_times: dict[str, float] = {}

    async def on_event(msg: Any) -> None:
        e = json.loads(msg.data)
        if e["kind"] == "succeeded":
            succeeded[e["job_id"]] = succeeded.get(e["job_id"], 0) + 1
        elif e["kind"] == "running" and e["job_id"] in kill_times:
            running_after_kill.append(e["ts"] - kill_times.pop(e["job_id"]))

    sub = await client.bus.js.subscribe(topology.JOB_EVENTS_ALL, ordered_consumer=True,
                                        deliver_policy=DeliverPolicy.ALL, cb=on_event)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    n = 0

    def spawn() -> None:
        nonlocal n
        wid = f"bw{n}"
        n += 1
        log = open(logdir / f"{wid}.log", "wb")
        procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "worker", "--simulate-gpus", "4",
             "--node", "bench", "--no-kernels", "--capacity", "2", "--worker-id", wid],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        log.close()

    killed = 0
    try:
        for _ in range(workers):
            spawn()
        t_end = time.monotonic() + 60
        while len(await client.workers()) < workers and time.monotonic() < t_end:
            await asyncio.sleep(0.2)
        ids = [await client.submit("sleep", {"seconds": seconds, "steps": 3},
                                   resources={"gpus": 1}, max_attempts=10) for _ in range(jobs)]
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            busy: dict[str, list[str]] = {}
            for _try in range(20):  # a worker that is running something right now
                for j in ids:
                    s = await client.status(j)
                    if s and s.state == "running" and s.worker_id in procs:
                        busy.setdefault(s.worker_id, []).append(j)
                if busy:
                    break
                await asyncio.sleep(0.25)
            if not busy:
                break
            victim = rng.choice(sorted(busy))
            os.killpg(procs.pop(victim).pid, signal.SIGKILL)
            killed += 1
            t = time.time()
            for j in busy[victim]:
                kill_times[j] = t
            spawn()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = [await client.status(j) for j in ids]
            if all(s is not None and s.terminal for s in states):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        states = [await client.status(j) for j in ids]
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        dispatcher.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(dtask, 10)
        await client.close()
        await dbus.close()
    lost = [s.job_id if s else "?" for s in states if s is None or s.state != "succeeded"]
    if lost:
        print(f"chaos: jobs not succeeded: {lost}; worker logs in {logdir}", file=sys.stderr)
    return {
        "jobs": jobs, "workers": workers, "kills": killed,
        "succeeded": sum(1 for s in states if s is not None and s.state == "succeeded"),
        "lost": len(lost), "duplicates": sum(1 for c in succeeded.values() if c > 1),
        "lost_attempts_recovered": sum(
            1 for s in states if s for a in s.attempts if a.outcome == "lost"),
        "rerun_after_kill_max_s": max(running_after_kill, default=None),
    }


# ---- entry ----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    cycles = max(10, int(getattr(args, "jobs", 2000)) // (HOLDERS * 4))
    repeats = max(1, int(getattr(args, "repeats", 3)))
    chaos_workers = max(3, int(getattr(args, "workers", 1)))
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-leases-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        env = {**os.environ, "JETFLEET_NATS_URL": server.url, "JETFLEET_LEASE_TTL_S": "3",
               "JETFLEET_ADVERT_TTL_S": "3", "JETFLEET_WORK_ACK_WAIT_S": "3",
               "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "WARNING"}
        settings = Settings.from_env(env)
        logdir = Path(tmp) / "logs"
        logdir.mkdir()
        try:
            latency = asyncio.run(_latency(server.url, settings, cycles, repeats))
            chaos = asyncio.run(_chaos(server.url, settings, env, logdir, chaos_workers,
                                       jobs=40, kills=4, seconds=1.0, seed=7))
        finally:
            server.stop()
    result = {"latency": latency, "chaos": chaos}
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        _print(latency, chaos)
    ok = chaos["lost"] == 0 and chaos["duplicates"] == 0 and latency["violations"] == 0
    return 0 if ok else 1


def _print(latency: dict[str, Any], chaos: dict[str, Any]) -> None:
    print(f"lease latency: {latency['holders']} holders on {latency['keys']} keys, "
          f"{latency['cycles_per_holder']} acquire cycles each ({RENEWS} renewals per hold), "
          f"median of {latency['repeats']} runs; raw KV ops on a private key each, same "
          "concurrency, same server")
    head = (f"{'op':<13}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}   {'raw op':<8}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'p50 ratio':>11}")
    print(head)
    print("-" * len(head))
    for r in latency["rows"]:
        ratio = f"{r['ratio_p50']:.2f}x" if r["ratio_p50"] else "-"
        print(f"{r['op']:<13}{r['n']:>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}   "
              f"{r['raw_op']:<8}{r['raw_p50_ms']:>9.2f}{r['raw_p99_ms']:>9.2f}{ratio:>11}")
    print(f"two holders seen at once: {latency['violations']}")
    print()
    rerun = chaos["rerun_after_kill_max_s"]
    print(f"chaos: {chaos['workers']} worker processes, {chaos['jobs']} GPU jobs, "
          f"{chaos['kills']} kill -9")
    print(f"  succeeded {chaos['succeeded']}/{chaos['jobs']}, lost {chaos['lost']} (must be 0), "
          f"duplicates {chaos['duplicates']} (must be 0), attempts lost to kills and rerun "
          f"{chaos['lost_attempts_recovered']}, slowest rerun after a kill "
          + (f"{rerun:.1f}s" if rerun is not None else "-"))
