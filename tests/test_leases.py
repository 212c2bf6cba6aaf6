"""Device leases on a real nats-server: the primitives, then many workers
contending for a few devices, checked two independent ways (the KV history
of every lease key, and the jobs' own running intervals per device)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from agents.devices import inventory
from agents.worker import App, JobContext
from bus import topology
from bus.leases import LeaseLost, LeaseTable
from tests.helpers import (
    EventLog,
    LeaseHistory,
    all_terminal,
    eventually,
    job_events,
    no_leases,
    overlaps,
    queued,
    replay,
    sleep_only,
    state_is,
    states_of,
)

# ---- the primitives ------------------------------------------------------------------


async def test_acquire_is_exclusive_renew_and_release_are_revision_checked(bus):
    leases = LeaseTable(bus, "n0")
    a = await leases.acquire("n0.gpu0", "w-a", "j1")
    assert a is not None and a.revision > 0
    assert await leases.acquire("n0.gpu0", "w-b", "j2") is None  # held: no second holder
    rev = a.revision
    await leases.renew(a)
    assert a.revision > rev
    # An older lease of the same holder on the same key (an earlier
    # acquisition, an earlier revision) can neither renew nor release.
    stale = type(a)(a.device, a.holder, a.job_id, rev, a.acquired_at - 1.0)
    with pytest.raises(LeaseLost):
        await leases.renew(stale)
    assert await leases.release(stale) is False
    # The same lease with an outdated revision is a renewal that timed out
    # but was applied: the record is provably its own, so it is adopted.
    behind = type(a)(a.device, a.holder, a.job_id, rev, a.acquired_at)
    await leases.renew(behind)
    assert behind.revision > a.revision
    a.revision = behind.revision
    assert (await leases.holders())["n0.gpu0"].holder == "w-a"
    assert await leases.release(a) is True
    assert "n0.gpu0" not in await leases.holders()
    # Free again, re-creatable over the delete marker; the old holder's lease
    # is dead for good.
    b = await leases.acquire("n0.gpu0", "w-b", "j2")
    assert b is not None
    with pytest.raises(LeaseLost):
        await leases.renew(a)
    assert await leases.release(a) is False
    assert (await leases.holders())["n0.gpu0"].holder == "w-b"


async def test_many_racers_one_winner_and_all_or_nothing(bus):
    leases = LeaseTable(bus, "n0")
    got = await asyncio.gather(*(leases.acquire("n0.gpu1", f"w{i}", f"j{i}") for i in range(40)))
    assert sum(1 for g in got if g is not None) == 1
    # all-or-nothing: gpu1 is taken, so a job wanting gpu0+gpu1 holds neither.
    assert await leases.acquire_all(["n0.gpu0", "n0.gpu1"], "w-x", "jx") is None
    assert "n0.gpu0" not in await leases.holders()


async def test_a_dead_holders_lease_expires_through_the_ttl(bus):
    leases = LeaseTable(bus, "n0")
    ttl = bus.settings.lease_ttl_s
    a = await leases.acquire("n0.gpu2", "w-dead", "j1")
    assert a is not None
    # Nobody renews it: within the TTL (plus the server's expiry tick) it is free.
    b = await eventually(lambda: leases.acquire("n0.gpu2", "w-new", "j2"),
                         timeout=ttl + 5, interval=0.25, what="the key to expire")
    assert b.holder == "w-new"
    with pytest.raises(LeaseLost):
        await leases.renew(a)


# ---- workers and leases ----------------------------------------------------------------


async def test_running_event_carries_leases_and_the_handler_sees_its_device(bus, components,
                                                                            client):
    app = App("envs")

    @app.capability(type="show.env", gpus=1)
    async def show(ctx: JobContext) -> dict[str, Any]:
        held = await LeaseTable(ctx.bus).holders()
        return {"env": ctx.env.get("CUDA_VISIBLE_DEVICES"), "devices": ctx.devices,
                "held": {k: v.job_id for k, v in held.items()}}

    await components.dispatcher()
    await components.worker(app, inventory=inventory(node="ne", simulate_gpus=3,
                                                     use_nvml=False))
    job = await client.submit("show.env", {}, resources={"gpus": 2})
    state = await client.wait(job, timeout=20)
    assert state.state == "succeeded"
    devices = state.result["devices"]
    assert len(devices) == 2 and all(d.startswith("ne.gpu") for d in devices)
    # Exactly its devices, by index, and they were leased to this job while it ran.
    assert state.result["env"] == ",".join(d.removeprefix("ne.gpu") for d in sorted(devices))
    assert {d: job for d in devices}.items() <= state.result["held"].items()
    running = next(e for e in await job_events(bus, job) if e["kind"] == "running")
    assert sorted(running["devices"]) == sorted(devices) == sorted(state.devices)
    # Released after the terminal event.
    await eventually(lambda: no_leases(bus), timeout=5, what="leases released")


async def test_losing_the_lease_stops_the_job_and_it_is_retried(bus, components, client):
    await components.dispatcher()
    await components.worker(inventory=inventory(node="nl", simulate_gpus=1, use_nvml=False))
    job = await client.submit("sleep", {"seconds": 30, "steps": 30}, resources={"gpus": 1},
                              max_attempts=2)
    await eventually(lambda: state_is(client, job, "running"), what="running")
    # Someone deletes the key under the holder (as an expiry would): its next
    # renewal's compare-and-set fails, and the job is stopped at once.
    kv = await bus.kv(topology.KV_LEASES)
    await kv.delete("nl.gpu0")
    s = await eventually(lambda: _attempt_ended(client, job, 1), timeout=15, what="attempt 1 ended")
    assert s.attempts[0].outcome == "failed" and s.attempts[0].error.code == "lease_lost"
    # Retried on a fresh lease (the attempt counted), then cancelled to finish quickly.
    await eventually(lambda: state_is(client, job, "running"), timeout=15, what="attempt 2")
    await client.cancel(job)
    s = await client.wait(job, timeout=20)
    assert s.state == "cancelled" and s.attempt == 2
    kinds = [e["kind"] for e in await job_events(bus, job)]
    assert kinds.count("retrying") == 1 and kinds.count("running") == 2


async def test_a_holder_that_cannot_renew_stops_before_the_ttl(bus, components, client,
                                                                nats_server):
    """The server is unreachable (frozen) for longer than the TTL: the worker
    cannot know whether its lease expired, so it stops the job itself."""
    await components.dispatcher()
    await components.worker(inventory=inventory(node="np", simulate_gpus=1, use_nvml=False))
    job = await client.submit("sleep", {"seconds": 60, "steps": 60}, resources={"gpus": 1},
                              max_attempts=2)
    await eventually(lambda: state_is(client, job, "running"), what="running")
    ttl = bus.settings.lease_ttl_s
    assert nats_server.proc is not None
    os.kill(nats_server.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(ttl + 1.5)
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    s = await eventually(lambda: _attempt_ended(client, job, 1), timeout=20, what="attempt 1 ended")
    # Stopped by its own deadline while the server was away, not by a failed CAS after.
    assert s.attempts[0].error.code == "lease_lost", s.attempts[0]
    assert "no lease renewal confirmed" in s.attempts[0].error.message
    await client.cancel(job)
    await client.wait(job, timeout=30)


async def _attempt_ended(client, job_id, attempt):
    s = await client.status(job_id)
    if s is None:
        return None
    for a in s.attempts:
        if a.attempt == attempt and a.ended_at is not None:
            return s
    return None


# ---- contention ------------------------------------------------------------------------


async def _contend(bus, components, client, *, workers: int, devices: int, jobs: int,
                   seconds: float) -> None:
    events = await EventLog(bus).start()
    await components.dispatcher()
    job_ids = [await client.submit("sleep", {"seconds": seconds, "steps": 1},
                                   job_id=f"c{i:04d}", resources={"gpus": 1}, max_attempts=3)
               for i in range(jobs)]
    await eventually(lambda: queued(bus, jobs), timeout=60, what="all jobs routed")
    history = await LeaseHistory(bus).start()
    app = sleep_only()
    for _ in range(workers):  # one node, so every worker contends for the same keys
        await components.worker(app, inventory=inventory(node="hot", simulate_gpus=devices,
                                                         use_nvml=False))
    await eventually(lambda: all_terminal(client, job_ids), timeout=600, interval=0.5,
                     what="every job to finish")
    await eventually(lambda: no_leases(bus), timeout=10, what="every lease released")
    await asyncio.sleep(0.5)  # let the history consumer catch up with the last deletes
    await history.stop()
    await events.stop()

    states = await states_of(client, job_ids)
    assert {s.state for s in states} == {"succeeded"}
    assert all(n == 1 for n in events.count("succeeded").values())
    assert len(events.count("succeeded")) == jobs

    # 1. The KV history: per key, create -> renewals -> delete, never two holders.
    r = replay(history.ops, bus.settings.lease_ttl_s)
    assert r.violations == []
    assert r.expiries == 0  # every lease was released, none leaked to the TTL
    assert r.releases == len(r.acquisitions)
    # Each attempt's devices were acquired by its worker for its job.
    acquired = {(k, h, j) for k, h, j in r.acquisitions}
    for s in states:
        for a in s.attempts:
            assert a.devices and all((d, a.worker_id, s.job_id) in acquired for d in a.devices)
    # 2. The jobs' own record: no two attempts overlap on one device.
    used, bad = overlaps(states)
    assert bad == []
    assert set(used) <= {f"hot.gpu{i}" for i in range(devices)}
    assert sum(used.values()) == sum(len(s.attempts) for s in states)
    # The running events name the same devices as the attempt records.
    running = {(e["job_id"], e["attempt"]): e["devices"] for e in events.events
               if e["kind"] == "running"}
    for s in states:
        for a in s.attempts:
            assert running[(s.job_id, a.attempt)] == a.devices
    # Real contention: many workers ran jobs, and every device was used.
    assert len({a.worker_id for s in states for a in s.attempts}) > devices
    assert len(used) == devices


async def test_contention_32_workers_8_devices(bus, components, client):
    await _contend(bus, components, client, workers=32, devices=8, jobs=200, seconds=0.05)


@pytest.mark.soak
async def test_contention_soak(bus, components, client):
    await _contend(bus, components, client, workers=32, devices=8, jobs=800, seconds=0.05)
