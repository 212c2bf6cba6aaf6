"""The object store `objects`: large values passed between components by `ObjRef`.

    store = ObjectStore(bus)
    ref = await store.put(b"...", ttl=3600)       # or a pathlib.Path, a file, a stream
    data = await store.get(ref)                   # ref: ObjRef, its JSON dict, or a name
    await store.get_to(ref, "out.bin")
    async with store.open(ref) as reader:         # streamed, digest checked at the end
        async for chunk in reader: ...

The layout on the server is the standard one (`$O.<bucket>.C.<nuid>` chunks,
`$O.<bucket>.M.<base64url name>` meta, `SHA-256=<base64url>` digests), so
`nats object ls/get/put` and nats-py's ObjectStore interoperate with it. The
transfers themselves are jetfleet's (bus/objectio.py). An object made with a
TTL disappears by itself: the server drops its meta record and chunks by their
per-message TTL, and readers refuse it once its expiry has passed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import hashlib
import logging
import math
import os
import queue
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.js.api import DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.object_store import (
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from bus import topology
from bus.connection import Bus
from bus.datalink import (
    DataLink,
    Digester,
    LinkError,
    LinkStalled,
    LinkUnavailable,
    in_thread,
    pieces_of_file,
)
from bus.objectio import (
    InvalidRef,
    ObjectChanged,
    ObjectCorrupt,
    ObjectError,
    ObjectExpired,
    ObjectNotFound,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    ObjectTruncated,
    Source,
    WrongBucket,
    chunks_of,
    digest_bytes,
    digest_text,
    link_publish,
    link_read,
    publish_chunks,
    read_chunks,
)
from schemas.common import ObjRef, new_id
from schemas.objects import EXPIRES_KEY, ObjectMeta, ObjectMetaOptions, rfc3339

log = logging.getLogger(__name__)

# Objects at least this large move over a data link of their own (bus.datalink):
# opening one costs a round trip or two, which a small object does not repay.
LINK_MIN_BYTES = 4 << 20

__all__ = [
    "InvalidRef", "ObjRef", "ObjectChanged", "ObjectCorrupt", "ObjectError", "ObjectExpired",
    "ObjectMeta", "ObjectNotFound", "ObjectReader", "ObjectStore", "ObjectStoreUnavailable",
    "ObjectTooLarge", "ObjectTruncated", "WrongBucket", "as_ref",
]

# Chunk size: measured with `jetfleet bench objects` (docs/objects.md); within
# the embedded server's max_payload of 8 MiB.
DEFAULT_CHUNK_SIZE = 512 << 10
# Names every client takes (nats-py validates keys with this pattern).
NAME_RE = re.compile(r"^[-/_=.a-zA-Z0-9]{1,1024}$")
# Chunks of an object with a TTL live this much longer than its meta record,
# so a reader never finds the record but not its chunks.
CHUNK_TTL_GRACE_S = 120

T = TypeVar("T")


def as_ref(ref: ObjRef | dict[str, Any] | str, bucket: str = topology.OBJECTS) -> ObjRef:
    """An ObjRef from what a payload carries: an ObjRef, its JSON dict, its JSON
    text, or a bare object name (in `bucket`). Raises InvalidRef."""
    if isinstance(ref, ObjRef):
        out = ref
    elif isinstance(ref, dict):
        try:
            out = msgspec.convert(ref, ObjRef)
        except msgspec.ValidationError as exc:
            raise InvalidRef(_short(ref), f"not an object reference ({exc})") from None
    elif isinstance(ref, str) and ref.lstrip().startswith("{"):
        try:
            out = msgspec.json.decode(ref, type=ObjRef)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidRef(_short(ref), f"not an object reference ({exc})") from None
    elif isinstance(ref, str):
        out = ObjRef(bucket=bucket, name=ref)
    else:
        raise InvalidRef(_short(ref), "an object reference is an ObjRef, its JSON dict "
                                      "or an object name")
    if not NAME_RE.match(out.name):
        raise InvalidRef(_short(out.name), "names are 1-1024 letters, digits and - / _ = .")
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _what(ref: ObjRef) -> str:
    return f"{ref.bucket}/{ref.name}"


class ObjectStore:
    """One object-store bucket on a Bus. Cheap to make; holds no server state."""

    def __init__(self, bus: Bus, bucket: str = topology.OBJECTS, *,
                 max_object_bytes: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 window: int = 16, window_bytes: int = 32 << 20,
                 batch_bytes: int = 16 << 20, stall_s: float = 15.0,
                 settle_s: float = 1.0, ttl_grace_s: int = CHUNK_TTL_GRACE_S,
                 data_links: bool = True, link_min_bytes: int | None = None) -> None:
        self.bus = bus
        self.bucket = bucket
        self.max_object_bytes = (bus.settings.max_object_bytes if max_object_bytes is None
                                 else max_object_bytes)
        # A chunk, its headers and the protocol line fit in one server payload.
        self.chunk_size = max(1024, min(chunk_size, bus.nc.max_payload - 4096))
        self.window = window
        self.window_bytes = max(window_bytes, self.chunk_size)
        self.batch_bytes = max(batch_bytes, self.chunk_size)
        self.stall_s = stall_s
        self.settle_s = settle_s
        self.ttl_grace_s = max(1, ttl_grace_s)
        # Objects of at least link_min_bytes (LINK_MIN_BYTES by default) move
        # over a data link of their own, unless data_links is off.
        self.link_min_bytes = (None if not data_links else
                               LINK_MIN_BYTES if link_min_bytes is None else link_min_bytes)
        # How many transfers went over a data link, and why the last one could not.
        self.links_used = 0
        self.link_unavailable: str | None = None
        self.stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        prefix = getattr(bus.js, "_prefix", "$JS.API")
        # The JetStream direct-get API of the store's stream (allow_direct).
        self._direct = f"{prefix}.DIRECT.GET.{self.stream}"

    # ---- names on the wire --------------------------------------------------------------

    def _meta_subject(self, name: str) -> str:
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        return OBJ_META_PRE_TEMPLATE.format(bucket=self.bucket, obj=encoded)

    def _chunk_subject(self, nuid: str) -> str:
        return OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self.bucket, obj=nuid)

    # ---- put -------------------------------------------------------------------------------

    async def put(self, data: Source, *, name: str | None = None, ttl: float | None = None,
                  description: str | None = None) -> ObjRef:
        """Store `data` (bytes, a pathlib.Path, a binary file, or an (async)
        iterable of bytes) under `name` (a new unique one by default; an
        existing object of that name is replaced). With `ttl` (seconds, rounded
        up to whole seconds) the object disappears after that long."""
        name = name or new_id("obj")
        ref = as_ref(ObjRef(bucket=self.bucket, name=name))
        what = _what(ref)
        ttl_s = _ttl_seconds(ttl, what)
        known = _known_size(data)
        if known is not None and known > self.max_object_bytes:
            raise ObjectTooLarge(what, f"{known} bytes is more than the limit of "
                                       f"{self.max_object_bytes} (JETFLEET_MAX_OBJECT_BYTES)")
        nuid = uuid.uuid4().hex
        subject = self._chunk_subject(nuid)
        headers = {"Nats-TTL": str(ttl_s + self.ttl_grace_s)} if ttl_s else None
        loop = asyncio.get_running_loop()
        try:
            link = await self._link(known) if _link_source(data) else None
            if link is not None:
                pieces = (pieces_of_file(data, self.chunk_size) if isinstance(data, os.PathLike)
                          else _slices(data, self.chunk_size))  # type: ignore[arg-type]
                size, count, digest, first = await in_thread(link, lambda: link_publish(
                    link, self.bus.nc.new_inbox(), subject, pieces, what=what,
                    limit=self.max_object_bytes, headers=headers, window=self.window,
                    window_bytes=self.window_bytes))
            else:
                size, count, digest, first = await publish_chunks(
                    self.bus.nc, subject, chunks_of(data, self.chunk_size), what=what,
                    limit=self.max_object_bytes, headers=headers, window=self.window,
                    window_bytes=self.window_bytes, stall_s=self.stall_s)
            meta = ObjectMeta(name=name, bucket=self.bucket, nuid=nuid, size=size,
                              chunks=count, digest=digest, mtime=rfc3339(time.time()),
                              description=description,
                              options=ObjectMetaOptions(max_chunk_size=self.chunk_size))
            meta_headers = {"Nats-Rollup": "sub"}
            if ttl_s:
                # The record must not outlive its first chunk's TTL.
                elapsed = loop.time() - (first if first is not None else loop.time())
                meta_ttl = min(ttl_s, math.floor(ttl_s + self.ttl_grace_s - elapsed))
                if meta_ttl < 1:
                    raise ObjectStoreUnavailable(what, f"the put took {elapsed:.0f}s, too long "
                                                       f"for a ttl of {ttl_s}s")
                meta.metadata = {EXPIRES_KEY: rfc3339(time.time() + meta_ttl)}
                meta_headers["Nats-TTL"] = str(meta_ttl)
            old = await self._replace_meta(meta, meta_headers, what)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._purge(subject))
            raise
        if old is not None and not old.deleted and old.nuid and old.nuid != nuid:
            with contextlib.suppress(Exception):
                await self._purge(self._chunk_subject(old.nuid))
        return meta.ref()

    async def _replace_meta(self, meta: ObjectMeta, headers: dict[str, str],
                            what: str) -> ObjectMeta | None:
        """Write `meta` over the record it replaces, compare-and-set on the meta
        subject's last sequence, and return the replaced record: each writer
        then purges exactly the chunks it replaced, even when puts of one name
        race (a lost race is retried against the new record)."""
        for _ in range(20):
            old, seq = await self._meta_and_seq(meta.name, what)
            try:
                await self._publish_meta(
                    meta, {**headers, "Nats-Expected-Last-Subject-Sequence": str(seq)}, what,
                    raw=True)
            except BadRequestError as exc:
                if exc.err_code == 10071:  # wrong last sequence: another writer was first
                    continue
                raise self._meta_refused(exc, what) from None
            return old
        raise ObjectStoreUnavailable(what, "too many writers raced to replace it")

    async def _publish_meta(self, meta: ObjectMeta, headers: dict[str, str], what: str, *,
                            raw: bool = False) -> None:
        """Publish a meta record; with `raw`, a refusal by the stream is raised
        as the server's BadRequestError (for a caller that handles some)."""
        try:
            await self.bus.publish(self._meta_subject(meta.name), msgspec.json.encode(meta),
                                   headers=headers, timeout=self.stall_s)
        except BadRequestError as exc:
            if raw:
                raise
            raise self._meta_refused(exc, what) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise ObjectStoreUnavailable(what, f"writing its meta record failed: {exc!r}") from exc

    def _meta_refused(self, exc: BadRequestError, what: str) -> ObjectError:
        if exc.err_code == 10166:
            return ObjectStoreUnavailable(
                what, f"stream {self.stream} does not allow per-message TTLs; start any "
                      "jetfleet component once so it applies the topology")
        return ObjectStoreUnavailable(what, f"the server refused its meta record: "
                                            f"{exc.description}")

    async def _purge(self, subject: str) -> None:
        await asyncio.wait_for(self.bus.js.purge_stream(self.stream, subject=subject),
                               self.stall_s)

    # ---- meta --------------------------------------------------------------------------------

    async def _meta_or_none(self, name: str, what: str) -> ObjectMeta | None:
        return (await self._meta_and_seq(name, what))[0]

    async def _meta_and_seq(self, name: str, what: str) -> tuple[ObjectMeta | None, int]:
        """The meta record of `name` (None if there is none) and its stream
        sequence (0 if none): what a replacing write compares against."""
        try:
            msg = await asyncio.wait_for(
                self.bus.js.get_last_msg(self.stream, self._meta_subject(name)), self.stall_s)
        except NotFoundError as exc:
            if exc.err_code == 10059:  # stream not found, as opposed to no message
                raise ObjectStoreUnavailable(what, f"no object store {self.bucket!r} on this "
                                                   "server") from None
            return None, 0
        except (nats.errors.Error, TimeoutError) as exc:
            raise ObjectStoreUnavailable(what, f"reading its meta record failed: {exc!r}") from exc
        try:
            return msgspec.json.decode(msg.data or b"", type=ObjectMeta), msg.seq or 0
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ObjectCorrupt(what, f"its meta record is unreadable ({exc})") from None

    async def info(self, ref: ObjRef | dict[str, Any] | str) -> ObjectMeta:
        """The meta record of a live object; the same refusals as get()."""
        r = self._ref(ref)
        return await self._resolve(r)

    def _ref(self, ref: ObjRef | dict[str, Any] | str) -> ObjRef:
        r = as_ref(ref, self.bucket)
        if r.bucket != self.bucket:
            raise WrongBucket(_what(r), f"this store serves bucket {self.bucket!r}, not "
                                        f"{r.bucket!r}")
        return r

    async def _resolve(self, r: ObjRef) -> ObjectMeta:
        return (await self._resolve_seq(r))[0]

    async def _resolve_seq(self, r: ObjRef) -> tuple[ObjectMeta, int]:
        """The live object a ref names, and its meta record's stream sequence;
        every refusal of a read is here."""
        what = _what(r)
        meta, seq = await self._meta_and_seq(r.name, what)
        if meta is None or meta.deleted:
            raise ObjectNotFound(what, "not found" if meta is None else "not found (it was deleted)")
        if meta.expired(time.time()):
            raise ObjectExpired(what, "expired (it was put with a TTL)")
        link = meta.options.link if meta.options else None
        if link is not None:
            raise InvalidRef(what, f"is a link to {link.bucket}/{link.name or ''}; links are "
                                   "not followed")
        if r.digest and r.digest != meta.digest:
            raise ObjectChanged(what, f"was replaced since the ref was made (ref digest "
                                      f"{r.digest}, now {meta.digest})")
        if not r.digest and r.size and r.size != meta.size:
            raise ObjectChanged(what, f"was replaced since the ref was made (ref size "
                                      f"{r.size}, now {meta.size})")
        return meta, seq

    # ---- get -----------------------------------------------------------------------------------

    def _chunks(self, meta: ObjectMeta, what: str) -> AsyncGenerator[bytes, None]:
        return read_chunks(self.bus.nc, self._direct, self._chunk_subject(meta.nuid), meta,
                           what=what, batch_bytes=self.batch_bytes, stall_s=self.stall_s,
                           settle_s=self.settle_s)

    async def get(self, ref: ObjRef | dict[str, Any] | str) -> bytearray:
        """The whole object in one buffer allocated once (a bytearray: no second
        copy to make it bytes), its digest checked."""
        r = self._ref(ref)
        return await self._reading(r, self._into_buffer)

    async def get_to(self, ref: ObjRef | dict[str, Any] | str,
                     path: str | os.PathLike[str]) -> ObjRef:
        """Write the object to `path` (through a temporary file beside it, renamed
        once the digest checks out: a failed get leaves no file behind)."""
        r = self._ref(ref)
        target = Path(path)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"{target.parent} is not a directory")

        async def to_file(meta: ObjectMeta, what: str) -> ObjRef:
            await self._into_file(meta, what, target)
            return meta.ref()

        return await self._reading(r, to_file)

    async def _reading(self, r: ObjRef, read: Callable[[ObjectMeta, str], Awaitable[T]]) -> T:
        """read(meta) of the object; once more if it was replaced while being
        read (its old chunks purged under the reader), as long as the ref still
        takes the new content."""
        what = _what(r)
        for _ in range(3):
            meta = await self._resolve(r)
            try:
                return await read(meta, what)
            except ObjectTruncated:
                now = await self._meta_or_none(r.name, what)
                if now is None or now.nuid == meta.nuid:
                    raise
        raise ObjectStoreUnavailable(what, "replaced again and again while being read")

    async def _link(self, size: int | None) -> DataLink | None:
        """A data link for a transfer of `size` bytes, or None: the object is
        small, links are off, or one cannot be opened (then the bus's own
        connection carries it, and `link_unavailable` says why)."""
        if self.link_min_bytes is None or size is None or size < self.link_min_bytes:
            return None
        nc = self.bus.nc
        url = nc.connected_url
        if url is None or not nc.is_connected:
            return None
        try:
            link = await asyncio.to_thread(DataLink.open, url, self.bus.settings,
                                           timeout=min(self.stall_s, 5.0))
        except LinkUnavailable as exc:
            self.link_unavailable = str(exc)
            log.debug("objects: no data link (%s): using the bus connection", exc)
            return None
        link.sock.settimeout(self.stall_s)
        self.links_used += 1
        return link

    async def _link_fetch(self, link: DataLink, meta: ObjectMeta, what: str,
                          region: Callable[[int], memoryview],
                          after: Callable[[memoryview], None] | None) -> None:
        """Every chunk over `link` into `region`, hashed beside the socket
        (then `after`), the digest checked."""
        want = digest_bytes(meta.digest)
        if want is None:
            link.close()
            raise ObjectCorrupt(what, f"its meta record has no valid digest ({meta.digest!r})")
        digester = Digester(hashlib.sha256(), after)

        def work() -> Any:
            try:
                link_read(link, self.bus.nc.new_inbox(), self._direct,
                          self._chunk_subject(meta.nuid), meta, region=region,
                          landed=digester.add, what=what,
                          batch_chunks=max(1, self.batch_bytes // self.chunk_size),
                          settle_s=self.settle_s)
            except BaseException:
                digester.abandon()
                raise
            finally:
                link.close()
            return digester.finish()

        try:
            h = await in_thread(link, work)
        except LinkStalled:
            raise ObjectStoreUnavailable(
                what, f"no data from the server for {self.stall_s:g}s") from None
        except (LinkError, OSError) as exc:
            raise ObjectStoreUnavailable(what, f"reading chunks failed: {exc}") from None
        if h.digest() != want:
            raise ObjectCorrupt(what, f"digest mismatch: read {digest_text(h)}, "
                                      f"its meta says {meta.digest}")

    async def _into_buffer(self, meta: ObjectMeta, what: str) -> bytearray:
        link = await self._link(meta.size)
        if link is not None:
            out = _unfilled(meta.size)
            whole = memoryview(out)
            at = [0]

            def region(n: int) -> memoryview:
                view = whole[at[0]:at[0] + n]
                at[0] += n
                return view

            await self._link_fetch(link, meta, what, region, None)
            return out
        out = bytearray(meta.size)
        view = memoryview(out)
        pos = 0
        chunks = self._chunks(meta, what)
        try:
            async for chunk in chunks:
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        finally:
            await chunks.aclose()
            view.release()
        return out

    async def _into_file(self, meta: ObjectMeta, what: str, target: Path) -> None:
        link = await self._link(meta.size)
        if link is not None:
            part = _PartFile(target)
            pool = _Buffers(max(2, self.batch_bytes // self.chunk_size + 2), self.chunk_size,
                            self.stall_s, what)

            def write(view: memoryview) -> None:
                part.f.write(view)
                pool.give_back(view)

            try:
                await self._link_fetch(link, meta, what, pool.take, write)
                part.commit()
            except BaseException:
                part.abort()
                raise
            return
        part = _PartFile(target)
        loop = asyncio.get_running_loop()
        chunks = self._chunks(meta, what)
        writing: asyncio.Future[int] | None = None
        try:
            # One write in a thread while the next chunk arrives.
            async for chunk in chunks:
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(None, part.f.write, chunk)
            if writing is not None:
                await writing
            part.commit()
        except BaseException:
            if writing is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(writing)
            part.abort()
            raise
        finally:
            await chunks.aclose()

    def open(self, ref: ObjRef | dict[str, Any] | str) -> ObjectReader:
        """A streaming reader: `async with store.open(ref) as r: async for chunk
        in r` (or `await r.read(n)`). Chunks come as they arrive; the digest is
        checked after the last one, so data is trusted only once the reader
        reaches its end without raising."""
        return ObjectReader(self, self._ref(ref))

    # ---- delete and list -----------------------------------------------------------------

    async def delete(self, ref: ObjRef | dict[str, Any] | str) -> None:
        """Delete the object (a `deleted` meta record, as every client writes,
        then its chunks). ObjectNotFound if there is none."""
        r = self._ref(ref)
        what = _what(r)
        for _ in range(20):
            meta, seq = await self._resolve_seq(r)
            marker = ObjectMeta(name=meta.name, bucket=self.bucket, nuid=meta.nuid,
                                deleted=True, mtime=rfc3339(time.time()))
            try:
                # Only over the record just read: a put racing in is not deleted blind.
                await self._publish_meta(marker, {"Nats-Rollup": "sub",
                                                  "Nats-Expected-Last-Subject-Sequence": str(seq)},
                                         what, raw=True)
            except BadRequestError as exc:
                if exc.err_code == 10071:
                    continue
                raise self._meta_refused(exc, what) from None
            with contextlib.suppress(Exception):
                await self._purge(self._chunk_subject(meta.nuid))
            return
        raise ObjectStoreUnavailable(what, "too many writers raced while deleting it")

    async def list(self) -> list[ObjectMeta]:
        """Every live object (not deleted, not expired), by name."""
        subject = OBJ_ALL_META_PRE_TEMPLATE.format(bucket=self.bucket)
        what = f"{self.bucket}/*"
        try:
            await asyncio.wait_for(self.bus.js.get_last_msg(self.stream, subject), self.stall_s)
        except NotFoundError:
            return []
        except (nats.errors.Error, TimeoutError) as exc:
            raise ObjectStoreUnavailable(what, f"listing failed: {exc!r}") from exc
        sub = await self.bus.js.subscribe(subject, stream=self.stream, ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        out: dict[str, ObjectMeta] = {}
        now = time.time()
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.stall_s)
                except nats.errors.TimeoutError:
                    break  # the last record expired meanwhile: what we have is all
                with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                    meta = msgspec.json.decode(msg.data, type=ObjectMeta)
                    if not meta.deleted and not meta.expired(now):
                        out[meta.name] = meta
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return [out[k] for k in sorted(out)]


class ObjectReader:
    """Streams one object; see ObjectStore.open."""

    def __init__(self, store: ObjectStore, ref: ObjRef) -> None:
        self._store = store
        self.ref = ref
        self.meta: ObjectMeta | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._buf = bytearray()
        self._eof = False

    async def _start(self) -> AsyncGenerator[bytes, None]:
        if self._chunks is None:
            self.meta = await self._store._resolve(self.ref)
            self._chunks = self._store._chunks(self.meta, _what(self.ref))
        return self._chunks

    async def __aenter__(self) -> ObjectReader:
        await self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __aiter__(self) -> ObjectReader:
        return self

    async def __anext__(self) -> bytes:
        if self._buf:
            out = bytes(self._buf)
            self._buf.clear()
            return out
        if self._eof:
            raise StopAsyncIteration
        chunks = await self._start()
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            raise

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all that is left when n < 0); b"" at the end."""
        while (n < 0 or len(self._buf) < n) and not self._eof:
            chunks = await self._start()
            try:
                self._buf += await chunks.__anext__()
            except StopAsyncIteration:
                self._eof = True
        take = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:take])
        del self._buf[:take]
        return out

    async def close(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()


class _PartFile:
    """A file written beside its target and renamed over it once complete.
    Opening, closing and renaming are quick metadata calls: done in place
    (only the writes go to a thread)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        self.f = self.path.open("wb")

    def commit(self) -> None:
        self.f.close()
        os.replace(self.path, self.target)

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _ttl_seconds(ttl: float | None, what: str) -> int:
    if ttl is None:
        return 0
    if not isinstance(ttl, int | float) or math.isnan(ttl) or ttl <= 0:
        raise ValueError(f"object {what}: ttl must be a positive number of seconds, "
                         f"not {ttl!r}")
    return max(1, math.ceil(ttl))


class _Buffers:
    """At most `count` reusable buffers for chunks on their way to a file: the
    socket is not read further while every one is still being written."""

    def __init__(self, count: int, size: int, stall_s: float, what: str) -> None:
        self.what = what
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.left = count
        self.size = size
        self.stall_s = stall_s

    def take(self, n: int) -> memoryview:
        try:
            buf = self.free.get_nowait()
        except queue.Empty:
            if self.left > 0:
                self.left -= 1
                buf = bytearray(max(n, self.size))
            else:
                try:
                    buf = self.free.get(timeout=self.stall_s)
                except queue.Empty:
                    raise ObjectStoreUnavailable(
                        self.what, f"writing the file took over {self.stall_s:g}s") from None
        if len(buf) < n:
            buf = bytearray(n)
        return memoryview(buf)[:n]

    def give_back(self, view: memoryview) -> None:
        buf = view.obj
        if isinstance(buf, bytearray):
            self.free.put(buf)


_bytearray_of_size = ctypes.pythonapi.PyByteArray_FromStringAndSize
_bytearray_of_size.restype = ctypes.py_object
_bytearray_of_size.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _unfilled(size: int) -> bytearray:
    """A bytearray of `size` whose bytes are not zeroed first (the C API with a
    NULL source): every byte is about to be received into it, and a large one
    is fresh mmap'ed memory, faulted in page by page by the receiving thread
    (outside the GIL) instead of memset here on the event loop. Never handed
    out unless every byte was written."""
    out: bytearray = _bytearray_of_size(None, size)
    return out


def _link_source(data: Source) -> bool:
    """Sources a data link's thread can read by itself: memory and files by path."""
    return isinstance(data, bytes | bytearray | memoryview | os.PathLike)


def _slices(data: bytes | bytearray | memoryview, size: int) -> Iterator[memoryview]:
    view = memoryview(data).cast("B")
    for off in range(0, view.nbytes, size):
        yield view[off:off + size]


def _known_size(data: Source) -> int | None:
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).nbytes
    if isinstance(data, os.PathLike):
        try:
            return Path(data).stat().st_size
        except OSError as exc:
            raise FileNotFoundError(f"cannot read {os.fspath(data)}: {exc.strerror}") from None
    return None
