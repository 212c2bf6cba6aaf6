"""Helpers the test modules share: waiting for a condition, reading events and
dead letters, job states, and the lease and event logs the contention and
chaos tests check."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.js.api import DeliverPolicy

from agents.worker import App
from agents.worker.builtin import builtin
from bus import codec, topology
from bus.connection import Bus
from bus.leases import LeaseTable
from schemas.fleet import LeaseRecord
from schemas.jobs import JobState


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1,
                     what: str = "condition") -> Any:
    """Poll an (async or sync) check until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def stored(bus: Bus, subjects: str, stream: str, quiet_s: float = 0.5) -> list[Any]:
    """Every message stored on `subjects` of `stream` up to now (publishers may go
    on: reading stops at the stream's last sequence when called, or when quiet)."""
    last = (await bus.js.stream_info(stream)).state.last_seq
    if not last:
        return []
    sub = await bus.js.subscribe(subjects, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL, stream=stream)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=quiet_s)
            except TimeoutError:
                break
            out.append(msg)
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return out


async def job_events(bus: Bus, job_id: str) -> list[dict[str, Any]]:
    """Every event recorded for a job so far, straight from the EVENTS stream."""
    return [json.loads(m.data) for m in await stored(bus, topology.job_events(job_id),
                                                      topology.EVENTS)]


async def event_kinds(bus: Bus, job_id: str) -> list[str]:
    return [e["kind"] for e in await job_events(bus, job_id)]


async def state_is(client: Any, job_id: str, *states: str) -> JobState | None:
    """The job's state when it is one of `states`, else None (for `eventually`)."""
    s = await client.status(job_id)
    return s if s is not None and s.state in states else None


async def running_attempt(client: Any, job_id: str, attempt: int) -> JobState | None:
    s = await client.status(job_id)
    return s if s is not None and s.state == "running" and s.attempt == attempt else None


async def no_leases(bus: Bus) -> bool:
    return not await LeaseTable(bus).holders()


async def dead_letters(bus: Bus, n: int) -> list[dict[str, Any]]:
    """The first `n` entries of the DEAD stream (waits up to 10 s for each)."""
    sub = await bus.js.subscribe(topology.DEAD_ALL, ordered_consumer=True)
    out = []
    try:
        while len(out) < n:
            out.append(json.loads((await sub.next_msg(timeout=10)).data))
    finally:
        await sub.unsubscribe()
    return out


@dataclass
class KvOp:
    key: str
    op: str  # PUT | DEL | PURGE
    ts: float  # server time of the write
    record: LeaseRecord | None


class LeaseHistory:
    """Every write to KV `leases` from the first, replayed in stream order
    through an ordered consumer on the bucket's own subjects."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.ops: list[KvOp] = []
        self._sub: Any = None

    async def start(self) -> LeaseHistory:
        self._sub = await self.bus.js.subscribe(f"$KV.{topology.KV_LEASES}.>",
                                                ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.ALL, cb=self._on)
        return self

    async def _on(self, msg: Any) -> None:
        op = (msg.headers or {}).get("KV-Operation", "PUT")
        rec = codec.decode(msg.data, LeaseRecord) if op == "PUT" and msg.data else None
        self.ops.append(KvOp(key=msg.subject.removeprefix(f"$KV.{topology.KV_LEASES}."), op=op,
                             ts=msg.metadata.timestamp.timestamp(), record=rec))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


@dataclass
class Replay:
    acquisitions: list[tuple[str, str, str | None]]  # (key, holder, job)
    renewals: int
    releases: int
    expiries: int
    violations: list[str]


def replay(ops: list[KvOp], ttl_s: float) -> Replay:
    """Walk each key's writes: create -> renewals by the same holder ->
    delete, or silence for a TTL (expiry). A write by anyone else while a
    holder's lease is live is a violation (two holders)."""
    out = Replay([], 0, 0, 0, [])
    holder: dict[str, tuple[str, str | None, float] | None] = {}
    last: dict[str, float] = {}
    for op in ops:
        cur = holder.get(op.key)
        if cur is not None and op.ts - last[op.key] >= ttl_s:
            out.expiries += 1  # the holder went silent for a TTL: the key expired
            cur = holder[op.key] = None
        if op.op in ("DEL", "PURGE"):
            if cur is not None:
                out.releases += 1
            holder[op.key] = None
        else:
            assert op.record is not None
            ident = (op.record.holder, op.record.job_id, op.record.acquired_at)
            if cur is None:
                holder[op.key] = ident
                out.acquisitions.append((op.key, op.record.holder, op.record.job_id))
            elif ident == cur:
                out.renewals += 1
            else:
                out.violations.append(f"{op.key}: {ident} wrote while {cur} held it")
        last[op.key] = op.ts
    return out


def overlaps(states: list[JobState]) -> tuple[dict[str, int], list[str]]:
    """Per device, the attempts' running intervals; any two that overlap."""
    per: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for s in states:
        for a in s.attempts:
            assert a.started_at is not None and a.ended_at is not None, (s.job_id, a)
            for dev in a.devices:
                per[dev].append((a.started_at, a.ended_at, f"{s.job_id}#{a.attempt}"))
    bad = []
    for dev, iv in per.items():
        iv.sort()
        for (_s0, e0, j0), (s1, _e1, j1) in itertools.pairwise(iv):
            if s1 < e0:
                bad.append(f"{dev}: {j0} ran until {e0:.4f}, {j1} started at {s1:.4f}")
    return {d: len(v) for d, v in per.items()}, bad


class EventLog:
    """Every job event on the bus, collected as it comes."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.events: list[dict[str, Any]] = []
        self._sub: Any = None

    async def start(self) -> EventLog:
        self._sub = await self.bus.js.subscribe(topology.JOB_EVENTS_ALL, ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.ALL, cb=self._on)
        return self

    async def _on(self, msg: Any) -> None:
        self.events.append(json.loads(msg.data))

    def kinds(self, job_id: str) -> list[str]:
        return [e["kind"] for e in self.events if e["job_id"] == job_id]

    def count(self, kind: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.events:
            if e["kind"] == kind:
                out[e["job_id"]] += 1
        return out

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def states_of(client: Any, job_ids: list[str]) -> list[JobState]:
    out = []
    for j in job_ids:
        s = await client.status(j)
        assert s is not None, j
        out.append(s)
    return out


async def all_terminal(client: Any, job_ids: list[str]) -> bool:
    for j in job_ids:
        s = await client.status(j)
        if s is None or not s.terminal:
            return False
    return True


def sleep_only() -> App:
    app = App("sleepers")
    app.capabilities["sleep"] = builtin.capabilities["sleep"]
    return app


async def queued(bus: Any, n: int) -> bool:
    info = await bus.js.stream_info(topology.WORK)
    return info.state.messages >= n


