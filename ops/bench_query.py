"""`jetfleet bench query`: the query service's ingest and its API, beside raw baselines.

ingest   GPU telemetry (8 GPUs a message), then job events, pre-published to the
         streams and drained by a `jetfleet run query` process (rate from its
         /health positions), beside a hand-written raw consumer in this process
         that fetches the same messages without acks, decodes them and inserts
         Arrow batches into DuckDB (no fold, no upserts).
lag      GPU telemetry offered at --ingest-rate samples/s for --lag-seconds while
         the service runs: for each message, publish to committed-in-DuckDB (its
         /health position polled every 20 ms).
api      a projection of --query-jobs jobs and --query-samples GPU samples made
         with SQL, then each endpoint timed over HTTP (keep-alive, sequential)
         beside the very same SQL (services/query/queries.py) run directly on
         DuckDB in this process, before the service opens the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bus import topology
from bus.connection import Bus, connect
from bus.server import EmbeddedServer
from bus.settings import Settings
from ops.benchkit import percentile, spawn, stop
from schemas import events as ev
from schemas.telemetry import GpuMetrics, GpuSample

GPUS = 8
LEASES = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-jobs", type=int, default=1_000_000, metavar="N",
                   help="query: jobs in the projection for the API latencies (default 1M)")
    p.add_argument("--query-samples", type=int, default=10_000_000, metavar="N",
                   help="query: GPU metric samples in it (default 10M)")
    p.add_argument("--ingest-samples", type=int, default=400_000, metavar="N",
                   help="query: GPU samples pre-published for the ingest rate (default 400k)")
    p.add_argument("--ingest-rate", type=float, default=60_000.0, metavar="R",
                   help="query: offered GPU samples/s for the lag run (default 60000)")
    p.add_argument("--lag-seconds", type=float, default=10.0, metavar="S",
                   help="query: length of the lag run (default 10)")


# ---- helpers ---------------------------------------------------------------------------------


def _gpu_message(node: str, ts: float, i: int) -> bytes:
    import msgspec

    return msgspec.json.encode(GpuMetrics(node=node, ts=ts, simulated=True, gpus=[
        GpuSample(index=g, gpu_util_pct=float((i + g) % 100), fb_used_mb=1000.0 + g,
                  fb_total_mb=16384.0, power_w=200.0, gpu_temp_c=60.0, sm_clock_mhz=1400.0,
                  simulated=True) for g in range(GPUS)]))


async def _publish_all(bus: Bus, items: list[tuple[str, bytes]]) -> None:
    for i in range(0, len(items), 2000):
        for subject, body in items[i:i + 2000]:
            await bus.js.publish_async(subject, body)
        await bus.js.publish_async_completed()


def _service(url: str, db: Path, tmp: Path, name: str) -> Any:
    env = {**os.environ, "JETFLEET_NATS_URL": url, "JETFLEET_LOG": "WARNING"}
    return spawn([sys.executable, "-m", "ops.cli", "run", "query", "--port", "0", "--db",
                  str(db), "--instance-id", name], env, tmp / f"{name}.log")


async def _api_url(bus: Bus, instance: str, timeout: float = 60.0) -> str:
    from ops.commands.api import discover

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in await discover(bus, timeout=0.2):
            if a.instance == instance:
                return a.url
        await asyncio.sleep(0.1)
    raise RuntimeError("the query service did not come up")


async def _positions(client: httpx.AsyncClient) -> dict[str, int]:
    health = (await client.get("/health")).json()
    return {s["stream"]: s["applied_seq"] for s in health["streams"]}


async def _drain(client: httpx.AsyncClient, stream: str, target: int) -> tuple[int, float]:
    """Messages applied and seconds taken, from the first look to `target`."""
    start = await _positions(client)
    t0 = time.perf_counter()
    while True:
        pos = await _positions(client)
        if pos.get(stream, 0) >= target:
            return target - start.get(stream, 0), time.perf_counter() - t0
        await asyncio.sleep(0.02)


# ---- the raw consumer --------------------------------------------------------------------------


async def _raw_drain(bus: Bus, stream: str, db: Path) -> tuple[int, float]:
    """The hand-written floor: no-ack fetch, decode, one Arrow insert per 20k rows."""
    import duckdb
    import msgspec
    import pyarrow as pa
    from nats.js import api as js_api

    last = int((await bus.js.stream_info(stream)).state.last_seq)
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE IF NOT EXISTS g (ts DOUBLE, node VARCHAR, gpu INTEGER, "
                "util DOUBLE, fb DOUBLE, power DOUBLE, temp DOUBLE)")
    con.execute("CREATE TABLE IF NOT EXISTS e (seq BIGINT, job_id VARCHAR, kind VARCHAR, "
                "ts DOUBLE, body VARCHAR)")
    name = f"raw-{stream.lower()}"
    await bus.js.add_consumer(stream, js_api.ConsumerConfig(
        name=name, ack_policy=js_api.AckPolicy.NONE, mem_storage=True,
        deliver_policy=js_api.DeliverPolicy.ALL, inactive_threshold=60.0))
    sub = await bus.js.pull_subscribe_bind(durable=None, stream=stream, name=name)
    gpu_dec = msgspec.json.Decoder(GpuMetrics)
    rows: list[tuple[Any, ...]] = []
    seen = 0
    t0 = time.perf_counter()

    def flush() -> None:
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        if len(cols) == 7:
            batch = pa.table({k: list(c) for k, c in zip(
                ("ts", "node", "gpu", "util", "fb", "power", "temp"), cols, strict=True)})
            con.execute("INSERT INTO g SELECT * FROM batch")
        else:
            batch = pa.table({k: list(c) for k, c in zip(  # noqa: F841
                ("seq", "job_id", "kind", "ts", "body"), cols, strict=True)})
            con.execute("INSERT INTO e SELECT * FROM batch")
        rows.clear()

    while seen < last:
        try:
            msgs = await sub.fetch(batch=1000, timeout=1.0)
        except Exception:
            continue
        for msg in msgs:
            seen = int(msg.metadata.sequence.stream)
            if stream == topology.TELEMETRY:
                m = gpu_dec.decode(msg.data)
                rows.extend((m.ts, m.node, g.index, g.gpu_util_pct, g.fb_used_mb, g.power_w,
                             g.gpu_temp_c) for g in m.gpus)
            else:
                e = ev.decode_event(msg.data)
                rows.append((seen, e.job_id, ev.event_kind(e), e.ts, msg.data.decode()))
        if len(rows) >= 20_000:
            flush()
    flush()
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    con.close()
    return last, elapsed


# ---- ingest and lag ----------------------------------------------------------------------------


async def _ingest(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    bus = await connect(Settings.from_env({"JETFLEET_NATS_URL": url}), name="bench-query")
    messages = max(1, args.ingest_samples // GPUS)
    now = time.time()
    await _publish_all(bus, [(topology.telemetry(f"n{i % 50}", "gpu"),
                              _gpu_message(f"n{i % 50}", now - messages + i, i))
                             for i in range(messages)])
    out: dict[str, Any] = {}
    n, secs = await _raw_drain(bus, topology.TELEMETRY, tmp / "raw.duckdb")
    out["raw_samples_per_s"] = n * GPUS / secs
    db = tmp / "q.duckdb"
    proc = _service(url, db, tmp, "bq-ingest")
    try:
        api = await _api_url(bus, "bq-ingest")
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:
            n, secs = await _drain(client, topology.TELEMETRY, messages)
            out["samples_per_s"] = n * GPUS / secs
            out["samples_measured"] = n * GPUS
    finally:
        stop([proc])
    # Job events (four a job) published while no service runs; a restarted service
    # resumes after its applied position and drains them.
    import msgspec

    jobs = max(1, args.ingest_samples // 40)
    items = []
    for i in range(jobs):
        job_id = f"b{i:07d}"
        for event in (ev.Submitted(job_id=job_id, capability={"type": "echo"}, user=f"u{i % 20}"),
                      ev.Queued(job_id=job_id),
                      ev.Running(job_id=job_id, attempt=1, worker_id="w", node="n0",
                                 devices=["n0.gpu0"]),
                      ev.Succeeded(job_id=job_id, attempt=1, worker_id="w")):
            items.append((topology.job_events(job_id), msgspec.json.encode(event)))
    await _publish_all(bus, items)
    last = int((await bus.js.stream_info(topology.EVENTS)).state.last_seq)
    rn, rsecs = await _raw_drain(bus, topology.EVENTS, tmp / "raw.duckdb")
    out["raw_events_per_s"] = rn / rsecs
    proc = _service(url, db, tmp, "bq-ingest2")
    try:
        api = await _api_url(bus, "bq-ingest2")
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:
            n, secs = await _drain(client, topology.EVENTS, last)
            out["events_per_s"] = n / secs
            out["events"] = n
            out["lag"] = await _lag(bus, client, args)
    finally:
        stop([proc])
        await bus.close()
    return out


async def _lag(bus: Bus, client: httpx.AsyncClient, args: argparse.Namespace) -> dict[str, Any]:
    import msgspec

    rate_msgs = args.ingest_rate / GPUS
    total = int(rate_msgs * args.lag_seconds)
    sent: dict[int, float] = {}
    applied: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            pos = await _positions(client)
            applied.append((time.perf_counter(), pos.get(topology.TELEMETRY, 0)))
            await asyncio.sleep(0.02)

    poller = asyncio.create_task(poll())
    t0 = time.perf_counter()
    futures = []
    for i in range(total):
        due = t0 + i / rate_msgs
        delay = due - time.perf_counter()
        if delay > 0.002:
            await asyncio.sleep(delay)
        body = msgspec.json.encode(GpuMetrics(node=f"n{i % 50}", simulated=True, gpus=[
            GpuSample(index=g, gpu_util_pct=float(g), simulated=True) for g in range(GPUS)]))
        fut = await bus.js.publish_async(topology.telemetry(f"n{i % 50}", "gpu"), body)
        futures.append((time.perf_counter(), fut))
    for t, fut in futures:
        ack = await fut
        sent[int(ack.seq)] = t
    offered_s = time.perf_counter() - t0
    last = max(sent)
    while not applied or applied[-1][1] < last:
        await asyncio.sleep(0.05)
    done.set()
    await poller
    lags = []
    j = 0
    for seq in sorted(sent):
        while applied[j][1] < seq:
            j += 1
        lags.append(applied[j][0] - sent[seq])
    return {"offered_samples_per_s": total * GPUS / offered_s, "messages": total,
            "p50_s": percentile(lags, 0.5), "p99_s": percentile(lags, 0.99),
            "max_s": max(lags)}


# ---- the API over a big projection -------------------------------------------------------------


def _generate(db: Path, jobs: int, samples: int, now: float) -> None:
    import duckdb

    from services.query import tables

    con = duckdb.connect(str(db))
    tables.create(con)
    span = 30 * 86400.0
    con.execute(f"""
        INSERT INTO jobs SELECT
          'j-' || lpad(i::VARCHAR, 8, '0'), CASE WHEN i % 50 = 0 THEN 'discovered'
            ELSE 'submitted' END,
          (['succeeded','succeeded','succeeded','failed','running','queued','cancelled',
            'succeeded'])[i % 8 + 1],
          (['echo','train','infer','kernel.verify','kernel.profile','sleep'])[i % 6 + 1],
          '{{"type":"echo"}}', i % 3, 'u' || (i % 50), NULL, 1, 'w' || (i % 40),
          'n' || (i % 100), ['n' || (i % 100) || '.gpu' || (i % 8)],
          {now} - {span} + i * {span / max(jobs, 1)}, {now}, {now} - {span} + i * {span / max(jobs, 1)} + 1,
          {now} - {span} + i * {span / max(jobs, 1)} + 600, 599.0, '{{"ok":true}}',
          CASE WHEN i % 8 = 3 THEN 'boom' END, CASE WHEN i % 8 = 3 THEN 'it failed' END,
          NULL, false, false, NULL, NULL, NULL, '[]', 4, i * 4, i * 4 + 3
        FROM range({jobs}) t(i)""")
    con.execute("""
        INSERT INTO attempts SELECT job_id, 1, worker_id, node, devices, 1, started_at,
          ended_at, state, error_code, error_message, "user", capability_type FROM jobs""")
    con.execute("""
        INSERT INTO job_events SELECT first_seq + k, job_id,
          (['submitted','queued','running','succeeded'])[k + 1], submitted_at + k, 1, 'w',
          '{"kind":"x","job_id":"' || job_id || '"}'
        FROM jobs, range(4) r(k)""")
    devices = 100 * GPUS
    per = max(1, samples // devices)
    con.execute(f"""
        INSERT INTO gpu_metrics SELECT {now} - {per * 5} + s * 5, 'n' || (d // {GPUS}),
          d % {GPUS}, NULL, ((s * 7 + d) % 100)::DOUBLE, NULL, 1000.0 + d, 16384.0, 200.0,
          60.0, NULL, 1400.0, NULL, NULL, NULL, NULL, true, 1
        FROM range({per}) a(s), range({devices}) b(d) ORDER BY 1""")
    con.execute(f"""
        INSERT INTO devices SELECT 'n' || (d // {GPUS}), d % {GPUS}, NULL, 'sim', {now},
          (d % 100)::DOUBLE, 1000.0, 16384.0, 200.0, 60.0, true FROM range({devices}) b(d)""")
    con.execute(f"""
        INSERT INTO nodes (node, hostname, last_heartbeat, heartbeat_interval, gpus, jobs)
        SELECT 'n' || i, 'host' || i, {now}, 5.0, {GPUS}, 3 FROM range(100) t(i)""")
    con.execute(f"""
        INSERT INTO leases SELECT 'n' || (d // {GPUS}) || '.gpu' || (d % {GPUS}), 'w1', NULL,
          'n' || (d // {GPUS}), {now} - 7200, {now}, NULL, true FROM range({LEASES}) b(d)""")
    con.execute("CHECKPOINT")
    con.close()


Case = tuple[str, str, dict[str, Any], Any]


def _cases(now: float, jobs: int) -> tuple[list[Case], Any]:
    """(name, path, params, raw call) for each measured request."""
    from services.query import queries as q

    rng = random.Random(1)

    def job_id() -> str:
        return f"j-{rng.randrange(jobs):08d}"

    window = {"since": now - 3600, "until": now}
    gq = {"node": "n17", "bucket": 60.0, "fields": list(q.GPU_FIELDS[:4])}

    return [
        ("jobs page 1 (50)", "/api/v1/jobs", {"limit": 50},
         lambda c: q.list_jobs(c, q.JobFilter(), 50, 0)),
        ("jobs filtered (state+user)", "/api/v1/jobs",
         {"limit": 50, "status": "failed", "user": "u7"},
         lambda c: q.list_jobs(c, q.JobFilter(status=["failed"], user="u7"), 50, 0)),
        ("jobs page at offset 90%", "/api/v1/jobs", {"limit": 50, "offset": int(jobs * 0.9)},
         lambda c: q.list_jobs(c, q.JobFilter(), 50, int(jobs * 0.9))),
        ("job detail", "/api/v1/jobs/{id}", {}, lambda c, i=None: q.job_detail(c, i)),
        ("gpu metrics 1 node 1 h", "/api/v1/metrics/gpu",
         {**gq, "since": str(window["since"]), "until": str(window["until"])},
         lambda c: q.metrics(c, "gpu", q.MetricQuery(
             since=window["since"], until=window["until"], bucket_s=60.0, node="n17",
             fields=tuple(q.GPU_FIELDS[:4])))),
        ("stats/cluster", "/api/v1/stats/cluster", {"window": 3600},
         lambda c: q.cluster_stats(c, [], window_s=3600, since=0.0, until=None,
                                   idle_threshold=5.0)),
    ], job_id


def _time_both(raw_db: Path, url: str, now: float, jobs: int, n: int
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each request over HTTP and its SQL on a copy of the file, alternately, so
    whatever else the machine does weighs on both alike."""
    import duckdb

    cases, job_id = _cases(now, jobs)
    raw: dict[str, list[float]] = {}
    api: dict[str, list[float]] = {}
    con = duckdb.connect(str(raw_db), read_only=True)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for name, path, params, call in cases:
                raw[name], api[name] = [], []
                for k in range(n + 5):
                    jid = job_id()
                    t = time.perf_counter()
                    if name == "job detail":
                        call(con, jid)
                    else:
                        call(con)
                    t_raw = time.perf_counter() - t
                    t = time.perf_counter()
                    r = client.get(path.replace("{id}", jid), params=params)
                    r.read()
                    t_api = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
                    if k >= 5:  # warm-up
                        raw[name].append(t_raw)
                        api[name].append(t_api)
    finally:
        con.close()
    return raw, api


async def _api(url: str, tmp: Path, args: argparse.Namespace, n: int) -> dict[str, Any]:
    import shutil

    import msgspec

    from schemas.fleet import LeaseRecord

    db = tmp / "big.duckdb"
    now = time.time()
    t = time.perf_counter()
    await asyncio.to_thread(_generate, db, args.query_jobs, args.query_samples, now)
    gen_s = time.perf_counter() - t
    raw_db = tmp / "big-raw.duckdb"
    await asyncio.to_thread(shutil.copyfile, db, raw_db)
    # The leases the file holds are also in KV (on a bucket whose TTL outlasts the
    # run), so the service's KV snapshots keep the very data the copy has.
    bus = await connect(Settings.from_env({"JETFLEET_NATS_URL": url,
                                           "JETFLEET_LEASE_TTL_S": "86400"}),
                        name="bench-query-api")
    leases = await bus.kv(topology.KV_LEASES)
    for d in range(LEASES):
        node, gpu = f"n{d // GPUS}", d % GPUS
        await leases.put(f"{node}.gpu{gpu}", msgspec.json.encode(LeaseRecord(
            device=f"{node}.gpu{gpu}", holder="w1", node=node, acquired_at=now - 7200,
            renewed_at=now)))
    proc = _service(url, db, tmp, "bq-api")
    try:
        api_url = await _api_url(bus, "bq-api")
        await asyncio.sleep(3.0)  # its first KV snapshot is in
        raw, api = await asyncio.to_thread(_time_both, raw_db, api_url, now, args.query_jobs, n)
    finally:
        stop([proc])
        await bus.close()
    return {"generate_s": gen_s, "raw": raw, "api": api}


# ---- main -----------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    n = 300
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-query-") as d:
        tmp = Path(d)
        with EmbeddedServer(tmp / "nats") as server:
            ingest = asyncio.run(_ingest(server.url, tmp, args))
        with EmbeddedServer(tmp / "nats2") as server:
            api = asyncio.run(_api(server.url, tmp, args, n))
    rows = []
    for name in api["api"]:
        a, r = api["api"][name], api["raw"][name]
        rows.append({"request": name, "raw_p50_ms": percentile(r, 0.5) * 1000,
                     "raw_p99_ms": percentile(r, 0.99) * 1000,
                     "api_p50_ms": percentile(a, 0.5) * 1000,
                     "api_p99_ms": percentile(a, 0.99) * 1000})
    if args.json:
        print(json.dumps({"ingest": ingest, "api": rows, "generate_s": api["generate_s"]},
                         indent=2))
        return 0
    lag = ingest["lag"]
    print("query benchmark (2-core machine numbers mean 2 cores shared by nats-server, the "
          "query service and this driver)")
    print(f"\ningest: {ingest['samples_measured']:,} GPU samples pre-published "
          f"({GPUS} a message), then {ingest['events']:,} job events")
    print(f"{'':<28}{'jetfleet query':>16}{'raw consumer':>16}{'ratio':>8}")
    print(f"{'GPU samples/s':<28}{ingest['samples_per_s']:>16,.0f}"
          f"{ingest['raw_samples_per_s']:>16,.0f}"
          f"{ingest['samples_per_s'] / ingest['raw_samples_per_s']:>8.2f}")
    print(f"{'job events/s':<28}{ingest['events_per_s']:>16,.0f}"
          f"{ingest['raw_events_per_s']:>16,.0f}"
          f"{ingest['events_per_s'] / ingest['raw_events_per_s']:>8.2f}")
    print(f"\nlag under load: {lag['offered_samples_per_s']:,.0f} GPU samples/s offered for "
          f"{args.lag_seconds:g}s ({lag['messages']:,} messages): publish to committed "
          f"p50 {lag['p50_s']:.3f}s  p99 {lag['p99_s']:.3f}s  max {lag['max_s']:.3f}s "
          f"(goal: p99 < 2 s at >= 50k samples/s)")
    print(f"\nAPI over {args.query_jobs:,} jobs and {args.query_samples:,} GPU samples "
          f"(made in {api['generate_s']:.0f}s); {n} sequential requests each, ms")
    print(f"{'request':<30}{'raw p50':>9}{'raw p99':>9}{'API p50':>9}{'API p99':>9}"
          f"{'p99 ratio':>11}")
    for r in rows:
        print(f"{r['request']:<30}{r['raw_p50_ms']:>9.2f}{r['raw_p99_ms']:>9.2f}"
              f"{r['api_p50_ms']:>9.2f}{r['api_p99_ms']:>9.2f}"
              f"{r['api_p99_ms'] / r['raw_p99_ms']:>11.2f}")
    return 0
