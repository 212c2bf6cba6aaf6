"""The single embedded server (file store) restarted under load, on the same
port and store: every component reconnects by itself, every follower of a
stream or a bucket (ordered consumers: the SDK's events() and wait(), the
monitor's KV mirrors) resumes as soon as the server is back, and no job is
lost or finished twice.

nats.py recovers an ordered consumer that a restart left behind only when
its idle-heartbeat check fires (two missed 5 s heartbeats, then another pass
if the first re-creation found JetStream not ready yet: 10 to 20 s measured
here), so "resumes" is checked against a bound well under that.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DiscardPolicy

from bus import topology
from bus.adverts import list_adverts
from bus.control import request
from bus.jobtable import JobTable
from bus.server import EmbeddedServer
from schemas import lifecycle as lc
from schemas.jobs import JobSubmission
from services.monitor import Monitor
from tests import faultapp
from tests.faults import audit, device_overlaps, job_stream, retrying, settled
from tests.helpers import eventually, job_events, state_is

# echo, and `hold` (tests/faultapp.py) on three simulated GPUs.
WORKER = ("--app", "tests.faultapp:app", "--no-kernels", "--simulate-gpus", "3")
# Well under nats.py's own recovery of a stalled ordered consumer (10-20 s).
RESUME_BOUND_S = 6.0


def restart(server: EmbeddedServer, how: str, down_s: float = 0.0) -> float:
    """Stop the server (SIGTERM: a clean shutdown; SIGKILL: none), leave it down
    `down_s`, and start it again on the same port and store; returns how long
    it was away."""
    t0 = time.monotonic()
    if how == "SIGKILL":
        server.kill()
    else:
        server.stop()
    time.sleep(down_s)
    server.start()
    return time.monotonic() - t0


# ---- followers -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", [pytest.param("SIGTERM", marks=pytest.mark.soak), "SIGKILL"])
async def test_followers_resume_at_once_after_a_restart(bus, client, components, nats_server,
                                                        how: str) -> None:
    """wait() (the SDK's events()) and the monitor's mirror of KV jobs, both
    started before the restart, see what happens after it within seconds."""
    monitor = Monitor(bus, lost_after=60.0)
    mon_task = asyncio.create_task(monitor.run())
    try:
        await eventually(lambda: monitor._ready, timeout=20, what="the monitor replayed")
        await components.dispatcher()
        job = await client.submit("echo", {"n": 1}, job_id="follow-1")
        await eventually(lambda: state_is(client, job, "queued"), what="queued, no worker yet")
        waiter = asyncio.create_task(client.wait(job, timeout=120))
        await asyncio.sleep(0.5)  # its ordered consumer is in place
        restart(nats_server, how)
        await retrying(lambda: bus.js.account_info())
        # A job record written after the restart: the monitor's index follows KV jobs.
        table = JobTable(bus)
        state = lc.new_job(JobSubmission(capability={"type": "hold"}, payload={},
                                         job_id="mirror-1"), "mirror-1")
        await retrying(lambda: table.create(state))
        got = await retrying(lambda: table.transition(
            "mirror-1", lc.start(1, "w-elsewhere", "node-m", [])))
        assert got is not None
        written = time.monotonic()
        await eventually(lambda: "mirror-1" in monitor.index.jobs, timeout=RESUME_BOUND_S,
                         what="the monitor's KV mirror to see a record written after the restart")
        mirror_s = time.monotonic() - written
        assert monitor.index.jobs["mirror-1"].node == "node-m"
        # The job finishes after the restart: the waiter hears it promptly.
        await components.worker()
        await eventually(lambda: state_is(client, job, "succeeded"), timeout=30,
                         what="the job done")
        done = time.monotonic()
        final = await asyncio.wait_for(waiter, RESUME_BOUND_S)
        assert final.state == "succeeded" and final.result == {"n": 1}
        print(f"{how}: the mirror saw a new record after {mirror_s:.2f}s, the waiter "
              f"returned {time.monotonic() - done:.2f}s after the job ended")
    finally:
        monitor.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(mon_task, 15)


async def test_an_idle_workers_waiting_pulls_are_made_again_after_a_restart(
        bus, client, components, nats_server) -> None:
    """A restarted server has forgotten the pull requests an idle worker left
    waiting: the worker gives their slots back on reconnect and leaves new ones,
    so the next job still comes straight to it."""
    await components.dispatcher()
    w = await components.worker()
    await eventually(lambda: w.intake.waiting_pulls >= len(topology.PRIORITIES),
                     what="requests waiting")
    used = dict(w.intake.pool_used)
    await asyncio.to_thread(restart, nats_server, "SIGKILL")
    await eventually(lambda: w.intake.forgotten == 1, timeout=30, what="the reconnect")
    await eventually(lambda: w.intake.waiting_pulls >= len(topology.PRIORITIES),
                     what="requests made again")
    assert w.intake.pool_used == used  # every slot the old requests held was given back
    before = w.intake.lingered
    job = await client.submit("echo", {"after": "restart"})
    assert (await client.wait(job, timeout=30)).state == "succeeded"
    assert w.intake.lingered == before + 1  # it came by a request made after the restart


async def test_the_monitor_rewatches_after_a_reconnect_it_did_not_see(bus, nats_server) -> None:
    """A reconnect shorter than the monitor's tick (in a cluster, failing over to
    another server takes milliseconds) leaves its loop nothing to notice: its KV
    mirrors must still be made afresh, since the consumers behind them may be
    gone with the server."""
    monitor = Monitor(bus, lost_after=60.0, tick_s=3.0)
    mon_task = asyncio.create_task(monitor.run())
    try:
        await eventually(lambda: monitor._ready, timeout=20, what="the monitor replayed")
        await asyncio.sleep(0.2)  # just after a tick: the restart falls between two
        restart(nats_server, "SIGKILL")
        table = JobTable(bus)
        state = lc.new_job(JobSubmission(capability={"type": "hold"}, payload={},
                                         job_id="mirror-2"), "mirror-2")
        await retrying(lambda: table.create(state))
        await retrying(lambda: table.transition("mirror-2",
                                                lc.start(1, "w-elsewhere", "node-m", [])))
        await eventually(lambda: "mirror-2" in monitor.index.jobs, timeout=RESUME_BOUND_S,
                         what="the monitor's KV mirror to see a record written after the restart")
    finally:
        monitor.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(mon_task, 15)


# ---- the whole fleet under load ------------------------------------------------------------


async def _answers(bus: Any, kind: str, instance: str) -> bool:
    try:
        info = await request(bus, kind, instance, "info", timeout=1.0)
    except Exception:
        return False
    return bool(info)


# SIGKILL and down for longer than the lease TTL and the ack wait (3 s here):
# running jobs lose their leases and stop, their work messages come back,
# attempts are retried. SIGTERM and straight back (a clean restart) in `just soak`.
@pytest.mark.parametrize(("how", "down_s"), [pytest.param("SIGTERM", 0.0, marks=pytest.mark.soak),
                                             ("SIGKILL", 4.0)])
async def test_a_server_restart_under_load_loses_and_doubles_nothing(
        bus, client, procs, nats_server, tmp_path: Path, how: str, down_s: float) -> None:
    rng = random.Random(7)
    members = {
        ("dispatcher", "d-1"): ("dispatcher", "--instance-id", "d-1"),
        ("worker", "rw1"): ("worker", *WORKER, "--node", "rn1", "--worker-id", "rw1"),
        ("worker", "rw2"): ("worker", *WORKER, "--node", "rn2", "--worker-id", "rw2"),
        ("monitor", "m-1"): ("monitor", "--instance-id", "m-1", "--lost-after", "20"),
        ("agent", "a-1"): ("agent", "--instance-id", "a-1", "--node", "rn1",
                           "--simulate-gpus", "2", "--heartbeat", "1",
                           "--metrics-interval", "2"),
    }
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    children = {key: procs.run(*argv, name=key[1], env={"JETFLEET_FAULT_DIR": str(runs_dir)})
                for key, argv in members.items()}
    for kind, instance in members:
        await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=60,
                         what=f"{instance} up")
    await eventually(lambda: _workers(bus, 2), timeout=60, what="both workers advertised")
    submitted: list[str] = []
    load = asyncio.create_task(job_stream(client, 120, rng, submitted, rate=15.0))
    await eventually(lambda: len(submitted) >= 40, timeout=60, what="load flowing")
    away_s = await asyncio.to_thread(restart, nats_server, how, down_s)
    back = time.time()
    await asyncio.wait_for(load, 120)
    await eventually(lambda: settled(client, submitted), timeout=180, interval=0.5,
                     what="every job to finish")
    result = await audit(client, submitted)
    assert result.ok(), (result.lost, result.duplicates, result.states)
    assert device_overlaps(faultapp.runs(runs_dir)) == []
    # Work went on after the restart, and every component is still there and
    # answering on its control endpoint (reconnected, not restarted).
    after = [e for e in result.events if e["kind"] == "succeeded" and e["ts"] > back]
    assert after, "no job finished after the restart"
    assert all(p.poll() is None for p in children.values())
    for kind, instance in members:
        await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=20,
                         what=f"{instance} answering after the restart")
    # The monitor still hears the agent (a restart shorter than --lost-after
    # is no lost node), and its mirror of KV jobs caught up: nothing open.
    mon = await request(bus, "monitor", "m-1", "info")
    assert mon["lost"] == 0 and mon["nodes_alive"] >= 1

    async def monitor_caught_up() -> bool:
        info = await request(bus, "monitor", "m-1", "info")
        return info["open_jobs"] == 0 and info["heartbeats"] > mon["heartbeats"]

    await eventually(monitor_caught_up, timeout=RESUME_BOUND_S, what="the monitor caught up")
    first_after = min(e["ts"] for e in after)
    print(f"{how}: server away {away_s:.2f}s; first job done {first_after - back:.2f}s after "
          f"it was back; states {dict(result.states)}; lost attempts {result.count('lost')}, "
          f"retries {result.count('retrying')}")


async def _workers(bus: Any, n: int) -> bool:
    return len(await list_adverts(bus)) >= n


# ---- an outcome's event and its acknowledgement ----------------------------------------------


async def test_an_outcome_whose_event_is_refused_keeps_its_work_message(bus, components,
                                                                        client) -> None:
    """EVENTS refuses the `succeeded` event (as while a cluster elects its new
    leader) but the WORK stream would take the ack: the message must stay, come
    back, and the event be said once EVENTS takes events again. Acking beside
    the event (not after it) lost the event for good: the record said
    succeeded and no follower ever heard it."""
    await components.dispatcher()
    await components.worker()  # (a component's connect declares EVENTS as it should be)
    job = await client.submit("sleep", {"seconds": 1.5, "steps": 1}, job_id="refused-1")
    await eventually(lambda: state_is(client, job, "running"), what="the job running")
    info = await bus.js.stream_info(topology.EVENTS)
    full = info.config
    blocked = copy.deepcopy(full)
    blocked.discard, blocked.max_msgs = DiscardPolicy.NEW, info.state.messages
    await bus.js.update_stream(blocked)  # every further event is refused
    try:
        await eventually(lambda: state_is(client, job, "succeeded"), timeout=20,
                         what="the record says succeeded")
        await asyncio.sleep(2.0)  # redeliveries meanwhile are refused their event too
        assert "succeeded" not in [e["kind"] for e in await job_events(bus, job)]
    finally:
        await bus.js.update_stream(full)

    async def announced() -> bool:
        return "succeeded" in [e["kind"] for e in await job_events(bus, job)]

    await eventually(announced, timeout=30, what="the succeeded event, said after all")
    kinds = [e["kind"] for e in await job_events(bus, job)]
    assert kinds.count("succeeded") == 1
    assert (await bus.js.stream_info(topology.WORK)).state.messages == 0
