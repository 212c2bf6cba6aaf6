"""The attempt pipeline: one delivered work item, read top to bottom.

    admit      is this a job this worker should start now? (its record, its
               labels and devices, a cancel, a lost previous attempt, spent attempts)
    start      middleware before_start (leases), then the record says running
               (compare-and-set) and the `running` event goes out
    invoke     the handler, under the guards middleware armed after_start
    policy     middleware after_invoke (retry policy, progress flush)
    settle     the one place an outcome becomes a record, an event and an ack
               (agents.worker.settle), then middleware after_attempt (release)

Everything cross-cutting is middleware (agents.worker.middleware); this
module knows none of it by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.worker.attempt import Attempt
from agents.worker.children import Children
from agents.worker.context import JobContext
from agents.worker.ledger import Ledger
from agents.worker.middleware import Middleware
from agents.worker.middleware.cancel import CancelRegistry
from agents.worker.outcome import (
    Abandoned,
    Announced,
    Busy,
    Cancelled,
    Dead,
    Delegated,
    Outcome,
    Rejected,
)
from agents.worker.settle import Settler
from bus import codec
from bus.consumer import Delivery, backoff
from bus.jobtable import JobTable, emit, say, unreadable
from bus.resources import ResourceStore
from schemas.common import ErrorInfo
from schemas.events import Running
from schemas.fleet import serves
from schemas.jobs import JobState, Resources, StopRequest, WorkItem

if TYPE_CHECKING:
    from agents.devices import Inventory
    from agents.worker.app import CapabilitySpec
    from bus.connection import Bus
    from bus.objects import ObjectStore
    from sdk.client import Client

log = logging.getLogger(__name__)


def describe(r: Resources) -> str:
    return f"gpus={r.gpus} gpu_memory_mb={r.gpu_memory_mb} cpu_slots={r.cpu_slots}"


@dataclass(frozen=True)
class Host:
    """What the pipeline needs of the worker it runs in."""

    bus: Bus
    client: Client
    worker_id: str
    node: str
    inventory: Inventory
    specs: dict[str, CapabilitySpec]
    cancel_grace_s: float
    objects: ObjectStore


class Pipeline:
    def __init__(self, host: Host, middleware: list[Middleware], registry: CancelRegistry,
                 settler: Settler, ledger: Ledger, jobs: JobTable,
                 others_serve: Callable[[WorkItem], Any]) -> None:
        self.w = host
        self.middleware = middleware
        self.registry = registry
        self.settler = settler
        self.ledger = ledger
        self.jobs = jobs
        self.others_serve = others_serve
        self._bg: set[asyncio.Task[Any]] = set()
        self._hooks: dict[str, tuple[int, tuple[Middleware, ...]]] = {}

    def _with(self, hook: str) -> tuple[Middleware, ...]:
        """The pieces that implement `hook` (the others are skipped, not awaited),
        looked up again only when a piece is added or removed."""
        n = len(self.middleware)
        cached = self._hooks.get(hook)
        if cached is not None and cached[0] == n:
            return cached[1]
        base = getattr(Middleware, hook)
        found = tuple(m for m in self.middleware if getattr(type(m), hook) is not base)
        self._hooks[hook] = (n, found)
        return found

    async def process(self, d: Delivery[WorkItem]) -> None:
        spec = self.w.specs.get(d.data.capability.get("type", ""))
        att = Attempt(delivery=d, spec=spec,
                      resources=(d.data.resources or Resources()).at_least(
                          spec.resources if spec else None),
                      cancel_grace_s=self.w.cancel_grace_s)
        outcome: Outcome | None = None
        async with contextlib.AsyncExitStack() as stack:
            for m in self._with("around"):
                await stack.enter_async_context(m.around(att))
            try:
                try:
                    outcome = await self._run(att)
                    await self.settler.settle(att, outcome)
                except codec.DecodeError as exc:
                    outcome = Rejected(unreadable(att.job_id, exc))
                    await self.settler.settle(att, outcome)
            except asyncio.CancelledError:
                # Shutting down mid-attempt: let the server redeliver it at once.
                with contextlib.suppress(Exception):
                    await d.nak()
                raise
            except Exception:
                delay = backoff(d.num_delivered)
                log.exception("job %s: the attempt could not be settled (delivery %d); "
                              "redelivery in %.1fs", att.job_id, d.num_delivered, delay)
                with contextlib.suppress(Exception):
                    await d.nak(delay)
            finally:
                for m in reversed(self._with("after_attempt")):
                    try:
                        await m.after_attempt(att, outcome)
                    except Exception:
                        log.exception("%s.after_attempt failed", m.name)
                att.release()

    async def _run(self, att: Attempt) -> Outcome:
        refused = await self._admit(att, fresh=False)
        if refused is not None:
            return refused
        for m in self._with("before_start"):
            early = await m.before_start(att)
            if early is not None:
                return early
        for _ in range(5):
            if await self.ledger.start(att.job_id, att.number, att.devices) is not None:
                break
            # The record changed since we read it (a cancel, another attempt):
            # decide again on the latest.
            refused = await self._admit(att, fresh=True)
            if refused is not None:
                return refused
        else:
            return Busy(0.1)
        att.started = True
        att.ctx = self._context(att)
        att.pending.append(say(self.w.bus, Running(
            job_id=att.job_id, attempt=att.number, worker_id=self.w.worker_id, node=self.w.node,
            devices=att.devices,
            # Unique per delivery: after a handler's Delegate the same attempt
            # number runs again elsewhere and must have its own running event.
            event_id=f"{att.job_id}.{att.number}.running.{self.w.worker_id}."
                     f"{att.delivery.num_delivered}")))
        for m in self._with("after_start"):
            await m.after_start(att)
        outcome = await att.invoke()
        for m in reversed(self._with("after_invoke")):
            outcome = await m.after_invoke(att, outcome)
        return outcome

    async def _admit(self, att: Attempt, *, fresh: bool) -> Outcome | None:
        """None when this worker should start the job's next attempt now."""
        item = att.item
        holder = self.registry.running.get(item.job_id)
        if holder is not None and holder is not att:
            # A second delivery of a job running here (its in-progress acks came
            # late): the running attempt settles the message.
            log.warning("job %s delivered again while running here", item.job_id)
            return Abandoned("delivered again while running here")
        state = await self._record(att, fresh)
        if state is None:
            return Rejected(f"no record of job {item.job_id} in KV jobs")
        att.state = state
        if state.terminal:
            return Announced(state)
        spec = att.spec
        if spec is None or not serves([spec.advert()], item.capability):
            return Delegated("this worker does not serve the job's labels")
        if not self.w.inventory.can_ever_fit(att.resources):
            if state.state == "unschedulable":
                return Busy(30.0)  # the dispatcher said so already: no bouncing, no noise
            return Delegated("this worker's devices can never hold the job's resources "
                             f"({describe(att.resources)})")
        if state.cancel_requested:
            return Cancelled(state.reason or "cancelled")
        if item.job_id in self.settler.delegated and await self.others_serve(item):
            return Delegated("")  # handed back once already: leave it to the others
        if state.state == "running":
            # Its message came back while the record says running: the previous
            # attempt's worker stopped heartbeating it (died, stalled, or
            # restarted under the same id; a live run here was caught above).
            lost = await self.ledger.lost(state)
            if lost is not None:
                await emit(self.w.bus, lost)
                self._supersede(state)
            state = await self._record(att, fresh=True)
            if state is None:
                return Rejected(f"no record of job {item.job_id} in KV jobs")
            att.state = state
            if state.terminal:
                return Announced(state)
        att.number = state.attempt + 1
        if att.number > item.max_attempts:
            att.number = 0
            return Dead(ErrorInfo(code="attempts_exhausted",
                                  message=f"all {item.max_attempts} attempts used"))
        return None

    async def _record(self, att: Attempt, fresh: bool) -> JobState | None:
        item = att.item
        if (not fresh and item.record is not None and item.revision
                and item.revision > 0 and item.record.job_id == item.job_id
                and att.delivery.num_delivered == 1):
            # The dispatcher's own record and revision: right unless something
            # changed it since, which the start's compare-and-set finds out. A
            # revision of 0 would make that compare-and-set a create: a work
            # item that no dispatcher sent could then record a job of its own.
            self.jobs.prime(item.job_id, item.record, item.revision)
            return item.record
        got = await self.jobs.get(item.job_id)
        return got[0] if got else None

    def _supersede(self, state: JobState) -> None:
        """Ask the quiet previous worker (if it is alive after all) to stop."""
        from bus.control import request

        if not state.worker_id or state.worker_id == self.w.worker_id:
            return

        async def ask() -> None:
            try:
                await request(self.w.bus, "worker", state.worker_id or "", "cancel",
                              StopRequest(job_id=state.job_id, kind="superseded",
                                          attempt=state.attempt,
                                          reason=f"attempt {state.attempt + 1} took the job"),
                              timeout=1.0)
            except Exception as exc:  # gone, or stalled: it finds out when it settles
                log.info("job %s: asking %s to stop attempt %d: %s", state.job_id,
                         state.worker_id, state.attempt, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(ask())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _context(self, att: Attempt) -> JobContext:
        env: dict[str, str] = {}
        if self.w.inventory.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.w.inventory.visible_devices(att.devices)
        cancelled = asyncio.Event()
        ctx = JobContext(item=att.item, attempt=att.number, worker_id=self.w.worker_id,
                         node=self.w.node, devices=att.devices, env=env,
                         loop=asyncio.get_running_loop(), bus=self.w.bus, client=self.w.client,
                         children=Children(self.w.bus, self.w.client, att.item, cancelled),
                         objects=self.w.objects,
                         resources=ResourceStore(self.w.bus, self.w.objects),
                         _progress=att.report_progress, cancelled=cancelled)
        if att.stop_reason is not None:
            ctx._set_cancelled()
        return ctx
