"""An object's chunks on the wire, and what can go wrong with them.

put: chunks are published back to back, each with its own reply inbox, while
at most `window` of them (and `window_bytes`) wait for their stream ack;
nats-py's ObjectStore.put waits one round trip per chunk.

get: chunks come in direct-get batches (`next_by_subj`, bounded by `max_bytes`
so memory stays bounded) and go to the caller as they land, each hashed while
still in cache; nats-py's ObjectStore.get adds `bytes` chunk by chunk, which
is quadratic (nats.py #703). Every wait is bounded: a server that stops
answering is an error, never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import IO, Any, TypeAlias, cast

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.datalink import DataLink, LinkError, LinkStalled
from schemas.objects import ObjectMeta

DIGEST_PREFIX = "SHA-256="

# What a put accepts: bytes in memory, a file (path or open binary file), or a
# stream of bytes pieces (async or not), cut here into chunks.
Source: TypeAlias = (bytes | bytearray | memoryview | os.PathLike[str] | IO[bytes]
                     | AsyncIterable[bytes] | Iterable[bytes])


# ---- errors ------------------------------------------------------------------------------


class ObjectError(Exception):
    """Something is wrong with one object; the message names it. `code` is a
    stable machine-readable reason, `retryable` says whether trying again may help."""

    code = "object_error"
    retryable = False

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"object {what}: {detail}")
        self.what = what
        self.detail = detail


class InvalidRef(ObjectError, ValueError):
    code = "invalid_ref"


class WrongBucket(InvalidRef):
    code = "wrong_bucket"


class ObjectNotFound(ObjectError, LookupError):
    code = "object_not_found"


class ObjectExpired(ObjectNotFound):
    code = "object_expired"


class ObjectChanged(ObjectError):
    """The name now holds other content than the ref was made for."""

    code = "object_changed"


class ObjectCorrupt(ObjectError):
    code = "object_corrupt"


class ObjectTruncated(ObjectCorrupt):
    code = "object_truncated"


class ObjectTooLarge(ObjectError, ValueError):
    code = "object_too_large"


class ObjectStoreUnavailable(ObjectError):
    """The server did not answer in time or refused the operation."""

    code = "object_store_unavailable"
    retryable = True


# ---- digests -------------------------------------------------------------------------------


def digest_text(h: Any) -> str:
    """`SHA-256=<base64url>`, the object store's digest format (nats.go, nats-py)."""
    return DIGEST_PREFIX + base64.urlsafe_b64encode(h.digest()).decode()


def digest_bytes(text: str) -> bytes | None:
    """The raw SHA-256 of a digest text, None if it is not one."""
    if text[:len(DIGEST_PREFIX)].upper() != DIGEST_PREFIX:
        return None
    try:
        raw = base64.urlsafe_b64decode(text[len(DIGEST_PREFIX):])
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 else None


# ---- put -------------------------------------------------------------------------------------


def ack_error(what: str, status: str, body: bytes) -> ObjectError | None:
    """What a chunk's publish ack says went wrong (None: it was stored)."""
    if status == "503":
        return ObjectStoreUnavailable(what, "no stream takes its chunks "
                                            "(is the topology applied?)")
    if status:
        return ObjectStoreUnavailable(what, f"the server answered {status}")
    try:
        ack = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return ObjectStoreUnavailable(what, f"unreadable publish ack {body[:80]!r}")
    if isinstance(ack, dict) and "error" in ack:
        err = ack["error"] or {}
        return ObjectStoreUnavailable(
            what, f"the server refused a chunk: {err.get('description', err)}")
    return None


class _Window:
    """Chunks published and not yet acked: at most `msgs` and `nbytes` of them
    (one chunk is always allowed, whatever its size)."""

    def __init__(self, what: str, msgs: int, nbytes: int) -> None:
        self.what = what
        self.msgs = msgs
        self.nbytes = nbytes
        self.inflight: dict[str, int] = {}
        self.bytes = 0

    def full(self, size: int) -> bool:
        return bool(self.inflight) and (len(self.inflight) >= self.msgs
                                        or self.bytes + size > self.nbytes)

    def add(self, token: str, size: int) -> None:
        self.inflight[token] = size
        self.bytes += size

    def landed(self, token: str) -> bool:
        size = self.inflight.pop(token, None)
        if size is None:
            return False
        self.bytes -= size
        return True


