"""Device leases for an attempt: taken before it starts, renewed while it runs,
given back when it ends.

When every device a job could use is leased, the job waits here, in-progress
acked, for a release (seen live on the bus, or a TTL expiry found by
retrying) up to `lease_wait_s`, rather than going back to the stream at once:
busy devices do not burn deliveries. While a job waits the worker takes no
more work, and waiting jobs take devices in arrival order. Still busy after
the wait: back to the stream (Busy), without using an attempt, so a worker
elsewhere may take it.

A renewal that fails, or no renewal confirmed for most of the TTL (server
away, partition), stops the attempt at once: the server may expire the key
by then, and the device must not be used by two jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agents.devices import Inventory
from agents.worker.middleware import Middleware
from agents.worker.outcome import Busy, Outcome
from bus.leases import Lease, LeaseLost, LeaseTable, LeaseWatch
from schemas.jobs import Resources

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt

log = logging.getLogger(__name__)


class Leases(Middleware):
    name = "leases"

    def __init__(self, table: LeaseTable, watch: LeaseWatch, inventory: Inventory,
                 worker_id: str, ttl_s: float, lease_wait_s: float,
                 stopping: Callable[[], bool], on_wait_change: Callable[[], None]) -> None:
        self.table = table
        self.watch = watch
        self.inventory = inventory
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self.lease_wait_s = lease_wait_s
        self.stopping = stopping
        self.on_wait_change = on_wait_change
        self.queue = asyncio.Lock()  # waiting jobs take devices in arrival order
        self.waiting = 0

    # ---- taking them -----------------------------------------------------------------

    async def before_start(self, att: Attempt) -> Outcome | None:
        held = await self._lease(att.job_id, att.resources)
        if held is None:
            return Busy(0.2 + random.random() * 0.3)
        att.leases = held
        return None

    async def _try(self, job_id: str, resources: Resources, check_view: bool) -> list[Lease] | None:
        options = self.inventory.candidates(resources)
        random.shuffle(options)  # contending workers spread over devices
        for keys in options:
            if check_view and not self.watch.maybe_free(keys, self.ttl_s):
                continue
            held = await self.table.acquire_all(keys, self.worker_id, job_id)
            if held is not None:
                return held
        return None

    async def _lease(self, job_id: str, resources: Resources) -> list[Lease] | None:
        if not resources.any():
            return []
        if not self.waiting:
            held = await self._try(job_id, resources, check_view=False)
            if held is not None:
                return held
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_wait_s
        self.waiting += 1
        try:
            async with self.queue:
                first = True
                while not self.stopping():
                    self.watch.changed.clear()
                    held = await self._try(job_id, resources, check_view=not first)
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
                        await asyncio.wait_for(self.watch.changed.wait(),
                                               min(left, max(0.2, self.ttl_s / 6)))
                    await asyncio.sleep(random.random() * 0.02)
        finally:
            self.waiting -= 1
            self.on_wait_change()
        return None

    # ---- keeping them ----------------------------------------------------------------

    async def after_start(self, att: Attempt) -> None:
        if att.leases:
            att.notes["renewal"] = asyncio.get_running_loop().create_task(self._renew(att))

    async def _renew(self, att: Attempt) -> None:
        """Renew every ttl/3. Lost when a renewal's CAS fails, and also when no
        renewal was confirmed for most of the TTL: the server may expire the key
        by then, so the job must not go on using it."""
        ttl = self.ttl_s
        interval = max(0.2, ttl / 3)
        margin = min(1.0, ttl / 4)  # for the stop itself and clock rates
        last = time.monotonic()
        while not att.finished:
            due = min(lease.safe_until for lease in att.leases) - margin
            t = time.monotonic()
            await asyncio.sleep(max(0.0, min(last + interval, due) - t))
            t = time.monotonic()
            if att.finished:
                return
            if t >= due:
                att.stop("lease_lost", f"no lease renewal confirmed for "
                                       f"{t - (due + margin - ttl):.1f}s (ttl {ttl:g}s): the "
                                       "lease may have expired")
                return
            if t < last + interval:
                continue
            last = t
            results = await asyncio.gather(
                *(asyncio.wait_for(self.table.renew(lease), max(0.1, min(interval, due - t)))
                  for lease in att.leases), return_exceptions=True)
            for r in results:
                if isinstance(r, LeaseLost):
                    att.stop("lease_lost", str(r))
                    return
                if isinstance(r, BaseException):  # server away: retry until `due`
                    log.warning("lease renewal failed: %s", type(r).__name__)

    # ---- giving them back ------------------------------------------------------------

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        renewal: asyncio.Task[Any] | None = att.notes.pop("renewal", None)
        if renewal is not None:
            renewal.cancel()
            await asyncio.wait({renewal}, timeout=2.0)
        for lease in att.leases:
            with contextlib.suppress(Exception):
                await self.table.release(lease)
