"""Workers started on demand: the node agent's app supervisor (`--apps apps.toml`).

For each app of the file (agents.node.appconfig), read top to bottom:

    probe    a child process imports the app and says what it declares
             (capability types, per-job resources); failing that, an
             `app_failed` event and another try after a backoff
    demand   work waiting on `work.*.<type>` (the stream's per-subject
             counts; no consumer needed), undelivered work per priority
             consumer, and the dispatcher's doorbells for a prompt wake-up
    start    when work waits and nobody serves it, or has waited
             `scale_up_after_s` while ours are busy (up to `max`), or to keep
             `min`; only while the node has the app's share of devices free
             (KV leases of this node, beside the shares of our own workers)
    ready    its advert in KV `capabilities` (with its pid): `app_started`,
             with the seconds it took and its on_start hook durations
    idle     no job for `idle_stop_s` and no work waiting: drained through its
             control endpoint, then signals: `app_stopped`
    crash    exit before `ready`, or a non-zero exit after: `app_failed`, and
             no start of that app before its backoff (doubling, capped) has
             passed; a worker that stayed up `STABLE_S` clears the count

Every start, stop and failure is an event on `events.nodes.<node>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agents.devices import Inventory, inventory
from agents.node.appconfig import AppConfig, AppsFile
from agents.node.appdevices import Plan, fits_now, plan
from agents.node.appworker import AppWorker
from bus import codec, control, topology
from bus.adverts import AdvertBook
from bus.connection import Bus
from schemas.apps import AppDeclaration
from schemas.fleet import CapabilityAdvert, LeaseRecord
from schemas.telemetry import AppFailed, AppStarted, AppStopped, NodeEvent

log = logging.getLogger(__name__)

TICK_S = 0.5
READY_POLL_S = 0.05
START_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 120.0
STABLE_S = 30.0
ACTIVITY_EVERY_S = 1.0


@dataclass
class Demand:
    queued: int = 0  # messages in WORK for the app's types (waiting or being handled)
    pending: int = 0  # never delivered to any worker yet


@dataclass
class AppState:
    cfg: AppConfig
    decl: AppDeclaration | None = None
    plan: Plan | None = None
    workers: dict[int, AppWorker] = field(default_factory=dict)
    failures: int = 0
    next_try: float = 0.0  # monotonic: no probe or start before
    probing: bool = False
    gave_up: str = ""  # a configuration that can never work, said once
    pending_since: float | None = None
    blocked: str = ""  # why a wanted start did not happen (logged once per reason)
    last_error: str = ""  # the latest failure to load or start it (cleared once it loads)
    demand: Demand = field(default_factory=Demand)

    @property
    def live(self) -> list[AppWorker]:
        return [w for w in self.workers.values() if not w.stopping and not w.exited]

    @property
    def starting(self) -> bool:
        return any(not w.ready for w in self.live)


class AppSupervisor:
    def __init__(self, bus: Bus, node: str, apps: AppsFile, *, simulate_gpus: int = 0,
                 use_nvml: bool = True, nats_url: str | None = None,
                 python: str = sys.executable) -> None:
        self.bus = bus
        self.node = node
        self.file = apps
        self.simulate_gpus = simulate_gpus
        self.use_nvml = use_nvml
        self.nats_url = nats_url
        self.python = python
        self.apps = [AppState(cfg) for cfg in apps.apps]
        self.inv = Inventory(node=node, gpus=[], slots_per_gpu=apps.gpu_slots, cpu_slots=[])
        self.book = AdvertBook(bus, max_age_s=0.25)
        self.started = self.stopped = self.failed = 0
        self._wake = asyncio.Event()
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = 0
        self._stamp = f"{int(time.time() * 1000):x}"
        self._last_activity = 0.0

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        self.inv = await asyncio.to_thread(
            inventory, self.node, self.simulate_gpus, slots_per_gpu=self.file.gpu_slots,
            use_nvml=self.use_nvml)
        log.info("apps from %s: %s (node %s: %d GPU(s)%s, %d slot(s) each)", self.file.path,
                 ", ".join(a.cfg.name for a in self.apps), self.node, len(self.inv.gpus),
                 " simulated" if self.inv.simulated else "", self.inv.slots_per_gpu)
        try:
            while not stopping.is_set():
                try:
                    await self.tick()
                except Exception:
                    log.exception("apps: supervising failed; next try in %gs", TICK_S)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._first(stopping), TICK_S)
        finally:
            await self.stop_all("agent stopping")
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for task in list(self._tasks):
                task.cancel()

    async def _first(self, stopping: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def tick(self) -> None:
        nowm = time.monotonic()
        for app in self.apps:
            self._reap(app, nowm)
            if app.gave_up:
                continue
            if app.decl is None:
                if not app.probing and nowm >= app.next_try:
                    app.probing = True
                    self._background(self._probe(app))
                continue
            app.demand = await self._demand(app)
            await self._maybe_start(app, nowm)
        if nowm - self._last_activity >= ACTIVITY_EVERY_S:
            self._last_activity = nowm
            await self._activity()
        for app in self.apps:
            self._maybe_stop(app, time.monotonic())

    # ---- probe ---------------------------------------------------------------------------

    async def _probe(self, app: AppState) -> None:
        cfg = app.cfg
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "agents.node.appprobe", cfg.app, cwd=str(cfg.cwd),
                env=self._env(cfg, probe=True), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise RuntimeError(f"importing {cfg.app} took more than "
                                   f"{PROBE_TIMEOUT_S:g}s") from None
            lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
            if proc.returncode != 0 or not lines:
                why = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
                raise RuntimeError(why[-1] if why else f"probe exited with {proc.returncode}")
            decl = codec.decode(lines[-1].encode(), AppDeclaration)
        except Exception as exc:
            self._failed(app, f"cannot load {cfg.app}: {exc}", phase="import")
            return
        finally:
            app.probing = False
        self._declared(app, decl)

    def _declared(self, app: AppState, decl: AppDeclaration) -> None:
        app.decl, app.last_error = decl, ""
        app.plan = p = plan(decl, app.cfg, self.inv)
        for problem in p.problems:
            log.warning("app %s: %s", app.cfg.name, problem)
        if not p.types:
            app.gave_up = "; ".join(p.problems)
            self._emit(AppFailed(node=self.node, app=app.cfg.name, error=app.gave_up,
                                 restarts=app.failures, retry_in_s=None,
                                 details={"spec": app.cfg.app, "problems": p.problems}))
            return
        log.info("app %s serves %s; share %s, capacity %s (imported in %.2fs)", app.cfg.name,
                 ", ".join(p.types), p.share.describe(self.inv.slots_per_gpu),
                 p.share.capacity or "default", decl.import_s)
        self._background(self._subscribe(p.types))
        self._wake.set()

    async def _subscribe(self, types: list[str]) -> None:
        async def ring(_msg: Any) -> None:
            self._wake.set()

        for ctype in types:
            self._subs.append(await self.bus.nc.subscribe(topology.work_doorbell(ctype), cb=ring))

    # ---- demand --------------------------------------------------------------------------

    async def _demand(self, app: AppState) -> Demand:
        assert app.plan is not None
        d = Demand()
        for ctype in app.plan.types:
            info = await self.bus.js.stream_info(topology.WORK,
                                                 subjects_filter=f"work.*.{ctype}")
            subjects = info.state.subjects or {}
            queued = sum(subjects.values())
            d.queued += queued
            if not queued:
                continue
            for prio in topology.PRIORITIES:
                n = subjects.get(topology.work_subject(ctype, prio), 0)
                if not n:
                    continue
                try:
                    ci = await self.bus.js.consumer_info(topology.WORK,
                                                         topology.work_consumer(ctype, prio))
                except Exception:  # no consumer yet: nobody ever took this work
                    d.pending += n
                    continue
                d.pending += int(ci.num_pending or 0)
        return d

    async def _others_serve(self, app: AppState) -> bool:
        assert app.plan is not None
        ours = {w.worker_id for a in self.apps for w in a.workers.values()}
        for advert in await self.book.adverts():
            if advert.worker_id in ours:
                continue
            if any(c.get("type") in app.plan.types for c in advert.capabilities):
                return True
        return False

    # ---- start ---------------------------------------------------------------------------

    async def _maybe_start(self, app: AppState, nowm: float) -> None:
        d, cfg = app.demand, app.cfg
        if d.pending and app.pending_since is None:
            app.pending_since = nowm
        elif not d.pending:
            app.pending_since = None
        live = app.live
        if app.starting or nowm < app.next_try:
            return
        reason = ""
        if len(live) < cfg.min:
            reason = f"keeping min {cfg.min}"
        elif len(live) < cfg.max and d.queued:
            if not live and not await self._others_serve(app):
                reason = f"{d.queued} job(s) waiting and no live worker serves them"
            elif (d.pending and app.pending_since is not None
                  and nowm - app.pending_since >= cfg.scale_up_after_s):
                reason = (f"{d.pending} job(s) waited {nowm - app.pending_since:.1f}s with "
                          f"{len(live)} worker(s) busy")
        if not reason:
            app.blocked = ""
            return
        if app.failures:
            reason += f" (restart after {app.failures} failure(s))"
        assert app.plan is not None
        if not await self._devices_free(app):
            why = (f"app {cfg.name}: wanted a worker ({reason}) but the node has no "
                   f"{app.plan.share.describe(self.inv.slots_per_gpu)} free")
            if why != app.blocked:
                log.info("%s", why)
                app.blocked = why
            return
        app.blocked = ""
        await self._start(app, reason)

    async def _devices_free(self, app: AppState) -> bool:
        assert app.plan is not None
        share = app.plan.share
        if not share.slots:
            return True
        ours = {w.worker_id for a in self.apps for w in a.workers.values()}
        held = {k for k, rec in (await self._leases()).items() if rec.holder not in ours}
        reserved = sum(a.plan.share.slots for a in self.apps if a.plan is not None
                       for _ in a.live)
        return fits_now(share, self.inv, held, reserved)

    async def _leases(self) -> dict[str, LeaseRecord]:
        kv = await self.bus.kv(topology.KV_LEASES)
        out: dict[str, LeaseRecord] = {}
        try:
            keys = await kv.keys(filters=[f"{self.node}.>"])
        except Exception:  # an empty bucket (NoKeysError): nothing leased
            return out
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await kv.get(key)
                if entry.value:
                    out[key] = codec.decode(entry.value, LeaseRecord)
        return out

    def _argv(self, app: AppState, worker_id: str) -> list[str]:
        assert app.plan is not None
        share = app.plan.share
        argv = [self.python, "-m", "ops.cli", "run", "worker", "--app", app.cfg.app,
                "--no-builtin", "--no-kernels", "--node", self.node, "--worker-id", worker_id]
        if share.slots:
            if self.simulate_gpus:
                argv += ["--simulate-gpus", str(self.simulate_gpus)]
            elif not self.use_nvml:
                argv += ["--no-nvml"]
            if self.inv.slots_per_gpu > 1:
                argv += ["--gpu-slots", str(self.inv.slots_per_gpu)]
        else:
            argv += ["--no-nvml"]  # a CPU-only worker holds no GPU
        if share.capacity:
            argv += ["--capacity", str(share.capacity)]
        if share.cpu_slots:
            argv += ["--cpu-slots", str(share.cpu_slots)]
        return argv

    def _env(self, cfg: AppConfig, *, probe: bool = False) -> dict[str, str]:
        import os

        env = {**os.environ, **cfg.env, "JETFLEET_NODE": self.node, "JETFLEET_APP": cfg.name}
        if self.nats_url:
            env["JETFLEET_NATS_URL"] = self.nats_url
        if self.bus.settings.worker_creds:  # a secured fleet: its workers run as workers
            env["JETFLEET_NATS_CREDS"] = self.bus.settings.worker_creds
        if self.simulate_gpus:
            env["JETFLEET_SIMULATED_GPUS"] = str(self.simulate_gpus)
        if probe:
            env["JETFLEET_LOG"] = "WARNING"
        return env

    async def _start(self, app: AppState, reason: str) -> None:
        slot = next(i for i in range(len(app.workers) + 1) if i not in app.workers)
        worker_id = f"{self.node}-{app.cfg.name}-{slot}"
        w = AppWorker(slot=slot, worker_id=worker_id, reason=reason)
        app.workers[slot] = w
        log.info("app %s: starting worker %s: %s", app.cfg.name, worker_id, reason)
        try:
            await w.spawn(self._argv(app, worker_id), app.cfg.cwd, self._env(app.cfg))
        except Exception as exc:  # no interpreter, no such folder...
            del app.workers[slot]
            self._failed(app, f"starting worker {worker_id} failed: {exc}", phase="spawn")
            return
        self._background(self._await_ready(app, w))
        self._background(self._watch_exit(w))

    async def _watch_exit(self, w: AppWorker) -> None:
        await w.wait()
        self._wake.set()  # reaped (and reported) at once, not at the next tick

    async def _await_ready(self, app: AppState, w: AppWorker) -> None:
        kv = await self.bus.kv(topology.KV_CAPABILITIES)
        deadline = w.spawned_at + START_TIMEOUT_S
        advertised = 0.0
        while not w.exited and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                entry = await kv.get(w.worker_id)
                advert = codec.decode(entry.value or b"", CapabilityAdvert)
                if advert.pid == w.pid:
                    advertised = advert.updated_at  # the worker's own clock: when it was ready
                    break
            await asyncio.sleep(READY_POLL_S)
        else:
            if not w.exited:  # hung in its start: stop it; the reaper reports the failure
                w.tail.append(f"not ready within {START_TIMEOUT_S:g}s")
                await w.stop(lambda: self._drain(w), 1.0)
                w.stopping = False
            self._wake.set()
            return
        w.ready_at = w.busy_at = time.monotonic()
        app.pending_since = w.ready_at if app.pending_since is not None else None
        hooks: dict[str, float] = {}
        with contextlib.suppress(Exception):
            info = await control.request(self.bus, "worker", w.worker_id, "info", timeout=1.0)
            hooks = {str(k): float(v) for k, v in (info.get("hooks_s") or {}).items()}
        self.started += 1
        start_s = (advertised - w.spawned_wall if advertised >= w.spawned_wall
                   else w.ready_at - w.spawned_at)
        self._emit(AppStarted(node=self.node, app=app.cfg.name, worker_id=w.worker_id,
                              pid=w.pid, reason=w.reason, start_s=round(start_s, 3),
                              spawned_at=w.spawned_wall, hooks_s=hooks))
        self._wake.set()

    # ---- activity, idle and stop -----------------------------------------------------------

    async def _activity(self) -> None:
        """Ask each ready worker what it runs: a job seen running, or finished since
        the last look, makes it busy now."""
        async def look(app: AppState, w: AppWorker) -> None:
            try:
                info = await control.request(self.bus, "worker", w.worker_id, "info",
                                             timeout=1.0)
            except Exception:
                return  # busy or going: looked at again in a second
            completed = int(info.get("completed") or 0)
            if info.get("running") or completed != w.completed:
                w.busy_at = time.monotonic()
            w.completed = completed
            if w.ready_at and time.monotonic() - w.ready_at >= STABLE_S:
                app.failures = 0

        await asyncio.gather(*(look(app, w) for app in self.apps for w in app.live if w.ready))

    def _maybe_stop(self, app: AppState, nowm: float) -> None:
        cfg = app.cfg
        live = app.live
        if len(live) <= cfg.min or app.demand.pending:
            return
        idle = [w for w in live if w.ready and nowm - w.busy_at >= cfg.idle_stop_s]
        if not idle:
            return
        w = min(idle, key=lambda x: x.busy_at)
        self._background(self._stop(app, w, f"idle {nowm - w.busy_at:.1f}s",
                                    idle_s=round(nowm - w.busy_at, 2)))

    async def _drain(self, w: AppWorker) -> None:
        await control.request(self.bus, "worker", w.worker_id, "drain", timeout=1.0)

    async def _stop(self, app: AppState, w: AppWorker, reason: str,
                    idle_s: float | None = None) -> None:
        log.info("app %s: stopping worker %s (%s)", app.cfg.name, w.worker_id, reason)
        how = await w.stop(lambda: self._drain(w), app.cfg.stop_grace_s)
        app.workers.pop(w.slot, None)
        self.stopped += 1
        self._emit(AppStopped(node=self.node, app=app.cfg.name, worker_id=w.worker_id,
                              pid=w.pid, reason=f"{reason} ({how})", idle_s=idle_s))
        self._wake.set()

    async def stop_all(self, reason: str) -> None:
        stops = [self._stop(app, w, reason) for app in self.apps for w in app.live]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)

    def _reap(self, app: AppState, nowm: float) -> None:
        """Workers that exited without being asked to: a failure, or (exit 0) a stop."""
        for slot, w in list(app.workers.items()):
            if w.stopping or not w.exited:
                continue
            del app.workers[slot]
            assert w.proc is not None and w.proc.returncode is not None
            rc = w.proc.returncode
            if rc == 0 and w.ready:
                self.stopped += 1
                self._emit(AppStopped(node=self.node, app=app.cfg.name, worker_id=w.worker_id,
                                      pid=w.pid, reason="exited by itself (code 0)"))
                continue
            when = "before it was ready" if not w.ready else (
                f"after {nowm - (w.ready_at or nowm):.1f}s")
            self._failed(app, f"worker {w.worker_id} exited with code {rc} {when}",
                         phase="run", worker=w)

    def _failed(self, app: AppState, error: str, *, phase: str,
                      worker: AppWorker | None = None) -> None:
        app.failures += 1
        app.last_error = error
        cfg = app.cfg
        delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (app.failures - 1))
        app.next_try = time.monotonic() + delay
        self.failed += 1
        details: dict[str, Any] = {"spec": cfg.app, "phase": phase}
        if worker is not None:
            details.update(worker_id=worker.worker_id, pid=worker.pid,
                           exit_code=worker.proc.returncode if worker.proc else None,
                           output=worker.output())
        log.warning("app %s: %s; next try in %.1fs", cfg.name, error, delay)
        self._emit(AppFailed(node=self.node, app=cfg.name, error=error, restarts=app.failures,
                             retry_in_s=round(delay, 3), details=details))

    # ---- events and info -------------------------------------------------------------------

    def _emit(self, event: NodeEvent) -> None:
        self._seq += 1
        event.event_id = f"{self.node}.app.{self._stamp}.{self._seq}"

        async def publish() -> None:
            for attempt in range(5):
                try:
                    await self.bus.publish(topology.node_events(self.node), event,
                                           msg_id=event.event_id)
                    return
                except Exception as exc:
                    log.info("publishing %s failed (%s); retrying", type(event).__name__, exc)
                    await asyncio.sleep(0.5 * (attempt + 1))

        self._background(publish())

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def info(self) -> dict[str, Any]:
        nowm = time.monotonic()
        out = []
        for app in self.apps:
            out.append({
                "name": app.cfg.name, "app": app.cfg.app, "min": app.cfg.min,
                "max": app.cfg.max,
                "state": ("unusable" if app.gave_up else "probing" if app.probing
                          else "failed" if app.decl is None and app.failures else
                          "ready" if app.decl else "new"),
                "capabilities": app.plan.types if app.plan else [],
                "share": (app.plan.share.describe(self.inv.slots_per_gpu) if app.plan else None),
                "failures": app.failures,
                "next_try_in_s": round(max(0.0, app.next_try - nowm), 2),
                "queued": app.demand.queued, "pending": app.demand.pending,
                "workers": [{"worker_id": w.worker_id, "pid": w.pid, "ready": w.ready,
                             "stopping": w.stopping,
                             "idle_s": round(nowm - w.busy_at, 1) if w.ready else None}
                            for w in app.workers.values()],
                "problem": app.gave_up or app.blocked or app.last_error or None,
            })
        return {"apps": out, "started": self.started, "stopped": self.stopped,
                "failed": self.failed}