class AckWindow(_Window):
    """The window of a put on the bus connection; the first failed ack is kept
    and raised at the next step."""

    def __init__(self, what: str, msgs: int, nbytes: int, stall_s: float) -> None:
        super().__init__(what, msgs, nbytes)
        self.stall_s = stall_s
        self.error: ObjectError | None = None
        self.changed = asyncio.Event()

    async def on_ack(self, msg: Msg) -> None:
        if not self.landed(msg.subject.rsplit(".", 1)[-1]):
            return
        self.changed.set()
        if self.error is None:
            self.error = ack_error(self.what, (msg.headers or {}).get("Status") or "", msg.data)

    async def _wait(self, done: Any) -> None:
        while not done():
            if self.error is not None:
                raise self.error
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), self.stall_s)
            except TimeoutError:
                raise ObjectStoreUnavailable(
                    self.what, f"no publish ack from the server for {self.stall_s:g}s") from None
        if self.error is not None:
            raise self.error

    async def reserve(self, token: str, size: int) -> None:
        await self._wait(lambda: not self.full(size))
        self.add(token, size)

    async def drain(self) -> None:
        await self._wait(lambda: not self.inflight)

    async def settle(self) -> None:
        """Wait (bounded, never raising) for the chunks in flight to land, so a
        purge after a failed put does not run before them."""
        with contextlib.suppress(Exception):
            self.error = None
            await self._wait(lambda: not self.inflight)


