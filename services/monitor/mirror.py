"""A live in-memory copy of a KV bucket: the latest value of every key, then
every change, through an ordered push consumer on the bucket's stream.

The consumer is what nats-py's ordered consumer makes (no acks, flow control,
idle heartbeats, in memory, one replica, removed once nobody listens), but its
messages come raw from the connection's reader (bus.wire): at three record
writes per job, nats-py's Msg, parsed headers, queue and callback cost the
monitor more than the mirror's own work. Order is checked here as nats-py
would: each delivery's consumer sequence must follow the last, and an idle
heartbeat must not name a later one. On a gap the bucket is watched afresh
from its latest values (applying a value twice is harmless).

KV watchers can stop silently after a server restart (nats.py #510), so the
owner calls `check()` on its loop: after a reconnect, or when the consumer
missed three idle heartbeats, the subscription is made afresh and the whole
bucket replayed. `ready` is set once the first replay is
complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import topology
from bus.connection import Bus
from bus.wire import Wire, command, parse_header_block, status_of

log = logging.getLogger(__name__)

OnPut = Callable[[str, bytes, int], None]
OnDelete = Callable[[str], None]


class KvMirror:
    HEARTBEAT_S = 5.0

    def __init__(self, bus: Bus, bucket: str, on_put: OnPut, on_delete: OnDelete) -> None:
        self.bus = bus
        self.bucket = bucket
        self.on_put = on_put
        self.on_delete = on_delete
        self.ready = asyncio.Event()
        self.watches = 0  # how many times the bucket was watched afresh
        self.gaps = 0  # out-of-order deliveries that made it so
        self.flow_controls = 0  # flow control requests answered
        self.silences = 0  # watched afresh after missed heartbeats
        self._stream = f"KV_{bucket}"
        self._prefix = topology.kv_subject(bucket)
        self._cut = len(self._prefix)
        self._sub: Any = None
        self._reconnects = -1
        self._cseq = 0  # the last consumer sequence applied
        self._again: asyncio.Task[None] | None = None
        self._generation = 0  # which watch a delivery belongs to
        self._bg: set[asyncio.Future[None]] = set()
        self._heard = 0.0  # when the consumer last said anything (a value or a heartbeat)
        self.consumer = ""

    async def start(self) -> None:
        reconnects = int(self.bus.nc.stats.get("reconnects", 0))
        self._cseq = 0
        self._generation += 1
        wire = Wire.of(self.bus.nc)
        inbox = self.bus.nc.new_inbox()
        self._sub = await wire.subscribe(inbox, functools.partial(self._on, self._generation))
        # Counted before the consumer exists: it delivers as soon as it does,
        # possibly before its creation is answered.
        self.watches += 1
        self._heard = time.monotonic()
        info = await self.bus.js.add_consumer(self._stream, ConsumerConfig(
            deliver_subject=inbox, filter_subject=f"{self._prefix}>",
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
            flow_control=True, idle_heartbeat=self.HEARTBEAT_S, mem_storage=True,
            num_replicas=1, inactive_threshold=max(30.0, 6 * self.HEARTBEAT_S),
            max_deliver=1))
        self.consumer = info.name
        if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
            self.ready.set()  # an empty bucket sends nothing to say it is done
        self._reconnects = reconnects  # made afresh for this connection

    async def check(self) -> None:
        """Re-subscribe after a reconnect (the watcher may have died silently),
        or when the consumer missed three idle heartbeats (gone with its server
        in a cluster fail-over while this connection stayed up)."""
        reconnects = int(self.bus.nc.stats.get("reconnects", 0))
        if not self.bus.nc.is_connected:
            return
        if reconnects != self._reconnects:
            log.info("re-watching KV %s after a reconnect", self.bucket)
            await self._watch_again()
        elif self._sub is not None and time.monotonic() - self._heard > 3 * self.HEARTBEAT_S:
            log.warning("KV %s mirror heard nothing for %.0f s: watching afresh", self.bucket,
                        time.monotonic() - self._heard)
            self.silences += 1
            await self._watch_again()

    async def _watch_again(self) -> None:
        await self.stop()
        try:
            await self.start()
        except (nats.errors.Error, TimeoutError) as exc:
            # JetStream not ready yet on a server just back: the next check
            # tries again (the reconnect count is still unmatched).
            log.warning("re-watching KV %s: %s; trying again", self.bucket, exc)
            await self.stop()
            self._reconnects = -1

    def _on(self, generation: int, subject: bytes, reply: bytes, data: bytes,
            headers: bytes | None) -> None:
        if generation != self._generation or self._sub is None:
            return  # an earlier watch's delivery, still on its way
        self._heard = time.monotonic()
        if not reply.startswith(b"$JS.ACK."):
            self._control(reply, data, headers)
            return
        tokens = reply.split(b".")
        if len(tokens) == 9:
            seq, cseq, pending = int(tokens[5]), int(tokens[6]), int(tokens[8])
        elif len(tokens) >= 11:
            seq, cseq, pending = int(tokens[7]), int(tokens[8]), int(tokens[10])
        else:
            return
        if cseq != self._cseq + 1:
            self._gap(f"consumer sequence {cseq} after {self._cseq}")
            return
        self._cseq = cseq
        key = subject[self._cut:].decode()
        try:
            if not data or (headers is not None and (b"KV-Operation: DEL" in headers
                                                     or b"KV-Operation: PURGE" in headers)):
                self.on_delete(key)
            else:
                self.on_put(key, data, seq)
        except Exception:  # one bad value must not stop the mirror
            log.exception("KV %s: applying %s failed", self.bucket, key)
        if pending == 0:
            self.ready.set()

    def _control(self, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """Idle heartbeats and flow control requests (status 100, no body)."""
        if status_of(headers) != "100" or data:
            return
        if reply:  # flow control: everything before it is applied, so answer now
            self.flow_controls += 1
            wire = Wire.of(self.bus.nc)
            if not wire.send(command(reply.decode(), b"")):
                self._background(wire.publish(reply.decode(), b""))
            return
        last = parse_header_block(headers or b"").get("Nats-Last-Consumer")
        if last is not None and last.isdigit() and int(last) > self._cseq:
            self._gap(f"heartbeat names consumer sequence {last} after {self._cseq}")

    def _gap(self, why: str) -> None:
        if self._again is not None and not self._again.done():
            return
        self.gaps += 1
        log.warning("KV %s mirror out of order (%s): watching afresh", self.bucket, why)
        self._sub_dead()
        self._again = asyncio.ensure_future(self._watch_again())

    def _sub_dead(self) -> None:
        self._generation += 1
        sub, self._sub = self._sub, None
        if sub is not None:
            Wire.of(self.bus.nc).unroute(sub._id)
            self._background(sub.unsubscribe())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(_quietly(coro))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def stop(self) -> None:
        self._generation += 1
        if self._sub is not None:
            Wire.of(self.bus.nc).unroute(self._sub._id)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro
