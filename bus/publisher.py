"""The lean JetStream publish on the hot path: one reply subscription per
connection, a future per message, no timer per message.

nats-py's `js.publish` is a request: a fresh token, a future and a
`wait_for` timer each time, and the ack parsed with `json` into a dataclass;
at a few thousand messages a second that bookkeeping costs more than the
message. Here every publish shares one wildcard reply subscription, acks are
decoded with msgspec, and a single sweeper fails the futures of publishes
unanswered after their timeout. Errors are nats-py's (APIError,
KeyWrongLastSequenceError, NoStreamResponseError, TimeoutError), so callers
handle them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import errors as js_errors
from nats.js.api import Header, PubAck

from bus.wire import Wire, command, header_block, status_of

NO_RESPONDERS = "503"
_WRONG_LAST = (10071, 10164)


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


class Publisher:
    def __init__(self, nc: NATS, registry: dict[str, asyncio.Future[Any]] | None = None) -> None:
        self.nc = nc
        self.wire = Wire.of(nc)
        # Where a refusal of the server (bus.connection.Denials) finds the futures.
        self.registry: dict[str, asyncio.Future[Any]] = {} if registry is None else registry
        self._prefix = ""
        self._cut = 0
        self._sub: Any = None
        self._waiting: dict[str, tuple[asyncio.Future[PubAck], float, str]] = {}
        self._tokens = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        async with self._lock:
            if self._sub is not None:
                return
            nc = self.nc
            self._prefix = f"{nc.new_inbox()}."
            self._cut = len(self._prefix)
            # Acks straight from the reader: no Msg, no queue, no task.
            self._sub = await self.wire.subscribe(f"{self._prefix}*", self._on_raw_ack)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None,
                      timeout: float = 10.0) -> PubAck:
        if self._sub is None:
            await self._start()
        return await self.send(subject, body, headers, timeout)

    def send(self, subject: str, body: bytes, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> asyncio.Future[PubAck]:
        """Publish now and hand back the future of its ack: no coroutine and no
        task per message, for publishes whose acks are gathered later (events
        said beside other work). Raises at once what the message cannot be
        (bus.wire.BadSubject, a header that cannot travel)."""
        loop = asyncio.get_running_loop()
        if self._sub is None:  # the first publish of this connection subscribes first
            return loop.create_task(self.publish(subject, body, headers, timeout))
        token = str(next(self._tokens))
        reply = self._prefix + token
        wire = self.wire
        cmd = command(subject, body, reply, header_block(headers) if headers else None)
        future: asyncio.Future[PubAck] = loop.create_future()
        self._waiting[token] = (future, time.monotonic() + timeout, reply)
        self.registry[reply] = future
        if wire.on_request is not None:
            wire.on_request(reply, subject)
        if not wire.send(cmd):
            # Not plainly connected: nats-py's publish buffers, waits or raises.
            task = loop.create_task(wire.long(subject, body, reply, headers))
            task.add_done_callback(functools.partial(_failed_send, future))
        return future

    def _on_raw_ack(self, subject: bytes, _reply: bytes, data: bytes,
                    headers: bytes | None) -> None:
        got = self._waiting.pop(subject[self._cut:].decode(), None)
        if got is None:
            return
        self.registry.pop(got[2], None)
        if not got[0].done():
            self._settle(got[0], data, status_of(headers) == NO_RESPONDERS)

    @staticmethod
    def _settle(future: asyncio.Future[PubAck], data: bytes, no_stream: bool) -> None:
        if no_stream:
            future.set_exception(js_errors.NoStreamResponseError())
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError as exc:
            future.set_exception(js_errors.Error(f"unreadable publish ack: {exc}"))
            return
        if ack.error is not None:
            e = ack.error
            if e.err_code in _WRONG_LAST:
                # nats-py's own class (what its KV callers catch), carrying the
                # codes a BadRequestError has, which its constructor drops.
                wrong = js_errors.KeyWrongLastSequenceError(description=e.description)
                wrong.code, wrong.err_code = e.code, e.err_code
                future.set_exception(wrong)
            else:
                future.set_exception(js_errors.APIError(code=e.code, err_code=e.err_code,
                                                        description=e.description))
            return
        future.set_result(PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain,
                                 duplicate=ack.duplicate))

    async def _sweep(self) -> None:
        """Fail the publishes whose ack never came (one timer for all of them)."""
        while True:
            await asyncio.sleep(0.25)
            t = time.monotonic()
            for token, (future, deadline, reply) in list(self._waiting.items()):
                if t >= deadline or future.done():
                    if not future.done():
                        future.set_exception(nats.errors.TimeoutError())
                    self._waiting.pop(token, None)
                    self.registry.pop(reply, None)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            self.wire.unroute(self._sub._id)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()




def _failed_send(future: asyncio.Future[PubAck], task: asyncio.Task[None]) -> None:
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())  # type: ignore[arg-type]


async def cas(publisher: Publisher, subject: str, value: bytes, last: int) -> int:
    """Compare-and-set one KV key (`subject` is `$KV.<bucket>.<key>`; `last` 0:
    create); KeyWrongLastSequenceError when it moved on. The new revision."""
    ack = await publisher.publish(subject, value,
                                  headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)})
    return int(ack.seq)
