"""Intake: which work a worker takes, and when.

    ring   a doorbell (or a 1 s tick) says some capability may have work;
    take   pull what is there right now, highest priority first, as much as
           there is room for;
    hand   each message to the pipeline as its own task.

Room: jobs that lease nothing (echo, sleep, CPU handlers) share a large pool
(`cheap_capacity`); jobs that lease devices count against the worker's
`capacity`, which comes from the devices it can lease. A job may ask for
devices in its submission, so on a worker that has devices a message counts
against `capacity` until it is read, and moves to the large pool when it
needs none. A capability's own `concurrency` limit holds within either.
While a job waits for a device (see middleware.leases) the worker takes
nothing more.

Doorbells say which priority has new work (the dispatcher rings with the
job's priority), so a worker asks only where there is news, highest priority
first; the poll every `poll_s` looks at every priority (retries and
redeliveries ring no bell).

Lingering pulls: an idle worker leaves one pull request of one message
waiting on each (priority, capability) of work that leases nothing, while its
cheap pool has plenty of room (each request holds a slot until it is answered
or expires after `linger_s`). A job published while the worker is idle then
comes straight to it, without the doorbell's round trip and a pull's; a
doorbell for a pair with a request waiting is left to that request, and a
job that comes with nothing behind it (its consumer's pending count) re-arms
the request at once instead of looking with a pull. A
backlog is still taken by no-wait pulls in priority order: lingering requests
are only armed once every consumer was found empty, so at most one job per
priority is taken in arrival order, as a doorbell would have had it. A
lingering job that comes while the worker is stopping or waiting for a device
goes straight back (nak). The price: a worker that freezes (or is cut off)
while idle may be handed one job per waiting request before the requests
expire; each comes back after `work_ack_wait_s`, like any job a frozen worker
held. A worker killed outright holds none: the server drops a closed
connection's requests with it.

Priorities: p0, then p1, then p2. Against starvation, a lower priority whose
oldest undelivered message has waited longer than `starvation_after_s` is
looked at first, once per such check (at most one check per capability every
`starvation_after_s / 4`, only while busy with higher priorities), so under a
steady stream of p0 a p2 job waits about `starvation_after_s`, while a backlog
queued all at once still drains strictly p0 before p1 before p2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from agents.worker.app import CapabilitySpec
from bus import topology
from bus.connection import Bus
from bus.consumer import Delivery, decode_or_dead_letter
from bus.pull import pull_now
from bus.wire import Wire
from schemas.common import now
from schemas.jobs import WorkItem

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, bus: Bus, specs: dict[str, CapabilitySpec],
                 process: Callable[[Delivery[WorkItem]], Awaitable[None]], *,
                 capacity: int, cheap_capacity: int, starvation_after_s: float, poll_s: float,
                 held: Callable[[], bool], has_devices: bool = False,
                 linger_s: float = 5.0) -> None:
        self.bus = bus
        self.specs = specs
        self.process = process
        self.capacity = capacity
        self.cheap_capacity = cheap_capacity
        self.starvation_after_s = max(0.1, starvation_after_s)
        self.poll_s = poll_s
        self.held = held
        self.has_devices = has_devices
        self.tasks: dict[asyncio.Task[Any], str] = {}
        self._task_pool: dict[asyncio.Task[Any], str] = {}
        self.inflight: dict[str, int] = {}  # messages being handled, per capability
        self.pool_used = {"devices": 0, "cheap": 0}
        self._doorbell = asyncio.Event()
        self._room = asyncio.Event()
        # (priority, capability) pairs that may have work: where to look next.
        self._pending: set[tuple[int, str]] = self._all()
        self._rings: dict[tuple[int, str], int] = {}  # doorbells heard, per pair
        self._aged: dict[str, int] = {}  # ctype -> starved priority to look at first
        self._aging_checked = 0.0
        self._own_bells: dict[str, int] = {}  # doorbells this worker rang for others
        self._stopping = asyncio.Event()
        self._bg: set[asyncio.Task[Any]] = set()
        self._subs: list[Any] = []
        # Lingering pulls: pair -> (pool its slot is held in, monotonic time armed).
        self.linger_s = linger_s
        self._pairs = sorted(self._all())
        self._armed: dict[tuple[int, str], tuple[str, float]] = {}
        self._linger_inbox = ""
        self.lingered = 0  # jobs that came by a lingering pull
        self.forgotten = 0  # reconnects that made the server forget the waiting requests

    # ---- doorbells --------------------------------------------------------------------

    async def subscribe(self) -> None:
        for ctype in self.specs:
            # Straight from the connection's reader (bus.wire): one bell per job.
            self._subs.append(await Wire.of(self.bus.nc).subscribe(
                topology.work_doorbell(ctype), self._ring))
        if self.linger_s > 0:
            self._linger_inbox = self.bus.nc.new_inbox()
            self._subs.append(await self.bus.nc.subscribe(f"{self._linger_inbox}.*",
                                                          cb=self._on_linger))
            # A restarted server has forgotten every waiting pull request.
            self.bus.on_reconnect(self._forget_lingers)

    def _all(self, ctype: str | None = None) -> set[tuple[int, str]]:
        types = self.specs if ctype is None else [ctype]
        return {(p, t) for p in topology.PRIORITIES for t in types}

    def _ring(self, subject: bytes, _reply: bytes, data: bytes, _headers: bytes | None) -> None:
        ctype = topology.doorbell_type(subject.decode())
        if self._own_bells.get(ctype):
            self._own_bells[ctype] -= 1  # rung for the others (a delegation): not for us
            return
        if ctype not in self.specs:
            return
        prio = topology.doorbell_priority(data)
        pairs = self._all(ctype) if prio is None else {(prio, ctype)}
        # A pair with a pull request waiting gets its job through it: no need to look.
        pairs -= self._armed.keys()
        if not pairs:
            return
        for pair in pairs:
            self._rings[pair] = self._rings.get(pair, 0) + 1
        self._pending |= pairs
        self._doorbell.set()

    def ring_for_others(self, ctype: str, priority: int, after: float) -> None:
        async def ring() -> None:
            await asyncio.sleep(after)
            self._own_bells[ctype] = self._own_bells.get(ctype, 0) + 1
            try:
                await self.bus.signal(topology.work_doorbell(ctype),
                                      topology.doorbell_body(priority))
            except Exception:
                self._own_bells[ctype] -= 1

        self._background(ring())

    def wake(self) -> None:
        self._room.set()

    # ---- room -------------------------------------------------------------------------

    def _pool(self, ctype: str) -> str:
        """Where a message of `ctype` counts until it is read."""
        return "devices" if self.specs[ctype].resources.any() or self.has_devices else "cheap"

    def _free(self, pool: str) -> int:
        size = self.capacity if pool == "devices" else self.cheap_capacity
        return size - self.pool_used[pool]

    def _room_for(self, ctype: str) -> int:
        room = self._free(self._pool(ctype))
        if not self.specs[ctype].resources.any():
            room = min(room, self._free("cheap"))
        limit = self.specs[ctype].concurrency
        if limit is not None:
            room = min(room, limit - self.inflight.get(ctype, 0))
        return room

    def _any_room(self) -> bool:
        return any(self._room_for(t) > 0 for t in self.specs)

    # ---- taking work ------------------------------------------------------------------

    def _order(self) -> list[tuple[int, str]]:
        """Highest priority first, except a priority found starving, looked at first, once."""
        aged = [(self._aged.pop(t), t) for t in sorted(self._aged)]
        strict = sorted(self._pending)
        return aged + [pt for pt in strict if pt not in aged]

    async def _take(self) -> int:
        rings = dict(self._rings)
        for prio, ctype in self._order():
            room = self._room_for(ctype)
            if room <= 0:
                continue  # this capability's pool or own limit is full
            msgs = await pull_now(self.bus.nc, topology.WORK, topology.work_consumer(ctype, prio),
                                  min(room, 256))
            if not msgs:
                # Nothing there, and no bell rang for it while we looked.
                if self._rings.get((prio, ctype)) == rings.get((prio, ctype)):
                    self._pending.discard((prio, ctype))
                continue
            for msg in msgs:
                self._spawn(msg, ctype, prio)
            if prio < topology.PRIORITIES[-1]:
                self._maybe_check_starvation(prio)
            return len(msgs)  # start over from the top: strict priority
        return 0

    def _maybe_check_starvation(self, served: int) -> None:
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
                        self._pending.add((prio, ctype))
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

    async def run(self) -> None:
        while not self._stopping.is_set():
            if self.held() or not self._any_room():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.poll_s)
                continue
            # Cleared before looking, so a bell that rings while we look is kept.
            self._doorbell.clear()
            try:
                took = await self._take()
            except Exception as exc:  # reconnecting server, etc.: back off and go on
                log.warning("taking work failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if took:
                continue
            try:
                await self._arm()
            except Exception as exc:
                log.warning("leaving pull requests waiting failed: %s", exc)
            try:
                await asyncio.wait_for(self._doorbell.wait(), self.poll_s)
            except TimeoutError:
                # A redelivery or a delayed retry rings no bell: look everywhere.
                self._pending |= self._all()

    # ---- lingering pulls -------------------------------------------------------------------

    @property
    def waiting_pulls(self) -> int:
        """Lingering pull requests now waiting on the server."""
        return len(self._armed)

    def _lingers(self, ctype: str) -> bool:
        """Work that leases nothing, with room for a request on every priority and more."""
        return (self._pool(ctype) == "cheap" and not self.specs[ctype].resources.any()
                and self._room_for(ctype) > 2 * len(topology.PRIORITIES))

    async def _arm(self) -> None:
        """Leave a one-message pull waiting on each idle pair that has none."""
        if not self._linger_inbox or self._stopping.is_set() or self.held():
            return
        t = time.monotonic()
        for pair, (_pool, since) in list(self._armed.items()):
            if t - since > self.linger_s + 5.0:
                self._release(pair)  # never answered (a lost reply): give its slot back
        for i in range(len(self._pairs)):
            await self._arm_one(i, t)

    async def _arm_one(self, i: int, t: float) -> None:
        prio, ctype = self._pairs[i]
        if (prio, ctype) in self._armed or not self._lingers(ctype):
            return
        pool = self._pool(ctype)
        self.pool_used[pool] += 1
        self.inflight[ctype] = self.inflight.get(ctype, 0) + 1
        self._armed[(prio, ctype)] = (pool, t)
        req = json.dumps({"batch": 1, "expires": int(self.linger_s * 1e9)}).encode()
        try:
            await self.bus.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{topology.WORK}."
                f"{topology.work_consumer(ctype, prio)}", req,
                reply=f"{self._linger_inbox}.{i}")
        except Exception:
            self._release((prio, ctype))
            raise

    def _release(self, pair: tuple[int, str]) -> str | None:
        got = self._armed.pop(pair, None)
        if got is None:
            return None
        pool = got[0]
        self.pool_used[pool] -= 1
        self.inflight[pair[1]] -= 1
        self._room.set()
        return pool

    async def _forget_lingers(self) -> None:
        self.forgotten += 1
        for pair in list(self._armed):
            self._release(pair)
        # Doorbells left to those requests may have rung meanwhile: look everywhere.
        self._pending |= self._all()
        self._doorbell.set()

    async def _on_linger(self, msg: Msg) -> None:
        if msg.headers and "Status" in msg.headers and not msg.data:
            # 408 expired, 409 (max waiting, consumer deleted, leadership
            # change), 100 idle heartbeat: the request is over (or alive).
            if msg.headers.get("Status") == "100":
                return
            token = msg.subject.rsplit(".", 1)[-1]
            if token.isdigit() and int(token) < len(self._pairs):
                pair = self._pairs[int(token)]
                if self._release(pair) is not None:
                    # A doorbell that came while it waited was left to it: look now.
                    self._pending.add(pair)
                    self._doorbell.set()
            return
        parsed = topology.parse_work_subject(msg.subject)
        if parsed is None:
            return
        ctype, prio = parsed
        self._release((prio, ctype))
        if ctype not in self.specs or self._stopping.is_set() or self.held():
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self.lingered += 1
        self._spawn(msg, ctype, prio)
        try:
            behind = msg.metadata.num_pending
        except Exception:
            behind = 1
        if behind:
            # A backlog is building: take it in batches, in priority order.
            self._pending.add((prio, ctype))
            self._doorbell.set()
        elif not self.held():
            # Nothing behind it: wait for the next one the same way, at once.
            with contextlib.suppress(Exception):
                await self._arm_one(self._pairs.index((prio, ctype)), time.monotonic())

    # ---- handing over -------------------------------------------------------------------

    def _spawn(self, msg: Msg, ctype: str, prio: int) -> None:
        pool = self._pool(ctype)
        self.pool_used[pool] += 1
        self.inflight[ctype] = self.inflight.get(ctype, 0) + 1
        task = asyncio.get_running_loop().create_task(self._handle(msg, ctype, prio))
        self.tasks[task] = ctype
        self._task_pool[task] = pool
        task.add_done_callback(lambda t: self._done(t, ctype))

    def _reclassify(self, ctype: str, item: WorkItem) -> None:
        """Read: a job that leases nothing moves to the large pool."""
        task = asyncio.current_task()
        if (task is None or self._task_pool.get(task) != "devices"
                or self.specs[ctype].resources.any()
                or (item.resources is not None and item.resources.any())):
            return
        self._task_pool[task] = "cheap"
        self.pool_used["devices"] -= 1
        self.pool_used["cheap"] += 1
        self._room.set()

    def _done(self, task: asyncio.Task[Any], ctype: str) -> None:
        self.tasks.pop(task, None)
        self.pool_used[self._task_pool.pop(task, "cheap")] -= 1
        self.inflight[ctype] -= 1
        if self.specs[ctype].concurrency is not None:
            self._pending |= self._all(ctype)  # a limited capability has room again: look now
            self._doorbell.set()
        self._room.set()

    async def _handle(self, msg: Msg, ctype: str, prio: int) -> None:
        delivery = await decode_or_dead_letter(self.bus, msg, topology.WORK,
                                               topology.work_consumer(ctype, prio), WorkItem)
        if delivery is None:
            return
        self._reclassify(ctype, delivery.data)
        keepalive = max(0.5, self.bus.settings.work_ack_wait_s / 4)
        async with delivery.keepalive(keepalive):
            await self.process(delivery)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- stopping -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._doorbell.set()
        self._room.set()

    async def close(self) -> None:
        for task in list(self._bg):
            task.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
