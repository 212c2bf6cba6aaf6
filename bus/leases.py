"""KV `leases`: one key per device or slot, one holder at a time.

acquire = atomic create; renew = compare-and-set on the last revision;
release = revision-checked delete; a dead holder's key expires through the
bucket TTL (each renewal is a new message with a fresh age). Nothing else
ever writes this bucket, so "no two holders" rests on the server's CAS alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError

from bus import codec, topology
from bus.connection import Bus
from schemas.common import now
from schemas.fleet import LeaseRecord


class LeaseLost(RuntimeError):
    """The lease expired or was taken: its holder must stop using the device now."""


@dataclass
class Lease:
    device: str
    holder: str
    job_id: str | None
    revision: int
    acquired_at: float


class LeaseTable:
    def __init__(self, bus: Bus, node: str | None = None) -> None:
        self.bus = bus
        self.node = node

    async def _kv(self):  # type: ignore[no-untyped-def]
        return await self.bus.kv(topology.KV_LEASES)

    def _record(self, device: str, holder: str, job_id: str | None, acquired_at: float) -> bytes:
        return codec.encode(LeaseRecord(device=device, holder=holder, job_id=job_id,
                                        node=self.node, acquired_at=acquired_at, renewed_at=now()))

    async def acquire(self, device: str, holder: str, job_id: str | None = None) -> Lease | None:
        """Take `device` if nobody holds it; None if somebody does."""
        kv = await self._kv()
        at = now()
        try:
            rev = await kv.create(device, self._record(device, holder, job_id, at))
        except KeyWrongLastSequenceError:
            return None
        return Lease(device, holder, job_id, int(rev), at)

    async def acquire_all(self, devices: list[str], holder: str,
                          job_id: str | None = None) -> list[Lease] | None:
        """All of `devices` or none: taken in sorted order, given back on a miss."""
        held: list[Lease] = []
        for device in sorted(devices):
            lease = await self.acquire(device, holder, job_id)
            if lease is None:
                for h in held:
                    await self.release(h)
                return None
            held.append(lease)
        return held

    async def renew(self, lease: Lease) -> Lease:
        kv = await self._kv()
        try:
            rev = await kv.update(lease.device,
                                  self._record(lease.device, lease.holder, lease.job_id,
                                               lease.acquired_at),
                                  last=lease.revision)
        except KeyWrongLastSequenceError:
            raise LeaseLost(f"lease on {lease.device} was lost (expired or taken)") from None
        lease.revision = int(rev)
        return lease

    async def release(self, lease: Lease) -> bool:
        """Delete only if we still hold it (the revision matches)."""
        kv = await self._kv()
        try:
            await kv.delete(lease.device, last=lease.revision)
            return True
        except KeyWrongLastSequenceError:
            return False
        except Exception:
            return False

    async def holders(self) -> dict[str, LeaseRecord]:
        kv = await self._kv()
        out: dict[str, LeaseRecord] = {}
        try:
            keys = await kv.keys()
        except NoKeysError:
            return out
        for key in keys:
            with contextlib.suppress(KeyNotFoundError, codec.DecodeError):
                entry = await kv.get(key)
                if entry.value:
                    out[key] = codec.decode(entry.value, LeaseRecord)
        return out
