"""The worker: advertises its capabilities, takes work when it has room
(agents.worker.intake), and runs each job as one attempt through the attempt
pipeline (agents.worker.pipeline) and its middleware, composed here.

    advertise   KV `capabilities`, renewed on its TTL
    intake      doorbells, priorities, room
    pipeline    admit, start, invoke, settle — with tracing, cancel, leases,
                time limit, progress, child jobs and the retry policy around it
    control     `jetfleet.worker.<id>.info|cancel|drain` (nats micro)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import time
from typing import Any

from agents.devices import Inventory, node_name
from agents.worker.app import App, CapabilitySpec
from agents.worker.intake import Intake
from agents.worker.ledger import Ledger
from agents.worker.middleware import Middleware
from agents.worker.middleware.cancel import CancelRegistry
from agents.worker.middleware.children import ChildJobs
from agents.worker.middleware.leases import Leases
from agents.worker.middleware.progress import ProgressReports
from agents.worker.middleware.retries import RetryPolicy
from agents.worker.middleware.timelimit import TimeLimit
from agents.worker.middleware.tracing import Tracing
from agents.worker.pipeline import Host, Pipeline, describe
from agents.worker.settle import Settler
from bus import topology, tracing
from bus.adverts import list_adverts, put_advert, remove_advert
from bus.connection import Bus
from bus.control import ControlService
from bus.jobtable import JobTable
from bus.leases import LeaseTable, LeaseWatch
from bus.objects import ObjectStore
from schemas.common import now
from schemas.fleet import CapabilityAdvert, serves
from schemas.jobs import WorkItem
from sdk.client import Client

log = logging.getLogger(__name__)
VERSION = "0.2.0"
# Jobs that lease nothing (echo, sleep, CPU handlers) at once, per worker.
CHEAP_CAPACITY = 256
# A worker without devices advertises this capacity for device-declaring work.
CPU_CAPACITY = 4


class Worker:
    def __init__(
        self,
        bus: Bus,
        app: App,
        *,
        inventory: Inventory | None = None,
        capacity: int | None = None,
        cheap_capacity: int | None = None,
        worker_id: str | None = None,
        cancel_grace_s: float = 2.0,
        starvation_after_s: float = 10.0,
        poll_s: float = 1.0,
        lease_wait_s: float | None = None,
        control: ControlService | None = None,
        middleware: list[Middleware] | None = None,
    ) -> None:
        self.bus = bus
        self.app = app
        self.specs: dict[str, CapabilitySpec] = dict(app.capabilities)
        self.inventory = inventory or Inventory(node=node_name(), gpus=[], slots_per_gpu=1,
                                                cpu_slots=[])
        # Capabilities whose declared devices this worker can never hold: still
        # advertised (so placement can say why nobody runs them), never taken.
        self.unservable = {t for t, spec in self.specs.items()
                           if not self.inventory.can_ever_fit(spec.resources)}
        for t in sorted(self.unservable):
            log.warning("capability %s declares %s, more than this worker's devices can "
                        "ever hold: advertised, but its jobs are left to others", t,
                        describe(self.specs[t].resources))
        self.node = self.inventory.node
        self.worker_id = worker_id or (control.instance if control else None) or (
            f"w-{self.node}-{os.getpid()}-{random.randrange(16**4):04x}")
        leasable = len(self.inventory.leasable())
        # Capacity comes from the devices a worker can lease, unless set; work that
        # leases nothing has a large pool of its own, unless a capacity was set
        # (then it caps everything, as asked).
        self.capacity = capacity or (leasable if leasable else CPU_CAPACITY)
        if cheap_capacity is None:
            cheap_capacity = capacity if capacity else CHEAP_CAPACITY
        self.cancel_grace_s = cancel_grace_s
        self.started_at = now()
        self.hook_times: dict[str, float] = {}
        self.client = Client(bus)
        self.jobs = JobTable(bus)
        self.ledger = Ledger(bus, self.jobs, self.worker_id, self.node)
        self.lease_table = LeaseTable(bus, self.node)
        self.lease_watch = LeaseWatch(bus, self.node)
        self._stopping = asyncio.Event()
        self.registry = CancelRegistry(self.jobs)
        self.leases = Leases(self.lease_table, self.lease_watch, self.inventory, self.worker_id,
                             bus.settings.lease_ttl_s,
                             lease_wait_s if lease_wait_s is not None
                             else 2 * bus.settings.lease_ttl_s,
                             stopping=self._stopping.is_set, on_wait_change=self._wake)
        self.intake = Intake(bus, {t: spec for t, spec in self.specs.items()
                                   if t not in self.unservable},
                             self._process, capacity=self.capacity,
                             cheap_capacity=cheap_capacity,
                             starvation_after_s=starvation_after_s, poll_s=poll_s,
                             held=lambda: self.leases.waiting > 0,
                             has_devices=bool(leasable))
        self.settler = Settler(bus, self.ledger, self.worker_id, self.intake.ring_for_others,
                               ObjectStore(bus))
        self.middleware = middleware if middleware is not None else self.default_middleware()
        self.objects = ObjectStore(bus)
        host = Host(bus=bus, client=self.client, worker_id=self.worker_id, node=self.node,
                    inventory=self.inventory, specs=self.specs,
                    cancel_grace_s=self.cancel_grace_s, objects=self.objects)
        self.pipeline = Pipeline(host, self.middleware, self.registry, self.settler, self.ledger,
                                 self.jobs, self._others_serve)
        self.control = control or ControlService(bus, "worker", self.worker_id, kind="worker",
                                                 on_drain=self.stop)
        self._own_control = control is None

    def default_middleware(self) -> list[Middleware]:
        """The composition, outermost first: each piece is one module of middleware/."""
        tracer: list[Middleware] = [Tracing(self.worker_id)] if tracing.enabled() else []
        return [
            *tracer,
            self.registry,
            self.leases,
            TimeLimit(),
            ProgressReports(self.bus, self.jobs, self.worker_id),
            ChildJobs(),
            RetryPolicy(),
        ]

    async def _process(self, delivery: Any) -> None:
        await self.pipeline.process(delivery)

    def _wake(self) -> None:
        self.intake.wake()

    @property
    def running(self) -> dict[str, Any]:
        return self.registry.running

    @property
    def completed(self) -> int:
        return self.settler.completed

    # ---- advert ---------------------------------------------------------------------

    def advert(self) -> CapabilityAdvert:
        return CapabilityAdvert(
            worker_id=self.worker_id, node=self.node, pid=os.getpid(),
            capabilities=[spec.advert() for spec in self.specs.values()],
            needs={t: spec.resources for t, spec in self.specs.items() if spec.resources.any()},
            devices=self.inventory.leasable(), capacity=self.capacity,
            load=len(self.registry.running), started_at=self.started_at, updated_at=now(),
            version=VERSION, simulated=self.inventory.simulated,
        )

    async def _advertise_loop(self) -> None:
        interval = max(0.5, self.bus.settings.advert_ttl_s / 3)
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                await put_advert(self.bus, self.advert())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def _others_serve(self, item: WorkItem) -> bool:
        with contextlib.suppress(Exception):
            return any(a.worker_id != self.worker_id and serves(a.capabilities, item.capability)
                       for a in await list_adverts(self.bus))
        return False

    # ---- control ------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        from bus import codec

        body: dict[str, Any] = codec.to_builtins(self.advert())
        body["running"] = sorted(self.registry.running)
        body["completed"] = self.completed
        body["hooks_s"] = self.hook_times
        return body

    async def _start_control(self) -> None:
        self.control.info = self.info
        await self.control.add("cancel", self.registry.on_request)
        if self._own_control:
            await self.control.start()

    async def _run_hooks(self, kind: str, hooks: list[Any]) -> None:
        for hook in hooks:
            t0 = time.monotonic()
            result = hook()
            if inspect.isawaitable(result):
                await result
            name = f"{kind}:{getattr(hook, '__name__', 'hook')}"
            self.hook_times[name] = round(time.monotonic() - t0, 3)
            log.info("%s took %.2fs", name, self.hook_times[name])

    # ---- life ---------------------------------------------------------------------------

    async def run(self) -> None:
        for ctype in self.intake.specs:
            for prio in topology.PRIORITIES:
                await topology.ensure_consumer(
                    self.bus.js, topology.WORK,
                    topology.work_consumer_config(self.bus.settings, ctype, prio))
        await self.intake.subscribe()
        await self._run_hooks("on_start", self.app.start_hooks)
        with contextlib.suppress(Exception):
            await self._start_control()
        self.bus.on_reconnect(self.registry.reconcile)
        if self.inventory.leasable():
            await self.lease_watch.start()
        await put_advert(self.bus, self.advert())
        advertiser = asyncio.create_task(self._advertise_loop())
        log.info("worker %s on %s serving %s (capacity %d)", self.worker_id, self.node,
                 ", ".join(sorted(self.specs)), self.capacity)
        try:
            await self.intake.run()
            await self.drain()
        finally:
            advertiser.cancel()
            await self.intake.close()
            await self.lease_watch.stop()
            if self._own_control:
                await self.control.stop()
            await remove_advert(self.bus, self.worker_id)
            with contextlib.suppress(Exception):
                await self._run_hooks("on_stop", self.app.stop_hooks)

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
        self.intake.stop()

    async def drain(self, timeout: float = 30.0) -> None:
        tasks = set(self.intake.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for att in list(self.registry.running.values()):
            att.stop("shutdown", "worker shutting down")
        tasks = set(self.intake.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=self.cancel_grace_s * 3 + 1)
