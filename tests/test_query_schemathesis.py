"""Schemathesis against the running query API's own OpenAPI: no input it can
generate from /schema/openapi.json makes the API answer 5xx."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from bus.jobtable import emit
from schemas import events as ev
from schemas.telemetry import GpuMetrics, GpuSample, Heartbeat
from tests.conftest import eventually
from tests.query_helpers import publish
from tests.test_query_process import _url


async def test_schemathesis_finds_no_server_error(bus, procs, tmp_path: Path) -> None:
    procs.run("query", "--instance-id", "q-fuzz", "--port", "0",
              "--db", str(tmp_path / "q.duckdb"), "--api-token", "fuzz", name="query")
    url = await _url(bus, "q-fuzz")
    # Something to find, so lookups by id hit rows as well as 404s.
    await emit(bus, ev.Submitted(job_id="fuzz-job", capability={"type": "echo"}, user="f"))
    await emit(bus, ev.Running(job_id="fuzz-job", attempt=1, worker_id="w", node="n0",
                               devices=["n0.gpu0"]))
    await publish(bus, "n0", "heartbeat", Heartbeat(node="n0", simulated=True))
    await publish(bus, "n0", "gpu", GpuMetrics(node="n0", simulated=True, gpus=[
        GpuSample(index=0, gpu_util_pct=3.0, simulated=True)]))

    async def ready() -> bool:
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.get("/api/v1/jobs/fuzz-job", headers={"Authorization": "Bearer fuzz"})
            return r.status_code == 200

    await eventually(ready, what="the seeded job in the projection")
    exe = shutil.which("schemathesis")
    argv = [exe] if exe else [sys.executable, "-m", "schemathesis.cli"]
    run = await asyncio.to_thread(
        subprocess.run,
        [*argv, "run", f"{url}/schema/openapi.json", "--checks", "not_a_server_error",
         "-H", "Authorization: Bearer fuzz", "--max-examples", "8", "--seed", "7",
         "--phases", "coverage,fuzzing", "--workers", "1", "--request-timeout", "20"],
        capture_output=True, text=True, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "generated" in out and "passed" in out
