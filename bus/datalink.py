"""A data link: one plain NATS connection of its own for an object's bytes.

nats-py reads through an asyncio stream and a parser that copy every payload
several times before it is handed over, and its writer joins each payload into
its pending buffer; for a large object that costs the client more than the
server. A data link speaks the same protocol on a blocking socket in a thread
of its own: a chunk's payload is received straight into the place it belongs
(`recv_into` the caller's buffer), a chunk is sent from the caller's memory
(`sendmsg` of the protocol line, the payload and its CRLF, no join), and the
SHA-256 runs in a second thread beside the socket (hashlib drops the GIL).

The link connects to the server the bus is connected to, as the bus's own
identity: the same URL credentials, `.creds` file or nkey seed (the nonce
signed here), and TLS when the server requires it or the settings configure
it. A link that cannot be opened is reported as LinkUnavailable and the caller
uses the bus's connection instead, so a data link is only ever a faster path,
never a new way to fail.

Every wait is bounded by the socket timeout: a server that stops answering is
an error within `stall_s`, never a hang, and closing the link (the caller's
task was cancelled) ends the thread's wait at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import ParseResult

from bus.settings import Settings

T = TypeVar("T")

CRLF = b"\r\n"
MAX_CONTROL_LINE = 64 << 10


class LinkUnavailable(Exception):
    """The link could not be opened (refused, auth, TLS): use the bus's connection."""


class LinkError(Exception):
    """The link broke or the server said -ERR while it was in use."""


class LinkStalled(LinkError):
    """No data from the server for the socket timeout."""


