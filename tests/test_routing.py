"""Routing and the attempt lifecycle on a real server: priorities and
starvation, delegation, retries with backoff, dead jobs, cancel with the lease
given back, timeouts, device slots, refused and unschedulable input, and the
live picture (`jetfleet workers`, `jetfleet leases`, `nats micro`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from agents.devices import inventory
from agents.worker import App, Delegate, JobContext
from agents.worker.builtin import builtin
from bus import topology
from bus.leases import LeaseTable
from tests.helpers import (
    EventLog,
    all_terminal,
    dead_letters,
    eventually,
    job_events,
    no_leases,
    overlaps,
    queued,
    state_is,
    states_of,
)


def _first(events: list[dict[str, Any]], kind: str, **match: Any) -> dict[str, Any]:
    return next(e for e in events if e["kind"] == kind
                and all(e.get(k) == v for k, v in match.items()))


# ---- priorities ----------------------------------------------------------------------


async def test_a_backlog_drains_p0_then_p1_then_p2(bus, components, client):
    await components.dispatcher()
    jobs: dict[str, int] = {}
    # Lowest first, so submission order cannot explain the outcome.
    for prio in (2, 1, 0):
        for i in range(5):
            jobs[await client.submit("echo", {"i": i}, priority=prio, job_id=f"p{prio}-{i}")] = prio
    await eventually(lambda: queued(bus, len(jobs)), what="all routed")
    events = await EventLog(bus).start()
    await components.worker(capacity=1)
    await eventually(lambda: all_terminal(client, list(jobs)), timeout=60, what="all done")
    await events.stop()
    started = sorted((e["ts"], e["job_id"]) for e in events.events if e["kind"] == "running")
    order = [jobs[j] for _, j in started]
    assert len(order) == len(jobs)
    assert order == sorted(order), order  # 15 jobs: more than any round-robin period


async def test_p2_is_served_under_a_steady_stream_of_p0(bus, components, client):
    await components.dispatcher()
    low = await client.submit("echo", {"low": True}, priority=2)
    stop = asyncio.Event()
    urgent: list[str] = []

    async def produce() -> None:  # always more p0 than one worker can take
        while not stop.is_set():
            urgent.append(await client.submit("sleep", {"seconds": 0.1, "steps": 1},
                                              priority=0))
            await asyncio.sleep(0.03)

    producer = asyncio.create_task(produce())
    try:
        await eventually(lambda: queued(bus, 5), what="a p0 backlog")
        await components.worker(capacity=1, starvation_after_s=2.0)
        state = await client.wait(low, timeout=60)
    finally:
        stop.set()
        await producer
    assert state.state == "succeeded"
    # It was served while p0 work was still waiting, not after the stream ended.
    p0 = [s for s in await states_of(client, urgent)]
    waiting_then = [s for s in p0 if s.submitted_at < state.started_at
                    and (s.started_at is None or s.started_at > state.started_at)]
    assert waiting_then, "p2 ran only once no p0 job was waiting"
    assert sum(1 for s in p0 if s.started_at and s.started_at < state.started_at) > 0


async def test_an_idle_worker_takes_new_work_by_its_waiting_pull(bus, components, client,
                                                                 procs, settings):
    """An idle worker leaves pull requests waiting, so a new job comes straight
    to it; a worker killed with -9 while its requests wait holds no job (the
    server drops them with its connection): the next job goes to a live worker
    at once, not after the work's ack wait."""
    await components.dispatcher()
    victim = procs.run("worker", "--no-kernels", "--worker-id", "w-doomed", name="doomed")
    await eventually(lambda: _serves_echo(bus, "w-doomed"), what="the doomed worker's advert")
    await asyncio.sleep(1.5)  # idle: its requests are waiting on the server
    os.killpg(victim.pid, 9)
    victim.wait(10)
    w = await components.worker()
    await eventually(lambda: w.intake.waiting_pulls >= len(topology.PRIORITIES),
                     what="the live worker's requests waiting")
    job = await client.submit("echo", {"x": 1})
    state = await client.wait(job, timeout=settings.work_ack_wait_s / 2)
    assert state.state == "succeeded" and state.worker_id == w.worker_id
    assert state.attempt == 1
    assert w.intake.lingered == 1  # it came by the waiting request, not a doorbell's pull
    await eventually(lambda: w.intake.waiting_pulls >= len(topology.PRIORITIES),
                     what="requests waiting again")


