"""Workers, leases and node inventory: snapshots of their KV buckets.

A snapshot is a fresh watcher read up to its end marker and then stopped,
taken every `interval_s`. Polling this way costs one short-lived consumer per
bucket and look, and cannot go quiet the way a long-lived KV watcher can after
a server restart (nats.py #510). Values that do not decode are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

import msgspec

from bus import kvread, topology
from bus.connection import Bus
from schemas.fleet import CapabilityAdvert, LeaseRecord
from schemas.telemetry import NodeInventory

from .ingest import Ingest

log = logging.getLogger(__name__)
T = TypeVar("T")


async def snapshot(bus: Bus, bucket: str, type_: type[T], timeout: float = 5.0) -> list[T]:
    decoder = msgspec.json.Decoder(type_)
    out: list[T] = []
    for value in (await kvread.latest(await bus.kv(bucket), deadline_s=timeout)).values():
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            out.append(decoder.decode(value))
    return out


class KvPoller:
    def __init__(self, bus: Bus, ingest: Ingest, interval_s: float = 2.0) -> None:
        self.bus = bus
        self.ingest = ingest
        self.interval_s = interval_s
        self.polls = 0

    async def poll(self) -> None:
        workers = await snapshot(self.bus, topology.KV_CAPABILITIES, CapabilityAdvert)
        leases = await snapshot(self.bus, topology.KV_LEASES, LeaseRecord)
        nodes = await snapshot(self.bus, topology.KV_NODES, NodeInventory)
        self.ingest.add_snapshot(workers=workers, leases=leases, inventories=nodes)
        self.polls += 1

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("KV snapshot failed (%s); trying again", exc)
            await asyncio.sleep(self.interval_s)

    def kick(self) -> Any:
        return asyncio.ensure_future(self.poll())