@dataclass(slots=True)
class Frame:
    """A MSG or HMSG whose payload is still on the socket."""

    subject: str
    headers: bytes  # the raw header block ("NATS/1.0 ...\r\n...\r\n\r\n"), b"" for MSG
    size: int       # payload bytes that follow

    def status(self) -> str:
        """The status code of a header block (`NATS/1.0 404 ...`), "" if none."""
        if not self.headers:
            return ""
        first = self.headers.split(CRLF, 1)[0].split(None, 2)
        return first[1].decode() if len(first) > 1 else ""

    def header(self, name: bytes) -> str | None:
        for line in self.headers.split(CRLF)[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == name.lower():
                return value.strip().decode()
        return None


class DataLink:
    """One blocking NATS connection, used from one operation's threads."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, info: dict[str, Any]) -> None:
        self.sock = sock
        self.info = info
        self.max_payload = int(info.get("max_payload", 1 << 20))
        self._buf = bytearray(MAX_CONTROL_LINE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._wlock = threading.Lock()
        self._sid = 0
        self.closed = False
        self._sendmsg = not isinstance(sock, ssl.SSLSocket)

    # ---- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, url: ParseResult, settings: Settings, *, timeout: float,
             name: str = "jetfleet-data") -> DataLink:
        host = url.hostname or "127.0.0.1"
        port = url.port or 4222
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise LinkUnavailable(f"connect {host}:{port}: {exc}") from None
        sock: socket.socket | ssl.SSLSocket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = cls(raw, {})
            info = link._read_info()
            ctx = _tls_context(settings)
            if info.get("tls_required") or url.scheme == "tls" or (
                    ctx is not None and info.get("tls_available")):
                if ctx is None:
                    ctx = ssl.create_default_context()
                sock = ctx.wrap_socket(raw, server_hostname=host)
                link = cls(sock, info)
            else:
                link.info = info
                link.max_payload = int(info.get("max_payload", 1 << 20))
            connect = {"verbose": False, "pedantic": False, "headers": True,
                       "no_responders": True, "protocol": 1, "lang": "python",
                       "version": "jetfleet", "name": name,
                       "tls_required": isinstance(sock, ssl.SSLSocket)}
            connect.update(_auth(url, settings, str(info.get("nonce", ""))))
            link.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            while True:
                line = link._line()
                if line == b"PONG":
                    return link
                if line.startswith(b"-ERR"):
                    raise LinkUnavailable(line.decode(errors="replace"))
        except LinkUnavailable:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        except (OSError, ValueError, LinkError) as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise LinkUnavailable(f"{type(exc).__name__}: {exc}") from None

    def _read_info(self) -> dict[str, Any]:
        line = self._line()
        if not line.startswith(b"INFO "):
            raise LinkUnavailable(f"not a NATS server: {line[:80]!r}")
        info: dict[str, Any] = json.loads(line[5:])
        return info

    # ---- writing -------------------------------------------------------------------------

    def write(self, *parts: bytes | memoryview) -> None:
        """Write the parts as one frame (no other writer between them)."""
        with self._wlock:
            if self._sendmsg and len(parts) > 1:
                _sendmsg_all(self.sock, list(parts))
            else:
                for part in parts:
                    self.sock.sendall(part)

    def subscribe(self, subject: str) -> int:
        self._sid += 1
        self.write(f"SUB {subject} {self._sid}\r\n".encode())
        return self._sid

    def publish(self, subject: str, payload: bytes | memoryview, *, reply: str = "",
                headers: bytes = b"") -> None:
        n = memoryview(payload).nbytes
        if headers:
            line = f"HPUB {subject} {reply} {len(headers)} {len(headers) + n}\r\n".encode()
            self.write(line, headers, payload, CRLF)
        else:
            line = f"PUB {subject} {reply} {n}\r\n".encode()
            self.write(line, payload, CRLF)

    # ---- reading ---------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise LinkError("a protocol line longer than 64 KiB")
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start:self._end]
            self._start, self._end = 0, rest
        self._end += self._recv_into(self._view[self._end:])

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view)
        except TimeoutError:
            raise LinkStalled("no data from the server") from None
        except OSError as exc:
            raise LinkError(f"reading failed: {exc}") from None
        if n == 0:
            raise LinkError("the server closed the connection")
        return n

    def _line(self) -> bytes:
        while True:
            at = self._buf.find(CRLF, self._start, self._end)
            if at >= 0:
                line = bytes(self._buf[self._start:at])
                self._start = at + 2
                return line
            self._fill()

    def line(self) -> bytes:
        """The next protocol line, without its CRLF."""
        return self._line()

    def buffered(self) -> int:
        """Bytes received and not yet consumed: 0 means the next read waits on the socket."""
        return self._end - self._start

    def read_into(self, dest: memoryview) -> None:
        """Exactly len(dest) payload bytes into `dest`: what is buffered first,
        the rest straight from the socket."""
        want = dest.nbytes
        have = min(want, self._end - self._start)
        if have:
            dest[:have] = self._view[self._start:self._start + have]
            self._start += have
        pos = have
        while pos < want:
            pos += self._recv_into(dest[pos:])

    def read_bytes(self, n: int) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def end_payload(self) -> None:
        while self._end - self._start < 2:
            self._fill()
        if self._buf[self._start:self._start + 2] != CRLF:
            raise LinkError("a payload not followed by CRLF")
        self._start += 2

    def skip(self, n: int) -> None:
        while n:
            if self._start == self._end:
                self._fill()
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def frame(self) -> Frame:
        """The next MSG or HMSG; PINGs are answered, other control lines passed by."""
        while True:
            got = self.frame_or_pong()
            if got is not None:
                return got

    def frame_or_pong(self) -> Frame | None:
        """The next MSG or HMSG, or None for a PONG (the answer to our PING)."""
        while True:
            line = self._line()
            if line.startswith(b"HMSG ") or line.startswith(b"MSG "):
                parts = line.split()
                subject = parts[1].decode()
                if parts[0] == b"HMSG":
                    hlen, total = int(parts[-2]), int(parts[-1])
                    headers = self.read_bytes(hlen)
                    return Frame(subject, headers, total - hlen)
                return Frame(subject, b"", int(parts[-1]))
            if line == b"PONG":
                return None
            if line == b"PING":
                self.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise LinkError(line[4:].strip().decode(errors="replace").strip("'"))
            # +OK and INFO need nothing.

    def close(self) -> None:
        """Close the socket; a thread blocked on it returns with LinkError."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def _sendmsg_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
    return ctx


def _auth(url: ParseResult, settings: Settings, nonce: str) -> dict[str, Any]:
    """The CONNECT fields that prove the bus's identity: URL user/password or
    token, or the nonce signed with the .creds file's (or the seed file's) nkey."""
    out: dict[str, Any] = {}
    if url.username and url.password is not None:
        out.update(user=url.username, **{"pass": url.password})
    elif url.username:
        out["auth_token"] = url.username
    if not settings.nats_creds:
        return out
    import nkeys

    text = open(settings.nats_creds, "rb").read()
    jwt, seed = _creds_parts(text)
    if seed is None:
        raise LinkUnavailable(f"{settings.nats_creds}: no nkey seed")
    kp = nkeys.from_seed(bytearray(seed))
    if nonce:
        out["sig"] = base64.urlsafe_b64encode(kp.sign(nonce.encode())).decode().rstrip("=")
    if jwt is not None:
        out["jwt"] = jwt.decode()
    else:
        out["nkey"] = kp.public_key.decode()
    return out


def _creds_parts(text: bytes) -> tuple[bytes | None, bytes | None]:
    """(user JWT, nkey seed) of a .creds file; (None, seed) for a bare seed file."""
    stripped = text.strip()
    if stripped.startswith(b"SU") and b"\n" not in stripped:
        return None, stripped
    jwt = seed = None
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith(b"-----BEGIN") and i + 1 < len(lines):
            if b"JWT" in ln:
                jwt = lines[i + 1]
            elif b"SEED" in ln:
                seed = lines[i + 1]
    return jwt, seed


# ---- running a link's work off the event loop --------------------------------------------


async def in_thread(link: DataLink, work: Callable[[], T]) -> T:
    """Run `work` (which uses `link`) in a thread of its own; if the awaiting
    task is cancelled the link is closed, so the thread ends at once."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            value = work()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, False, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, True, value)

    thread = threading.Thread(target=run, name="jetfleet-data-link", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        link.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(fut), 5)
        raise


class Digester:
    """SHA-256 of views handed over in order, computed in a thread of its own
    while the caller goes on receiving; `after` (if given) is called with each
    view once hashed (a file writer, or a buffer pool taking it back)."""

    def __init__(self, hasher: Any, after: Callable[[memoryview], None] | None = None) -> None:
        self.hasher = hasher
        self.after = after
        self._q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jetfleet-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            view = self._q.get()
            if view is None:
                return
            if self.error is not None:
                continue
            try:
                self.hasher.update(view)
                if self.after is not None:
                    self.after(view)
            except BaseException as exc:
                self.error = exc

    def add(self, view: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(view)

    def finish(self) -> Any:
        self._q.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.hasher

    def abandon(self) -> None:
        self._q.put(None)


def pieces_of_file(path: str | os.PathLike[str], size: int) -> Iterator[memoryview]:
    """A file in pieces of `size`, read into one reused buffer (each piece is
    sent before the next is read)."""
    buf = bytearray(size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return
            yield view[:n]
