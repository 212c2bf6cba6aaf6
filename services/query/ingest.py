"""Pull EVENTS and TELEMETRY from the applied sequence on, into bounded batches.

Each stream is read through a consumer of this process alone (ephemeral, no
acks: the applied sequence in DuckDB is the only position), created to start
right after what the projection holds. A message at or below the applied
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

import nats.errors
from nats.aio.msg import Msg
from nats.js import api as js_api

from bus import topology
from bus.connection import Bus

from .rows import Batch
from .writer import Projection

log = logging.getLogger(__name__)

STREAMS = (topology.EVENTS, topology.TELEMETRY)


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
                 max_rows: int = 20_000, max_delay_s: float = 0.25, fetch_batch: int = 1000,
                 on_flush: Callable[[Batch], None] | None = None) -> None:
        self.bus = bus
        self.projection = projection
        self.instance = instance
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.fetch_batch = fetch_batch
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
        self._generation = 0

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

    async def _consumer(self, stream: str, start: int) -> Any:
        name = topology.query_consumer(self.instance, stream, self._generation)
        with contextlib.suppress(Exception):
            await self.bus.js.delete_consumer(stream, name)
        cfg = js_api.ConsumerConfig(
            name=name, ack_policy=js_api.AckPolicy.NONE, mem_storage=True, num_replicas=1,
            deliver_policy=(js_api.DeliverPolicy.BY_START_SEQUENCE if start > 1
                            else js_api.DeliverPolicy.ALL),
            opt_start_seq=start if start > 1 else None,
            # Gone by itself once this process is.
            inactive_threshold=60.0,
        )
        await self.bus.js.add_consumer(stream, cfg)
        return await self.bus.js.pull_subscribe_bind(durable=None, stream=stream, name=name)

    async def _read(self, stream: str, generation: int) -> None:
        st = self.streams[stream]
        sub: Any = None
        idle_since = time.monotonic()
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = await self._consumer(stream, st.read + 1)
                await self._room.wait()
                msgs = await sub.fetch(batch=self.fetch_batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                if time.monotonic() - idle_since > 5.0:
                    # Quiet for a while: make sure our consumer still exists
                    # (a server restart forgets it) and nothing waits unread.
                    idle_since = time.monotonic()
                    if await self._behind(stream, st):
                        await self._drop(sub)
                        sub = None
                continue
            except asyncio.CancelledError:
                await self._drop(sub)
                raise
            except Exception as exc:
                log.warning("reading %s: %s; re-creating the consumer", stream, exc)
                await self._drop(sub)
                sub = None
                await asyncio.sleep(0.5)
                continue
            if generation != self._generation:
                return
            idle_since = time.monotonic()
            self._take(st, msgs)

    async def _behind(self, stream: str, st: StreamState) -> bool:
        try:
            info = await self.bus.js.stream_info(stream)
        except Exception:
            return True
        return int(info.state.last_seq) > st.read

    @staticmethod
    async def _drop(sub: Any) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return None

    def _take(self, st: StreamState, msgs: list[Msg]) -> None:
        batch = self.batch
        for msg in msgs:
            meta = msg.metadata
            seq = int(meta.sequence.stream)
            if seq <= st.read:
                continue  # already applied (a consumer re-created from an older point)
            st.read, st.pending = seq, int(meta.num_pending)
            ts = meta.timestamp.timestamp() if meta.timestamp else None
            if self._oldest is None:
                self._oldest = time.monotonic()
            if ts is not None and (self._oldest_stream_ts is None or ts < self._oldest_stream_ts):
                self._oldest_stream_ts = ts
            batch.add(st.stream, seq, msg.subject, msg.data, ts)
        st.last_read_at = time.monotonic()
        if batch.size >= self.max_rows * 4:
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
        self._room.set()
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
        self._room.set()
        positions = await self.in_writer(self.projection.positions)
        self._generation += 1
        gen = self._generation
        for s, st in self.streams.items():
            st.applied = st.read = positions[s].seq if s in positions else 0
        self._tasks = [t for t in self._tasks if not t.get_name().startswith("read-")]
        self._tasks += [asyncio.create_task(self._read(s, gen), name=f"read-{s}")
                        for s in STREAMS]

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
