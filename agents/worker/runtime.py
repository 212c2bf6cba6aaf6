"""The worker: advertises its capabilities, takes work only when it has room,
runs each job as one attempt under leases, and settles it exactly once.

The loop, top to bottom:
  1. ring: a doorbell (or a 1 s tick) says some capability may have work;
  2. take: pull what is there right now, highest priority first;
  3. run: per message, check the job's state, lease devices, mark it running
     (compare-and-set), run the handler under in-progress acks, lease renewal,
     its timeout and cancel watch;
  4. settle: CAS the outcome, emit its event, release leases, ack (or nak with
     backoff for a retry, or dead-letter when attempts are spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from agents.devices import Inventory, node_name
from agents.worker.app import App, CapabilitySpec
from agents.worker.context import Delegate, JobContext, JobError
from bus import codec, topology, tracing
from bus.adverts import put_advert, remove_advert
from bus.connection import Bus
from bus.consumer import Abandon, Delivery, Reject, Retry, backoff, decode_or_dead_letter, settle
from bus.jobtable import JobTable, emit
from bus.leases import Lease, LeaseLost, LeaseTable
from bus.pull import pull_now
from schemas.common import ErrorInfo, now
from schemas.events import (
    Cancelled,
    Dead,
    Delegated,
    Failed,
    Lost,
    Progress,
    Retrying,
    Running,
    Succeeded,
)
from schemas.fleet import CapabilityAdvert, serves
from schemas.jobs import AttemptRecord, JobState, Resources, WorkItem

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass
class _Run:
    ctx: JobContext
    task: asyncio.Task[Any] | None = None
    stop_reason: str | None = None  # "cancelled" | "timeout" | "lease_lost" | "shutdown"
    stop_message: str = ""
    leases: list[Lease] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        bus: Bus,
        app: App,
        *,
        inventory: Inventory | None = None,
        capacity: int | None = None,
        worker_id: str | None = None,
        cancel_grace_s: float = 2.0,
        starvation_every: int = 8,
        poll_s: float = 1.0,
    ) -> None:
        self.bus = bus
        self.app = app
        self.specs: dict[str, CapabilitySpec] = dict(app.capabilities)
        self.inventory = inventory or Inventory(node=node_name(), gpus=[], slots_per_gpu=1,
                                                cpu_slots=[])
        self.node = self.inventory.node
        self.worker_id = worker_id or f"w-{self.node}-{os.getpid()}-{random.randrange(16**4):04x}"
        leasable = len(self.inventory.leasable())
        # Capacity comes from the devices a worker can lease, unless set.
        self.capacity = capacity or (leasable if leasable else 4)
        self.cancel_grace_s = cancel_grace_s
        self.starvation_every = max(2, starvation_every)
        self.poll_s = poll_s
        self.jobs = JobTable(bus)
        self.leases = LeaseTable(bus, self.node)
        self.running: dict[str, _Run] = {}
        self.started_at = now()
        self._doorbell = asyncio.Event()
        self._room = asyncio.Event()
        self._pending: set[str] = set(self.specs)
        self._stopping = asyncio.Event()
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._service: Any = None
        self.completed = 0
        self.delegated: set[str] = set()

    # ---- advert ---------------------------------------------------------------------

    def advert(self) -> CapabilityAdvert:
        return CapabilityAdvert(
            worker_id=self.worker_id, node=self.node, pid=os.getpid(),
            capabilities=[spec.advert() for spec in self.specs.values()],
            devices=self.inventory.leasable(), capacity=self.capacity, load=len(self.running),
            started_at=self.started_at, updated_at=now(), version=VERSION,
            simulated=self.inventory.simulated,
        )

    async def _advertise_loop(self) -> None:
        interval = max(0.5, self.bus.settings.advert_ttl_s / 3)
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                await put_advert(self.bus, self.advert())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    # ---- taking work ------------------------------------------------------------------

    async def _ring(self, msg: Msg) -> None:
        ctype = msg.subject.removeprefix("signal.work.")
        if ctype in self.specs:
            self._pending.add(ctype)
            self._doorbell.set()

    def _order(self, round_no: int) -> list[tuple[int, str]]:
        """Highest priority first; every `starvation_every`-th round lowest first,
        so a steady stream of urgent work cannot starve priority 2 for ever."""
        prios = list(topology.PRIORITIES)
        if round_no % self.starvation_every == self.starvation_every - 1:
            prios.reverse()
        return [(p, t) for p in prios for t in sorted(self._pending)]

    async def _take(self, free: int, round_no: int) -> int:
        empty: dict[str, int] = {}
        for prio, ctype in self._order(round_no):
            msgs = await pull_now(self.bus.nc, topology.WORK, topology.work_consumer(ctype, prio),
                                  free)
            if not msgs:
                empty[ctype] = empty.get(ctype, 0) + 1
                continue
            for msg in msgs:
                self._spawn(self._execute(msg, ctype, prio))
            return len(msgs)  # start over from the top: strict priority
        for ctype, n in empty.items():
            if n == len(topology.PRIORITIES):
                self._pending.discard(ctype)
        return 0

    async def _fetch_loop(self) -> None:
        round_no = 0
        while not self._stopping.is_set():
            free = self.capacity - len(self._tasks)
            if free <= 0:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.poll_s)
                continue
            try:
                took = await self._take(free, round_no)
            except Exception as exc:  # reconnecting server, etc.: back off and go on
                log.warning("taking work failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            round_no += 1
            if took:
                continue
            self._doorbell.clear()
            try:
                await asyncio.wait_for(self._doorbell.wait(), self.poll_s)
            except TimeoutError:
                # A redelivery or a delayed retry rings no bell: look everywhere.
                self._pending.update(self.specs)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            self._room.set()

        task.add_done_callback(done)

    async def _execute(self, msg: Msg, ctype: str, prio: int) -> None:
        delivery = await decode_or_dead_letter(self.bus, msg, topology.WORK,
                                               topology.work_consumer(ctype, prio), WorkItem)
        if delivery is not None:
            keepalive = max(0.5, self.bus.settings.work_ack_wait_s / 4)
            await settle(self.bus, delivery, self._handle, keepalive)

    # ---- one job ----------------------------------------------------------------------

    async def _handle(self, d: Delivery[WorkItem]) -> None:
        item = d.data
        with tracing.span(f"run {item.capability.get('type')}", kind=SpanKind.CONSUMER,
                          headers=d.headers,
                          attributes={**tracing.messaging_attrs(d.msg.subject, "process",
                                                                item.job_id),
                                      "jetfleet.job_id": item.job_id,
                                      "jetfleet.worker_id": self.worker_id}) as span:
            await self._attempt(d, item, span)

    async def _attempt(self, d: Delivery[WorkItem], item: WorkItem, span: Any) -> None:
        got = await self.jobs.get(item.job_id)
        if got is None:
            raise Reject(f"no record of job {item.job_id} in KV jobs", job_id=item.job_id)
        state, _ = got
        if state.terminal:
            return  # already settled (a redelivery after the outcome was recorded)
        spec = self.specs.get(item.capability.get("type", ""))
        resources = _merge_resources(spec, item.resources)
        if spec is None or not serves([spec.advert()], item.capability) \
                or not self.inventory.can_ever_fit(resources):
            await self._delegate(item, "this worker does not serve the job's labels or resources")
        if state.cancel_requested:
            await self._finish_cancelled(item, state.attempt, state.reason or "cancelled")
            return
        if state.state == "running" and state.worker_id != self.worker_id:
            await self._record_lost(state)
        attempt = state.attempt + 1
        if attempt > item.max_attempts:
            await self._dead(item, state.attempt, ErrorInfo(
                code="attempts_exhausted", message=f"all {item.max_attempts} attempts used"))
        leases = await self._lease(item, resources)
        started = await self._mark_running(item, attempt, leases)
        if not started:
            for lease in leases:
                await self.leases.release(lease)
            raise Retry(0.1)
        run = _Run(ctx=self._context(item, attempt, leases), leases=leases)
        self.running[item.job_id] = run
        span.set_attribute("jetfleet.attempt", attempt)
        try:
            await emit(self.bus, Running(job_id=item.job_id, attempt=attempt,
                                         worker_id=self.worker_id, node=self.node,
                                         devices=[lease.device for lease in leases]),
                       tracing.inject({}))
            await self._run_and_settle(run, item, attempt, span)
        finally:
            self.running.pop(item.job_id, None)
            for lease in leases:
                await self.leases.release(lease)
            self.completed += 1

    async def _run_and_settle(self, run: _Run, item: WorkItem, attempt: int, span: Any) -> None:
        t0 = time.monotonic()
        try:
            result = await self._invoke(run, item)
        except Delegate as exc:
            await self._undo_running(item, attempt)
            await self._delegate(item, exc.reason)
        except Exception as exc:
            error = self._error_of(run, exc)
            span.set_status(Status(StatusCode.ERROR, error.message))
            if run.stop_reason == "cancelled":
                await self._finish_cancelled(item, attempt, run.stop_message or "cancelled")
            elif isinstance(exc, JobError) and not exc.retryable:
                await self._finish(item, attempt, "failed", error=error)
            else:
                await self._retry_or_die(item, attempt, error)
        else:
            if run.stop_reason == "cancelled":
                await self._finish_cancelled(item, attempt, run.stop_message or "cancelled")
                return
            await self._finish(item, attempt, "succeeded", result=result,
                               duration_s=time.monotonic() - t0)

    def _error_of(self, run: _Run, exc: BaseException) -> ErrorInfo:
        if run.stop_reason in ("timeout", "lease_lost", "shutdown"):
            return ErrorInfo(code=run.stop_reason, message=run.stop_message)
        if isinstance(exc, JobError):
            return ErrorInfo(code=exc.code, message=exc.message)
        if isinstance(exc, asyncio.CancelledError):
            return ErrorInfo(code="cancelled", message=run.stop_message or "stopped")
        return ErrorInfo(code=type(exc).__name__, message=str(exc)[:2000])

    async def _invoke(self, run: _Run, item: WorkItem) -> Any:
        spec = self.specs[item.capability["type"]]
        ctx = run.ctx
        if spec.is_async:
            run.task = asyncio.create_task(spec.handler(ctx))
        else:
            run.task = asyncio.create_task(asyncio.to_thread(spec.handler, ctx))
        guards = [asyncio.create_task(self._renew_leases(run)),
                  asyncio.create_task(self._watch_cancel(run))]
        if item.timeout_s:
            guards.append(asyncio.create_task(self._deadline(run, item.timeout_s)))
        try:
            return await run.task
        finally:
            for g in guards:
                g.cancel()
            for g in guards:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await g

    async def _stop_handler(self, run: _Run, reason: str, message: str) -> None:
        """Cooperative first; then SIGTERM, then SIGKILL of the handler's processes."""
        if run.stop_reason is not None:
            return
        run.stop_reason, run.stop_message = reason, message
        run.ctx._set_cancelled()
        task = run.task
        if task is None:
            return
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                run.ctx.signal_processes(sig)
            done, _ = await asyncio.wait({task}, timeout=self.cancel_grace_s)
            if done:
                return
        task.cancel()  # a thread cannot be killed: its result is discarded

    async def _deadline(self, run: _Run, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        await self._stop_handler(run, "timeout", f"attempt exceeded timeout_s={timeout_s}")

    async def _renew_leases(self, run: _Run) -> None:
        if not run.leases:
            return
        interval = max(0.3, self.bus.settings.lease_ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                for lease in run.leases:
                    await self.leases.renew(lease)
            except LeaseLost as exc:
                await self._stop_handler(run, "lease_lost", str(exc))
                return
            except Exception as exc:  # server away: keep trying until the TTL says lost
                log.warning("lease renewal failed: %s", exc)

    async def _watch_cancel(self, run: _Run) -> None:
        """The cancel signal is a nudge; the KV flag is the record, checked here."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                got = await self.jobs.get(run.ctx.job_id)
                if got and got[0].cancel_requested:
                    await self._stop_handler(run, "cancelled", got[0].reason or "cancelled")
                    return

    async def _on_cancel_signal(self, msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        run = self.running.get(job_id)
        if run is not None:
            reason = "cancelled"
            with contextlib.suppress(Exception):
                reason = json.loads(msg.data).get("reason") or reason
            asyncio.create_task(self._stop_handler(run, "cancelled", reason))

    # ---- state transitions ---------------------------------------------------------------

    def _context(self, item: WorkItem, attempt: int, leases: list[Lease]) -> JobContext:
        keys = [lease.device for lease in leases]
        env = {}
        if self.inventory.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.inventory.visible_devices(keys)
        loop = asyncio.get_running_loop()

        async def progress(fraction: float | None, message: str | None,
                           data: dict[str, Any] | None) -> None:
            def note(s: JobState) -> JobState | None:
                if s.state != "running" or s.attempt != attempt:
                    return None
                s.progress = fraction
                return s

            with contextlib.suppress(Exception):
                await self.jobs.transition(item.job_id, note)
                await emit(self.bus, Progress(job_id=item.job_id, attempt=attempt,
                                              worker_id=self.worker_id, progress=fraction,
                                              message=message, data=data))

        return JobContext(item=item, attempt=attempt, worker_id=self.worker_id, node=self.node,
                          devices=keys, env=env, loop=loop, _progress=progress,
                          services={"bus": self.bus, "worker": self})

    async def _lease(self, item: WorkItem, resources: Resources) -> list[Lease]:
        if not resources.any():
            return []
        for keys in _shuffled(self.inventory.candidates(resources)):
            held = await self.leases.acquire_all(keys, self.worker_id, item.job_id)
            if held is not None:
                return held
        # Everything this worker could use is busy right now: not an attempt.
        raise Retry(0.2 + random.random() * 0.3)

    async def _mark_running(self, item: WorkItem, attempt: int, leases: list[Lease]) -> bool:
        devices = [lease.device for lease in leases]

        def start(s: JobState) -> JobState | None:
            if s.terminal or s.cancel_requested or s.attempt != attempt - 1:
                return None
            s.state, s.attempt, s.worker_id, s.node = "running", attempt, self.worker_id, self.node
            s.devices, s.started_at, s.reason, s.progress = devices, now(), None, None
            s.attempts = [*s.attempts, AttemptRecord(attempt=attempt, worker_id=self.worker_id,
                                                     devices=devices, started_at=now())]
            return s

        return await self.jobs.transition(item.job_id, start) is not None

    def _owned(self, s: JobState, attempt: int) -> bool:
        return s.state == "running" and s.attempt == attempt and s.worker_id == self.worker_id

    async def _finish(self, item: WorkItem, attempt: int, kind: str, *, result: Any = None,
                      error: ErrorInfo | None = None, duration_s: float | None = None) -> None:
        def end(s: JobState) -> JobState | None:
            if not self._owned(s, attempt):
                return None
            s.state, s.ended_at, s.progress = kind, now(), 1.0 if kind == "succeeded" else s.progress  # type: ignore[assignment]
            s.result, s.error = result, error
            _close_attempt(s, attempt, kind, error)
            return s

        if await self.jobs.transition(item.job_id, end) is None:
            raise Abandon()  # another attempt owns the job now: its result, not ours
        if kind == "succeeded":
            await emit(self.bus, Succeeded(job_id=item.job_id, attempt=attempt,
                                           worker_id=self.worker_id, result=result,
                                           duration_s=duration_s))
        else:
            assert error is not None
            await emit(self.bus, Failed(job_id=item.job_id, attempt=attempt,
                                        worker_id=self.worker_id, error=error))

    async def _finish_cancelled(self, item: WorkItem, attempt: int, reason: str) -> None:
        def end(s: JobState) -> JobState | None:
            if s.terminal:
                return None
            s.state, s.ended_at, s.reason = "cancelled", now(), reason
            _close_attempt(s, attempt, "cancelled", None)
            return s

        if await self.jobs.transition(item.job_id, end) is not None:
            await emit(self.bus, Cancelled(job_id=item.job_id, attempt=attempt,
                                           worker_id=self.worker_id, reason=reason))

    async def _retry_or_die(self, item: WorkItem, attempt: int, error: ErrorInfo) -> None:
        error.attempt = attempt
        if attempt >= item.max_attempts:
            def end(s: JobState) -> JobState | None:
                if not self._owned(s, attempt):
                    return None
                _close_attempt(s, attempt, "failed", error)
                return s

            if await self.jobs.transition(item.job_id, end) is None:
                raise Abandon()
            await self._dead(item, attempt, error)
        delay = backoff(attempt)

        def again(s: JobState) -> JobState | None:
            if not self._owned(s, attempt):
                return None
            s.state, s.error, s.worker_id = "retrying", error, None
            _close_attempt(s, attempt, "failed", error)
            return s

        if await self.jobs.transition(item.job_id, again) is None:
            raise Abandon()
        await emit(self.bus, Retrying(job_id=item.job_id, attempt=attempt,
                                      worker_id=self.worker_id, error=error, delay_s=delay))
        raise Retry(delay)

    async def _dead(self, item: WorkItem, attempt: int, error: ErrorInfo) -> None:
        """Attempts spent: the job is dead and its message goes to DEAD."""
        errors: list[ErrorInfo] = []

        def end(s: JobState) -> JobState | None:
            if s.terminal:
                return None
            s.state, s.ended_at, s.error = "dead", now(), error
            errors.extend(a.error for a in s.attempts if a.error is not None)
            return s

        if await self.jobs.transition(item.job_id, end) is not None:
            await emit(self.bus, Dead(job_id=item.job_id, attempt=attempt,
                                      worker_id=self.worker_id, error=error, errors=errors))
        raise Reject(f"{error.code}: {error.message}", job_id=item.job_id)

    async def _record_lost(self, s: JobState) -> None:
        """The previous attempt's worker went silent (its message came back)."""
        error = ErrorInfo(code="worker_lost", attempt=s.attempt,
                          message=f"worker {s.worker_id} stopped heartbeating the job")

        def lose(cur: JobState) -> JobState | None:
            if cur.state != "running" or cur.attempt != s.attempt:
                return None
            cur.state, cur.error = "lost", error
            _close_attempt(cur, s.attempt, "lost", error)
            return cur

        if await self.jobs.transition(s.job_id, lose) is not None:
            await emit(self.bus, Lost(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                                      reason=error.message))

    async def _undo_running(self, item: WorkItem, attempt: int) -> None:
        def back(s: JobState) -> JobState | None:
            if not self._owned(s, attempt):
                return None
            s.state, s.attempt, s.worker_id, s.devices = "queued", attempt - 1, None, []
            s.attempts = [a for a in s.attempts if a.attempt != attempt]
            return s

        await self.jobs.transition(item.job_id, back)

    async def _delegate(self, item: WorkItem, reason: str) -> None:
        """Hand the job back for another worker without using an attempt."""
        if item.job_id not in self.delegated:
            self.delegated.add(item.job_id)
            await emit(self.bus, Delegated(job_id=item.job_id, worker_id=self.worker_id,
                                           event_id=f"{item.job_id}.delegated.{self.worker_id}",
                                           reason=reason))
        raise Retry(0.5 + random.random())

    # ---- control -------------------------------------------------------------------------

    async def _start_service(self) -> None:
        from nats import micro

        async def info(req: Any) -> None:
            body = codec.to_builtins(self.advert())
            body["running"] = sorted(self.running)
            body["completed"] = self.completed
            await req.respond(codec.encode(body))

        async def cancel(req: Any) -> None:
            job_id = req.data.decode().strip()
            run = self.running.get(job_id)
            if run is None:
                await req.respond_error("404", f"job {job_id} is not running here")
                return
            asyncio.create_task(self._stop_handler(run, "cancelled", "cancelled via control"))
            await req.respond(b'{"ok": true}')

        async def drain(req: Any) -> None:
            self.stop()
            await req.respond(b'{"ok": true}')

        self._service = await micro.add_service(
            self.bus.nc, name="jetfleet-worker", version=VERSION,
            description="jetfleet worker", metadata={"worker_id": self.worker_id,
                                                      "node": self.node})
        group = self._service.add_group(name=f"jetfleet.worker.{self.worker_id}")
        await group.add_endpoint(name="info", handler=info)
        await group.add_endpoint(name="cancel", handler=cancel)
        await group.add_endpoint(name="drain", handler=drain)

    async def run(self) -> None:
        for ctype in self.specs:
            for prio in topology.PRIORITIES:
                await topology.ensure_consumer(
                    self.bus.js, topology.WORK,
                    topology.work_consumer_config(self.bus.settings, ctype, prio))
            self._subs.append(await self.bus.nc.subscribe(topology.work_doorbell(ctype),
                                                          cb=self._ring))
        self._subs.append(await self.bus.nc.subscribe(topology.cancel_signal("*"),
                                                      cb=self._on_cancel_signal))
        with contextlib.suppress(Exception):
            await self._start_service()
        await put_advert(self.bus, self.advert())
        advertiser = asyncio.create_task(self._advertise_loop())
        log.info("worker %s on %s serving %s (capacity %d)", self.worker_id, self.node,
                 ", ".join(sorted(self.specs)), self.capacity)
        try:
            await self._fetch_loop()
            await self.drain()
        finally:
            advertiser.cancel()
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self._service is not None:
                with contextlib.suppress(Exception):
                    await self._service.stop()
            await remove_advert(self.bus, self.worker_id)

    def stop(self) -> None:
        """Stop taking work; running jobs finish (see drain)."""
        self._stopping.set()
        self._doorbell.set()
        self._room.set()

    async def drain(self, timeout: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for run in list(self.running.values()):
            await self._stop_handler(run, "shutdown", "worker shutting down")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.cancel_grace_s * 3 + 1)


def _merge_resources(spec: CapabilitySpec | None, asked: Resources | None) -> Resources:
    base = spec.resources if spec is not None else Resources()
    if asked is None:
        return base
    return Resources(gpus=max(base.gpus, asked.gpus),
                     gpu_memory_mb=max(base.gpu_memory_mb, asked.gpu_memory_mb),
                     cpu_slots=max(base.cpu_slots, asked.cpu_slots))


def _close_attempt(s: JobState, attempt: int, outcome: str, error: ErrorInfo | None) -> None:
    for a in s.attempts:
        if a.attempt == attempt and a.ended_at is None:
            a.ended_at, a.outcome, a.error = now(), outcome, error


def _shuffled(options: list[list[str]]) -> list[list[str]]:
    """Spread contending workers over devices instead of all trying the first."""
    out = list(options)
    random.shuffle(out)
    return out
