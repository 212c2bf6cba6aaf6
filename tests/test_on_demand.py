"""Workers started on demand: a real node agent (`jetfleet run agent --apps`)
starts real worker processes when work waits, scales them up to `max` while
work keeps waiting and devices are free, stops them after idling, and
reports every start, stop and failure on `events.nodes.<node>`; failing
apps are retried with a backoff, never in a tight loop."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
from nats.js.api import DeliverPolicy

from bus import topology
from tests.conftest import ROOT, Procs
from tests.helpers import event_kinds, eventually

QUICK = """\
import asyncio, time
from agents.worker import App, JobContext

app = App("quick")
STARTED = time.time()

@app.on_start
async def load() -> None:
    await asyncio.sleep(0.2)  # "load a model"

@app.capability(type="quick.echo")
async def echo(ctx: JobContext, payload: dict) -> dict:
    return {"echo": payload, "worker": ctx.worker_id, "entered": time.time()}
"""

GPU_SLOW = """\
import asyncio
from agents.worker import App, JobContext

app = App("gpuslow")

@app.capability(type="gpu.slow", gpus=1)
async def slow(ctx: JobContext, payload: dict) -> dict:
    await asyncio.sleep(payload.get("seconds", 1.0))
    return {"devices": ctx.devices, "worker": ctx.worker_id}
"""

CRASHES = """\
from agents.worker import App, JobContext

app = App("crashes")

@app.on_start
def load() -> None:
    raise RuntimeError("boom: the model file is missing")

@app.capability(type="never.runs")
async def never(ctx: JobContext) -> dict:
    return {}
