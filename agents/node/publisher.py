"""Telemetry out of the agent: batched, bounded, and caught up after an outage.

Messages are encoded when queued and kept per kind in bounded queues (by
count and bytes): a heartbeat or a jobs list keeps only the latest, metrics
keep a window of history so the query service can fill the gap after an
outage, and the oldest are dropped (and counted) when a queue is full. A
flush publishes up to `batch` messages at once through `Bus.publish`
(pipelined, each with a `Nats-Msg-Id`, so a retry of a publish that did land
is dropped by the server), heartbeats first; what fails stays queued and is
retried with backoff. Nothing here blocks the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bus import codec
from bus.connection import Bus

log = logging.getLogger(__name__)


@dataclass
class _Queue:
    max_count: int
    max_bytes: int
    items: deque[tuple[str, bytes, str]] = field(default_factory=deque)
    size: int = 0
    dropped: int = 0

    def push(self, subject: str, body: bytes, msg_id: str) -> None:
        self.items.append((subject, body, msg_id))
        self.size += len(body)
        while len(self.items) > self.max_count or (self.size > self.max_bytes and len(self.items) > 1):
            _, old, _ = self.items.popleft()
            self.size -= len(old)
            self.dropped += 1


# kind -> (messages kept, bytes kept), in the order a flush sends them.
DEFAULT_LIMITS: dict[str, tuple[int, int]] = {
    "heartbeat": (1, 1 << 20),
    "jobs": (1, 4 << 20),
    "gpu": (360, 16 << 20),
    "procs": (360, 16 << 20),
}


class Publisher:
    def __init__(self, bus: Bus, limits: dict[str, tuple[int, int]] | None = None, *,
                 batch: int = 128, timeout: float = 3.0) -> None:
        self.bus = bus
        self.queues = {k: _Queue(n, b) for k, (n, b) in (limits or DEFAULT_LIMITS).items()}
        self.batch = batch
        self.timeout = timeout
        self.sent = 0
        self.failures = 0
        self.last_ok = time.monotonic()
        self._wake = asyncio.Event()
        self._backoff = 0.0

    def put(self, kind: str, subject: str, message: Any, msg_id: str, *, now: bool = False) -> None:
        self.queues[kind].push(subject, codec.encode(message), msg_id)
        if now:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return sum(len(q.items) for q in self.queues.values())

    @property
    def dropped(self) -> int:
        return sum(q.dropped for q in self.queues.values())

    async def flush(self) -> bool:
        """Send one batch; True when everything queued went out."""
        picked: list[tuple[_Queue, tuple[str, bytes, str]]] = []
        for q in self.queues.values():
            for item in list(q.items)[:self.batch - len(picked)]:
                picked.append((q, item))
            if len(picked) >= self.batch:
                break
        if not picked:
            return True
        results = await asyncio.gather(
            *(self.bus.publish(subj, body, msg_id=mid, timeout=self.timeout)
              for _, (subj, body, mid) in picked), return_exceptions=True)
        ok = 0
        for (q, item), res in zip(picked, results, strict=True):
            if isinstance(res, BaseException):
                continue
            with contextlib.suppress(ValueError):
                q.items.remove(item)
                q.size -= len(item[1])
                ok += 1
        self.sent += ok
        if ok < len(picked):
            self.failures += 1
            err = next(r for r in results if isinstance(r, BaseException))
            log.info("telemetry: %d of %d publishes failed (%s); %d queued", len(picked) - ok,
                     len(picked), type(err).__name__, self.backlog)
            return False
        self.last_ok = time.monotonic()
        return self.backlog == 0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.2, self._backoff or 1.0))
            self._wake.clear()
            try:
                done = await self.flush()
            except Exception as exc:  # never let telemetry take the agent down
                log.warning("telemetry flush failed: %s", exc)
                done = False
            if done:
                self._backoff = 0.0
            elif self.backlog:
                # Failing (the bus is away): back off up to 5 s; a new heartbeat
                # still wakes a try at once, so the first one after an outage goes out.
                self._backoff = min(5.0, max(0.5, self._backoff * 2))

    async def drain(self, timeout: float) -> None:
        """At shutdown: try to send what is queued, for at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.backlog and loop.time() < end:
            try:
                if not await asyncio.wait_for(self.flush(), max(0.1, end - loop.time())):
                    await asyncio.sleep(0.2)
            except (TimeoutError, Exception):
                break
