"""kill -9 of one server of a three-server cluster under load: every stream,
bucket and the object store replicated three ways, every component connected
to all three servers. Counted at the end: no job lost, no result twice, no
device used by two jobs at once (the handlers' own account, and the replay
of every write to KV `leases`); the time to recover is measured and printed.

A cluster takes about ten seconds to form here and as long again to elect new
leaders for what the killed server led, so these are soak tests (`just soak`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus import topology
from bus.adverts import list_adverts
from bus.connection import connect
from bus.control import request
from bus.server import EmbeddedCluster, EmbeddedServer
from bus.settings import Settings
from sdk import Client
from tests import faultapp
from tests.conftest import FAST, ROOT, Procs
from tests.faults import LeaseTap, audit, device_overlaps, job_stream, settled
from tests.helpers import eventually, replay

# What the killed server may have led, and must be led again before work flows.
REPLICATED = (topology.JOBS, topology.WORK, topology.EVENTS, f"KV_{topology.KV_JOBS}",
              f"KV_{topology.KV_LEASES}", f"KV_{topology.KV_CAPABILITIES}")
WORKER = ("--app", "tests.faultapp:app", "--no-kernels")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(tmp_path / "nats", size=3).start()
    try:
        yield c
    finally:
        c.stop()


async def _leaders(bus: Any) -> dict[str, str | None]:
    """Who leads each replicated stream now (None: nobody yet, or no answer in 1 s)."""
    out: dict[str, str | None] = {}
    for name in REPLICATED:
        try:
            info = await asyncio.wait_for(bus.js.stream_info(name), 1.0)
            out[name] = info.cluster.leader if info.cluster else None
        except Exception:
            out[name] = None
    return out


def _longest_gap(times: list[float]) -> float:
    times = sorted(times)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def _answers(bus: Any, kind: str, instance: str) -> bool:
    try:
        return bool(await request(bus, kind, instance, "info", timeout=1.0))
    except Exception:
        return False


async def _kill_one_under_load(cluster: EmbeddedCluster, tmp_path: Path, *, target: str,
                               jobs: int, rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    env = {**os.environ, **FAST, "JETFLEET_NATS_URL": cluster.url, "JETFLEET_REPLICAS": "3",
           "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "INFO",
           "JETFLEET_FAULT_DIR": str(tmp_path / "runs")}
    (tmp_path / "runs").mkdir()
    (tmp_path / "logs").mkdir()
    settings = Settings.from_env(env)
    bus = await connect(settings, name="test")
    client = Client(bus)
    procs = Procs(env, tmp_path / "logs")
    tap = await LeaseTap(bus).start()
    try:
        members = {
            ("dispatcher", "cd1"): ("dispatcher", "--instance-id", "cd1"),
            ("dispatcher", "cd2"): ("dispatcher", "--instance-id", "cd2"),
            # Two workers per node, on the same two simulated GPUs: they contend
            # for the same lease keys.
            **{("worker", w): ("worker", *WORKER, "--simulate-gpus", "2", "--node", node,
                               "--worker-id", w)
               for w, node in (("cw1", "cn1"), ("cw2", "cn1"), ("cw3", "cn2"), ("cw4", "cn2"))},
            ("monitor", "cm1"): ("monitor", "--instance-id", "cm1", "--lost-after", "30"),
            ("agent", "ca1"): ("agent", "--instance-id", "ca1", "--node", "cn1",
                               "--simulate-gpus", "2", "--heartbeat", "1",
                               "--metrics-interval", "2"),
        }
        children = {key: procs.run(*argv, name=key[1]) for key, argv in members.items()}
        for kind, instance in members:
            await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=90,
                             what=f"{instance} up")

        async def workers_up() -> bool:
            return len(await list_adverts(bus)) >= 4

        await eventually(workers_up, timeout=60, what="every worker advertised")
        before = await _leaders(bus)
        names = [s.server_name for s in cluster.servers]
        victim_name = before[topology.WORK] if target == "work-leader" else rng.choice(
            [n for n in names if n != before[topology.WORK]])
        victim: EmbeddedServer = next(s for s in cluster.servers if s.server_name == victim_name)

        submitted: list[str] = []
        load = asyncio.create_task(job_stream(client, jobs, rng, submitted, rate=rate,
                                              prefix="c"))
        await eventually(lambda: len(submitted) >= jobs // 3, timeout=120, what="load flowing")
        t_kill = time.time()
        victim.kill()
        # Recovery: every replicated stream led again (by a living server) ...

        async def led() -> dict[str, str | None] | None:
            now = await _leaders(bus)
            ok = all(v is not None and v != victim_name for v in now.values())
            return now if ok else None

        after = await eventually(led, timeout=120, interval=0.2, what="new leaders")
        leaders_s = time.time() - t_kill
        # ... and every component answering its control endpoint.
        for kind, instance in members:
            await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=60,
                             what=f"{instance} answering after the kill")
        components_s = time.time() - t_kill
        await asyncio.wait_for(load, 300)
        await eventually(lambda: settled(client, submitted), timeout=300, interval=0.5,
                         what="every job to finish")
        result = await audit(client, submitted)
        await asyncio.sleep(1.0)  # the tap has read the last releases
        await tap.stop()
        assert result.ok(), (result.lost[:10], result.duplicates[:10], result.states)
        runs = faultapp.runs(tmp_path / "runs")
        assert device_overlaps(runs) == []
        r = replay(tap.ops, settings.lease_ttl_s)
        assert r.acquisitions, "the lease tap read nothing: the replay proved nothing"
        assert tap.violations(settings.lease_ttl_s) == []
        assert all(p.poll() is None for p in children.values())
        done = [e["ts"] for e in result.events if e["kind"] == "succeeded"]
        assert any(t > t_kill for t in done), "no job finished after the kill"
        # Recovery, as a user sees it: the first job submitted after the kill
        # to finish, and the longest spell with no job finishing at all.
        late = [s for s in result.records.values() if s.submitted_at > t_kill]
        first_new = min((s.ended_at or 0.0) - t_kill for s in late) if late else None
        return {"victim": victim_name, "target": target, "leaders_before": before,
                "leaders_after": after, "leaders_s": round(leaders_s, 2),
                "components_s": round(components_s, 2),
                "first_new_job_done_s": round(first_new, 2) if first_new else None,
                "longest_stall_s": round(_longest_gap([t_kill, *done]), 2),
                "jobs": len(submitted), "states": dict(result.states),
                "lost_attempts": result.count("lost"), "retries": result.count("retrying"),
                "lease_acquisitions": len(r.acquisitions), "lease_expiries": r.expiries,
                "lease_writes": len(tap.ops), "lease_writes_missed": tap.missed,
                "device_runs": len(runs)}
    finally:
        await tap.stop()
        procs.close()
        await bus.close()


@pytest.mark.soak
@pytest.mark.parametrize("target", ["work-leader", "another"])
async def test_kill_9_one_of_three_servers_under_load(cluster, tmp_path: Path,
                                                      target: str) -> None:
    out = await _kill_one_under_load(cluster, tmp_path, target=target, jobs=240, rate=12.0,
                                     seed=5)
    print("cluster kill:", out)
    assert out["states"] == {"succeeded": out["jobs"]}
    assert out["leaders_after"][topology.WORK] != out["victim"]