def _within_limit(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise ObjectTooLarge(what, f"more than the limit of {limit} bytes "
                                   "(JETFLEET_MAX_OBJECT_BYTES)")


async def publish_chunks(nc: NATS, subject: str, chunks: AsyncIterator[bytes | memoryview], *,
                         what: str, limit: int, headers: dict[str, str] | None,
                         window: int, window_bytes: int, stall_s: float
                         ) -> tuple[int, int, str, float | None]:
    """Publish every chunk on `subject`, pipelined; returns (size, chunks,
    digest, loop time of the first publish). Raises ObjectTooLarge past `limit`."""
    acks = AckWindow(what, window, window_bytes, stall_s)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.*", cb=acks.on_ack)
    h = hashlib.sha256()
    size = count = 0
    first: float | None = None
    try:
        async for chunk in chunks:
            n = len(chunk)
            if n == 0:
                continue
            _within_limit(what, size + n, limit)
            token = str(count)
            await acks.reserve(token, n)
            if first is None:
                first = asyncio.get_running_loop().time()
            # A memoryview slice is sent as is (nats-py copies it into the PUB);
            # hashed after that copy, while the chunk is still in cache.
            await nc.publish(subject, cast(bytes, chunk), reply=f"{inbox}.{token}",
                             headers=headers)
            # Let nats-py's flusher write this chunk now: a lone pending PUB is
            # written without being joined into (and copied with) the next ones.
            await asyncio.sleep(0)
            h.update(chunk)
            size += n
            count += 1
        await acks.drain()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            await asyncio.shield(acks.settle())
        if isinstance(exc, nats.errors.Error):
            raise ObjectStoreUnavailable(what, f"publishing chunks failed: {exc!r}") from exc
        raise
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return size, count, digest_text(h), first


async def chunks_of(data: Source, chunk_size: int) -> AsyncIterator[bytes | memoryview]:
    """Any put source as pieces of `chunk_size` (the last one shorter); bytes
    in memory are sliced without a copy, files are read off the event loop."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for off in range(0, len(view), chunk_size):
            yield view[off:off + chunk_size]
        return
    if isinstance(data, os.PathLike):
        f: IO[bytes] = await asyncio.to_thread(open, Path(data), "rb")
        try:
            async for piece in _read_file(f, chunk_size):
                yield piece
        finally:
            f.close()
        return
    if hasattr(data, "read"):
        async for piece in _read_file(data, chunk_size):  # type: ignore[arg-type]
            yield piece
        return
    if isinstance(data, str):
        raise TypeError("an object is bytes: pass str.encode(), or a pathlib.Path for a file")
    buf = bytearray()
    async for piece in _pieces(data):
        if isinstance(piece, str):
            raise TypeError("a stream of an object yields bytes, not str")
        buf += piece
        while len(buf) >= chunk_size:
            yield bytes(buf[:chunk_size])
            del buf[:chunk_size]
    if buf:
        yield bytes(buf)


async def _read_file(f: IO[bytes], chunk_size: int) -> AsyncIterator[bytes]:
    # The next read runs in a thread while the caller publishes this one.
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, f.read, chunk_size)
    while True:
        piece = await pending
        if not piece:
            return
        pending = loop.run_in_executor(None, f.read, chunk_size)
        yield piece


async def _pieces(data: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, AsyncIterable):
        async for piece in data:
            yield piece
    elif isinstance(data, Iterable):
        for piece in data:
            yield piece
    else:
        raise TypeError(f"cannot put a {type(data).__name__}: give bytes, a pathlib.Path, "
                        "a binary file or an (async) iterable of bytes")


# ---- get -------------------------------------------------------------------------------------


async def read_chunks(nc: NATS, direct_subject: str, subject: str, meta: ObjectMeta, *,
                      what: str, batch_bytes: int, stall_s: float, settle_s: float
                      ) -> AsyncGenerator[bytes, None]:
    """The object's chunks in order, from direct-get batches of at most
    `batch_bytes`. After the last chunk the size and digest are checked; a
    mismatch raises ObjectCorrupt, missing chunks ObjectTruncated (after up to
    `settle_s` of retries, for a replica that lags the leader)."""
    want = digest_bytes(meta.digest)
    if want is None:
        raise ObjectCorrupt(what, f"its meta record has no valid digest ({meta.digest!r})")
    h = hashlib.sha256()
    got = chunks = 0
    if meta.size > 0:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_bytes_limit=4 * batch_bytes + (64 << 20))
        loop = asyncio.get_running_loop()
        seq = 1
        settling = _Settling(what, settle_s)
        try:
            while got < meta.size:
                remaining = max(1, meta.chunks - chunks) if meta.chunks else 1024
                req = {"seq": seq, "next_by_subj": subject, "batch": remaining,
                       "max_bytes": batch_bytes}
                await nc.publish(direct_subject, msgspec.json.encode(req), reply=inbox)
                before = got
                while True:
                    msg = await _next(sub, what, stall_s)
                    hdrs = msg.headers or {}
                    status = hdrs.get("Status")
                    if status:
                        if status not in ("204", "404"):
                            raise ObjectStoreUnavailable(
                                what, f"the server answered {status} "
                                      f"{hdrs.get('Description', '')}".rstrip())
                        break
                    seq = int(hdrs.get("Nats-Sequence", seq)) + 1
                    got += len(msg.data)
                    chunks += 1
                    if got > meta.size:
                        raise ObjectCorrupt(what, f"its chunks hold more than its size of "
                                                  f"{meta.size} bytes")
                    h.update(msg.data)
                    yield msg.data
                    if got == meta.size:
                        break
                if got == meta.size or got > before:
                    settling.until = None
                    continue
                # A batch that brought nothing: the chunks are gone, or a replica lags.
                await asyncio.sleep(settling.nothing(loop.time(), meta, chunks, got))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    if h.digest() != want:
        raise ObjectCorrupt(what, f"digest mismatch: read {digest_text(h)}, "
                                  f"its meta says {meta.digest}")


class _Settling:
    """How long a read waits for chunks that are not there (a replica that
    lags its leader) before it calls them missing."""

    def __init__(self, what: str, settle_s: float) -> None:
        self.what = what
        self.settle_s = settle_s
        self.until: float | None = None

    def nothing(self, now: float, meta: ObjectMeta, chunks: int, got: int) -> float:
        """A look that brought nothing: how long to wait before the next, or
        ObjectTruncated once settle_s has passed."""
        if self.until is None:
            self.until = now + self.settle_s
        if now >= self.until:
            raise ObjectTruncated(self.what, f"only {chunks} of {meta.chunks} chunks "
                                             f"({got} of {meta.size} bytes) are on the server")
        return min(0.1, self.settle_s)


async def _next(sub: Any, what: str, stall_s: float) -> Msg:
    try:
        msg: Msg = await sub.next_msg(timeout=stall_s)
    except nats.errors.TimeoutError:
        raise ObjectStoreUnavailable(
            what, f"no data from the server for {stall_s:g}s") from None
    except nats.errors.Error as exc:
        raise ObjectStoreUnavailable(what, f"reading chunks failed: {exc!r}") from exc
    return msg


# ---- the same over a data link (bus.datalink): no copy between socket and caller ------------


def link_read(link: DataLink, inbox: str, direct_subject: str, subject: str, meta: ObjectMeta,
              *, region: Callable[[int], memoryview], landed: Callable[[memoryview], None],
              what: str, batch_chunks: int, settle_s: float) -> int:
    """read_chunks over a data link, run in a thread: each chunk's payload is
    received into `region(n)` (where its n bytes belong) and handed to
    `landed(view)`; returns the number of chunks. Size and count are checked
    here, the digest by the caller (it is computed beside this thread).

    Batches are of `batch_chunks` chunks; the next one is asked for as soon as
    the header of a batch's last chunk arrives, so the server never waits for
    a round trip, and at most two batches are ever queued for this client."""
    link.subscribe(inbox)
    got = chunks = 0
    seq = 1
    settling = _Settling(what, settle_s)
    asked = 0          # batches asked for whose end-of-batch has not come
    left = 0           # chunks the newest batch may still bring
    mark = 0           # bytes got when the newest batch was asked for

    def ask(from_seq: int) -> None:
        nonlocal asked, left, mark
        remaining = max(1, meta.chunks - chunks) if meta.chunks else batch_chunks
        n = min(batch_chunks, remaining)
        req = {"seq": from_seq, "next_by_subj": subject, "batch": n, "max_bytes": 1 << 40}
        link.publish(direct_subject, msgspec.json.encode(req), reply=inbox)
        asked += 1
        left = n
        mark = got

    ask(seq)
    while got < meta.size:
        frame = link.frame()
        status = frame.status()
        if status:
            link.skip(frame.size)
            link.end_payload()
            if status not in ("204", "404"):
                desc = frame.header(b"Description") or ""
                raise ObjectStoreUnavailable(what, f"the server answered {status} {desc}".rstrip())
            asked -= 1
            if asked:
                continue  # the batch asked for ahead follows
            # Nothing asked for and the object is not whole: a chunk is missing
            # (gone, or a replica lags the leader: wait up to settle_s for it).
            if got > mark:
                settling.until = None
            else:
                time.sleep(settling.nothing(time.monotonic(), meta, chunks, got))
            ask(seq)
            continue
        if got + frame.size > meta.size:
            raise ObjectCorrupt(what, f"its chunks hold more than its size of {meta.size} bytes")
        at = frame.header(b"Nats-Sequence")
        seq = int(at) + 1 if at else seq
        left -= 1
        if left == 0 and asked == 1 and got + frame.size < meta.size:
            ask(seq)
        view = region(frame.size)
        link.read_into(view)
        link.end_payload()
        landed(view)
        got += frame.size
        chunks += 1
    return chunks


class _LinkAcks(_Window):
    """The window of a put on a data link: the acks are read in a thread of
    their own while the sender's thread publishes."""

    def __init__(self, link: DataLink, what: str, msgs: int, nbytes: int) -> None:
        super().__init__(what, msgs, nbytes)
        self.link = link
        self.error: BaseException | None = None
        self.sent_all = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="jetfleet-data-acks", daemon=True)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    if self.error is not None or (self.sent_all and not self.inflight):
                        return
                frame = self.link.frame_or_pong()
                if frame is None:
                    continue
                body = self.link.read_bytes(frame.size)
                self.link.end_payload()
                self._ack(frame.subject.rsplit(".", 1)[-1], frame.status(), body)
        except LinkStalled:
            self._fail(ObjectStoreUnavailable(self.what, "no publish ack from the server for "
                                                         f"{self.link.sock.gettimeout():g}s"))
        except LinkError as exc:
            self._fail(ObjectStoreUnavailable(self.what, f"publishing chunks failed: {exc}"))
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def _ack(self, token: str, status: str, body: bytes) -> None:
        error = ack_error(self.what, status, body)
        with self.cond:
            self.landed(token)
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def reserve(self, token: str, size: int) -> None:
        with self.cond:
            while self.full(size):
                if self.error is not None:
                    raise self.error
                self.cond.wait()
            if self.error is not None:
                raise self.error
            self.add(token, size)

    def finish(self) -> None:
        with self.cond:
            self.sent_all = True
        # The ack reader wakes on this PING's PONG if every ack came already.
        self.link.write(b"PING\r\n")
        self.thread.join()
        if self.error is not None:
            raise self.error


