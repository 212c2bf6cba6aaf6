"""A live in-memory copy of a KV bucket: the latest value of every key, then
every change, through an ordered consumer on the bucket's stream.

KV watchers can stop silently after a server restart (nats.py #510), so the
owner calls `check()` on its loop: after a reconnect the subscription is made
afresh and the whole bucket replayed (applying a value twice is harmless).
`ready` is set once the first replay is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.api import DeliverPolicy

from bus import topology
from bus.connection import Bus

log = logging.getLogger(__name__)

OnPut = Callable[[str, bytes, int], None]
OnDelete = Callable[[str], None]


class KvMirror:
    def __init__(self, bus: Bus, bucket: str, on_put: OnPut, on_delete: OnDelete) -> None:
        self.bus = bus
        self.bucket = bucket
        self.on_put = on_put
        self.on_delete = on_delete
        self.ready = asyncio.Event()
        self._prefix = topology.kv_subject(bucket)
        self._sub: Any = None
        self._reconnects = -1

    async def start(self) -> None:
        reconnects = int(self.bus.nc.stats.get("reconnects", 0))
        self._sub = await self.bus.js.subscribe(
            f"{self._prefix}>", ordered_consumer=True, cb=self._on,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, pending_msgs_limit=1 << 20,
            pending_bytes_limit=1 << 30)
        info = await self._sub.consumer_info()
        if info.num_pending == 0 and not info.delivered.consumer_seq:
            self.ready.set()  # an empty bucket sends nothing to say it is done
        self._reconnects = reconnects  # made afresh for this connection

    async def check(self) -> None:
        """Re-subscribe after a reconnect (the watcher may have died silently)."""
        reconnects = int(self.bus.nc.stats.get("reconnects", 0))
        if reconnects != self._reconnects and self.bus.nc.is_connected:
            log.info("re-watching KV %s after a reconnect", self.bucket)
            await self.stop()
            try:
                await self.start()
            except (nats.errors.Error, TimeoutError) as exc:
                # JetStream not ready yet on a server just back: the next check
                # tries again (the reconnect count is still unmatched).
                log.warning("re-watching KV %s: %s; trying again", self.bucket, exc)
                await self.stop()

    async def _on(self, msg: Any) -> None:
        key = msg.subject[len(self._prefix):]
        op = (msg.headers or {}).get("KV-Operation")
        seq, pending = _position(msg)
        try:
            if op in ("DEL", "PURGE") or not msg.data:
                self.on_delete(key)
            else:
                self.on_put(key, msg.data, seq)
        except Exception:  # one bad value must not stop the mirror
            log.exception("KV %s: applying %s failed", self.bucket, key)
        if pending == 0:
            self.ready.set()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None



def _position(msg: Any) -> tuple[int, int]:
    """(stream sequence, messages pending) of a delivery."""
    got = topology.ack_position(msg.reply)
    if got is not None:
        return got[0], got[2]
    meta = msg.metadata
    return int(meta.sequence.stream), int(meta.num_pending)
