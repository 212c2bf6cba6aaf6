"""The connection every component holds: NATS, JetStream, buckets, one publish helper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from bus import codec, topology, tracing
from bus.credentials import CredentialsError, Identity, loose_mode, read_identity
from bus.publisher import Publisher
from bus.security import APPLIES_TOPOLOGY, COMPONENT_ROLES, ROLES
from bus.server import ServerError, check_version
from bus.settings import Settings
from bus.wire import Wire
from schemas.common import now
from schemas.fleet import DeadLetter

log = logging.getLogger(__name__)


class _QuietSslEof(logging.Filter):
    """asyncio warns on every TLS connection nats-py closes ("returning true from
    eof_received() has no effect when using ssl"): nothing anyone can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


def _tls_context(s: Settings) -> ssl.SSLContext | None:
    if not (s.nats_tls_ca or s.nats_tls_cert):
        return None
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietSslEof) for f in asyncio_log.filters):
        asyncio_log.addFilter(_QuietSslEof())
    ctx = ssl.create_default_context(cafile=s.nats_tls_ca or None)
    if s.nats_tls_cert:
        ctx.load_cert_chain(s.nats_tls_cert, s.nats_tls_key or None)
    return ctx


class Bus:
    """One NATS connection with JetStream and the declared buckets."""

    def __init__(self, nc: NATS, js: JetStreamContext, settings: Settings, name: str,
                 identity: Identity | None = None, denials: Denials | None = None) -> None:
        self.nc = nc
        self.js = js
        self.settings = settings
        self.name = name
        # Who the credentials say we are (None: no credentials), and what the server refused.
        self.identity = identity
        self.denials = denials or Denials(name, identity)
        # The lean JetStream publish every hot path uses (bus.publisher).
        self.publisher = Publisher(nc, self.denials.futures)
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
            return await self.publisher.publish(subject, body, hdrs, timeout)
        with tracing.span(f"publish {subject.split('.')[0]}", kind=SpanKind.PRODUCER,
                          attributes=tracing.messaging_attrs(subject, "publish", msg_id)):
            tracing.inject(hdrs)
            return await self.js.publish(subject, body, headers=hdrs or None, timeout=timeout)

    async def signal(self, subject: str, message: Any = b"") -> None:
        """A core-NATS message (not persisted): doorbells and control nudges."""
        body = message if isinstance(message, bytes) else codec.encode(message)
        await self.publisher.wire.publish(subject, body)

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
        await self.publisher.close()
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


class ConnectError(ConnectionError):
    """No server answered at the URL within the connect timeout: a one-line reason."""


class PermissionDenied(ConnectError):
    """The server refused this connection's user an action (its role does not allow it)."""

    def __init__(self, who: str, action: str, subject: str) -> None:
        super().__init__(f"{who} may not {action} {subject!r}: the NATS server refused it "
                         "(the role's permissions: docs/security.md)")
        self.action = action
        self.subject = subject


# nats-py passes the server's -ERR on: 'Permissions Violation for Publish to "x"'.
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)
# The exit status of a component refused at start (sysexits' EX_NOPERM).
EXIT_DENIED = 77


def parse_violation(text: str) -> tuple[str, str] | None:
    """('publish to' | 'subscribe to', subject) from a permissions-violation error."""
    found = _VIOLATION.search(text)
    if found is None:
        return None
    return ("publish to" if found.group(1).lower() == "publish" else "subscribe to",
            found.group(2))