def link_publish(link: DataLink, inbox: str, subject: str, pieces: Iterable[bytes | memoryview],
                 *, what: str, limit: int, headers: dict[str, str] | None, window: int,
                 window_bytes: int) -> tuple[int, int, str, float | None]:
    """publish_chunks over a data link, run in a thread: each chunk sent from
    the caller's memory, hashed right after (still in cache), at most
    `window` / `window_bytes` waiting for their acks."""
    link.subscribe(f"{inbox}.*")
    block = b""
    if headers:
        block = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                 + "\r\n").encode()
    acks = _LinkAcks(link, what, window, window_bytes)
    acks.thread.start()
    h = hashlib.sha256()
    size = count = 0
    first: float | None = None
    try:
        for piece in pieces:
            n = memoryview(piece).nbytes
            if n == 0:
                continue
            _within_limit(what, size + n, limit)
            token = str(count)
            acks.reserve(token, n)
            if first is None:
                first = time.monotonic()
            link.publish(subject, piece, reply=f"{inbox}.{token}", headers=block)
            h.update(piece)
            size += n
            count += 1
        acks.finish()
    except (LinkError, OSError) as exc:
        raise ObjectStoreUnavailable(what, f"publishing chunks failed: {exc}") from None
    finally:
        link.close()
        acks.thread.join(5)
    return size, count, digest_text(h), first
