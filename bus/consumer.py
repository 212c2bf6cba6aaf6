"""The one consumer loop: pull, decode strictly, run with in-progress acks, settle;
and the one follower of a stream (`Follower`), for readers that want every message
in order without a durable consumer.

A handler settles a delivery by returning (ack), raising `Retry` (nak with a
delay), raising `Reject` (terminate and dead-letter with the reason), or
raising anything else (nak with exponential backoff; once deliveries run out
the MAX_DELIVERIES advisory dead-letters it). A message that fails to decode
is terminated and dead-lettered at once: it can never succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus import codec, topology
from bus.connection import Bus
from bus.pull import Fetcher
from bus.wire import Wire

log = logging.getLogger(__name__)
T = TypeVar("T")


class Retry(Exception):
    """Settle with a NAK: redeliver after `delay` seconds."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = delay


class Abandon(Exception):
    """Settle with nothing: the message now belongs to another delivery (a newer
    attempt elsewhere), and acking this stale one would delete it under them."""


class Reject(Exception):
    """Settle with TERM and record the message on DEAD with `reason`."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff for the n-th failed attempt (1-based)."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


@dataclass
class Delivery(Generic[T]):
    """A fetched message, its decoded body and its delivery metadata."""

    msg: Msg
    data: T
    stream: str
    consumer: str
    settled: bool = field(default=False)

    @property
    def headers(self) -> dict[str, str]:
        return text_headers(self.msg.headers)

    @property
    def num_delivered(self) -> int:
        return _ack_tokens(self.msg)[0]

    @property
    def stream_seq(self) -> int:
        return _ack_tokens(self.msg)[1]

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await ack(self.msg)

    async def nak(self, delay: float | None = None) -> None:
        if not self.settled:
            self.settled = True
            await self.msg.nak(delay=delay if delay else None)

    async def term(self) -> None:
        if not self.settled:
            self.settled = True
            await self.msg.term()

    @contextlib.asynccontextmanager
    async def keepalive(self, interval: float) -> AsyncIterator[None]:
        """Send in-progress acks every `interval` s while the body runs.

        A timer, not a task: most bodies end before the first beat, and a
        timer costs next to nothing to set and cancel.
        """
        beat = _Beat(self, interval)
        try:
            yield
        finally:
            beat.cancel()


class _Beat:
    """The keepalive's timer. An object rather than a closure that re-arms
    itself: such a closure refers to itself through its own cell, and every
    delivery would then leave a reference cycle for the garbage collector."""

    __slots__ = ("delivery", "handle", "interval")

    def __init__(self, delivery: Delivery[Any], interval: float) -> None:
        self.delivery, self.interval = delivery, interval
        self.handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            interval, self.beat)

    def beat(self) -> None:
        if self.delivery.settled or self.handle is None:
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.delivery.msg.in_progress())
        task.add_done_callback(_ignore_result)
        self.handle = loop.call_later(self.interval, self.beat)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _ack_tokens(msg: Msg) -> tuple[int, int]:
    """(times delivered, stream sequence) read from the ack subject by hand
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`, or the form with
    domain and account hash); nats-py's metadata builds dataclasses and a
    datetime."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[6]), int(tokens[7])
    meta = msg.metadata
    return int(meta.num_delivered), int(meta.sequence.stream)


async def ack(msg: Msg) -> None:
    """Acknowledge a JetStream message, the lean way where the connection has it."""
    if msg._ackd or not msg.reply:
        return
    msg._ackd = True
    await Wire.of(msg._client).publish(msg.reply, b"+ACK")


def text_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    """Headers as plain strings: nats-py's stream-message get hands a non-ASCII
    value back as an `email.header.Header`, which no encoder takes (a dead
    letter carrying one could not be published, and its message stayed)."""
    return {str(k): str(v) for k, v in (headers or {}).items()}


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so a failed beat is not reported as unhandled


async def decode_or_dead_letter(bus: Bus, msg: Msg, stream: str, consumer: str,
                                type_: type[T]) -> Delivery[T] | None:
    """Decode strictly; on failure terminate and dead-letter with the reason.

    `type_` bytes hands the raw body to a handler that decodes it itself.
    """
    if type_ is bytes:
        return Delivery(msg=msg, data=msg.data, stream=stream, consumer=consumer)  # type: ignore[arg-type]
    try:
        data = codec.decode(msg.data, type_)
    except codec.DecodeError as exc:
        seq = msg.metadata.sequence.stream if msg.reply else None
        await bus.dead_letter(stream, msg.subject, exc.reason, msg.data,
                              headers=text_headers(msg.headers), stream_seq=seq,
                              consumer=consumer)
        with contextlib.suppress(Exception):
            await msg.term()
        return None
    return Delivery(msg=msg, data=data, stream=stream, consumer=consumer)


async def settle(bus: Bus, delivery: Delivery[Any], handler: Callable[[Delivery[Any]], Awaitable[None]],
                 keepalive_s: float) -> None:
    """Run `handler` under in-progress acks and settle the delivery by how it ended."""
    try:
        async with delivery.keepalive(keepalive_s):
            await handler(delivery)
        await delivery.ack()
    except Retry as r:
        await delivery.nak(r.delay)
    except Abandon:
        delivery.settled = True
    except Reject as r:
        await bus.dead_letter(delivery.stream, delivery.msg.subject, r.reason, delivery.msg.data,
                              headers=delivery.headers, stream_seq=delivery.stream_seq,
                              consumer=delivery.consumer, deliveries=delivery.num_delivered,
                              job_id=r.job_id)
        await delivery.term()
    except asyncio.CancelledError:
        # Shutting down mid-handler: let the server redeliver it at once.
        with contextlib.suppress(Exception):
            await delivery.nak()
        raise
    except Exception:
        delay = backoff(delivery.num_delivered)
        log.exception("handler failed on %s (delivery %d); retry in %.1fs",
                      delivery.msg.subject, delivery.num_delivered, delay)
        with contextlib.suppress(Exception):
            await delivery.nak(delay)


class ConsumerLoop(Generic[T]):
    """Pull from one durable consumer with bounded concurrency."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        config: ConsumerConfig,
        type_: type[T],
        handler: Callable[[Delivery[T]], Awaitable[None]],
        *,
        concurrency: int = 16,
        batch: int = 64,
        keepalive_s: float | None = None,
    ) -> None:
        assert config.durable_name
        self.bus = bus
        self.stream = stream
        self.config = config
        self.type_ = type_
        self.handler = handler
        self.concurrency = concurrency
        self.batch = batch
        ack_wait = config.ack_wait or 30.0
        self.keepalive_s = keepalive_s or max(0.5, ack_wait / 3)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await topology.ensure_consumer(self.bus.js, self.stream, self.config)
        fetcher = Fetcher(self.bus.nc, self.stream, self.config.durable_name or "")
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await fetcher.fetch(min(free, self.batch), timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.errors.Error as exc:
                    log.warning("fetch from %s failed: %s", self.config.durable_name, exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._one(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self.drain()
            await fetcher.close()

    async def _one(self, msg: Msg) -> None:
        delivery = await decode_or_dead_letter(
            self.bus, msg, self.stream, self.config.durable_name or "", self.type_)
        if delivery is not None:
            await settle(self.bus, delivery, self.handler, self.keepalive_s)

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self, timeout: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


class DeadLetterReaper:
    """Moves messages that exhausted MaxDeliver onto DEAD (via the server advisory).

    Several reapers may run (one per dispatcher); a queue group makes each
    advisory handled once. `on_dead` lets the owner react (e.g. mark a job dead).
    """

    def __init__(self, bus: Bus,
                 on_dead: Callable[[str, int, bytes, dict[str, str]], Awaitable[None]] | None = None
                 ) -> None:
        self.bus = bus
        self.on_dead = on_dead
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(
            topology.MAX_DELIVERIES_ADVISORY, queue="jetfleet-dead-letter", cb=self._handle)

    async def _handle(self, msg: Msg) -> None:
        try:
            adv = codec.decode(msg.data, dict[str, Any])
            stream, seq = str(adv["stream"]), int(adv["stream_seq"])
            consumer, deliveries = str(adv.get("consumer", "")), int(adv.get("deliveries", 0))
            raw = await self.bus.js.get_msg(stream, seq)
        except Exception as exc:  # the message may already be gone: nothing to move
            log.warning("max-deliveries advisory not handled: %s", exc)
            return
        headers = text_headers(raw.headers)
        await self.bus.dead_letter(stream, raw.subject or "", f"max deliveries exhausted ({deliveries})",
                                   raw.data or b"", headers=headers, stream_seq=seq,
                                   consumer=consumer, deliveries=deliveries)
        if self.on_dead is not None:
            await self.on_dead(stream, seq, raw.data or b"", headers)
        with contextlib.suppress(Exception):
            await self.bus.js.delete_msg(stream, seq)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class Follower:
    """What a stream stores on `subject`, in order, from the first message (or
    from the one after `after_seq`), through an ordered push consumer.

    The consumer is made afresh from the message after the last one read when
    the connection came back (a restarted server forgot it), and when it has
    been quiet for `quiet_s` while the stream holds a newer message on the
    subject (its server died in a cluster, or it stalled: nats.py #510). On its
    own, nats.py re-creates a stalled ordered consumer only after two missed
    idle heartbeats, 10 to 20 s after a restart as measured here.
    """

    def __init__(self, bus: Bus, subject: str, *, after_seq: int = 0,
                 quiet_s: float = 2.0) -> None:
        self.bus = bus
        self.subject = subject
        self.last_seq = after_seq
        self.quiet_s = quiet_s
        self.resubscribed = 0
        self._sub: Any = None
        self._stream: str | None = None
        self._reconnects = -1
        self._heard = 0.0
        self._quiet = quiet_s

    async def _subscribe(self) -> None:
        await self._drop()
        loop = asyncio.get_running_loop()
        self._reconnects = int(self.bus.nc.stats.get("reconnects", 0))
        if self.last_seq:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=self.last_seq + 1)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._sub = await self.bus.js.subscribe(self.subject, ordered_consumer=True,
                                                config=config, pending_msgs_limit=1 << 20,
                                                pending_bytes_limit=1 << 30)
        self._heard = loop.time()

    async def _drop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _behind(self) -> bool:
        """Whether the stream holds a message on the subject newer than the last read."""
        if self._stream is None:
            self._stream = await self.bus.js.find_stream_name_by_subject(self.subject)
        try:
            raw = await self.bus.js.get_last_msg(self._stream, self.subject)
        except NotFoundError:
            return False
        return int(raw.seq or 0) > self.last_seq

    async def next(self, timeout: float) -> Msg:
        """The next message; TimeoutError when none came within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"nothing on {self.subject} within {timeout:g}s")
            reconnected = int(self.bus.nc.stats.get("reconnects", 0)) != self._reconnects
            if self._sub is None or (reconnected and self.bus.nc.is_connected):
                if self._sub is not None:
                    self.resubscribed += 1
                try:
                    await self._subscribe()
                except (nats.errors.Error, TimeoutError) as exc:
                    log.debug("following %s: %s; trying again", self.subject, exc)
                    await asyncio.sleep(min(left, 0.2))
                    continue
            try:
                msg: Msg = await self._sub.next_msg(timeout=min(left, 0.5))
            except (TimeoutError, nats.errors.TimeoutError):
                if loop.time() - self._heard >= self._quiet and self.bus.nc.is_connected:
                    self._heard = loop.time()  # look again after another quiet spell
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        if await self._behind():
                            log.info("following %s: quiet with newer messages stored; "
                                     "re-subscribing", self.subject)
                            self.resubscribed += 1
                            await self._drop()
                        else:
                            # Idle, not stalled: look less often the longer it lasts.
                            self._quiet = min(self._quiet * 2, 10 * self.quiet_s)
                continue
            self._heard, self._quiet = loop.time(), self.quiet_s
            seq = int(msg.metadata.sequence.stream)
            if seq <= self.last_seq:
                continue  # a re-made consumer may repeat what raced the switch
            self.last_seq = seq
            return msg

    async def close(self) -> None:
        await self._drop()
