"""Versioned shared resources (KV `resources`): prompts, configs, weights.

    res = ResourceStore(bus)
    v = await res.put("prompt", {"system": "be brief"})     # version 1, 2, 3 ...
    r = await res.get("prompt")                             # the latest, or version=2
    async for r in res.watch("prompt"): ...                 # each new version
    res.reads                                               # {"prompt": [3]}: versions read

Each put is a compare-and-set on the key's last revision, so two writers never
make the same version. A value larger than `inline_limit` (and any file or
stream) goes to the object store, and the record carries its ObjRef. The
bucket keeps the last versions of each name (its `history`); a put that pushes
the oldest out deletes that version's object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus import kvread, topology
from bus.connection import Bus
from bus.objectio import ObjectError, Source
from bus.objects import ObjectStore
from schemas.common import ObjRef, new_id
from schemas.resources import RESOURCE_NAME_PATTERN, ResourceKind, ResourceVersion

__all__ = ["InvalidResource", "Resource", "ResourceConflict", "ResourceError",
           "ResourceNotFound", "ResourceStore", "ResourceVersion", "ResourceVersionGone"]

log = logging.getLogger(__name__)
_NAME_RE = re.compile(RESOURCE_NAME_PATTERN)
_UNSET: Any = object()


class ResourceError(Exception):
    code = "resource_error"
    retryable = False


class InvalidResource(ResourceError, ValueError):
    code = "invalid_resource"


class ResourceNotFound(ResourceError, LookupError):
    code = "resource_not_found"


class ResourceVersionGone(ResourceNotFound):
    """The version existed but the bucket no longer keeps it."""

    code = "resource_version_gone"


class ResourceConflict(ResourceError):
    code = "resource_conflict"
    retryable = True


class ResourceUnavailable(ResourceError):
    code = "resource_unavailable"
    retryable = True


@dataclass(frozen=True)
class Resource:
    """A version of a resource with its value loaded: JSON for kind `json`,
    bytes (a bytearray when it came from the object store) for kind `bytes`."""

    name: str
    version: int
    value: Any
    record: ResourceVersion

    @property
    def kind(self) -> ResourceKind:
        return self.record.kind


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 256 or not _NAME_RE.match(name):
        raise InvalidResource(f"resource name {name!r}: letters, digits and - _ = / . "
                              "(no leading, trailing or doubled dot), at most 256")
    return name


class ResourceStore:
    """Versioned resources on a Bus. `reads` maps each name read through this
    instance to the versions read, in order: make one per job attempt and
    record it with the attempt."""

    def __init__(self, bus: Bus, objects: ObjectStore | None = None, *,
                 inline_limit: int = 64 << 10, bucket: str = topology.KV_RESOURCES,
                 poll_s: float = 5.0, max_tries: int = 20) -> None:
        self.bus = bus
        self.objects = objects or ObjectStore(bus)
        self.inline_limit = inline_limit
        self.bucket = bucket
        self.poll_s = poll_s
        self.max_tries = max_tries
        self.reads: dict[str, list[int]] = {}
        self._keep: int | None = None  # versions the bucket keeps per name

    async def _kv(self) -> KeyValue:
        try:
            return await self.bus.kv(self.bucket)
        except nats.errors.Error as exc:
            raise ResourceUnavailable(f"KV bucket {self.bucket!r}: {exc!r}") from exc

    def _note(self, name: str, version: int) -> None:
        seen = self.reads.setdefault(name, [])
        if version not in seen:
            seen.append(version)

    # ---- put -----------------------------------------------------------------------------

    async def put(self, name: str, value: Any = _UNSET, *, data: Source | None = None,
                  description: str | None = None,
                  created_by: str | None = None) -> ResourceVersion:
        """A new version of `name`: a JSON `value`, or bytes `data` (bytes, a
        pathlib.Path, a file or a stream). Returns the record written."""
        check_name(name)
        if (value is _UNSET) == (data is None):
            raise InvalidResource(f"resource {name}: give a JSON value or data, not both")
        kind: ResourceKind = "json" if data is None else "bytes"
        inline_value: Any = None
        inline_data: bytes | None = None
        ref: ObjRef | None = None
        if kind == "json":
            try:
                text = msgspec.json.encode(value)
            except (TypeError, msgspec.EncodeError) as exc:
                raise InvalidResource(f"resource {name}: the value is not JSON ({exc})") from None
            size = len(text)
            if size <= self.inline_limit:
                inline_value = value
            else:
                ref = await self.objects.put(text, name=_object_name(name))
        elif isinstance(data, bytes | bytearray | memoryview) and len(data) <= self.inline_limit:
            inline_data = bytes(data)
            size = len(inline_data)
        else:
            assert data is not None
            ref = await self.objects.put(data, name=_object_name(name))
            size = ref.size
        try:
            return await self._append(name, kind, inline_value, inline_data, ref, size,
                                      description, created_by)
        except BaseException:
            if ref is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.objects.delete(ref))
            raise

    async def _append(self, name: str, kind: ResourceKind, value: Any, data: bytes | None,
                      ref: ObjRef | None, size: int, description: str | None,
                      created_by: str | None) -> ResourceVersion:
        kv = await self._kv()
        for _ in range(self.max_tries):
            latest = await self._latest_entry(kv, name)
            version = 1 if latest is None else latest[0].version + 1
            record = ResourceVersion(name=name, version=version, kind=kind, value=value,
                                     data=data, ref=ref, size=size, created_at=time.time(),
                                     created_by=created_by, description=description)
            dropped = await self._falling_out(kv, name) if latest is not None else None
            body = msgspec.json.encode(record)
            try:
                if latest is None:
                    await kv.create(name, body)
                else:
                    await kv.update(name, body, last=latest[1])
            except KeyWrongLastSequenceError:
                continue  # another writer made this version first: take the next
            except nats.errors.Error as exc:
                raise ResourceUnavailable(f"resource {name}: writing version {version} "
                                          f"failed: {exc!r}") from exc
            if dropped is not None and dropped.ref is not None:
                with contextlib.suppress(Exception):
                    await self.objects.delete(dropped.ref)
            return record
        raise ResourceConflict(f"resource {name}: {self.max_tries} writers raced for the next "
                               "version; try again")

    async def _falling_out(self, kv: KeyValue, name: str) -> ResourceVersion | None:
        """The version this put pushes out of the bucket's history, if any."""
        history = await self._history(kv, name)
        if self._keep is None:
            self._keep = (await kv.status()).history or 1
        return history[0] if len(history) >= self._keep else None

    # ---- read ------------------------------------------------------------------------------

    async def _latest_entry(self, kv: KeyValue, name: str) -> tuple[ResourceVersion, int] | None:
        try:
            entry = await kv.get(name)
        except KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise ResourceUnavailable(f"resource {name}: {exc!r}") from exc
        if entry.value is None:
            return None
        return _decode(name, entry.value), entry.revision or 0

    async def _history(self, kv: KeyValue, name: str) -> list[ResourceVersion]:
        try:
            entries = await kvread.history(kv, name)
        except nats.errors.Error as exc:
            raise ResourceUnavailable(f"resource {name}: {exc!r}") from exc
        out = []
        for e in entries:
            if e.value:
                with contextlib.suppress(ResourceError):
                    out.append(_decode(name, e.value))
        return sorted(out, key=lambda r: r.version)

    async def info(self, name: str, version: int | None = None) -> ResourceVersion:
        """The record of the latest version of `name`, or of `version`; the
        value is not loaded (a large one stays in the object store)."""
        check_name(name)
        kv = await self._kv()
        latest = await self._latest_entry(kv, name)
        if latest is None:
            raise ResourceNotFound(f"no resource {name!r}")
        record = latest[0]
        if version is not None and version != record.version:
            if version < 1 or version > record.version:
                raise ResourceNotFound(f"resource {name} has no version {version} (the latest "
                                       f"is {record.version})")
            kept = {r.version: r for r in await self._history(kv, name)}
            if version not in kept:
                oldest = min(kept) if kept else record.version
                raise ResourceVersionGone(f"resource {name} version {version} is no longer kept "
                                          f"(the oldest kept is {oldest})")
            record = kept[version]
        self._note(name, record.version)
        return record

    async def get(self, name: str, version: int | None = None) -> Resource:
        """The latest version of `name` (or `version`) with its value loaded."""
        record = await self.info(name, version)
        return Resource(name=name, version=record.version, value=await self._load(record),
                        record=record)

    async def get_to(self, name: str, path: str | os.PathLike[str],
                     version: int | None = None) -> ResourceVersion:
        """Write the value of a version to a file (the bytes of kind `bytes`,
        the JSON text of kind `json`), streamed when it is in the object store."""
        record = await self.info(name, version)
        if record.ref is not None:
            try:
                await self.objects.get_to(record.ref, path)
            except ObjectError as exc:
                raise self._object_error(record, exc) from exc
        else:
            body = record.data if record.kind == "bytes" else msgspec.json.encode(record.value)
            await asyncio.to_thread(Path(path).write_bytes, body or b"")
        return record

    async def _load(self, record: ResourceVersion) -> Any:
        if record.ref is None:
            return record.data if record.kind == "bytes" else record.value
        try:
            raw = await self.objects.get(record.ref)
        except ObjectError as exc:
            raise self._object_error(record, exc) from exc
        if record.kind == "bytes":
            return raw
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ResourceError(f"resource {record.name} version {record.version}: its value "
                                f"is not JSON ({exc})") from None

    @staticmethod
    def _object_error(record: ResourceVersion, exc: ObjectError) -> ResourceError:
        err = ResourceUnavailable if exc.retryable else ResourceError
        return err(f"resource {record.name} version {record.version}: {exc}")

    async def versions(self, name: str) -> list[ResourceVersion]:
        """The versions of `name` the bucket still keeps, oldest first."""
        check_name(name)
        return await self._history(await self._kv(), name)

    # ---- watch -----------------------------------------------------------------------------

    async def watch(self, name: str, *, current: bool = True,
                    after: int | None = None) -> AsyncIterator[Resource]:
        """Each new version of `name`, in order, as it is put: the current one
        first (unless `current` is False or `after` names a version already
        seen). Missed nothing: a core-NATS doorbell on the key's subject wakes
        it, and every `poll_s` it checks the bucket anyway, so a lost message
        or a server restart delays a version, never drops it (unless more
        versions than the bucket keeps land in between)."""
        check_name(name)
        kv = await self._kv()
        doorbell = await self.bus.nc.subscribe(topology.kv_subject(self.bucket, name))
        try:
            last = after
            if last is None and not current:
                latest = await self._latest_entry(kv, name)
                last = latest[0].version if latest else 0
            last = last or 0
            while True:
                for record in await self._newer_or_none(kv, name, last):
                    try:
                        value = await self._load(record)
                    except ResourceUnavailable:
                        break  # the store is away for now: this version again next time
                    last = record.version
                    self._note(name, record.version)
                    yield Resource(name=name, version=record.version, value=value,
                                   record=record)
                with contextlib.suppress(nats.errors.TimeoutError):
                    await doorbell.next_msg(timeout=self.poll_s)
        finally:
            with contextlib.suppress(Exception):
                await doorbell.unsubscribe()

    async def _newer_or_none(self, kv: KeyValue, name: str,
                             last: int) -> list[ResourceVersion]:
        """Versions after `last`; none while the server is away (a watch outlives
        a server restart and catches up after it)."""
        try:
            return await self._newer(kv, name, last)
        except ResourceUnavailable as exc:
            log.info("watching resource %s: %s; retrying", name, exc)
            return []

    async def _newer(self, kv: KeyValue, name: str, last: int) -> list[ResourceVersion]:
        latest = await self._latest_entry(kv, name)
        if latest is None or latest[0].version <= last:
            return []
        if latest[0].version == last + 1:
            return [latest[0]]
        return [r for r in await self._history(kv, name) if r.version > last]

    async def list(self) -> list[ResourceVersion]:
        """The latest version of every resource, by name."""
        kv = await self._kv()
        try:
            keys = await kvread.keys(kv)
        except nats.errors.Error as exc:
            raise ResourceUnavailable(f"listing resources: {exc!r}") from exc
        out = []
        for key in sorted(keys):
            latest = await self._latest_entry(kv, key)
            if latest is not None:
                out.append(latest[0])
        return out


def _object_name(name: str) -> str:
    # Unique per put: a writer that loses the race for a version keeps no
    # object another writer's record points at.
    return f"resources/{name}/{new_id('v')}"


def _decode(name: str, raw: bytes) -> ResourceVersion:
    try:
        return msgspec.json.decode(raw, type=ResourceVersion)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ResourceError(f"resource {name}: unreadable record ({exc})") from None