async def _serves_echo(bus, worker_id: str) -> bool:
    from bus.adverts import list_adverts

    return any(a.worker_id == worker_id and any(c.get("type") == "echo" for c in a.capabilities)
               for a in await list_adverts(bus))


# ---- delegation ------------------------------------------------------------------------


async def test_a_job_for_another_workers_labels_is_delegated_without_an_attempt(
        bus, components, client):
    await components.dispatcher()
    a = await components.worker()  # serves sleep, but no pool label
    job = await client.submit({"type": "sleep", "pool": "b"}, {"seconds": 0.1, "steps": 1})
    await eventually(lambda: _has(bus, job, "delegated"), what="A hands the job back")
    b_app = App("b")
    b_app.capability(type="sleep", pool="b")(builtin.capabilities["sleep"].handler)
    b = await components.worker(b_app)
    state = await client.wait(job, timeout=60)
    assert state.state == "succeeded" and state.attempt == 1
    assert [x.worker_id for x in state.attempts] == [b.worker_id]
    events = await job_events(bus, job)
    delegated = [e for e in events if e["kind"] == "delegated"]
    assert [e["worker_id"] for e in delegated] == [a.worker_id]  # once, however often A saw it
    assert "labels" in delegated[0]["reason"]
    assert all(e.get("attempt", 0) <= 1 for e in events)


async def test_a_handler_that_delegates_hands_back_the_same_attempt(bus, components, client):
    """Worker A takes the job, its handler finds it cannot run it after all
    (Delegate), and worker B runs it as the same attempt 1."""
    await components.dispatcher()
    picky, able = App("picky"), App("able")

    @picky.capability(type="render")
    async def refuse(ctx: JobContext) -> Any:
        raise Delegate("needs more memory than this device has")

    @able.capability(type="render")
    async def render(ctx: JobContext) -> Any:
        return {"by": ctx.worker_id, "attempt": ctx.attempt}

    a = await components.worker(picky)
    job = await client.submit("render", {})
    await eventually(lambda: _has(bus, job, "delegated"), what="A delegates")
    b = await components.worker(able)
    state = await client.wait(job, timeout=60)
    assert state.state == "succeeded" and state.result == {"by": b.worker_id, "attempt": 1}
    events = await job_events(bus, job)
    kinds = [e["kind"] for e in events]
    assert kinds.count("delegated") == 1 and _first(events, "delegated")["worker_id"] == a.worker_id
    # Every run of attempt 1 has its running event (A's and B's), none is deduplicated away.
    runs = [e for e in events if e["kind"] == "running"]
    assert {e["worker_id"] for e in runs} >= {a.worker_id, b.worker_id}
    assert {e["attempt"] for e in runs} == {1} and len(state.attempts) == 1
    assert "retrying" not in kinds


async def _has(bus, job_id, kind):
    return any(e["kind"] == kind for e in await job_events(bus, job_id))


# ---- retries, dead, timeouts ------------------------------------------------------------


async def test_retries_back_off_exponentially_then_succeed(bus, components, client):
    await components.dispatcher()
    await components.worker()
    job = await client.submit("sleep", {"seconds": 0.05, "steps": 1, "fail_attempts": 3},
                              max_attempts=5)
    state = await client.wait(job, timeout=60)
    assert state.state == "succeeded" and state.attempt == 4
    events = await job_events(bus, job)
    retrying = [e for e in events if e["kind"] == "retrying"]
    delays = [e["delay_s"] for e in retrying]
    assert len(delays) == 3 and delays == sorted(delays) and delays[0] < delays[-1]
    assert [e["error"]["code"] for e in retrying] == ["requested_failure"] * 3
    # The nak delay is honoured: the next attempt never starts before it has passed.
    for r in retrying:
        nxt = _first(events, "running", attempt=r["attempt"] + 1)
        assert nxt["ts"] - r["ts"] >= r["delay_s"] * 0.9, (r, nxt)
    assert [a.outcome for a in state.attempts] == ["failed"] * 3 + ["succeeded"]


