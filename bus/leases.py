"""KV `leases`: one key per device or slot, one holder at a time.

acquire = atomic create; renew = compare-and-set on the last revision;
release = revision-checked delete; a dead holder's key expires through the
bucket TTL (each renewal is a new message with a fresh age). Nothing else
ever writes this bucket, so "no two holders" rests on the server's CAS alone.

The holder's side of the bargain: the server forgets a lease `ttl` after the
last renewal it *received*, so a holder that cannot renew (server away,
partition, a stalled loop) must stop using the device before `ttl` has passed
since the last renewal it *sent* and saw confirmed (`Lease.confirmed`). The
worker runtime checks `Lease.safe_until` for exactly that.

A request that timed out may still have been applied: acquire and renew then
read the key back and adopt it when the record is their own (same holder,
job and acquisition time), instead of leaking a key for a TTL or reporting a
lease lost that is in fact held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from bus import codec, kvread, topology
from bus.connection import Bus
from schemas.common import now
from schemas.fleet import LeaseRecord

log = logging.getLogger(__name__)

# Server error codes for a failed expected-last-subject-sequence check.
_WRONG_LAST = (10071, 10164)
# Errors after which the request may or may not have been applied.
_UNSURE = (asyncio.TimeoutError, TimeoutError, nats.errors.TimeoutError,
           nats.errors.ConnectionClosedError, nats.errors.NoRespondersError)


class LeaseLost(RuntimeError):
    """The lease expired or was taken: its holder must stop using the device now."""


@dataclass
class Lease:
    device: str
    holder: str
    job_id: str | None
    revision: int
    acquired_at: float
    ttl_s: float = 10.0
    # time.monotonic() when the last write the server confirmed was *sent*:
    # the server cannot expire the key before confirmed + ttl_s.
    confirmed: float = field(default_factory=time.monotonic)

    @property
    def safe_until(self) -> float:
        """Monotonic deadline after which the key may have expired on the server."""
        return self.confirmed + self.ttl_s


def lease_subject(bucket_prefix: str = "") -> str:
    """The subject the KV bucket's own stream writes a key on (`$KV.<bucket>.<key>`)."""
    return topology.kv_subject(topology.KV_LEASES, bucket_prefix)


class LeaseTable:
    def __init__(self, bus: Bus, node: str | None = None) -> None:
        self.bus = bus
        self.node = node

    @property
    def ttl_s(self) -> float:
        return float(self.bus.settings.lease_ttl_s)

    async def _kv(self) -> KeyValue:
        return await self.bus.kv(topology.KV_LEASES)

    def _record(self, device: str, holder: str, job_id: str | None, acquired_at: float) -> bytes:
        return codec.encode(LeaseRecord(device=device, holder=holder, job_id=job_id,
                                        node=self.node, acquired_at=acquired_at, renewed_at=now()))

    async def _own_revision(self, device: str, holder: str, job_id: str | None,
                            acquired_at: float) -> int | None:
        """The key's revision when its current value is our own record, else None."""
        kv = await self._kv()
        try:
            entry = await kv.get(device)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        try:
            rec = codec.decode(entry.value, LeaseRecord)
        except codec.DecodeError:
            return None
        if rec.holder == holder and rec.job_id == job_id and rec.acquired_at == acquired_at:
            return int(entry.revision or 0)
        return None

    async def acquire(self, device: str, holder: str, job_id: str | None = None) -> Lease | None:
        """Take `device` if nobody holds it; None if somebody does."""
        kv = await self._kv()
        at = now()
        sent = time.monotonic()
        try:
            rev = await kv.create(device, self._record(device, holder, job_id, at))
        except KeyWrongLastSequenceError:
            return None
        except _UNSURE:
            # Maybe applied: adopt the key if it holds our record.
            with contextlib.suppress(Exception):
                own = await self._own_revision(device, holder, job_id, at)
                if own is not None:
                    return Lease(device, holder, job_id, own, at, self.ttl_s, sent)
            raise
        return Lease(device, holder, job_id, int(rev), at, self.ttl_s, sent)

    async def acquire_all(self, devices: list[str], holder: str,
                          job_id: str | None = None) -> list[Lease] | None:
        """All of `devices` or none: taken in sorted order, given back on a miss."""
        held: list[Lease] = []
        try:
            for device in sorted(devices):
                lease = await self.acquire(device, holder, job_id)
                if lease is None:
                    break
                held.append(lease)
            else:
                return held
        except BaseException:
            for h in held:
                await self.release(h)
            raise
        for h in held:
            await self.release(h)
        return None

    async def renew(self, lease: Lease) -> Lease:
        kv = await self._kv()
        sent = time.monotonic()
        value = self._record(lease.device, lease.holder, lease.job_id, lease.acquired_at)
        try:
            rev = await kv.update(lease.device, value, last=lease.revision)
        except KeyWrongLastSequenceError:
            # An earlier renewal that timed out may have been applied after all.
            own = await self._own_revision(lease.device, lease.holder, lease.job_id,
                                           lease.acquired_at)
            if own is None or own == lease.revision:
                raise LeaseLost(f"lease on {lease.device} was lost (expired or taken)") from None
            lease.revision = own
            try:
                rev = await kv.update(lease.device, value, last=lease.revision)
            except KeyWrongLastSequenceError:
                raise LeaseLost(f"lease on {lease.device} was lost (expired or taken)") from None
        lease.revision = int(rev)
        lease.confirmed = sent
        return lease

    async def release(self, lease: Lease, attempts: int = 3) -> bool:
        """Delete only if we still hold it (the revision matches).

        False when the key is no longer ours (expired, taken) or the server
        could not be reached; in the latter case the bucket TTL frees it.
        """
        kv = await self._kv()
        for i in range(attempts):
            try:
                await kv.delete(lease.device, last=lease.revision)
                return True
            except KeyWrongLastSequenceError:
                return False
            except APIError as exc:
                if exc.err_code in _WRONG_LAST:
                    return False
                log.warning("releasing %s failed: %s", lease.device, exc)
            except nats.errors.ConnectionClosedError:
                return False  # this holder is going away: the TTL frees the key
            except _UNSURE as exc:
                # The delete may have landed: then the key is gone or someone
                # else's, and a retry fails the revision check harmlessly.
                log.warning("releasing %s: %s (try %d)", lease.device, type(exc).__name__, i + 1)
            except Exception as exc:
                log.warning("releasing %s failed: %s", lease.device, exc)
                return False
            await asyncio.sleep(0.1 * (i + 1))
        return False

    async def holders(self) -> dict[str, LeaseRecord]:
        kv = await self._kv()
        out: dict[str, LeaseRecord] = {}
        keys = await kvread.keys(kv)
        for key in keys:
            with contextlib.suppress(KeyNotFoundError, codec.DecodeError):
                entry = await kv.get(key)
                if entry.value:
                    out[key] = codec.decode(entry.value, LeaseRecord)
        return out


