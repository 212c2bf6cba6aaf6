"""The attempt pipeline: typed handlers, composable middleware, progress that
costs the bus little, one cancel path, child jobs. Real nats-server, real
dispatcher and workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import msgspec

from agents.worker import App, JobContext, JobError
from agents.worker.middleware import Middleware
from agents.worker.outcome import Failed, Outcome, Succeeded
from bus import topology
from tests.conftest import ROOT
from tests.helpers import event_kinds, eventually, job_events, running_attempt


class Square(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    times: int = 1


class Squared(msgspec.Struct):
    value: int
    by: str


typed = App("typed")


@typed.capability(type="square")
async def square(ctx: JobContext, p: Square) -> Squared:
    return Squared(value=p.x * p.x * p.times, by=ctx.worker_id)


@typed.capability(type="plain")
def plain(ctx: JobContext) -> dict:  # a plain function with the raw payload: still works
    return {"got": ctx.payload, "thread": True}


# ---- typed handlers -------------------------------------------------------------------


async def test_a_typed_handler_gets_its_struct_and_returns_one(bus, components, client):
    await components.dispatcher()
    w = await components.worker(typed)
    assert await client.run("square", {"x": 7, "times": 2}, timeout=20) == {
        "value": 98, "by": w.worker_id}
    assert await client.run("plain", {"a": [1]}, timeout=20) == {"got": {"a": [1]},
                                                                   "thread": True}


async def test_an_invalid_payload_fails_at_once_with_msgspecs_message(bus, components, client):
    from agents.worker.builtin import builtin

    await components.dispatcher()
    await components.worker(App().include(typed).include(builtin))
    job = await client.submit("square", {"x": "seven"}, max_attempts=3)
    state = await client.wait(job, timeout=20)
    assert state.state == "failed" and state.error.code == "invalid_payload"
    assert "Expected `int`, got `str` - at `$.x`" in state.error.message
    assert state.attempt == 1 and "retrying" not in await event_kinds(bus, job)
    # The built-in sleep is typed too: an unknown field is refused, not ignored.
    nap = await client.submit("sleep", {"secs": 3})
    state = await client.wait(nap, timeout=20)
    assert state.state == "failed" and "secs" in state.error.message


# ---- middleware -----------------------------------------------------------------------


class Recorder(Middleware):
    """A piece of our own: records the hooks, and turns one failure into a success."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def before_start(self, att):
        self.calls.append("before_start")
        return None

    async def after_start(self, att):
        self.calls.append(f"after_start:{att.number}")

    async def after_invoke(self, att, outcome: Outcome) -> Outcome:
        self.calls.append(f"after_invoke:{type(outcome).__name__}")
        if isinstance(outcome, Failed) and outcome.error.code == "flaky":
            return Succeeded({"rescued": True}, 0.0)
        return outcome

    async def after_attempt(self, att, outcome):
        self.calls.append(f"after_attempt:{type(outcome).__name__}")


async def test_a_finished_job_leaves_no_reference_cycle(bus, components, client):
    """An attempt, its context and its deliveries are freed by reference counting
    as soon as the job ends: a cycle per job would make the collector's passes a
    real share of a busy worker's CPU."""
    import gc

    from agents.worker.attempt import Attempt
    from bus.consumer import Delivery

    await components.dispatcher()
    await components.worker()
    assert await client.run("echo", {"warm": 1}, timeout=20) == {"warm": 1}
    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            assert await client.run("echo", {"i": i}, timeout=20) == {"i": i}
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if isinstance(o, Attempt | Delivery | JobContext)]
        assert left == [], f"objects of finished jobs left to the cyclic collector: {left[:5]}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_a_middleware_of_our_own_composes_with_the_default_ones(bus, components, client):
    app = App("flaky")

    @app.capability(type="flaky")
    async def flaky(ctx: JobContext) -> None:
        raise JobError("flaky", "always", retryable=False)

    await components.dispatcher()
    w = await components.worker(app)
    rec = Recorder()
    w.middleware.insert(len(w.middleware) - 1, rec)  # inside the retry policy
    assert await client.run("flaky", {}, timeout=20) == {"rescued": True}
    assert rec.calls == ["before_start", "after_start:1", "after_invoke:Failed",
                         "after_attempt:Succeeded"]


