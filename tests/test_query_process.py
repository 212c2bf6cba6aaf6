"""The query service as a real process (`jetfleet run query`): tokens and scopes,
CORS and rate limits over real HTTP, and a kill -9 in the middle of ingest."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import duckdb
import httpx

from bus import topology
from bus.jobtable import emit
from ops.commands import api as api_client
from schemas import events as ev
from schemas.telemetry import GpuMetrics, GpuSample
from tests.conftest import eventually


async def _url(bus, instance: str | None = None, timeout: float = 30.0) -> str:
    async def found() -> str | None:
        for a in await api_client.discover(bus, timeout=0.3):
            if instance is None or a.instance == instance:
                return a.url
        return None

    return str(await eventually(found, timeout=timeout, what="the query API on the bus"))


async def test_tokens_scopes_cors_and_rate_limit(bus, procs, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# reader and submitter\nro-token read\nwo-token write\n")
    procs.run("query", "--instance-id", "q-auth", "--port", "0",
              "--db", str(tmp_path / "q.duckdb"), "--api-token", "rw-token",
              "--tokens-file", str(tokens), "--cors-origin", "http://ui.test",
              "--rate-limit", "40/minute", name="query")
    url = await _url(bus, "q-auth")
    submission = {"capability": {"type": "echo"}, "payload": {}}

    def auth(token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        matrix = {
            # (method, token) -> status
            ("GET", None): 401, ("GET", "wrong"): 401, ("GET", "ro-token"): 200,
            ("GET", "wo-token"): 200, ("GET", "rw-token"): 200,
            ("POST", None): 401, ("POST", "wrong"): 401, ("POST", "ro-token"): 403,
            ("POST", "wo-token"): 202, ("POST", "rw-token"): 202,
        }
        for (method, token), status in matrix.items():
            if method == "GET":
                r = await c.get("/api/v1/jobs", headers=auth(token))
            else:
                r = await c.post("/api/v1/jobs", json=submission, headers=auth(token))
            assert r.status_code == status, (method, token, r.status_code, r.text)
            if status >= 400:
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["status"] == status
        r = await c.get("/api/v1/jobs", headers={"Authorization": "Basic cnctdG9rZW4="})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        forbidden = await c.post("/api/v1/jobs", json=submission, headers=auth("ro-token"))
        assert "needs write" in forbidden.json()["detail"]
        # Always open: health, the schema, Prometheus.
        assert (await c.get("/health")).status_code == 200
        schema = await c.get("/schema/openapi.json")
        assert schema.status_code == 200 and "/api/v1/jobs" in schema.json()["paths"]
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200 and "jetfleet_projection_lag_messages" in metrics.text

        pre = await c.options("/api/v1/jobs", headers={
            "Origin": "http://ui.test", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert pre.headers.get("access-control-allow-origin") == "http://ui.test"
        other = await c.get("/health", headers={"Origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in other.headers

        statuses = [(await c.get("/api/v1/nodes", headers=auth("ro-token"))).status_code
                    for _ in range(45)]
        assert 429 in statuses and set(statuses) <= {200, 429}
        limited = await c.get("/api/v1/nodes", headers=auth("ro-token"))
        assert limited.status_code == 429
        assert limited.headers["content-type"].startswith("application/problem+json")
        assert (await c.get("/health")).status_code == 200  # not rate limited


async def test_kill_9_mid_ingest_and_restart_counts_nothing_twice(bus, procs,
                                                                  tmp_path: Path) -> None:
    db = tmp_path / "q.duckdb"
    args = ["query", "--port", "0", "--db", str(db), "--batch-rows", "500",
            "--batch-delay", "0.05"]
    first = procs.run(*args, "--instance-id", "q-first", name="query")
    url = await _url(bus, "q-first")
    jobs, gpu_messages, gpus = 1600, 400, 8
    published = asyncio.Event()

    async def publish() -> None:
        for i in range(jobs):
            job_id = f"k{i:05d}"
            await emit(bus, ev.Submitted(job_id=job_id, capability={"type": "echo"},
                                         user=f"u{i % 7}"))
            await emit(bus, ev.Queued(job_id=job_id))
            await emit(bus, ev.Running(job_id=job_id, attempt=1, worker_id="w", node="n0",
                                       devices=["n0.gpu0"]))
            await emit(bus, ev.Succeeded(job_id=job_id, attempt=1, worker_id="w",
                                         result={"i": i}))
            if i % (jobs // gpu_messages) == 0:
                await bus.publish(topology.telemetry("n0", "gpu"), GpuMetrics(
                    node="n0", simulated=True, gpus=[
                        GpuSample(index=g, gpu_util_pct=float(g), simulated=True)
                        for g in range(gpus)]))
        published.set()

    writer = asyncio.create_task(publish())

    async def applied() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            health = (await c.get("/health")).json()
        return sum(s["applied_seq"] for s in health["streams"])

    # Kill it once a good part (but not all) is in the projection.
    await eventually(lambda: _over(applied, 1500), timeout=60, what="ingest under way")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert not published.is_set(), "publishing finished before the kill: make it longer"
    await writer

    second = procs.run(*args, "--instance-id", "q-second", name="query")
    url = await _url(bus, "q-second")
    events_last = (await bus.js.stream_info(topology.EVENTS)).state.last_seq
    telemetry_last = (await bus.js.stream_info(topology.TELEMETRY)).state.last_seq

    async def caught_up() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            streams = {s["stream"]: s["applied_seq"] for s in (await c.get("/health")).json()[
                "streams"]}
        return streams == {topology.EVENTS: events_last, topology.TELEMETRY: telemetry_last}

    await eventually(caught_up, timeout=60, what="the restarted service caught up")
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        stats = (await c.get("/api/v1/stats/cluster")).json()
        assert stats["jobs_by_state"] == {"succeeded": jobs}
        page = (await c.get("/api/v1/jobs", params={"user": "u3", "limit": 1000})).json()
        assert page["total"] == len([i for i in range(jobs) if i % 7 == 3])
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=30)

    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT seq) FROM job_events").fetchone() \
            == (4 * jobs, 4 * jobs)
        assert con.execute("SELECT count(*), min(events), max(events) FROM jobs").fetchone() \
            == (jobs, 4, 4)
        assert con.execute("SELECT count(*) FROM attempts").fetchone() == (jobs,)
        assert con.execute("SELECT count(*) FROM gpu_metrics").fetchone() == \
            (gpu_messages * gpus,)
        assert con.execute("SELECT sum(messages) FROM applied").fetchone() == \
            (4 * jobs + gpu_messages,)
    finally:
        con.close()


async def _over(applied, n: int) -> bool:
    try:
        return await applied() > n
    except httpx.HTTPError:
        return False


def test_up_with_api_port_starts_the_query_api_the_cli_finds(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_API_TOKEN": "up-token"}
    up = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--data-dir", str(tmp_path / "fleet"),
         "--api-port", "0", "--api-token", "up-token"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "nats at" not in line and time.monotonic() < deadline:
            line = up.stdout.readline() if up.stdout else ""
        assert "nats at" in line, line
        nats_url = line.split("nats at ")[1].split(",")[0]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "ops.cli", "--nats", nats_url, *args],
                                  env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)

        found = cli("query", "url")
        while found.returncode != 0 and time.monotonic() < deadline + 30:
            time.sleep(0.3)
            found = cli("query", "url")
        assert found.returncode == 0, found.stderr
        api_url = found.stdout.strip()
        assert api_url.startswith("http://127.0.0.1:")
        submitted = cli("submit", "echo", "--payload", '{"via": "up"}', "--wait",
                        "--wait-timeout", "60")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        deadline = time.monotonic() + 30
        items: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            got = cli("query", "get", "/api/v1/jobs", "status=succeeded")
            assert got.returncode == 0, got.stderr
            import json

            items = json.loads(got.stdout)["items"]
            if items:
                break
            time.sleep(0.3)
        assert [i["capability_type"] for i in items] == ["echo"]
        r = httpx.get(f"{api_url}/api/v1/jobs")
        assert r.status_code == 401  # the token up was given guards it
        assert (tmp_path / "fleet" / "query.duckdb").exists()
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=90)
    assert up.returncode == 0 and "jetfleet stopped" in rest


async def test_cli_rebuilds_a_file_offline_and_runs_sql_on_it(bus, procs, tmp_path: Path
                                                             ) -> None:
    import json

    db = tmp_path / "offline.duckdb"
    for i in range(5):
        await emit(bus, ev.Submitted(job_id=f"o{i}", capability={"type": "echo"}, user="zed"))
    await bus.publish(topology.telemetry("n0", "gpu"), GpuMetrics(node="n0", gpus=[
        GpuSample(index=0, gpu_util_pct=9.0)]))
    built = await asyncio.to_thread(procs.cli, "query", "rebuild", "--db", str(db))
    assert built.returncode == 0, built.stderr
    assert "EVENTS up to 5" in built.stdout and "TELEMETRY up to 1" in built.stdout
    sql = await asyncio.to_thread(procs.cli, "--json", "query", "sql", "--db", str(db),
                                  "SELECT user, count(*) AS n FROM jobs GROUP BY ALL")
    assert sql.returncode == 0, sql.stderr
    assert json.loads(sql.stdout) == [{"user": "zed", "n": 5}]
    bad = await asyncio.to_thread(procs.cli, "query", "sql", "--db", str(db), "SELEC nothing")
    assert bad.returncode != 0 and bad.stderr.startswith("jetfleet: SQL failed")
    assert "Traceback" not in bad.stderr
    # A file a running service holds is refused with one line, and left as it is.
    procs.run("query", "--instance-id", "q-holds", "--port", "0", "--db", str(db),
              name="query")
    await _url(bus, "q-holds")
    held = await asyncio.to_thread(procs.cli, "query", "rebuild", "--db", str(db))
    assert held.returncode != 0 and "open in another process" in held.stderr
    assert "Traceback" not in held.stderr
