"""KV `jobs`: the latest state per job, changed only by compare-and-set.

Every writer (dispatcher, worker, canceller) goes through `transition`, so
two writers racing on one job cannot both win: that is how a redelivered job
never yields a second result.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus import codec, topology, tracing
from bus.connection import Bus
from bus.publisher import cas
from schemas.common import now
from schemas.events import JobEvent, event_kind
from schemas.jobs import JobState

Mutation = Callable[[JobState], JobState | None]


class JobTable:
    """KV `jobs` through compare-and-set, remembering the last revision it read
    or wrote of recent jobs: a transition then tries that revision first and
    costs one round trip instead of two. A stale guess only costs a failed CAS
    (or a re-read when the mutation declines), so results are as if uncached.

    The states it remembers are the ones it hands out: read-only to everyone
    (lifecycle transitions change a copy), so a transition starts from the
    remembered state without decoding it again."""

    CACHE_SIZE = 4096

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None
        self._last: OrderedDict[str, tuple[JobState, int]] = OrderedDict()

    def _remember(self, job_id: str, state: JobState, revision: int) -> None:
        self._last[job_id] = (state, revision)
        self._last.move_to_end(job_id)
        while len(self._last) > self.CACHE_SIZE:
            self._last.popitem(last=False)

    def prime(self, job_id: str, state: JobState, revision: int) -> None:
        """Remember a record and revision learnt elsewhere (a work item carries the
        dispatcher's), so the next transition needs no read to start from."""
        if job_id not in self._last or self._last[job_id][1] < revision:
            self._remember(job_id, state, revision)

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.kv(topology.KV_JOBS)
        return self._kv

    async def get(self, job_id: str) -> tuple[JobState, int] | None:
        kv = await self.kv()
        try:
            entry = await kv.get(job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        state, revision = codec.decode(entry.value, JobState), int(entry.revision or 0)
        self._remember(job_id, state, revision)
        return state, revision

    async def create(self, state: JobState) -> int | None:
        """Create the job's record; None when the job id is already known."""
        kv = await self.kv()
        state.updated_at = now()
        raw = codec.encode(state)
        try:
            rev = await cas(self.bus.publisher, topology.kv_subject(topology.KV_JOBS,
                                                                    state.job_id), raw, 0)
        except KeyWrongLastSequenceError:
            try:  # a deleted key can be made again (what nats-py's create does)
                rev = int(await kv.create(state.job_id, raw))
            except KeyWrongLastSequenceError:
                return None
        self._remember(state.job_id, state, rev)
        return rev

    async def transition(self, job_id: str, mutate: Mutation,
                         retries: int = 50) -> tuple[JobState, int] | None:
        """Apply `mutate` to the latest state with CAS, retrying on conflict.

        `mutate` returns the new state, or None to leave the job as it is
        (then None is returned). The job must exist.
        """
        cached = self._last.get(job_id)
        for _ in range(retries):
            if cached is not None:
                state, rev = cached
            else:
                current = await self.get(job_id)
                if current is None:
                    return None
                state, rev = current
            new = mutate(state)
            if new is None:
                if cached is not None:
                    cached = None  # declined on a guess: decide on the latest state
                    continue
                return None
            new.updated_at = now()
            raw = codec.encode(new)
            try:
                new_rev = await cas(self.bus.publisher,
                                    topology.kv_subject(topology.KV_JOBS, job_id), raw, rev)
            except KeyWrongLastSequenceError:
                cached = None
                await asyncio.sleep(0.005)
                continue
            self._remember(job_id, new, new_rev)
            return new, new_rev
        raise RuntimeError(f"job {job_id}: too many concurrent updates")


def unreadable(job_id: str, exc: codec.DecodeError) -> str:
    """Why a job's message is dead-lettered when something other than a job
    record lies under the job's key (a client writing KV jobs by hand): it
    reads no better on a redelivery."""
    return f"the record of job {job_id} in KV jobs cannot be read ({exc.reason})"


def _stamp(event: JobEvent) -> str:
    """The event's stable dedup id (set once)."""
    if not event.event_id:
        kind = event_kind(event)
        event.event_id = (f"{event.job_id}.{event.attempt}.{kind}" if kind != "progress"
                          else f"{event.job_id}.{event.attempt}.progress.{now():.6f}")
    return event.event_id


def say(bus: Bus, event: JobEvent) -> asyncio.Future[Any]:
    """`emit` sent at once, handing back the future of its ack (no task and no
    coroutine per event where no trace context has to ride with it)."""
    if tracing.enabled():
        return asyncio.ensure_future(emit(bus, event))
    return bus.publisher.send(topology.job_events(event.job_id), codec.encode(event),
                              headers={"Nats-Msg-Id": _stamp(event)})


async def emit(bus: Bus, event: JobEvent, headers: dict[str, str] | None = None) -> None:
    """Publish a job event on `events.jobs.<id>` with a stable dedup id."""
    _stamp(event)
    if tracing.enabled() or headers:
        await bus.publish(topology.job_events(event.job_id), event, msg_id=event.event_id,
                          headers=headers)
        return
    await bus.publisher.publish(topology.job_events(event.job_id), codec.encode(event),
                                headers={"Nats-Msg-Id": event.event_id})


def state_dict(state: JobState) -> dict[str, Any]:
    out: dict[str, Any] = codec.to_builtins(state)
    return out
