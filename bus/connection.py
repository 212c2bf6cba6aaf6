"""The connection every component holds: NATS, JetStream, buckets, one publish helper."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from bus import codec, topology, tracing
from bus.server import ServerError, check_version
from bus.settings import Settings
from schemas.common import now
from schemas.fleet import DeadLetter

log = logging.getLogger(__name__)


def _tls_context(s: Settings) -> ssl.SSLContext | None:
    if not (s.nats_tls_ca or s.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=s.nats_tls_ca or None)
    if s.nats_tls_cert:
        ctx.load_cert_chain(s.nats_tls_cert, s.nats_tls_key or None)
    return ctx


class Bus:
    """One NATS connection with JetStream and the declared buckets."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, name: str) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        self.name = name
        self._kv: dict[str, KeyValue] = {}
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` after every reconnect (a request sent meanwhile may be lost)."""
        self._reconnect_hooks.append(hook)

    async def _reconnected(self) -> None:
        for hook in list(self._reconnect_hooks):
            try:
                await hook()
            except Exception:
                log.exception("reconnect hook failed")

    async def kv(self, bucket: str) -> KeyValue:
        kv = self._kv.get(bucket)
        if kv is None:
            kv = self._kv[bucket] = await self.js.key_value(bucket)
        return kv

    async def publish(
        self,
        subject: str,
        message: Any,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> PubAck:
        """The one JetStream publish: JSON body, `Nats-Msg-Id`, trace context."""
        hdrs = dict(headers or {})
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        body = message if isinstance(message, bytes) else codec.encode(message)
        if not tracing.enabled():
            return await self.js.publish(subject, body, headers=hdrs or None, timeout=timeout)
        with tracing.span(f"publish {subject.split('.')[0]}", kind=SpanKind.PRODUCER,
                          attributes=tracing.messaging_attrs(subject, "publish", msg_id)):
            tracing.inject(hdrs)
            return await self.js.publish(subject, body, headers=hdrs or None, timeout=timeout)

    async def signal(self, subject: str, message: Any = b"") -> None:
        """A core-NATS message (not persisted): doorbells and control nudges."""
        body = message if isinstance(message, bytes) else codec.encode(message)
        await self.nc.publish(subject, body)

    async def dead_letter(
        self,
        stream: str,
        subject: str,
        reason: str,
        raw: bytes,
        *,
        headers: dict[str, str] | None = None,
        stream_seq: int | None = None,
        consumer: str | None = None,
        deliveries: int | None = None,
        job_id: str | None = None,
    ) -> None:
        text, encoding = codec.raw_text(raw)
        letter = DeadLetter(
            subject=subject, reason=reason, stream=stream, stream_seq=stream_seq,
            consumer=consumer, deliveries=deliveries, raw=text, raw_encoding=encoding,
            headers={k: v for k, v in (headers or {}).items() if k != "Nats-Msg-Id"},
            job_id=job_id, ts=now(),
        )
        msg_id = f"dead.{stream}.{stream_seq}" if stream_seq is not None else None
        await self.publish(topology.dead_subject(stream), letter, msg_id=msg_id)
        log.warning("dead-lettered %s message on %s: %s", stream, subject, reason)

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


class ConnectError(ConnectionError):
    """No server answered at the URL within the connect timeout: a one-line reason."""


async def connect(
    settings: Settings | None = None,
    *,
    name: str = "jetfleet",
    url: str | None = None,
    apply_topology: bool = True,
    connect_timeout: float | None = None,
) -> Bus:
    """Connect, failing within `connect_timeout` when no server answers, then
    reconnect for ever with a short ping interval, so a long-running component
    rides out a server restart instead of closing."""
    s = settings or Settings.from_env()
    target = url or s.nats_url
    timeout = s.connect_timeout_s if connect_timeout is None else connect_timeout
    servers = [u.strip() for u in target.split(",") if u.strip()]
    # nats-py's first connect retries for minutes with its defaults (and for
    # ever with unlimited reconnects): bound it here, one quick try at a time.
    opts: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.1,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "connect_timeout": max(0.5, min(2.0, timeout)),
        "allow_reconnect": True,
    }
    if s.nats_creds:
        opts["user_credentials"] = s.nats_creds
    tls = _tls_context(s)
    if tls is not None:
        opts["tls"] = tls

    async def _on_error(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    async def _on_disconnect() -> None:
        log.info("nats: disconnected from %s", target)

    holder: list[Bus] = []

    async def _on_reconnect() -> None:
        log.info("nats: reconnected")
        if holder:
            asyncio.get_running_loop().create_task(holder[0]._reconnected())

    opts.update(error_cb=_on_error, disconnected_cb=_on_disconnect, reconnected_cb=_on_reconnect)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: BaseException | None = None
    nc: NATS | None = None
    while nc is None:
        try:
            nc = await asyncio.wait_for(nats.connect(**opts), max(0.5, deadline - loop.time()))
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            last = exc
            if _is_auth_error(exc) or loop.time() >= deadline:
                raise ConnectError(_connect_failure(target, timeout, exc)) from None
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
    del last
    # Connected: from now on reconnect for ever, quickly.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    version = nc.connected_server_version
    try:
        check_version((version.major, version.minor, version.patch), where=f"the server at {target}")
    except ServerError:
        await nc.close()
        raise
    js = nc.jetstream(timeout=10)
    bus = Bus(nc, js, s, name)
    holder.append(bus)
    if apply_topology:
        await topology.apply(js, s)
    return bus


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text or "permissions" in text


def _connect_failure(target: str, timeout: float, exc: BaseException) -> str:
    if _is_auth_error(exc):
        return (f"the NATS server at {target} refused our credentials ({exc}); check "
                "JETFLEET_NATS_CREDS or the credentials file")
    return (f"no NATS server answered at {target} within {timeout:g}s: start one with "
            "`jetfleet up` (then export the JETFLEET_NATS_URL it prints), or point --nats / "
            "JETFLEET_NATS_URL at a running server")
