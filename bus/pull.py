"""A no-wait pull: take what a consumer has right now, up to `batch`, and return.

nats-py's `fetch` long-polls an empty consumer for its whole timeout; a worker
that serves many (capability, priority) consumers needs to ask each one
"anything now?" in one round trip, in priority order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.wire import Wire, parse_header_block, status_of


async def pull_now(nc: NATS, stream: str, consumer: str, batch: int,
                   timeout: float = 2.0) -> list[Msg]:
    reply = nc.new_inbox()
    # JetStream delivers pulled messages under their own subjects to the
    # reply inbox's subscription, so each pull gets a subscription of its own.
    sub = await nc.subscribe(reply, max_msgs=0)
    # Read straight from the subscription's queue: nats-py's next_msg makes a
    # task (named by a fresh uuid4) and a wait_for per message; here a wait
    # happens only when the queue is empty, which a batch rarely leaves it.
    queue: asyncio.Queue[Msg] = sub._pending_queue
    out: list[Msg] = []
    try:
        req = json.dumps({"batch": batch, "no_wait": True}).encode()
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", req, reply=reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < batch:
            try:
                msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
            sub._pending_size -= len(msg.data)
            if _is_status(msg):
                break  # 404 no messages, 408 request timeout, 409 ...
            out.append(msg)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # Anything that raced in after we stopped goes straight back.
        while True:
            try:
                late = queue.get_nowait()
            except Exception:
                break
            if not _is_status(late):
                with contextlib.suppress(Exception):
                    await late.nak()
    return out


def _is_status(msg: Msg) -> bool:
    return not msg.data and bool(msg.headers) and "Status" in (msg.headers or {})


class Fetcher:
    """`fetch` for one reader of a pull consumer (a ConsumerLoop), with nats-py's
    semantics and without its cost per message (a task and a `wait_for` each).

    Every request shares one inbox, read raw from the connection's reader
    (bus.wire). A fetch takes what an earlier request delivered first; else
    it asks for what is there now (no-wait, ended by the server's 404); else
    it leaves one request waiting for the first message until `timeout`. What
    that request delivers after the fetch returned waits here for the next
    fetch, as in nats-py. Status messages name their request, so a late one
    ends nothing it should not.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self.nc = nc
        self.wire = Wire.of(nc)
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.requests = 0
        self.last_status = ""
        self._inbox = ""
        self._sub: Any = None
        self._buffer: collections.deque[Msg] = collections.deque()
        self._token = 0
        self._ended: set[int] = set()
        self._wake: asyncio.Future[None] | None = None

    async def _start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.wire.subscribe(f"{self._inbox}.*", self._on)

    def _on(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if not data and headers is not None:
            code = status_of(headers)
            if code:
                if code == "100":
                    return  # an idle heartbeat: the request lives
                token = subject.rpartition(b".")[2]
                if token.isdigit():
                    self._ended.add(int(token))
                if code not in ("404", "408"):
                    self.last_status = code  # 409: max waiting, consumer deleted, ...
                self._poke()
                return
        self._buffer.append(Msg(
            _client=self.nc, subject=subject.decode(), reply=reply.decode(), data=data,
            headers=parse_header_block(headers) if headers else None,
            _sid=self._sub._id if self._sub is not None else None))
        self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _ask(self, batch: int, expires_s: float | None) -> int:
        self._token += 1
        self.requests += 1
        req: dict[str, Any] = {"batch": batch}
        if expires_s is None:
            req["no_wait"] = True
        else:
            req["expires"] = max(1_000_000, int(expires_s * 1e9) - 100_000)
        await self.wire.publish(self.subject, json.dumps(req).encode(),
                                reply=f"{self._inbox}.{self._token}")
        return self._token

    async def _until(self, done: Callable[[], bool], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wake = loop.create_future()
            try:
                await asyncio.wait_for(self._wake, left)
            except TimeoutError:
                return
            finally:
                self._wake = None

    def _take(self, batch: int) -> list[Msg]:
        buf = self._buffer
        return [buf.popleft() for _ in range(min(batch, len(buf)))]

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages; TimeoutError when none came within `timeout`."""
        if self._sub is None:
            await self._start()
        if self._buffer:
            return self._take(batch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ended = self._ended
        token = await self._ask(batch, None)
        await self._until(lambda: token in ended or len(self._buffer) >= batch, deadline)
        if not self._buffer:
            left = deadline - loop.time()
            if left > 0.001:
                token = await self._ask(batch, left)
                await self._until(lambda: token in ended or bool(self._buffer), deadline)
        ended.clear()
        if not self._buffer:
            raise TimeoutError
        return self._take(batch)

    async def close(self) -> None:
        """Stop reading; what was delivered but not taken goes back at once."""
        sub, self._sub = self._sub, None
        if sub is not None:
            self.wire.unroute(sub._id)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        while self._buffer:
            with contextlib.suppress(Exception):
                await self._buffer.popleft().nak()