async def test_attempts_exhausted_ends_dead_with_every_error_and_a_dead_letter(
        bus, components, client):
    await components.dispatcher()
    await components.worker()
    job = await client.submit("sleep", {"seconds": 0.05, "steps": 1, "fail_attempts": 9},
                              max_attempts=3)
    state = await client.wait(job, timeout=60)
    assert state.state == "dead" and state.attempt == 3
    dead = _first(await job_events(bus, job), "dead")
    assert [e["attempt"] for e in dead["errors"]] == [1, 2, 3]
    assert all(e["code"] == "requested_failure" for e in dead["errors"])
    letter = await _dead_letter_for(bus, job)
    assert letter["stream"] == topology.WORK and "requested_failure" in letter["reason"]
    assert json.loads(letter["raw"])["job_id"] == job
    assert (await bus.js.stream_info(topology.WORK)).state.messages == 0  # not redelivered


async def _dead_letter_for(bus, job_id):
    sub = await bus.js.subscribe(topology.DEAD_ALL, ordered_consumer=True)
    try:
        while True:
            letter = json.loads((await sub.next_msg(timeout=10)).data)
            if letter.get("job_id") == job_id:
                return letter
    finally:
        await sub.unsubscribe()


async def test_timeout_stops_the_attempt_and_counts_it_failed(bus, components, client):
    await components.dispatcher()
    await components.worker(inventory=inventory(node="nt", simulate_gpus=1, use_nvml=False))
    job = await client.submit("sleep", {"seconds": 60, "steps": 60}, timeout_s=1.0,
                              max_attempts=2, resources={"gpus": 1})
    state = await client.wait(job, timeout=60)
    # Stopped (the sleep would take a minute), retried, and dead after the second.
    assert state.state == "dead" and state.attempt == 2
    assert [a.error.code for a in state.attempts] == ["timeout", "timeout"]
    kinds = [e["kind"] for e in await job_events(bus, job)]
    assert kinds.count("retrying") == 1 and "succeeded" not in kinds
    await eventually(lambda: no_leases(bus), timeout=5, what="the lease given back")


# ---- cancel ----------------------------------------------------------------------------


async def test_cancel_a_running_gpu_job_gives_its_lease_back(bus, components, client):
    await components.dispatcher()
    await components.worker(inventory=inventory(node="nc", simulate_gpus=1, use_nvml=False))
    job = await client.submit("sleep", {"seconds": 60, "steps": 60}, resources={"gpus": 1})
    await eventually(lambda: state_is(client, job, "running"), what="running")
    assert (await LeaseTable(bus).holders())["nc.gpu0"].job_id == job
    await client.cancel(job, reason="not needed")
    state = await client.wait(job, timeout=20)
    assert state.state == "cancelled" and state.reason == "not needed"
    await eventually(lambda: no_leases(bus), timeout=3, what="the lease released")
    # The device is free for the next job at once.
    nxt = await client.submit("sleep", {"seconds": 0.05, "steps": 1}, resources={"gpus": 1})
    assert (await client.wait(nxt, timeout=20)).devices == ["nc.gpu0"]


STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(120)")