# ---- progress ---------------------------------------------------------------------------


async def test_a_tight_progress_loop_costs_few_events_and_record_writes(bus, components, client):
    app = App("chatty")

    @app.capability(type="chatty")
    async def chatty(ctx: JobContext) -> str:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < 2.0:
            i += 1
            ctx.progress(min(1.0, (time.monotonic() - t0) / 2.0), f"step {i}")
            if i % 100 == 0:
                await asyncio.sleep(0)
        ctx.progress(1.0, "last")
        return f"{i} reports"

    await components.dispatcher()
    await components.worker(app)
    writes: list[str] = []
    job = "chatty-1"

    async def wrote(msg) -> None:
        writes.append(msg.subject)

    sub = await bus.nc.subscribe(topology.kv_subject(topology.KV_JOBS, job), cb=wrote)
    await client.submit("chatty", {}, job_id=job)
    state = await client.wait(job, timeout=30)
    await sub.unsubscribe()
    reports = int(state.result.split()[0])
    assert reports > 1000, reports
    progress = [e for e in await job_events(bus, job) if e["kind"] == "progress"]
    assert 5 <= len(progress) <= 80, len(progress)  # 20/s at most, after a small burst
    assert progress[-1]["message"] == "last"  # the latest report is never lost
    # create, start, at most one progress write a second (2 s), succeed.
    assert len(writes) <= 1 + 1 + 3 + 1, writes


# ---- cancel ----------------------------------------------------------------------------