class Denials:
    """What the server refused on one connection.

    Each refusal is logged as one line naming the subject and the role (again
    for the same subject at most once a minute). A refused request would only
    time out, so the subject of every request is remembered and a refusal
    fails the requests waiting on that subject at once with PermissionDenied.
    A component (its role in COMPONENT_ROLES) refused within `exit_within_s` of
    connecting has credentials that do not fit what it does: it exits with
    EXIT_DENIED instead of retrying.
    """

    REMEMBER = 1024
    LOG_EVERY_S = 60.0

    def __init__(self, name: str, identity: Identity | None, exit_within_s: float = 0.0) -> None:
        role = identity.role if identity else ""
        self.who = (f"role {role} ({identity.name})" if identity and identity.name != role
                    else f"role {role}" if role else name)
        self.components = role in COMPONENT_ROLES
        self.exit_within_s = exit_within_s if self.components else 0.0
        self.count = 0
        self.last: PermissionDenied | None = None
        self._logged: dict[tuple[str, str], float] = {}
        self._replies: dict[str, str] = {}  # reply inbox -> subject, the latest requests
        # nats-py lower-cases the server's error line: the subjects as we spelled them.
        self._spelled: dict[str, str] = {}
        self._nc: NATS | None = None
        self._since = time.monotonic()
        # Futures of publishes awaiting their ack, by reply subject (bus.publisher).
        self.futures: dict[str, asyncio.Future[Any]] = {}

    def attach(self, nc: NATS) -> None:
        """Remember the subject of each request `nc` sends (a wrapper around its publish)."""
        self._nc, self._since = nc, time.monotonic()
        original, original_sub = nc.publish, nc.subscribe
        replies, spelled = self._replies, self._spelled

        def remember(table: dict[str, str], key: str, value: str) -> None:
            table[key] = value
            if len(table) > self.REMEMBER:
                del table[next(iter(table))]

        async def publish(subject: str, payload: bytes = b"", reply: str = "",
                          headers: dict[str, str] | None = None) -> None:
            if reply:
                remember(replies, reply, subject)
            else:
                remember(spelled, subject.lower(), subject)
            await original(subject, payload, reply, headers)

        # The lean path (bus.wire) tells the same tables what it sends.
        wire = Wire.of(nc)
        wire.on_request = lambda reply, subject: remember(replies, reply, subject)
        wire.on_publish = lambda subject: remember(spelled, subject.lower(), subject)

        async def subscribe(subject: str, *args: Any, **kwargs: Any) -> Any:
            remember(spelled, subject.lower(), subject)
            return await original_sub(subject, *args, **kwargs)

        # Methods of this one client (nats-py calls them through self).
        setattr(nc, "publish", publish)  # noqa: B010
        setattr(nc, "subscribe", subscribe)  # noqa: B010

    def note(self, action: str, said: str) -> PermissionDenied:
        """The server refused `action` on `said` (the subject as nats-py reports it)."""
        key = said.lower()
        requests = [r for r, subj in self._replies.items() if subj.lower() == key]
        subject = (self._replies[requests[0]] if requests else self._spelled.get(key, said))
        exc = PermissionDenied(self.who, action, subject)
        self.count += 1
        self.last = exc
        t = time.monotonic()
        if self.exit_within_s and t - self._since <= self.exit_within_s:
            log.critical("permission denied: %s; exiting, since these credentials do not "
                         "fit this component (issue the right ones with `jetfleet creds`)", exc)
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(EXIT_DENIED)
        failed = self._fail_requests(requests, exc) if action == "publish to" else 0
        # A client's refused request raises with this very line: no need to log it too.
        told = failed > 0 and not self.components
        logged = (action, key)
        if not told and t - self._logged.get(logged, -self.LOG_EVERY_S) >= self.LOG_EVERY_S:
            self._logged[logged] = t
            log.error("permission denied: %s", exc)
        return exc

    def _fail_requests(self, replies: list[str], exc: PermissionDenied) -> int:
        """Fail at once the requests sent to the refused subject (they would time out);
        returns how many."""
        nc = self._nc
        prefix = bytes(getattr(nc, "_resp_sub_prefix", None) or b"").decode()
        waiting: dict[str, asyncio.Future[Any]] = getattr(nc, "_resp_map", None) or {}
        failed = 0
        for reply in replies:
            del self._replies[reply]
            future = waiting.get(reply.removeprefix(prefix)) if prefix else None
            if future is None:  # sent by the lean publisher (bus.publisher)?
                future = self.futures.get(reply)
            if future is not None and not future.done():
                future.set_exception(PermissionDenied(self.who, exc.action, exc.subject))
                failed += 1
        return failed


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
    identity = _authenticate(s, opts)
    tls = _tls_context(s)
    if tls is not None:
        opts["tls"] = tls
    denials = Denials(name, identity, exit_within_s=s.deny_exit_s)

    loop = asyncio.get_running_loop()
    # A refusal of our credentials or a failed TLS handshake while connecting comes
    # through the error callback: it ends the first connect at once, with its reason.
    hopeless: asyncio.Future[BaseException] = loop.create_future()

    async def _on_error(exc: Exception) -> None:
        refused = parse_violation(str(exc))
        if refused is not None:
            denials.note(*refused)
        elif not holder and (_is_auth_error(exc) or _is_tls_error(exc)):
            if not hopeless.done():
                hopeless.set_result(exc)
        else:
            log.debug("nats: %s", exc)

    async def _on_disconnect() -> None:
        log.info("nats: disconnected from %s", target)

    holder: list[Bus] = []

    async def _on_reconnect() -> None:
        log.info("nats: reconnected")
        if holder:
            asyncio.get_running_loop().create_task(holder[0]._reconnected())

    opts.update(error_cb=_on_error, disconnected_cb=_on_disconnect, reconnected_cb=_on_reconnect)
    deadline = loop.time() + timeout
    nc: NATS | None = None
    while nc is None:
        attempt = asyncio.ensure_future(nats.connect(**opts))
        either: set[asyncio.Future[Any]] = {attempt, hopeless}
        await asyncio.wait(either, timeout=max(0.5, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            exc: BaseException = hopeless.result() if hopeless.done() else TimeoutError()
        else:
            try:
                nc = attempt.result()
                break
            except (OSError, TimeoutError, nats.errors.Error) as failed:
                exc = failed
        if hopeless.done() or _is_auth_error(exc) or _is_tls_error(exc) or (
                loop.time() >= deadline):
            raise ConnectError(_connect_failure(target, timeout, exc)) from None
        await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
    # Connected: from now on reconnect for ever, quickly.
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    version = nc.connected_server_version
    try:
        check_version((version.major, version.minor, version.patch), where=f"the server at {target}")
    except ServerError:
        await nc.close()
        raise
    if (identity is not None and identity.role != "admin") or "@" in target:
        # Only a user with limited permissions can be refused: the others pay nothing.
        denials.attach(nc)
    js = nc.jetstream(timeout=10)
    bus = Bus(nc, js, s, name, identity, denials)
    holder.append(bus)
    if apply_topology:
        try:
            if identity is None or identity.role in APPLIES_TOPOLOGY or identity.role not in ROLES:
                await topology.apply(js, s)
            else:
                # Other roles may not declare streams: the dispatcher or an admin does.
                await _topology_present(js, identity, target, timeout)
        except BaseException:
            await nc.close()
            raise
    return bus


def _authenticate(s: Settings, opts: dict[str, Any]) -> Identity | None:
    """Credentials into the connect options: a .creds file (user JWT and nkey seed),
    or a file holding only an nkey seed. Each user has its own inbox prefix."""
    if not s.nats_creds:
        return None
    path = s.nats_creds
    loose = loose_mode(path)
    if loose:
        log.warning("credentials file %s can be read by other users (%s): chmod 600 it", path,
                    loose)
    try:
        head = open(path, "rb").read(4096)
    except OSError as exc:
        raise ConnectError(f"credentials file {path}: {exc.strerror or exc}") from None
    if head.strip().startswith(b"SU") and b"\n" not in head.strip():
        import nkeys

        try:
            user = nkeys.from_seed(bytearray(head.strip())).public_key.decode()
        except Exception:
            raise ConnectError(f"{path} is neither a NATS credentials file nor an nkey seed"
                               ) from None
        opts["nkeys_seed"] = path
        return Identity(user=user, name=user, role="", node=None, expires=None)
    try:
        identity = read_identity(path)
    except CredentialsError as exc:
        raise ConnectError(str(exc)) from None
    if identity.expires is not None and identity.expires < time.time():
        raise ConnectError(f"credentials file {path} ({identity.name}) expired: issue a new "
                           "one with `jetfleet creds`")
    opts["user_credentials"] = path
    opts["inbox_prefix"] = identity.inbox_prefix
    return identity


async def _topology_present(js: JetStreamContext, identity: Identity, target: str,
                            timeout: float) -> None:
    """The fleet's streams exist (a forming cluster is waited out, within `timeout`)."""
    from nats.js.errors import NotFoundError, ServiceUnavailableError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(timeout, 5.0)
    while True:
        try:
            await js.stream_info(topology.JOBS)
            return
        except NotFoundError:
            raise ConnectError(
                f"the fleet's streams do not exist on {target} yet, and role {identity.role} "
                "may not declare them: start the dispatcher (or `jetfleet up`) first") from None
        except (ServiceUnavailableError, nats.errors.TimeoutError, TimeoutError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.5)


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text or "permissions" in text


def _is_tls_error(exc: BaseException) -> bool:
    # nats-py without a TLS context meets a server that requires TLS: "invalid hostname".
    text = str(exc).lower()
    return isinstance(exc, ssl.SSLError) or any(
        w in text for w in ("certificate", "ssl", "tls", "invalid hostname"))


def _connect_failure(target: str, timeout: float, exc: BaseException) -> str:
    if _is_tls_error(exc):
        return (f"TLS with the NATS server at {target} failed ({getattr(exc, 'reason', exc)}): "
                "a server with TLS needs JETFLEET_NATS_TLS_CA, the CA that signed its "
                "certificate")
    if _is_auth_error(exc):
        return (f"the NATS server at {target} refused our credentials ({exc}); check "
                "JETFLEET_NATS_CREDS (a credentials file of this fleet: `jetfleet creds`)")
    return (f"no NATS server answered at {target} within {timeout:g}s: start one with "
            "`jetfleet up` (then export the JETFLEET_NATS_URL it prints), or point --nats / "
            "JETFLEET_NATS_URL at a running server")