async def test_cancel_escalates_to_sigkill_of_the_handlers_process_group(bus, components,
                                                                           client, tmp_path):
    app = App("stubborn")
    pids = tmp_path / "pids"

    @app.capability(type="stubborn", gpus=1)
    async def stubborn(ctx: JobContext) -> Any:
        # Ignores the cooperative flag and runs a child that ignores SIGTERM.
        task = asyncio.create_task(ctx.run_process([sys.executable, "-c", STUBBORN]))
        await eventually(lambda: ctx.processes, timeout=10)
        pids.write_text(" ".join(str(p.pid) for p in ctx.processes))
        rc, _, _ = await task
        return {"rc": rc}

    await components.dispatcher()
    await components.worker(app, inventory=inventory(node="nk", simulate_gpus=1, use_nvml=False),
                            cancel_grace_s=0.5)
    job = await client.submit("stubborn", {})
    await eventually(lambda: pids.exists() and pids.read_text(), what="child started")
    pid = int(pids.read_text().split()[0])
    await client.cancel(job)
    state = await client.wait(job, timeout=20)
    assert state.state == "cancelled"
    await eventually(lambda: not _alive(pid), timeout=5, what="the child killed")
    await eventually(lambda: no_leases(bus), timeout=3, what="the lease released")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(Exception):  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    return True


# ---- slots -----------------------------------------------------------------------------


async def test_small_jobs_share_one_gpu_through_slots(bus, components, client):
    app = App("slots")

    @app.capability(type="slot.probe")
    async def probe(ctx: JobContext) -> Any:
        await asyncio.sleep(ctx.payload.get("seconds", 1.0))
        return {"env": ctx.env.get("CUDA_VISIBLE_DEVICES"), "devices": ctx.devices}

    await components.dispatcher()
    inv = inventory(node="ns", simulate_gpus=1, simulated_memory_mb=16000, slots_per_gpu=4,
                    use_nvml=False)
    await components.worker(app, inventory=inv)
    small = [await client.submit("slot.probe", {"seconds": 1.5},
                                 resources={"gpu_memory_mb": 4000}) for _ in range(4)]
    pair = await client.submit("slot.probe", {"seconds": 0.2}, resources={"gpu_memory_mb": 8000})
    whole = await client.submit("slot.probe", {"seconds": 0.2}, resources={"gpus": 1})
    jobs = [*small, pair, whole]
    await eventually(lambda: all_terminal(client, jobs), timeout=60, what="all done")
    states = await states_of(client, jobs)
    assert {s.state for s in states} == {"succeeded"}
    assert all(s.result["env"] == "0" for s in states)  # all on GPU 0
    slot_sets = [set(s.devices) for s in states]
    assert all(len(d) == 1 for d in slot_sets[:4]) and len(slot_sets[4]) == 2
    assert slot_sets[5] == {f"ns.gpu0.s{i}" for i in range(4)}
    # The four small ones shared the GPU at the same time, on different slots.
    small_states = states[:4]
    latest_start = max(s.started_at for s in small_states)
    earliest_end = min(s.ended_at for s in small_states)
    assert latest_start < earliest_end
    assert len({d for s in small_states for d in s.devices}) == 4
    _, bad = overlaps(states)  # and never two on one slot
    assert bad == []


# ---- bad input ---------------------------------------------------------------------------


async def test_bad_resources_and_labels_are_refused_with_a_reason(bus, components, client):
    await components.dispatcher()
    await components.worker(inventory=inventory(node="nb", simulate_gpus=2, use_nvml=False))
    bad = {
        "unk": ({"resources": {"gpus": 1, "tpus": 2}}, "tpus"),
        "neg": ({"resources": {"gpus": -1}}, "gpus"),
        "negmem": ({"resources": {"gpu_memory_mb": -5}}, "gpu_memory_mb"),
        "badres": ({"resources": 4}, "resources"),
        "labint": ({"capability": {"type": "sleep", "arch": 90}}, "arch"),
        "labempty": ({"capability": {"type": "sleep", "arch": ""}}, "arch"),
        "labels": ({"labels": {"team": ["a"]}}, "labels"),
    }
    for job_id, (fields, _) in bad.items():
        body = {"job_id": job_id, "capability": {"type": "sleep"}, **fields}
        await bus.js.publish(topology.SUBMIT, json.dumps(body).encode())
    for job_id, (_, fragment) in bad.items():
        state = await client.wait(job_id, timeout=20)
        assert state.state == "failed" and state.error.code == "invalid_submission", job_id
        assert fragment in state.error.message, (job_id, state.error.message)
        failed = _first(await job_events(bus, job_id), "failed")
        assert failed["error"]["message"] == state.error.message
        assert "running" not in [e["kind"] for e in await job_events(bus, job_id)]
    letters = await dead_letters(bus, len(bad))
    assert {lt["reason"] for lt in letters} == {
        (await client.status(j)).error.message for j in bad}


