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

Priorities: step 2 always tries p0, then p1, then p2. Against starvation, a
lower priority whose oldest undelivered message has waited longer than
`starvation_after_s` is looked at first, once per such check (at most one
check per capability every `starvation_after_s / 4`, only while busy with
higher priorities), so under a steady stream of p0 a p2 job waits about
`starvation_after_s`, while a backlog that is all queued at once still
drains strictly p0 before p1 before p2.

Devices: when every device a job could use is leased, the job waits here,
in-progress acked, for a release (seen live on the bus, or a TTL expiry
found by retrying) up to `lease_wait_s`, rather than going back to the
stream at once: busy devices do not burn deliveries. While a job waits, the
worker takes no more work, and waiting jobs take devices in arrival order.
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
from agents.worker.ledger import Ledger
from bus import codec, topology, tracing
from bus.adverts import list_adverts, put_advert, remove_advert
from bus.connection import Bus
from bus.consumer import Abandon, Delivery, Reject, Retry, backoff, decode_or_dead_letter, settle
from bus.jobtable import JobTable, emit
from bus.leases import Lease, LeaseLost, LeaseTable, LeaseWatch
from bus.pull import pull_now
from schemas.common import ErrorInfo, now
from schemas.events import (
    Delegated,
    Progress,
    Running,
)
from schemas.fleet import CapabilityAdvert, serves
from schemas.jobs import JobState, Resources, WorkItem

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass
class _Run:
    ctx: JobContext
    task: asyncio.Task[Any] | None = None
    stop_reason: str | None = None  # "cancelled" | "timeout" | "lease_lost" | "shutdown" | "superseded"
    stop_message: str = ""
    leases: list[Lease] = field(default_factory=list)
    attempt: int = 0
    delivery: Delivery[WorkItem] | None = None
    finished: bool = False  # the handler ended: its guards stop on their own