"""


class NodeEvents:
    """Every event on events.nodes.<node>, as it comes."""

    def __init__(self, bus: Any, node: str) -> None:
        self.bus, self.node = bus, node
        self.events: list[dict[str, Any]] = []
        self._sub: Any = None

    async def start(self) -> NodeEvents:
        async def on(msg: Any) -> None:
            self.events.append(json.loads(msg.data))

        self._sub = await self.bus.js.subscribe(topology.node_events(self.node),
                                                ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.ALL, cb=on)
        return self

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


def write_app(folder: Path, module: str, source: str, toml: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    path = folder / "apps.toml"
    path.write_text(textwrap.dedent(toml))
    return path


def agent(procs: Procs, node: str, apps: Path, *extra: str) -> subprocess.Popen[bytes]:
    return procs.run("agent", "--instance-id", f"agent-{node}", "--node", node,
                     "--apps", str(apps), "--heartbeat", "1",
                     "--metrics-interval", "5", "--no-nvml", *extra, name=f"agent-{node}")


def workers_of(agent_proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    with_children = psutil.Process(agent_proc.pid).children(recursive=True)
    return [p for p in with_children if "worker" in " ".join(p.cmdline())]


async def test_worker_started_on_demand_and_stopped_after_idle(components, procs, client, bus,
                                                               tmp_path: Path) -> None:
    await components.dispatcher()
    apps = write_app(tmp_path / "app", "quick", QUICK, """
        [[app]]
        app = "quick:app"
        min = 0
        max = 1
        idle_stop_s = 1.5
    """)
    events = await NodeEvents(bus, "n-demand").start()
    proc = agent(procs, "n-demand", apps)
    # min = 0: the agent learns what the app serves, and starts nothing yet.
    await asyncio.sleep(2.0)
    assert not events.of("app_started") and not workers_of(proc)
    assert not await client.workers()

    t0 = time.time()
    job = await client.submit("quick.echo", {"hello": "on demand"})
    state = await client.wait(job, timeout=30)
    assert state.state == "succeeded", state
    assert state.result["echo"] == {"hello": "on demand"}
    assert state.worker_id == "n-demand-quick-0"
    assert "unschedulable" not in await event_kinds(bus, job)

    started = await eventually(lambda: events.of("app_started"), what="app_started")
    assert started[0]["app"] == "quick" and started[0]["worker_id"] == "n-demand-quick-0"
    assert "waiting" in started[0]["reason"]
    # The hook sleeps 0.2 s; uvloop's timers run on a millisecond clock, so the
    # measured time can come out a millisecond short.
    assert started[0]["start_s"] > 0 and started[0]["hooks_s"]["on_start:load"] >= 0.19
    assert started[0]["ts"] >= t0

    # Idle for idle_stop_s: drained and gone, its advert removed.
    stopped = await eventually(lambda: events.of("app_stopped"), timeout=20, what="app_stopped")
    assert stopped[0]["worker_id"] == "n-demand-quick-0"
    assert "idle" in stopped[0]["reason"] and "drained" in stopped[0]["reason"]
    assert stopped[0]["idle_s"] >= 1.5
    await eventually(lambda: not workers_of(proc), what="the worker process to exit")
    assert not [a for a in await client.workers() if a.worker_id == "n-demand-quick-0"]

    # New work after the stop starts it again.
    state = await client.wait(await client.submit("quick.echo", {"n": 2}), timeout=30)
    assert state.state == "succeeded"
    await eventually(lambda: len(events.of("app_started")) == 2, what="a second start")
    assert not events.of("app_failed")
    await events.stop()


async def test_scale_up_to_max_while_work_waits_within_free_devices(components, procs, client,
                                                                      bus, tmp_path: Path) -> None:
    """max = 3, but the node has 2 (simulated) GPUs and each worker's share is one:
    two workers, each job on its own GPU, never a third."""
    await components.dispatcher()
    apps = write_app(tmp_path / "app", "gpuslow", GPU_SLOW, """
        [[app]]
        app = "gpuslow:app"
        max = 3
        idle_stop_s = 30
        scale_up_after_s = 0.3
    """)
    events = await NodeEvents(bus, "n-scale").start()
    proc = agent(procs, "n-scale", apps, "--simulate-gpus", "2")
    await asyncio.sleep(1.0)
    jobs = [await client.submit("gpu.slow", {"seconds": 1.5}) for _ in range(6)]
    states = [await client.wait(j, timeout=60) for j in jobs]
    assert all(s.state == "succeeded" for s in states), [(s.state, s.error) for s in states]
    ran_on = {s.worker_id for s in states}
    assert ran_on == {"n-scale-gpuslow-0", "n-scale-gpuslow-1"}, ran_on
    assert {tuple(s.devices) for s in states} == {("n-scale.gpu0",), ("n-scale.gpu1",)}
    started = events.of("app_started")
    assert [e["worker_id"] for e in started] == ["n-scale-gpuslow-0", "n-scale-gpuslow-1"]
    assert "waited" in started[1]["reason"]
    # Two workers ran at once (the second scaled up while work waited).
    spans = sorted((a.started_at, a.ended_at, s.worker_id) for s in states for a in s.attempts)
    assert any(s1 < e0 and w0 != w1 for (_s0, e0, w0), (s1, _e1, w1)
               in itertools.pairwise(spans))
    assert len(workers_of(proc)) == 2
    info = await _agent_info(bus, "n-scale")
    app = info["apps"][0]
    assert app["share"] == "1 GPU(s)" and len(app["workers"]) == 2
    await events.stop()


async def _agent_info(bus: Any, node: str) -> dict[str, Any]:
    from bus import control

    return dict(await control.request(bus, "agent", f"agent-{node}", "info"))


async def test_crashing_app_restarted_with_backoff(procs, bus, tmp_path: Path) -> None:
    apps = write_app(tmp_path / "app", "crashes", CRASHES, """
        [[app]]
        app = "crashes:app"
        min = 1
        max = 1
        backoff_s = 0.4
        max_backoff_s = 10
    """)
    events = await NodeEvents(bus, "n-crash").start()
    agent(procs, "n-crash", apps)
    await eventually(lambda: len(events.of("app_failed")) >= 2, timeout=30,
                     what="two failures")
    await asyncio.sleep(6.0)
    failed = events.of("app_failed")
    # Backoff 0.4, 0.8, 1.6, 3.2, 6.4 s plus each start: a handful, never a tight loop.
    assert 3 <= len(failed) <= 6, [(e["restarts"], e["retry_in_s"]) for e in failed]
    delays = [e["retry_in_s"] for e in failed]
    assert delays == sorted(delays) and delays[1] == 2 * delays[0], delays
    assert [e["restarts"] for e in failed] == list(range(1, len(failed) + 1))
    assert all("before it was ready" in e["error"] for e in failed)
    output = "\n".join(failed[0]["details"]["output"])
    assert "boom: the model file is missing" in output
    assert not events.of("app_started")
    await events.stop()


async def test_app_that_fails_to_import_is_reported_and_retried(components, procs, client, bus,
                                                                 tmp_path: Path) -> None:
    await components.dispatcher()
    folder = tmp_path / "app"
    folder.mkdir()
    apps = folder / "apps.toml"
    apps.write_text('[[app]]\napp = "later:app"\nbackoff_s = 0.3\nmax_backoff_s = 2\n')
    events = await NodeEvents(bus, "n-import").start()
    agent(procs, "n-import", apps)
    await eventually(lambda: len(events.of("app_failed")) >= 2, timeout=30, what="failures")
    first, second = events.of("app_failed")[:2]
    assert "No module named 'later'" in first["error"] and first["details"]["phase"] == "import"
    assert (first["restarts"], second["restarts"]) == (1, 2)
    assert second["retry_in_s"] == 2 * first["retry_in_s"]
    # Asked, the agent says why it cannot use the app (not only in its log).
    async def failed_app() -> dict[str, Any] | None:  # (not while it probes again)
        app = (await _agent_info(bus, "n-import"))["apps"][0]
        return app if app["state"] == "failed" else None

    app = await eventually(failed_app, what="the app's state: failed")
    assert "No module named 'later'" in app["problem"], app
    # The app appears: the next try finds it, and work is served.
    (folder / "later.py").write_text(QUICK)
    state = await client.wait(await client.submit("quick.echo", {"late": True}), timeout=40)
    assert state.state == "succeeded" and state.worker_id == "n-import-later-0"
    await eventually(lambda: events.of("app_started"), what="app_started")
    app = (await _agent_info(bus, "n-import"))["apps"][0]
    assert app["state"] == "ready" and app["problem"] is None, app
    await events.stop()


def test_bad_apps_files_are_one_line_errors(tmp_path: Path, procs: Procs) -> None:
    cases = {
        "nothing = 1\n": "unknown key 'nothing'",
        "[[app]]\napp = 'x'\n": "app must be \"MODULE:ATTR\"",
        "[[app]]\napp = 'x:app'\nmin = 3\nmax = 2\n": "min (3) is more than max (2)",
        "[[app]]\napp = 'x:app'\ngpus = 'one'\n": "gpus must be a whole number",
        "[[app]]\napp = 'x:app'\nwat = 1\n": "unknown key 'wat'",
        "[[app\n": "not valid TOML",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        for argv in (("run", "agent", "--apps", str(path)),
                     ("up", "--apps", str(path), "--data-dir", str(tmp_path / "d"))):
            out = procs.cli(*argv, timeout=30)
            assert out.returncode == 2, (argv, out.stderr)
            lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and expected in lines[0], (text, out.stderr)
    out = procs.cli("up", "--apps", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert out.returncode == 2 and "--apps needs the apps file" in out.stderr
    assert not (tmp_path / "d" / "logs").exists(), "nothing was started"


def test_up_with_apps_starts_workers_on_demand(tmp_path: Path) -> None:
    """`jetfleet up --apps FILE --workers 0`: nothing serves quick.echo until a
    call arrives; then the agent starts it and the call returns its result."""
    folder = tmp_path / "app"
    apps = write_app(folder, "quick", QUICK, """
        [[app]]
        app = "quick:app"
        idle_stop_s = 60
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "WARNING"}
    up = subprocess.Popen([sys.executable, "-m", "ops.cli", "up", "--apps", str(apps),
                           "--workers", "0", "--data-dir", str(tmp_path / "fleet")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          start_new_session=True)
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert "nats at" in line, line
        url = line.split("nats at ")[1].split(",")[0]
        call = subprocess.run([sys.executable, "-m", "ops.cli", "call", "quick.echo",
                               "--payload", '{"via": "up"}', "--timeout", "60", "--nats", url],
                              env=env, capture_output=True, text=True, timeout=90, cwd=ROOT)
        assert call.returncode == 0, call.stderr
        result = json.loads(call.stdout)
        assert result["echo"] == {"via": "up"} and result["worker"].endswith("-quick-0")
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=90)
    assert "jetfleet stopped" in out
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(apps) in " ".join(p.info["cmdline"] or []) or p.cwd() == str(folder):
                left.append(p.pid)
        except psutil.Error:
            continue
    assert not left, "children left behind"


