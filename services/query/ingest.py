"""Pull EVENTS and TELEMETRY from the applied sequence on, into bounded batches.

Each stream is read through a consumer of this process alone (ephemeral, no
acks: the applied sequence in DuckDB is the only position), created to start
right after what the projection holds. It is read by a follower (bus.follow:
a data link in a thread, handing over chunks), or through nats-py's ordered
consumer when no link can be opened (a server at its connection limit). A message at or below the applied
sequence is dropped, so a consumer re-created after a server restart can
never apply anything twice. A batch is flushed when it holds `max_rows` rows
or its oldest message has waited `max_delay_s`; one flush runs at a time in
the writer thread while the next batch fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js import api as js_api

from bus import topology
from bus.connection import Bus
from bus.datalink import LinkUnavailable
from bus.follow import Delivered, LinkFollower

from .rows import Batch
from .writer import Projection

log = logging.getLogger(__name__)

STREAMS = (topology.EVENTS, topology.TELEMETRY)
_SUBJECTS = {topology.EVENTS: topology.EVENTS_ALL, topology.TELEMETRY: topology.TELEMETRY_ALL}


def _position(msg: Msg) -> tuple[int, float | None, int]:
    """(stream sequence, stream time in s, messages pending) of a delivery."""
    got = topology.ack_position(msg.reply)
    if got is not None:
        return got
    meta = msg.metadata
    ts = meta.timestamp.timestamp() if meta.timestamp else None
    return int(meta.sequence.stream), ts, int(meta.num_pending)


@dataclass
class StreamState:
    stream: str
    applied: int = 0          # committed in DuckDB
    read: int = 0             # taken into a batch
    pending: int = 0          # left in the stream after the last message read
    last_read_at: float = 0.0


@dataclass
class IngestStats:
    batches: int = 0
    events: int = 0
    samples: int = 0
    # Seconds from a message's arrival in its stream to its commit here.
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    last_flush_s: float = 0.0


class Ingest:
    def __init__(self, bus: Bus, projection: Projection, *, instance: str,
                 max_rows: int = 20_000, max_delay_s: float = 0.25,
                 on_flush: Callable[[Batch], None] | None = None) -> None:
        self.bus = bus
        self.projection = projection
        self.instance = instance
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.on_flush = on_flush
        self.streams = {s: StreamState(s) for s in STREAMS}
        self.stats = IngestStats()
        self.batch = Batch()
        self._oldest: float | None = None  # monotonic time the batch's first message came
        self._oldest_stream_ts: float | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projection-writer")
        self._flushing: asyncio.Lock = asyncio.Lock()
        self._room = asyncio.Event()
        self._room.set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._followers: dict[str, LinkFollower] = {}
        # How each stream is read now: "link" (a follower) or "nats" (the fallback).
        self.readers: dict[str, str] = {}
        self._generation = 0
        # Bumped on every reconnect: the server may have forgotten our consumers.
        self._connection = 0
        bus.on_reconnect(self._reconnected)

    async def _reconnected(self) -> None:
        self._connection += 1

    # ---- the writer thread -------------------------------------------------------------------

    async def in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the writer thread, after any flush in progress."""
        async with self._flushing:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        positions = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.projection.positions)
        for s, st in self.streams.items():
            st.applied = st.read = positions[s].seq if s in positions else 0
        self._generation += 1
        gen = self._generation
        self._tasks = [asyncio.create_task(self._read(s, gen), name=f"read-{s}")
                       for s in STREAMS]
        self._tasks.append(asyncio.create_task(self._flusher(), name="flusher"))

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        await self.flush()
        self._pool.shutdown(wait=True)

    async def rebuild(self) -> None:
        """Forget the projection's replayed tables and replay both streams from the start."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.batch = Batch()
        self._oldest = None
        await self.in_writer(self.projection.truncate)
        await self.start()

    # ---- reading ----------------------------------------------------------------------------

    async def _subscribe(self, stream: str, start: int, generation: int) -> Any:
        st = self.streams[stream]

        async def on_message(msg: Msg) -> None:
            if generation != self._generation:
                return
            self._take(st, msg)
            if not self._room.is_set():
                await self._room.wait()  # back-pressure: the server holds the rest

        cfg = js_api.ConsumerConfig(
            description=f"query projection {self.instance}",
            deliver_policy=(js_api.DeliverPolicy.BY_START_SEQUENCE if start > 1
                            else js_api.DeliverPolicy.ALL),
            opt_start_seq=start if start > 1 else None,
            # Gone by itself once this process is.
            inactive_threshold=60.0)
        return await self.bus.js.subscribe(_SUBJECTS[stream], stream=stream, cb=on_message,
                                           ordered_consumer=True, config=cfg)

    async def _read(self, stream: str, generation: int) -> None:
        """Follow the stream over a link; through nats-py if no link can be opened."""
        st = self.streams[stream]

        def on_chunk(chunk: list[Delivered]) -> None:
            if generation != self._generation:
                return
            for seq, ts, pending, subject, data in chunk:
                self._add(st, seq, ts, pending, subject, data)
            if not self._room.is_set():
                follower.pause()

        follower = LinkFollower(self.bus, stream, _SUBJECTS[stream], on_chunk, start=st.read + 1,
                            name=f"jetfleet-query-{stream.lower()}")
        self._followers[stream] = follower
        self.readers[stream] = "link"
        try:
            await follower.run()
        except LinkUnavailable as exc:
            log.warning("%s: no data link (%s); reading through the bus connection",
                        stream, exc)
            self.readers[stream] = "nats"
            await self._read_nats(stream, generation)
        finally:
            if self._followers.get(stream) is follower:
                del self._followers[stream]

    async def _read_nats(self, stream: str, generation: int) -> None:
        """Keep an ordered consumer delivering from after what was taken. It is
        re-created after a reconnect (a restarted server forgets it) and when it
        went quiet while the stream holds more."""
        st = self.streams[stream]
        sub: Any = None
        connection = self._connection
        try:
            while not self._stop.is_set():
                if connection != self._connection:
                    connection = self._connection
                    await self._drop(sub)
                    sub = None
                if sub is None:
                    try:
                        sub = await self._subscribe(stream, st.read + 1, generation)
                    except Exception as exc:
                        log.warning("subscribing to %s: %s; trying again", stream, exc)
                        await asyncio.sleep(1.0)
                        continue
                    st.last_read_at = time.monotonic()
                await asyncio.sleep(1.0)
                quiet = time.monotonic() - st.last_read_at
                if quiet > 5.0 and self._room.is_set():
                    behind = await self._behind(stream, st)
                    st.last_read_at = time.monotonic()  # look again in 5 s, not every second
                    if behind:
                        log.info("%s: consumer quiet for %.0fs with messages waiting; "
                                 "re-creating it", stream, quiet)
                        await self._drop(sub)
                        sub = None
        finally:
            await self._drop(sub)

    async def _behind(self, stream: str, st: StreamState) -> bool:
        try:
            info = await self.bus.js.stream_info(stream)
        except Exception:
            return False
        return int(info.state.last_seq) > st.read

    @staticmethod
    async def _drop(sub: Any) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _take(self, st: StreamState, msg: Msg) -> None:
        seq, ts, pending = _position(msg)
        self._add(st, seq, ts, pending, msg.subject, msg.data)

    def _add(self, st: StreamState, seq: int, ts: float | None, pending: int, subject: str,
             data: bytes) -> None:
        if seq <= st.read:
            return  # already taken (a consumer re-created from an older point)
        st.read, st.pending = seq, pending
        st.last_read_at = time.monotonic()
        if self._oldest is None:
            self._oldest = st.last_read_at
        if ts is not None and (self._oldest_stream_ts is None or ts < self._oldest_stream_ts):
            self._oldest_stream_ts = ts
        self.batch.add(st.stream, seq, subject, data, ts)
        if self.batch.size >= self.max_rows * 4:
            self._room.clear()  # back-pressure: the writer is behind

    # ---- flushing ---------------------------------------------------------------------------

    async def _flusher(self) -> None:
        tick = min(0.05, self.max_delay_s / 2)
        while not self._stop.is_set():
            await asyncio.sleep(tick)
            if self._due():
                try:
                    await self.flush()
                except Exception:
                    log.exception("projection flush failed; resuming from the applied position")
                    await self._restart()

    def _due(self) -> bool:
        if self.batch.empty():
            return False
        if self.batch.size >= self.max_rows:
            return True
        return self._oldest is None or time.monotonic() - self._oldest >= self.max_delay_s

    def add_snapshot(self, **snap: Any) -> None:
        """KV snapshots ride with the next batch (workers=, leases=, inventories=)."""
        for k, v in snap.items():
            setattr(self.batch, k, v)
        self.batch.snapshot_ts = time.time()

    async def flush(self) -> None:
        if self.batch.empty():
            return
        batch, self.batch = self.batch, Batch()
        oldest = self._oldest_stream_ts
        self._oldest = self._oldest_stream_ts = None
        started = time.perf_counter()
        await self.in_writer(self.projection.apply, batch)
        self._make_room()
        committed = time.time()
        self.stats.batches += 1
        self.stats.events += len(batch.events) + len(batch.node_events)
        self.stats.samples += batch.samples
        self.stats.last_flush_s = time.perf_counter() - started
        if oldest is not None:
            self.stats.lags.append(max(0.0, committed - oldest))
        for s, p in batch.positions.items():
            self.streams[s].applied = p.seq
        if self.on_flush is not None:
            self.on_flush(batch)

    async def _restart(self) -> None:
        """After a failed flush: drop the batch and read again from what was committed."""
        for t in [t for t in self._tasks if t.get_name().startswith("read-")]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.batch = Batch()
        self._oldest = self._oldest_stream_ts = None
        self._make_room()
        positions = await self.in_writer(self.projection.positions)
        self._generation += 1
        gen = self._generation
        for s, st in self.streams.items():
            st.applied = st.read = positions[s].seq if s in positions else 0
        self._tasks = [t for t in self._tasks if not t.get_name().startswith("read-")]
        self._tasks += [asyncio.create_task(self._read(s, gen), name=f"read-{s}")
                        for s in STREAMS]

    def _make_room(self) -> None:
        self._room.set()
        for follower in self._followers.values():
            follower.resume()

    def lag_messages(self) -> dict[str, int]:
        """Messages in each stream not yet committed here (as of the last read)."""
        return {s: st.pending + (st.read - st.applied) for s, st in self.streams.items()}

    async def caught_up(self, timeout: float = 30.0,
                        check: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Wait until every message now in the streams is committed here."""
        targets = {}
        for s in STREAMS:
            info = await self.bus.js.stream_info(s)
            targets[s] = int(info.state.last_seq)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(self.streams[s].applied >= t for s, t in targets.items()):
                return True
            await asyncio.sleep(0.05)
        return False
