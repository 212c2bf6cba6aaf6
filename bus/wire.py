"""The lean protocol paths of one nats-py connection: the hot path's publishes
and the messages of a few subscriptions, without nats-py's per-message
machinery.

nats-py's `publish` checks subject and reply with a regular expression each,
checks every header key with another and translates every header value, and
goes through two coroutines before the command reaches its buffer: about
4 us of a 2-core machine's time. A message to a subscription becomes a `Msg`
dataclass with parsed headers, goes through a queue to the subscription's
task and then to its callback coroutine: about 3 us. At 9 stream writes and
some 20 deliveries and acks per job, that bookkeeping outweighed the work.

Here a publish is the protocol line, built once and appended to nats-py's own
outgoing buffer, whose flusher writes it with everything else queued in the
same loop iteration (nothing is reordered: one buffer, one writer). A
subscription registered with `route` gets its messages raw (subject, reply,
body, header block) in a plain function called by nats-py's reader. Everything
nats-py does around them stays its own: connecting, reconnecting and
resubscribing, pings, draining, errors. Whenever the connection is not plainly
up (connecting, reconnecting, draining, closed, or its outgoing buffer over
nats-py's limit), a publish goes through nats-py's `publish`, which buffers,
waits or raises as it always does.

This rests on four members of nats-py's client: its outgoing buffer
(`_pending`, `_pending_data_size`), its flusher's queue (`_flush_queue`,
`_flusher_task`) and the reader's call `_process_msg`. `Wire.lean` says
whether the connection has them; without them every call goes the long way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

# What nats-py refuses in a subject (a space or line break would let a caller
# inject protocol commands), and in a header value.
_BAD_SUBJECT = re.compile(r"[ \t\r\n]").search
_HEADER_LINE = b"NATS/1.0\r\n"

# A raw handler: (subject, reply, body, header block or None), called on the
# reader's task. It must not block; it may schedule.
Handler = Callable[[bytes, bytes, bytes, "bytes | None"], None]

_INTERNALS = ("_pending", "_pending_data_size", "_flush_queue", "_flusher_task",
              "_max_pending_size", "_process_msg")


_FITS: dict[type, bool] = {}


def _reader_fits(cls: type) -> bool:
    """The reader calls `_process_msg(sid, subject, reply, data, headers)`, as
    in the nats-py this was written against."""
    fits = _FITS.get(cls)
    if fits is None:
        try:
            names = list(inspect.signature(getattr(cls, "_process_msg")).parameters)  # noqa: B009
        except (AttributeError, TypeError, ValueError):
            names = []
        fits = _FITS[cls] = names == ["self", "sid", "subject", "reply", "data", "headers"]
    return fits


class BadSubject(ValueError):
    pass


_BAD_VALUE = re.compile(r"[\r\n]").search
_KEYS: dict[str, bytes] = {}  # header keys seen, checked, as `Key: ` bytes


def header_block(headers: Mapping[str, str]) -> bytes:
    """The `NATS/1.0` header block of a publish (keys and values as given;
    a line break in a value would end the block, so it is refused)."""
    out = _HEADER_LINE
    for k, v in headers.items():
        key = _KEYS.get(k)
        if key is None:
            if not k or ":" in k or _BAD_VALUE(k) or " " in k:
                raise ValueError(f"header {k!r} cannot travel (empty, colon, space or line break)")
            key = b"%s: " % k.encode()
            if len(_KEYS) < 256:
                _KEYS[k] = key
        if _BAD_VALUE(v):
            raise ValueError(f"header {k!r}: {v!r} cannot travel (a line break)")
        out += key + v.encode() + b"\r\n"
    return out + b"\r\n"


def command(subject: str, body: bytes, reply: str = "", headers: bytes | None = None) -> bytes:
    """The PUB or HPUB line of one message."""
    if _BAD_SUBJECT(subject) or not subject or (reply and _BAD_SUBJECT(reply)):
        raise BadSubject(f"subject {subject!r} or reply {reply!r} has a space or line break")
    if headers is None:
        if reply:
            return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(body), body)
        return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(body), body)
    n = len(headers)
    if reply:
        return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), n,
                                                  n + len(body), headers, body)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), n, n + len(body), headers, body)


class Wire:
    """The lean paths of one connection (`Wire.of(nc)` makes or finds it)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.lean = (all(hasattr(nc, a) for a in _INTERNALS)
                     and isinstance(getattr(nc, "_pending", None), list)
                     and _reader_fits(type(nc)))
        self._routes: dict[int, Handler] = {}
        # Told of every publish with a reply (bus.connection.Denials), so a
        # refusal by the server can be matched to the requests it fails.
        self.on_request: Callable[[str, str], None] | None = None
        self.on_publish: Callable[[str], None] | None = None
        self.lean_publishes = 0
        if self.lean:
            # nats-py's reader passes None when a message has no headers.
            self._reader = nc._process_msg
            setattr(nc, "_process_msg", self._process_msg)  # noqa: B010
        else:
            log.warning("nats-py %s lacks the members bus.wire uses: publishing the long way",
                        type(nc).__module__)

    @classmethod
    def of(cls, nc: NATS) -> Wire:
        wire: Wire | None = getattr(nc, "_jetfleet_wire", None)
        if wire is None:
            wire = cls(nc)
            setattr(nc, "_jetfleet_wire", wire)  # noqa: B010
        return wire

    # ---- out ---------------------------------------------------------------------

    def send(self, cmd: bytes) -> bool:
        """Queue one protocol command for nats-py's flusher; False when the
        connection is not plainly up (then the caller goes the long way)."""
        nc = self.nc
        if not self.lean or not nc.is_connected:
            return False
        size = nc._pending_data_size + len(cmd)
        if 0 < nc._max_pending_size < size:
            return False  # nats-py makes the publisher wait for a flush
        flusher = nc._flusher_task
        if flusher is None or flusher.done():
            return False
        nc._pending.append(cmd)
        nc._pending_data_size = size
        queue = nc._flush_queue
        if queue is not None and queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        self.lean_publishes += 1
        return True

    async def publish(self, subject: str, body: bytes = b"", reply: str = "",
                      headers: Mapping[str, str] | None = None,
                      header_bytes: bytes | None = None) -> None:
        """A core publish: the lean way when it can, else nats-py's `publish`."""
        if self.on_request is not None and reply:
            self.on_request(reply, subject)
        elif self.on_publish is not None and not reply:
            self.on_publish(subject)
        if self.lean and self.nc.is_connected:
            block = header_bytes if header_bytes is not None else (
                header_block(headers) if headers else None)
            if self.send(command(subject, body, reply, block)):
                return
        await self.long(subject, body, reply, headers, header_bytes)

    async def long(self, subject: str, body: bytes, reply: str = "",
                   headers: Mapping[str, str] | None = None,
                   header_bytes: bytes | None = None) -> None:
        """nats-py's own publish (what the lean path hands over to)."""
        if headers is None and header_bytes is not None:
            headers = parse_header_block(header_bytes)
        # The client's own publish (not a wrapper set on the instance, which
        # bus.connection.Denials uses: the hooks above already told it).
        await type(self.nc).publish(self.nc, subject, body, reply=reply,
                                    headers=dict(headers) if headers else None)

    # ---- in ----------------------------------------------------------------------

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Any:
        """Subscribe with a raw handler: straight from the reader on the lean
        path, else through nats-py's callback (the same arguments either way)."""
        async def through_nats_py(msg: Msg) -> None:
            block = header_block(msg.headers) if msg.headers else None
            handler(msg.subject.encode(), (msg.reply or "").encode(), msg.data, block)

        sub = await self.nc.subscribe(subject, queue=queue, cb=through_nats_py)
        if self.lean:
            self.route(sub._id, handler)
        return sub

    def route(self, sid: int, handler: Handler) -> None:
        """Hand the messages of subscription `sid` to `handler`, raw."""
        if not self.lean:
            raise RuntimeError("this nats-py client has no lean path")
        self._routes[sid] = handler

    def unroute(self, sid: int) -> None:
        self._routes.pop(sid, None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        handler = self._routes.get(sid)
        if handler is None:
            await self._reader(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        try:
            handler(subject, reply, data, headers)
        except Exception:
            log.exception("handler of subscription %d failed", sid)


def parse_header_block(block: bytes) -> dict[str, str]:
    """A header block back to a dict (status line dropped)."""
    out: dict[str, str] = {}
    for line in block.decode(errors="replace").split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def status_of(headers: bytes | None) -> str:
    """The status code of a header block (`NATS/1.0 503` -> '503'), or ''."""
    if not headers or not headers.startswith(b"NATS/1.0 "):
        return ""
    return headers[9:12].decode(errors="replace")