# Stop reasons after which the attempt counts as failed, whatever the handler returned.
_FAILED_STOPS = frozenset({"timeout", "lease_lost", "shutdown"})


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
        starvation_after_s: float = 10.0,
        poll_s: float = 1.0,
        lease_wait_s: float | None = None,
        control: Any = None,
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
        self.starvation_after_s = max(0.1, starvation_after_s)
        self.poll_s = poll_s
        ttl = bus.settings.lease_ttl_s
        self.lease_wait_s = lease_wait_s if lease_wait_s is not None else 2 * ttl
        self.jobs = JobTable(bus)
        self.ledger = Ledger(bus, self.jobs, self.worker_id, self.node)
        self.leases = LeaseTable(bus, self.node)
        self.lease_watch = LeaseWatch(bus, self.node)
        self._lease_queue = asyncio.Lock()  # waiting jobs take devices in arrival order
        self._lease_waiting = 0
        self._aged: dict[str, int] = {}  # ctype -> starved priority to look at first
        self._aging_checked = 0.0
        self._bg: set[asyncio.Task[Any]] = set()
        self.running: dict[str, _Run] = {}
        self._inflight: dict[str, int] = {}  # messages being handled, per capability
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
        self._own_bells: dict[str, int] = {}  # doorbells this worker rang for others

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
        ctype = topology.doorbell_type(msg.subject)
        if self._own_bells.get(ctype):
            self._own_bells[ctype] -= 1  # rung for the others (see _delegate): not for us
            return
        if ctype in self.specs:
            self._pending.add(ctype)
            self._doorbell.set()

    def _order(self) -> list[tuple[int, str]]:
        """Highest priority first, except a priority found starving (see
        `_check_starvation`), which is looked at first, once."""
        aged = [(self._aged.pop(t), t) for t in sorted(self._pending) if t in self._aged]
        strict = [(p, t) for p in topology.PRIORITIES for t in sorted(self._pending)]
        return aged + [pt for pt in strict if pt not in aged]

    async def _take(self, free: int) -> int:
        empty: dict[str, int] = {}
        seen: set[tuple[int, str]] = set()
        for prio, ctype in self._order():
            if (prio, ctype) in seen:
                continue
            seen.add((prio, ctype))
            room = self._room_for(ctype, free)
            if room <= 0:
                continue  # this capability is at its own concurrency limit
            msgs = await pull_now(self.bus.nc, topology.WORK, topology.work_consumer(ctype, prio),
                                  room)
            if not msgs:
                empty[ctype] = empty.get(ctype, 0) + 1
                continue
            for msg in msgs:
                self._spawn(self._execute(msg, ctype, prio))
            if prio < topology.PRIORITIES[-1]:
                self._maybe_check_starvation(prio)
            return len(msgs)  # start over from the top: strict priority
        for ctype, n in empty.items():
            if n == len(topology.PRIORITIES):
                self._pending.discard(ctype)
        return 0

    def _maybe_check_starvation(self, served: int) -> None:
        """While busy with priority `served`, now and then ask how long the
        oldest undelivered lower-priority message of each capability has waited."""
        t = time.monotonic()
        if t - self._aging_checked < self.starvation_after_s / 4:
            return
        self._aging_checked = t
        self._background(self._check_starvation(served))

    async def _check_starvation(self, served: int) -> None:
        for ctype in sorted(self.specs):
            for prio in reversed(topology.PRIORITIES):  # the lowest (most starved) first
                if prio <= served:
                    break
                with contextlib.suppress(Exception):
                    age = await self._oldest_waiting(ctype, prio)
                    if age is not None and age >= self.starvation_after_s:
                        self._aged[ctype] = prio
                        self._pending.add(ctype)
                        break

    async def _oldest_waiting(self, ctype: str, prio: int) -> float | None:
        """Seconds the oldest never-delivered message on (ctype, prio) has waited."""
        info = await self.bus.js.consumer_info(topology.WORK, topology.work_consumer(ctype, prio))
        if not info.num_pending:
            return None
        seq = int(info.delivered.stream_seq or 0) + 1 if info.delivered else 1
        raw = await self.bus.js.get_msg(topology.WORK, seq=seq,
                                        subject=topology.work_subject(ctype, prio), next=True)
        if raw.time is None:
            return None
        return max(0.0, now() - raw.time.timestamp())

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.capacity - len(self._tasks)
            if free <= 0 or self._lease_waiting:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.poll_s)
                continue
            try:
                took = await self._take(free)
            except Exception as exc:  # reconnecting server, etc.: back off and go on
                log.warning("taking work failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if took:
                continue
            self._doorbell.clear()
            try:
                await asyncio.wait_for(self._doorbell.wait(), self.poll_s)
            except TimeoutError:
                # A redelivery or a delayed retry rings no bell: look everywhere.
                self._pending.update(self.specs)

    def _background(self, coro: Any) -> None:
        """A helper task kept referenced until it ends (not counted as work)."""
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            self._room.set()

        task.add_done_callback(done)

    def _room_for(self, ctype: str, free: int) -> int:
        limit = self.specs[ctype].concurrency
        return free if limit is None else min(free, limit - self._inflight.get(ctype, 0))

    async def _execute(self, msg: Msg, ctype: str, prio: int) -> None:
        self._inflight[ctype] = self._inflight.get(ctype, 0) + 1
        try:
            delivery = await decode_or_dead_letter(self.bus, msg, topology.WORK,
                                                   topology.work_consumer(ctype, prio), WorkItem)
            if delivery is not None:
                keepalive = max(0.5, self.bus.settings.work_ack_wait_s / 4)
                await settle(self.bus, delivery, self._handle, keepalive)
        finally:
            self._inflight[ctype] -= 1
            if self.specs[ctype].concurrency is not None:
                # A limited capability has room again: look at its queue now.
                self._pending.add(ctype)
                self._doorbell.set()

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
        if item.job_id in self.running:
            # A second delivery of a job this worker is still running (its
            # in-progress acks came late): the running one settles the message.
            log.warning("job %s delivered again while running here", item.job_id)
            raise Abandon()
        got = await self.jobs.get(item.job_id)
        if got is None:
            raise Reject(f"no record of job {item.job_id} in KV jobs", job_id=item.job_id)
        state, _ = got
        if state.terminal:
            # Already settled: a redelivery after the outcome was recorded. The
            # holder may have died between the record and its event, so say it
            # again under the same event id (the EVENTS dedup window drops it
            # when it was said), then ack.
            await self.ledger.reannounce(state)
            return
        spec = self.specs.get(item.capability.get("type", ""))
        resources = _merge_resources(spec, item.resources)
        if spec is None or not serves([spec.advert()], item.capability):
            await self._delegate(d, item, "this worker does not serve the job's labels")
        if not self.inventory.can_ever_fit(resources):
            await self._delegate(d, item, "this worker's devices can never hold the job's "
                                          f"resources ({_describe(resources)})")
        if state.cancel_requested:
            await self.ledger.cancelled(item, state.attempt, state.reason or "cancelled")
            return
        if item.job_id in self.delegated and await self._others_serve(item):
            # Handed back once already (its handler said no): leave it to them.
            await self._delegate(d, item, "")
        if state.state == "running":
            # Its message came back while the job is marked running: the previous
            # attempt's worker stopped heartbeating it (died, or restarted under
            # the same worker id; a live run here was caught above).
            await self.ledger.lost(state)
        attempt = state.attempt + 1
        if attempt > item.max_attempts:
            await self.ledger.dead(item, state.attempt, ErrorInfo(
                code="attempts_exhausted", message=f"all {item.max_attempts} attempts used"))
        leases = await self._lease(item, resources)
        try:
            started = await self.ledger.start(item, attempt, [lease.device for lease in leases])
        except BaseException:
            await self._release(leases)
            raise
        if not started:
            await self._release(leases)
            raise Retry(0.1)
        run = _Run(ctx=self._context(item, attempt, leases), leases=leases, attempt=attempt,
                   delivery=d)
        self.running[item.job_id] = run
        span.set_attribute("jetfleet.attempt", attempt)
        try:
            # Unique per delivery: after a handler's Delegate the same attempt
            # number runs again elsewhere and must have its own running event.
            await emit(self.bus, Running(
                job_id=item.job_id, attempt=attempt, worker_id=self.worker_id, node=self.node,
                devices=[lease.device for lease in leases],
                event_id=f"{item.job_id}.{attempt}.running.{self.worker_id}.{d.num_delivered}"),
                tracing.inject({}))
            await self._run_and_settle(run, item, attempt, span)
        finally:
            self.running.pop(item.job_id, None)
            await self._release(leases)
            self.completed += 1

    async def _release(self, leases: list[Lease]) -> None:
        for lease in leases:
            with contextlib.suppress(Exception):
                await self.leases.release(lease)

    async def _run_and_settle(self, run: _Run, item: WorkItem, attempt: int, span: Any) -> None:
        t0 = time.monotonic()
        try:
            result = await self._invoke(run, item)
        except Delegate as exc:
            if run.stop_reason is None:
                await self.ledger.undo(item, attempt)
                await self._delegate(run.delivery, item, exc.reason)
            await self._settle_stopped(run, item, attempt, span)
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and (
                    run.stop_reason is None or _being_cancelled()):
                raise  # the worker itself is being cancelled, not the job
            error = self._error_of(run, exc)
            span.set_status(Status(StatusCode.ERROR, error.message))
            if run.stop_reason is not None:
                await self._settle_stopped(run, item, attempt, span, error)
            elif isinstance(exc, JobError) and not exc.retryable:
                await self.ledger.finish(item, attempt, "failed", error=error)
            else:
                await self.ledger.retry_or_die(item, attempt, error)
        else:
            if run.stop_reason is not None:
                # Stopped from outside but it returned anyway: the stop decides
                # (a result made after a timeout or without a lease is not kept).
                await self._settle_stopped(run, item, attempt, span)
                return
            await self.ledger.finish(item, attempt, "succeeded", result=result,
                               duration_s=time.monotonic() - t0)

    async def _settle_stopped(self, run: _Run, item: WorkItem, attempt: int, span: Any,
                              error: ErrorInfo | None = None) -> None:
        """The attempt was stopped by a cancel, its timeout, a lost lease, the
        worker's shutdown, or a newer attempt elsewhere."""
        if run.stop_reason == "cancelled":
            await self.ledger.cancelled(item, attempt, run.stop_message or "cancelled")
        elif run.stop_reason == "superseded":
            raise Abandon()  # the newer attempt owns the job and its message
        else:
            error = error or self._error_of(run, None)
            span.set_status(Status(StatusCode.ERROR, error.message))
            await self.ledger.retry_or_die(item, attempt, error)

    def _error_of(self, run: _Run, exc: BaseException | None) -> ErrorInfo:
        if run.stop_reason in _FAILED_STOPS or exc is None:
            return ErrorInfo(code=run.stop_reason or "stopped", message=run.stop_message)
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
        # Most short handlers are done within a few milliseconds: spare them
        # the guard tasks (leases, cancel and timeouts are all far longer).
        first = min(0.02, item.timeout_s or 0.02)
        done, _ = await asyncio.wait({run.task}, timeout=first)
        if done:
            run.finished = True
            return run.task.result()
        guards = [asyncio.create_task(self._renew_leases(run)),
                  asyncio.create_task(self._watch_cancel(run))]
        if item.timeout_s:
            guards.append(asyncio.create_task(
                self._deadline(run, max(0.0, item.timeout_s - first))))
        try:
            return await run.task
        finally:
            # The guards also stop on `finished`: on Python 3.11 a cancel that
            # lands as a request's reply arrives can be swallowed (wait_for,
            # gh-86296), and awaiting such a guard would hang the attempt.
            run.finished = True
            for g in guards:
                g.cancel()
            await asyncio.wait(guards, timeout=2.0)

    async def _stop_handler(self, run: _Run, reason: str, message: str) -> None:
        """Cooperative first; then SIGTERM, then SIGKILL of the handler's processes.

        A lost lease allows no grace: the device may already be someone else's,
        so the handler's processes are killed at once.
        """
        if run.stop_reason is not None:
            return
        run.stop_reason, run.stop_message = reason, message
        run.ctx._set_cancelled()
        task = run.task
        if task is None:
            return
        if reason == "lease_lost":
            steps: tuple[tuple[int | None, float], ...] = ((signal.SIGKILL, 0.5),)
        else:
            steps = ((None, self.cancel_grace_s), (signal.SIGTERM, self.cancel_grace_s),
                     (signal.SIGKILL, self.cancel_grace_s))
        for sig, grace in steps:
            if sig is not None:
                run.ctx.signal_processes(sig)
            done, _ = await asyncio.wait({task}, timeout=grace)
            if done:
                return
        task.cancel()  # a thread cannot be killed: its result is discarded

    async def _deadline(self, run: _Run, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        await self._stop_handler(run, "timeout", f"attempt exceeded timeout_s={timeout_s}")

    async def _renew_leases(self, run: _Run) -> None:
        """Renew every ttl/3. Lost when a renewal's CAS fails, and also when no
        renewal was confirmed for most of the TTL (server away, partition): the
        server may expire the key by then, so the job must not go on using it."""
        if not run.leases:
            return
        ttl = self.bus.settings.lease_ttl_s
        interval = max(0.2, ttl / 3)
        margin = min(1.0, ttl / 4)  # for the stop itself and clock rates
        last = time.monotonic()
        while not run.finished:
            due = min(lease.safe_until for lease in run.leases) - margin
            t = time.monotonic()
            await asyncio.sleep(max(0.0, min(last + interval, due) - t))
            t = time.monotonic()
            if run.finished:
                return
            if t >= due:
                await self._stop_handler(
                    run, "lease_lost",
                    f"no lease renewal confirmed for {t - (due + margin - ttl):.1f}s "
                    f"(ttl {ttl:g}s): the lease may have expired")
                return
            if t < last + interval:
                continue
            last = t
            results = await asyncio.gather(
                *(asyncio.wait_for(self.leases.renew(lease), max(0.1, min(interval, due - t)))
                  for lease in run.leases), return_exceptions=True)
            for r in results:
                if isinstance(r, LeaseLost):
                    await self._stop_handler(run, "lease_lost", str(r))
                    return
                if isinstance(r, BaseException):  # server away: retry until `due`
                    log.warning("lease renewal failed: %s", type(r).__name__)

    async def _watch_cancel(self, run: _Run) -> None:
        """The cancel signal is a nudge; the KV flag is the record, checked here.
        So is the attempt: when a newer attempt took the job (this worker's
        heartbeats were late and the message went elsewhere), this one stops."""
        while not run.finished:
            await asyncio.sleep(1.0)
            if run.finished:
                return
            with contextlib.suppress(Exception):
                got = await self.jobs.get(run.ctx.job_id)
                if got and got[0].cancel_requested:
                    await self._stop_handler(run, "cancelled", got[0].reason or "cancelled")
                    return
                if got and (got[0].attempt != run.attempt or got[0].terminal):
                    await self._stop_handler(run, "superseded",
                                             f"attempt {got[0].attempt} took the job over")
                    return

    async def _on_cancel_signal(self, msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        run = self.running.get(job_id)
        if run is not None:
            reason = "cancelled"
            with contextlib.suppress(Exception):
                reason = json.loads(msg.data).get("reason") or reason
            self._background(self._stop_handler(run, "cancelled", reason))

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

    async def _try_lease(self, item: WorkItem, resources: Resources,
                         check_view: bool) -> list[Lease] | None:
        ttl = self.bus.settings.lease_ttl_s
        for keys in _shuffled(self.inventory.candidates(resources)):
            if check_view and not self.lease_watch.maybe_free(keys, ttl):
                continue
            held = await self.leases.acquire_all(keys, self.worker_id, item.job_id)
            if held is not None:
                return held
        return None

    async def _lease(self, item: WorkItem, resources: Resources) -> list[Lease]:
        """Every lease the job needs, or Retry (busy devices are not an attempt).

        Waits up to `lease_wait_s` for devices to come free, in the order the
        jobs arrived here, waking on releases seen on the bus and retrying on a
        timer for TTL expiries (which publish nothing).
        """
        if not resources.any():
            return []
        if not self._lease_waiting:
            held = await self._try_lease(item, resources, check_view=False)
            if held is not None:
                return held
        ttl = self.bus.settings.lease_ttl_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_wait_s
        self._lease_waiting += 1
        try:
            async with self._lease_queue:
                first = True
                while not self._stopping.is_set():
                    self.lease_watch.changed.clear()
                    held = await self._try_lease(item, resources, check_view=not first)
                    first = False
                    if held is not None:
                        return held
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    # A release wakes us at once (with a little jitter so the
                    # waiters of several workers do not all pounce together);
                    # an expiry is found by the timer.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.lease_watch.changed.wait(),
                                               min(left, max(0.2, ttl / 6)))
                    await asyncio.sleep(random.random() * 0.02)
        finally:
            self._lease_waiting -= 1
            self._room.set()
        # Everything this worker could use stayed busy: back to the stream, so a
        # worker elsewhere may take it; still not an attempt.
        raise Retry(0.2 + random.random() * 0.3)

    async def _delegate(self, d: Delivery[WorkItem] | None, item: WorkItem, reason: str) -> None:
        """Hand the job back for another worker without using an attempt.

        Recorded once per worker. The nak delay grows with the deliveries, so
        a job nobody live can serve (the dispatcher marks it unschedulable)
        waits in the stream instead of spinning through its deliveries.
        """
        if item.job_id not in self.delegated:
            self.delegated.add(item.job_id)
            await emit(self.bus, Delegated(job_id=item.job_id, worker_id=self.worker_id,
                                           event_id=f"{item.job_id}.delegated.{self.worker_id}",
                                           reason=reason))
        n = d.num_delivered if d is not None else 1
        delay = backoff(n, base=0.5, cap=30.0) * (1 + random.random())
        # Once it is back in the stream, ring the others' doorbell (not ours):
        # otherwise this worker's own next poll tends to win the race for it.
        self._background(self._ring_for_others(item.capability["type"], delay + 0.05))
        raise Retry(delay)

    async def _ring_for_others(self, ctype: str, after: float) -> None:
        await asyncio.sleep(after)
        self._own_bells[ctype] = self._own_bells.get(ctype, 0) + 1
        try:
            await self.bus.signal(topology.work_doorbell(ctype))
        except Exception:
            self._own_bells[ctype] -= 1

    async def _others_serve(self, item: WorkItem) -> bool:
        with contextlib.suppress(Exception):
            return any(a.worker_id != self.worker_id and serves(a.capabilities, item.capability)
                       for a in await list_adverts(self.bus))
        return False

    # ---- control -------------------------------------------------------------------------

    async def _start_service(self) -> None:
        from nats import micro

        async def info(req: Any) -> None:
            body = codec.to_builtins(self.advert())
            body["running"] = sorted(self.running)
            body["completed"] = self.completed
            await req.respond(codec.encode(body))

        async def cancel(req: Any) -> None:
            raw = req.data.decode().strip()
            body = json.loads(raw) if raw.startswith("{") else {"job_id": raw}
            job_id = body.get("job_id", "")
            run = self.running.get(job_id)
            if run is None:
                await req.respond_error("404", f"job {job_id} is not running here")
                return
            self._background(self._stop_handler(run, "cancelled",
                                                body.get("reason") or "cancelled via control"))
            await req.respond(b'{"ok": true}')

        async def drain(req: Any) -> None:
            self.stop()
            await req.respond(b'{"ok": true}')

        self._service = await micro.add_service(
            self.bus.nc, name="jetfleet-worker", version=VERSION,
            description="jetfleet worker", metadata={"worker_id": self.worker_id,
                                                      "node": self.node})
        group = self._service.add_group(name=topology.control_group("worker", self.worker_id))
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
        with contextlib.suppress(Exception):
            await self._start_service()
        if self.inventory.leasable():
            await self.lease_watch.start()
        await put_advert(self.bus, self.advert())
        advertiser = asyncio.create_task(self._advertise_loop())
        log.info("worker %s on %s serving %s (capacity %d)", self.worker_id, self.node,
                 ", ".join(sorted(self.specs)), self.capacity)
        try:
            await self._fetch_loop()
            await self.drain()
        finally:
            advertiser.cancel()
            for task in list(self._bg):
                task.cancel()
            await self.lease_watch.stop()
            for sub in self._subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if self._service is not None:
                with contextlib.suppress(Exception):
                    await self._service.stop()
            await remove_advert(self.bus, self.worker_id)

    async def serve_until(self, stopping: asyncio.Event) -> None:
        """Run until `stopping` is set (then drain), or until the worker ends."""
        task = asyncio.create_task(self.run())
        stop_wait = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop_wait.cancel()
            task.result()
            return
        self.stop()
        await task

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


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(r: Resources) -> str:
    return f"gpus={r.gpus} gpu_memory_mb={r.gpu_memory_mb} cpu_slots={r.cpu_slots}"


def _shuffled(options: list[list[str]]) -> list[list[str]]:
    """Spread contending workers over devices instead of all trying the first."""
    out = list(options)
    random.shuffle(out)
    return out
