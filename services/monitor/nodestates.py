"""KV `node_states`: each node's verdict (alive or lost), changed only by
compare-and-set, so of several monitors exactly one makes each change, and
only that one emits its event. Mirrored in memory, so a monitor learns what
the others decided (a node another monitor declared lost is recovered by
whichever hears it first)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from bus import codec, topology
from bus.connection import Bus
from schemas.telemetry import NodeStatus
from services.monitor.mirror import KvMirror

log = logging.getLogger(__name__)
Change = Callable[[NodeStatus], NodeStatus | None]


class NodeStates:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.records: dict[str, tuple[NodeStatus, int]] = {}
        self.mirror = KvMirror(bus, topology.KV_NODE_STATES, self._put, self._delete)

    async def start(self) -> None:
        await self.mirror.start()

    def _put(self, key: str, data: bytes, revision: int) -> None:
        try:
            status = codec.decode(data, NodeStatus)
        except codec.DecodeError as exc:
            log.warning("KV node_states %s: not a node status (%s)", key, exc.reason)
            return
        have = self.records.get(key)
        if have is None or have[1] <= revision:
            self.records[key] = (status, revision)

    def _delete(self, key: str) -> None:
        self.records.pop(key, None)

    def get(self, node: str) -> NodeStatus | None:
        got = self.records.get(node)
        return got[0] if got else None

    async def read(self, node: str) -> tuple[NodeStatus, int] | None:
        kv = await self.bus.kv(topology.KV_NODE_STATES)
        try:
            entry = await kv.get(node)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        got = codec.decode(entry.value, NodeStatus), int(entry.revision or 0)
        self._put(node, entry.value, got[1])
        return got

    async def create(self, status: NodeStatus) -> int | None:
        """The node's first record; None when another monitor made it first."""
        kv = await self.bus.kv(topology.KV_NODE_STATES)
        data = codec.encode(status)
        try:
            rev = int(await kv.create(status.node, data))
        except KeyWrongLastSequenceError:
            await self.read(status.node)
            return None
        self._put(status.node, data, rev)
        return rev

    async def change(self, node: str, mutate: Change, retries: int = 20
                     ) -> tuple[NodeStatus, int] | None:
        """Apply `mutate` under compare-and-set; None when it declines on the latest
        record (another monitor decided first) or there is no record."""
        kv = await self.bus.kv(topology.KV_NODE_STATES)
        current = self.records.get(node)
        for _ in range(retries):
            if current is None:
                current = await self.read(node)
                if current is None:
                    return None
            status, rev = current
            new = mutate(msgspec.structs.replace(status))
            if new is None:
                return None
            data = codec.encode(new)
            try:
                new_rev = int(await kv.update(node, data, last=rev))
            except KeyWrongLastSequenceError:
                current = None  # someone else changed it: decide on the latest
                await asyncio.sleep(0.005)
                continue
            self._put(node, data, new_rev)
            return new, new_rev
        raise RuntimeError(f"node {node}: too many concurrent changes")