# ---- shares: what the app declares, what the node has ----------------------------------------


def _decl(*caps: tuple[str, int, int]) -> Any:
    from schemas.apps import AppDeclaration, CapabilityDeclaration
    from schemas.jobs import Resources

    return AppDeclaration(app="m:app", capabilities=[
        CapabilityDeclaration(type=t, resources=Resources(gpus=g, gpu_memory_mb=m))
        for t, g, m in caps])


def test_shares_follow_the_apps_declarations(tmp_path: Path) -> None:
    from agents.devices import inventory
    from agents.node.appconfig import AppConfig
    from agents.node.appdevices import fits_now, plan

    two = inventory("n", simulate_gpus=2, slots_per_gpu=4)  # 16 GB each, 4 GB slots
    cfg = AppConfig(app="m:app", name="m", cwd=tmp_path)
    # No share in the file: one job of the widest capability.
    p = plan(_decl(("big", 2, 0), ("small", 0, 4096)), cfg, two)
    assert (p.share.slots, p.share.whole, p.share.capacity) == (8, True, 1)
    assert p.types == ["big", "small"] and not p.problems
    # A share smaller than a job: that capability is reported, the other watched.
    p = plan(_decl(("big", 2, 0), ("small", 0, 4096)),
             AppConfig(app="m:app", name="m", cwd=tmp_path, gpus=1), two)
    assert p.types == ["small"] and "more than the worker's share" in p.problems[0]
    assert p.share.capacity == 4  # four 4 GB jobs fit one whole GPU
    # More than the node has: never watched, and no part of the share.
    p = plan(_decl(("huge", 3, 0)), cfg, two)
    assert not p.types and "more than this node has" in p.problems[0]
    p = plan(_decl(("huge", 3, 0), ("one", 1, 0)), cfg, two)
    assert p.types == ["one"] and (p.share.slots, p.share.capacity) == (4, 1)
    # Memory shares count slots: 8 GB = 2 slots, one 8 GB job at a time.
    p = plan(_decl(("llm", 0, 8192)), AppConfig(app="m:app", name="m", cwd=tmp_path,
                                                gpu_memory_mb=8192), two)
    assert (p.share.slots, p.share.whole, p.share.capacity) == (2, False, 1)
    # gpus = 0 says CPU only.
    p = plan(_decl(("tts", 0, 0)), AppConfig(app="m:app", name="m", cwd=tmp_path, gpus=0), two)
    assert p.share.slots == 0 and p.share.capacity is None

    whole = plan(_decl(("big", 1, 0)), cfg, two).share
    assert fits_now(whole, two, held_by_others=set(), reserved_slots=4)  # gpu1 still free
    assert not fits_now(whole, two, held_by_others=set(), reserved_slots=8)
    # One slot of gpu1 leased by someone else: no whole GPU left beside our worker's.
    assert not fits_now(whole, two, held_by_others={"n.gpu1.s2"}, reserved_slots=4)
    half = plan(_decl(("llm", 0, 8192)), cfg, two).share
    assert fits_now(half, two, held_by_others={"n.gpu0.s0", "n.gpu1.s0"}, reserved_slots=4)
    assert not fits_now(half, two, held_by_others={f"n.gpu{g}.s{i}" for g in (0, 1)
                                                   for i in range(3)}, reserved_slots=0)