async def test_one_cancel_path_stops_hundreds_of_running_jobs_without_polling(
        bus, components, client):
    n = 200
    await components.dispatcher()
    await components.worker(capacity=n)
    jobs = [await client.submit("sleep", {"seconds": 120, "steps": 1}, job_id=f"many-{i:03d}")
            for i in range(n)]

    async def all_in(state: str) -> bool:
        for j in jobs:
            s = await client.status(j)
            if s is None or s.state != state:
                return False
        return True

    async def all_running() -> bool:
        return await all_in("running")

    await eventually(all_running, timeout=120, interval=0.5, what="every job running")
    reads: list[str] = []

    async def read(msg) -> None:
        reads.append(msg.subject)

    subs = [await bus.nc.subscribe(f"$JS.API.DIRECT.GET.KV_{topology.KV_JOBS}.>", cb=read),
            await bus.nc.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{topology.KV_JOBS}", cb=read)]
    await asyncio.sleep(3.0)  # jobs running: nobody reads their records
    assert reads == [], f"{len(reads)} record reads while {n} jobs ran"
    for sub in subs:
        await sub.unsubscribe()
    t0 = time.monotonic()
    for j in jobs:
        await client.cancel(j, reason="all of them")

    async def all_cancelled() -> bool:
        return await all_in("cancelled")

    await eventually(all_cancelled, timeout=60, interval=0.5, what="every job cancelled")
    assert time.monotonic() - t0 < 60
    for j in jobs[:5]:
        kinds = await event_kinds(bus, j)
        assert kinds.count("cancelled") == 1 and "succeeded" not in kinds


SUPERSEDE_APP = '''
import asyncio, os
from agents.worker import App

app = App("slowpoke")

@app.capability(type="slowpoke")
async def slowpoke(ctx, p: dict) -> dict:
    for _ in range(60):
        await asyncio.sleep(0.1)
        if ctx.is_cancelled:
            return {"stopped": True}
    open(os.path.join(p["dir"], f"done-{ctx.worker_id}"), "w").close()
    return {"done_by": ctx.worker_id}
'''


async def test_a_stalled_attempt_is_stopped_when_a_newer_one_takes_over(
        tmp_path: Path, bus, client, procs):
    (tmp_path / "slowpoke.py").write_text(SUPERSEDE_APP)
    env = {"PYTHONPATH": str(ROOT)}
    procs.run("dispatcher")
    # --app imports from the current folder, as uvicorn does.
    a = _worker_in(procs, tmp_path, "wa", env)
    job = await client.submit("slowpoke", {"dir": str(tmp_path)})
    running = await eventually(lambda: running_attempt(client, job, 1), timeout=30)
    assert running.worker_id == "wa"
    os.kill(a.pid, signal.SIGSTOP)  # stalled: no in-progress acks, no renewals
    try:
        _worker_in(procs, tmp_path, "wb", env)
        again = await eventually(lambda: running_attempt(client, job, 2), timeout=30,
                                 what="attempt 2 on the other worker")
        assert again.worker_id == "wb"
    finally:
        os.kill(a.pid, signal.SIGCONT)
    state = await client.wait(job, timeout=30)
    assert state.state == "succeeded" and state.result == {"done_by": "wb"}
    await asyncio.sleep(7)  # long enough for a's handler to have finished, had it not stopped
    assert not (tmp_path / "done-wa").exists(), "the superseded attempt ran on to the end"
    assert (await event_kinds(bus, job)).count("succeeded") == 1


def _worker_in(procs, folder: Path, worker_id: str, env: dict[str, str]):
    import subprocess

    log = open(procs.logdir / f"{worker_id}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run", "worker", "--no-kernels",
                             "--no-builtin", "--app", "slowpoke:app", "--worker-id", worker_id],
                            env={**procs.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=folder, start_new_session=True)
    log.close()
    procs.procs.append(proc)
    return proc


# ---- child jobs ------------------------------------------------------------------------

family = App("family")


@family.capability(type="parent")
async def parent(ctx: JobContext, p: dict) -> dict:
    got = await ctx.call("child", {"n": p["n"]}, timeout=30)
    return {"child_said": got}


@family.capability(type="child")
async def child(ctx: JobContext, p: dict) -> int:
    return p["n"] * 10


@family.capability(type="loop")
async def loop(ctx: JobContext, p: dict) -> object:
    return await ctx.call("loop", p, timeout=60)


@family.capability(type="waiter")
async def waiter(ctx: JobContext, p: dict) -> object:
    return await ctx.call(p["what"], {"seconds": 60, "steps": 60}, timeout=120)


async def test_ctx_call_runs_a_child_and_links_it(bus, components, client):
    await components.dispatcher()
    await components.worker(family)
    job = await client.submit("parent", {"n": 4})
    state = await client.wait(job, timeout=30)
    assert state.state == "succeeded" and state.result == {"child_said": 40}
    kids = [s for s in await client.list_jobs() if s.parent_job_id == job]
    assert len(kids) == 1 and kids[0].depth == 1 and kids[0].state == "succeeded"


async def test_a_call_loop_stops_at_the_depth_limit(bus, components, client):
    await components.dispatcher()
    await components.worker(family)
    job = await client.submit("loop", {})
    state = await client.wait(job, timeout=60)
    assert state.state == "failed" and state.error.code == "child_failed"
    # The innermost call said why; each level above passed it on.
    assert "call_depth_exceeded" in state.error.message


async def test_cancelling_a_parent_cancels_its_child(bus, components, client):
    await components.dispatcher()
    await components.worker(family)
    await components.worker()  # serves sleep
    job = await client.submit("waiter", {"what": "sleep"})

    async def child_running():
        kids = [s for s in await client.list_jobs() if s.parent_job_id == job]
        return kids[0] if kids and kids[0].state == "running" else None

    kid = await eventually(child_running, timeout=30, what="the child running")
    await client.cancel(job, "enough")
    assert (await client.wait(job, timeout=20)).state == "cancelled"
    assert (await client.wait(kid.job_id, timeout=20)).state == "cancelled"


async def test_a_child_nobody_can_run_fails_its_parent_with_the_reason(bus, components, client):
    await components.dispatcher(unschedulable_after_s=0.5)
    await components.worker(family)
    job = await client.submit("waiter", {"what": "no.such.capability"})
    state = await client.wait(job, timeout=30)
    assert state.state == "failed" and state.error.code == "child_unschedulable"
    assert "no live worker advertises capability {type=no.such.capability}" in \
        state.error.message
    assert json.dumps(state.error.message)  # a plain line, fit for a terminal