async def test_resources_no_node_can_hold_are_unschedulable_at_once(bus, components, client):
    # A long grace: "at once" must come from the resource check, not the grace.
    await components.dispatcher(unschedulable_after_s=120)
    await components.worker(inventory=inventory(node="nu", simulate_gpus=2, use_nvml=False))
    await eventually(lambda: _advertised(client, 1), what="the worker's advert")
    job = await client.submit("sleep", {"seconds": 0.05}, resources={"gpus": 64})
    state = await eventually(lambda: state_is(client, job, "unschedulable"), timeout=10)
    assert "gpus=64" in state.reason and "most GPUs any matching node offers is 2" in state.reason
    event = _first(await job_events(bus, job), "unschedulable")
    assert event["reason"] == state.reason
    # A job that fits still runs beside it.
    ok = await client.submit("sleep", {"seconds": 0.05, "steps": 1}, resources={"gpus": 2})
    assert (await client.wait(ok, timeout=20)).state == "succeeded"
    assert (await client.status(job)).state == "unschedulable"  # and it never ran


async def _loaded(client, worker_id):
    return any(a.worker_id == worker_id and a.load == 1 for a in await client.workers())


async def _advertised(client, n):
    return len(await client.workers()) >= n


# ---- the live picture ------------------------------------------------------------------


async def test_workers_and_leases_cli_and_micro_services(bus, components, client, procs):
    await components.dispatcher()
    w = await components.worker(inventory=inventory(node="nv", simulate_gpus=2, use_nvml=False))
    job = await client.submit("sleep", {"seconds": 60, "steps": 60}, resources={"gpus": 1})
    await eventually(lambda: state_is(client, job, "running"), what="running")
    await eventually(lambda: _loaded(client, w.worker_id), what="the advert shows the load")
    out = await asyncio.to_thread(procs.cli, "leases", "--json")
    assert out.returncode == 0, out.stderr
    leases = json.loads(out.stdout)  # a list, like every listing's --json
    assert [v["job_id"] for v in leases] == [job]
    assert leases[0]["holder"] == w.worker_id and leases[0]["key"].startswith("nv.gpu")
    out = await asyncio.to_thread(procs.cli, "workers", "--json")
    adverts = json.loads(out.stdout)
    (advert,) = [a for a in adverts if a["worker_id"] == w.worker_id]
    assert advert["load"] == 1 and advert["capacity"] == 2 and advert["simulated"] is True
    assert [d["key"] for d in advert["devices"]] == ["nv.gpu0", "nv.gpu1"]
    # `nats micro ls` is a $SRV.PING; `nats micro info` a $SRV.INFO.
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish("$SRV.PING.jetfleet-worker", b"", reply=inbox)
    pong = json.loads((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()
    assert pong["metadata"]["worker_id"] == w.worker_id
    info = await bus.nc.request(f"jetfleet.worker.{w.worker_id}.info", b"", timeout=5)
    assert json.loads(info.data)["running"] == [job]
    await client.cancel(job)
    await client.wait(job, timeout=20)


async def test_capability_concurrency_limit_holds_while_the_worker_has_room(components, client):
    """`concurrency=` on a capability caps it below the worker's capacity."""
    app = App()
    active = {"now": 0, "most": 0}

    @app.capability(type="narrow", concurrency=2)
    async def narrow(ctx: JobContext) -> dict:
        active["now"] += 1
        active["most"] = max(active["most"], active["now"])
        await asyncio.sleep(0.2)
        active["now"] -= 1
        return {}

    await components.dispatcher()
    await components.worker(app, capacity=8)
    ids = [await client.submit("narrow") for _ in range(8)]
    for job_id in ids:
        assert (await client.wait(job_id, timeout=30)).state == "succeeded"
    assert active["most"] == 2
