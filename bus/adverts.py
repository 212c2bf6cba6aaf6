"""KV `capabilities`: one advert per live worker, renewed on a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.js.errors import KeyNotFoundError

from bus import codec, kvread, topology
from bus.connection import Bus
from schemas.fleet import CapabilityAdvert, serves


async def list_adverts(bus: Bus) -> list[CapabilityAdvert]:
    """Every live worker's advert (expired ones are gone from the bucket)."""
    kv = await bus.kv(topology.KV_CAPABILITIES)
    keys = await kvread.keys(kv)
    out: list[CapabilityAdvert] = []
    for key in keys:
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                try:
                    out.append(codec.decode(entry.value, CapabilityAdvert))
                except codec.DecodeError:
                    continue  # a foreign value in our bucket is not a worker
    return out


async def put_advert(bus: Bus, advert: CapabilityAdvert) -> None:
    kv = await bus.kv(topology.KV_CAPABILITIES)
    await kv.put(advert.worker_id, codec.encode(advert))


async def remove_advert(bus: Bus, worker_id: str) -> None:
    kv = await bus.kv(topology.KV_CAPABILITIES)
    with contextlib.suppress(Exception):
        await kv.delete(worker_id)


class AdvertBook:
    """A cached view of live adverts, refreshed at most every `max_age_s`.

    Polling instead of a KV watcher: watchers can stop silently after a
    server restart (nats.py #510), and a stale book only delays routing hints.
    """

    def __init__(self, bus: Bus, max_age_s: float = 0.5) -> None:
        self.bus = bus
        self.max_age_s = max_age_s
        self._adverts: list[CapabilityAdvert] = []
        self._at = 0.0
        # One refresh at a time: many concurrent callers share its answer.
        self._lock = asyncio.Lock()

    async def adverts(self) -> list[CapabilityAdvert]:
        if time.monotonic() - self._at > self.max_age_s:
            async with self._lock:
                if time.monotonic() - self._at > self.max_age_s:
                    self._adverts = await list_adverts(self.bus)
                    self._at = time.monotonic()
        return self._adverts

    async def matching(self, wanted: dict[str, str]) -> list[CapabilityAdvert]:
        return [a for a in await self.adverts() if serves(a.capabilities, wanted)]
