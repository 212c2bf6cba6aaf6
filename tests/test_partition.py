"""A worker cut off from the server stops its job before its lease can expire,
and nothing runs twice: the job is taken over elsewhere only after the cut-off
worker stopped using the device, and the cut-off worker's late writes change
nothing when it comes back.

Two ways to cut a worker off: a TCP relay between it and the server that
stops forwarding (a partition neither end can tell from silence), and the
server itself stopped with SIGSTOP for longer than the lease TTL (every
worker cut off at once). Each run of the `hold` capability writes its own
start and end to a file (tests/faultapp.py), so the account of when a device
was in use does not depend on the bus the fault cut.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bus.adverts import list_adverts
from tests import faultapp
from tests.faults import TcpProxy, audit, device_overlaps, settled
from tests.helpers import LeaseHistory, eventually, replay, state_is

HOLD = ("--app", "tests.faultapp:app", "--no-builtin", "--no-kernels")


def _worker(procs: Any, wid: str, node: str, gpus: int, fault_dir: Path,
            url: str | None = None) -> Any:
    env = {"JETFLEET_FAULT_DIR": str(fault_dir)}
    if url is not None:
        env["JETFLEET_NATS_URL"] = url
    return procs.run("worker", *HOLD, "--simulate-gpus", str(gpus), "--node", node,
                     "--worker-id", wid, env=env, name=wid)


async def _advertised(bus: Any, *wids: str) -> bool:
    return set(wids) <= {a.worker_id for a in await list_adverts(bus)}


async def test_a_partitioned_worker_stops_before_its_job_runs_elsewhere(
        bus, components, client, procs, nats_server, tmp_path: Path) -> None:
    ttl = bus.settings.lease_ttl_s
    fault_dir = tmp_path / "runs"
    fault_dir.mkdir()
    history = await LeaseHistory(bus).start()
    proxy = TcpProxy(nats_server.host, nats_server.port).start()
    try:
        await components.dispatcher()
        _worker(procs, "wA", "p1", 1, fault_dir, url=proxy.url)
        await eventually(lambda: _advertised(bus, "wA"), timeout=60, what="worker A up")
        job = await client.submit("hold", {"seconds": 6.0}, job_id="part-1", max_attempts=5)
        await eventually(lambda: state_is(client, job, "running"), timeout=30,
                         what="the job running on A")
        assert (await client.status(job)).worker_id == "wA"
        # B shares A's node and its only device: it can take the job over only
        # through the same lease key.
        _worker(procs, "wB", "p1", 1, fault_dir)
        await eventually(lambda: _advertised(bus, "wB"), timeout=60, what="worker B up")

        proxy.freeze()
        cut_at = time.time()

        async def taken_over() -> bool:
            s = await client.status(job)
            return s is not None and s.worker_id == "wB" and s.attempt == 2

        await eventually(taken_over, timeout=30, what="B running the job's next attempt")
        a_runs = [r for r in faultapp.runs(fault_dir) if r["worker_id"] == "wA"]
        assert len(a_runs) == 1 and a_runs[0]["end"] is not None, a_runs
        # A stopped by itself, while nothing it sent could reach anyone, before
        # the server could expire its lease: a TTL after the last renewal the
        # server stored (by the server's clock, on this same machine).
        a_last = max(op.ts for op in history.ops
                     if op.record is not None and op.record.holder == "wA")
        assert a_last < cut_at + 0.5  # (nothing of A's got through the frozen relay)
        assert a_runs[0]["end"] < a_last + ttl, (a_runs[0]["end"] - a_last, ttl)

        await eventually(lambda: state_is(client, job, "succeeded"), timeout=60,
                         what="the job done by B")
        proxy.thaw()  # A comes back: its late writes must change nothing

        async def a_back() -> bool:
            return await _advertised(bus, "wA")

        await eventually(a_back, timeout=60, what="A advertising again after the partition")
        await asyncio.sleep(ttl)  # time for any write A held back to land

        runs = faultapp.runs(fault_dir)
        assert device_overlaps(runs) == []
        a_run, b_run = sorted(runs, key=lambda r: r["start"])
        assert (a_run["worker_id"], a_run["attempt"]) == ("wA", 1)
        assert (b_run["worker_id"], b_run["attempt"]) == ("wB", 2)
        assert b_run["start"] > a_run["end"]
        print(f"partition: A's last renewal stored {a_last - cut_at:+.2f}s from the cut; A "
              f"stopped {a_run['end'] - cut_at:.2f}s after the cut, B started "
              f"{b_run['start'] - cut_at:.2f}s after it (lease TTL {ttl:g}s)")
        result = await audit(client, [job])
        assert result.ok(), (result.lost, result.duplicates)
        state = result.records[job]
        assert (state.worker_id, state.attempt) == ("wB", 2)
        assert [a.outcome for a in state.attempts] == ["lost", "succeeded"]
        kinds = [e["kind"] for e in result.events]
        assert kinds.count("succeeded") == 1 and kinds.count("running") == 2
        await history.stop()
        r = replay(history.ops, ttl)
        assert r.violations == []
        # A's key was never given back by A (it could not reach the server):
        # it expired, and only then did B acquire it.
        assert r.expiries >= 1
        assert [h for _, h, _ in r.acquisitions] == ["wA", "wB"]

        # A serves again: B goes away and A takes the next job.
        procs.procs[-1].kill()
        job2 = await client.submit("hold", {"seconds": 0.2}, job_id="part-2")
        done = await client.wait(job2, timeout=60)
        assert done.state == "succeeded" and done.worker_id == "wA"
    finally:
        proxy.stop()


@pytest.mark.soak
async def test_sigstop_of_the_server_past_the_lease_ttl(bus, components, client, procs,
                                                       nats_server, tmp_path: Path) -> None:
    """Every worker is cut off at once: each stops its jobs, and after the server
    resumes each job is done exactly once, no device ever used twice at a time."""
    ttl = bus.settings.lease_ttl_s
    fault_dir = tmp_path / "runs"
    fault_dir.mkdir()
    await components.dispatcher()
    for wid in ("s1", "s2"):
        _worker(procs, wid, "sp", 2, fault_dir)
    await eventually(lambda: _advertised(bus, "s1", "s2"), timeout=60, what="workers up")
    jobs = [await client.submit("hold", {"seconds": 4.0}, job_id=f"stop-{i}", max_attempts=6)
            for i in range(6)]

    async def two_running() -> bool:
        n = 0
        for j in jobs:
            s = await client.status(j)
            n += s is not None and s.state == "running"
        return n >= 2

    await eventually(two_running, timeout=60, what="jobs running on both devices")
    assert nats_server.proc is not None
    os.kill(nats_server.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(ttl + 2)
        # Before the server wakes, every run that had started has stopped.
        open_runs = [r for r in faultapp.runs(fault_dir) if r["end"] is None]
        assert open_runs == []
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    await eventually(lambda: settled(client, jobs), timeout=180, interval=0.5,
                     what="every job to finish")
    result = await audit(client, jobs)
    assert result.ok(), (result.lost, result.duplicates, result.states)
    runs = faultapp.runs(fault_dir)
    assert device_overlaps(runs) == []
    stopped = [r for r in runs if r["attempt"] == 1 and r["end"] is not None
               and r["end"] - r["start"] < 3.9]
    assert stopped, "no run was cut short by the stopped server: the test proved nothing"
    assert result.count("retrying") + result.count("lost") >= len(stopped)