class LeaseWatch:
    """A live, best-effort view of the lease keys under one prefix (a node).

    A core-NATS subscription on the bucket's own subjects sees every create,
    renewal and release as it happens, so a worker waiting for a device wakes
    on the release instead of hammering the server, and does not bother trying
    a key it just saw taken. Expiry through the TTL publishes nothing, so
    waiters also retry on a timer; the server's CAS stays the only authority.
    """

    def __init__(self, bus: Bus, prefix: str) -> None:
        self.bus = bus
        self.prefix = prefix
        self.changed = asyncio.Event()
        # key -> (held?, monotonic time seen)
        self._seen: dict[str, tuple[bool, float]] = {}
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(lease_subject(f"{self.prefix}.>"), cb=self._on)

    async def _on(self, msg: Any) -> None:
        key = msg.subject.removeprefix(lease_subject())
        op = (msg.headers or {}).get("KV-Operation", "")
        held = op not in ("DEL", "PURGE")
        self._seen[key] = (held, time.monotonic())
        if not held:
            self.changed.set()

    def maybe_free(self, keys: list[str], ttl_s: float) -> bool:
        """False only when some key was seen taken recently (within the TTL)."""
        t = time.monotonic()
        for k in keys:
            held, at = self._seen.get(k, (False, 0.0))
            if held and t - at < ttl_s:
                return False
        return True

    def note_held(self, keys: list[str]) -> None:
        t = time.monotonic()
        for k in keys:
            self._seen[k] = (True, t)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def reclaim_node(bus: Bus, node: str) -> list[str]:
    """Free every lease a lost node holds: its keys (`<node>.…`) whose record names
    it, each deleted only at the revision read, so a lease taken again meanwhile
    is left alone. Its holder, if still alive, finds out at its next renewal
    (LeaseLost) and stops using the device. Returns the keys freed."""
    kv = await bus.kv(topology.KV_LEASES)
    watcher = await kv.watch(f"{node}.>", ignore_deletes=True)
    held: list[tuple[str, int]] = []
    try:
        async for entry in watcher:
            if entry is None:
                break  # the end of what is stored now
            if not entry.value:
                continue
            with contextlib.suppress(codec.DecodeError):
                rec = codec.decode(entry.value, LeaseRecord)
                if rec.node not in (None, node):
                    continue
            held.append((entry.key, int(entry.revision or 0)))
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    freed: list[str] = []
    for key, revision in held:
        try:
            await kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            continue
        except APIError as exc:
            if exc.err_code in _WRONG_LAST:
                continue
            raise
        freed.append(key)
    return freed
