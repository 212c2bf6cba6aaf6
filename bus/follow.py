"""Follow a stream in order from a sequence on, over a data link of its own.

The query service reads every event and sample the fleet publishes. Through
nats-py each message costs the event loop its parser, a Msg with parsed
headers, an ordered consumer's sequence bookkeeping, a queue and a callback:
about 13 us a message in the query service at a few thousand jobs a second,
more than decoding and applying the message itself. A follower reads instead
on a blocking socket in a thread (bus.datalink, as the process's own bus
identity): it pulls from an ephemeral consumer of its own (no acks: the
caller's applied position is the only position), splits the frames, reads
sequence, time and pending count from each ack subject, and hands the event
loop whole chunks of `(seq, ts, pending, subject, data)`.

Order and completeness: one consumer, one link, pulled in order, so a chunk
continues the last one. A consumer sequence that skips (which no healthy
consumer does), a 409 from the server, a stall past three idle heartbeats or
a broken link ends the round; the next one creates a consumer from just after
the last sequence the caller was handed. The caller drops what it already has
(`seq <= applied`), so a round that starts early applies nothing twice.

Back-pressure: new pull requests are made only while the caller says there is
room (`pause()` / `resume()`). What the thread asked for before it saw the
pause still arrives (two requests at most are outstanding at any time).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bus import topology
from bus.connection import Bus
from bus.datalink import DataLink, LinkError, LinkUnavailable, in_thread

log = logging.getLogger(__name__)

Delivered = tuple[int, float, int, str, bytes]  # seq, stream time (s), pending, subject, data
OnChunk = Callable[[list[Delivered]], None]

BATCH = 2048
HEARTBEAT_S = 2.0


class FollowError(Exception):
    """The server refused the consumer or its requests (a permission, a missing stream)."""


class LinkFollower:
    def __init__(self, bus: Bus, stream: str, subject: str, on_chunk: OnChunk, *,
                 start: int, batch: int = BATCH, heartbeat_s: float = HEARTBEAT_S,
                 name: str = "jetfleet-follow") -> None:
        self.bus = bus
        self.stream = stream
        self.subject = subject
        self.on_chunk = on_chunk
        self.next = max(1, start)  # the first sequence not yet handed over
        self.batch = batch
        self.heartbeat_s = heartbeat_s
        self.name = name
        self.rounds = 0
        self.handed = 0
        self._room = threading.Event()
        self._room.set()
        self._stop = threading.Event()
        self._link: DataLink | None = None

    # ---- the caller's side (event loop) -------------------------------------------------

    def pause(self) -> None:
        self._room.clear()

    def resume(self) -> None:
        self._room.set()

    def stop(self) -> None:
        self._stop.set()
        self._room.set()
        link = self._link
        if link is not None:
            link.close()

    async def run(self) -> None:
        """Follow until stopped. LinkUnavailable when the first link cannot be
        opened, or the server says this role may not create or pull from the
        consumer (the caller then reads through nats-py instead); anything else
        is retried in a new round."""
        loop = asyncio.get_running_loop()
        delay = 0.1
        first = True
        try:
            while not self._stop.is_set():
                url = self.bus.nc.connected_url
                if url is None or not self.bus.nc.is_connected:
                    await asyncio.sleep(0.2)
                    continue
                inbox = self.bus.nc.new_inbox()
                start = self.next
                try:
                    link = await asyncio.to_thread(DataLink.open, url, self.bus.settings,
                                                   timeout=5.0, name=self.name)
                except LinkUnavailable as exc:
                    if first:
                        raise
                    log.info("%s: no link yet (%s); trying again", self.stream, exc)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
                first = False
                self._link = link
                self.rounds += 1
                try:
                    await in_thread(link, functools.partial(self._round, link, loop, inbox, start))
                except (LinkError, FollowError, OSError, ValueError) as exc:
                    if self._stop.is_set():
                        break
                    if "Permissions Violation" in str(exc):
                        # This role may not create or pull from such a consumer:
                        # no later round does better, so let the caller read
                        # another way rather than retry for ever.
                        raise LinkUnavailable(f"following {self.stream}: {exc}") from None
                    log.info("following %s from %d: %s; starting again from %d",
                             self.stream, start, exc, self.next)
                else:
                    delay = 0.1
                finally:
                    self._link = None
                    link.close()
                if not self._stop.is_set():
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
        finally:
            self.stop()

    def _hand(self, chunk: list[Delivered]) -> None:
        """On the loop: pass a chunk on, remembering where the next round starts."""
        last = chunk[-1][0]
        if last >= self.next:
            self.next = last + 1
        self.handed += len(chunk)
        self.on_chunk(chunk)

    # ---- the thread -------------------------------------------------------------------------

    def _round(self, link: DataLink, loop: asyncio.AbstractEventLoop, inbox: str,
               start: int) -> None:
        """One consumer, pulled until something goes wrong or the follower stops."""
        link.sock.settimeout(self.heartbeat_s * 3)
        link.subscribe(f"{inbox}.>")
        config: dict[str, Any] = {
            "ack_policy": "none", "filter_subject": self.subject,
            "inactive_threshold": int(max(30.0, self.heartbeat_s * 6) * 1e9),
            "mem_storage": True, "num_replicas": 1,
            "deliver_policy": "by_start_sequence", "opt_start_seq": start}
        link.publish(f"$JS.API.CONSUMER.CREATE.{self.stream}",
                     json.dumps({"stream_name": self.stream, "config": config}).encode(),
                     reply=f"{inbox}.create")
        # Left to expire (inactive_threshold) rather than deleted: a reader's
        # role need not be allowed to delete consumers.
        self._pull(link, loop, inbox, self._created(link))

    def _created(self, link: DataLink) -> str:
        frame = link.frame()
        body = link.read_bytes(frame.size)
        link.end_payload()
        if frame.status() == "503":
            raise FollowError(f"no JetStream answer for stream {self.stream}")
        got = json.loads(body or b"{}")
        if "error" in got:
            raise FollowError(f"consumer on {self.stream}: {got['error'].get('description')}")
        name = got.get("name")
        if not isinstance(name, str):
            raise FollowError(f"consumer on {self.stream}: unexpected answer {body[:200]!r}")
        return name

    def _pull(self, link: DataLink, loop: asyncio.AbstractEventLoop, inbox: str,
              name: str) -> None:
        ask = json.dumps({"batch": self.batch, "expires": int(self.heartbeat_s * 6e9),
                          "idle_heartbeat": int(self.heartbeat_s * 1e9)}).encode()
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}"
        reply = f"{inbox}.pull"
        asked: list[int] = []  # messages still due on each request, oldest first
        chunk: list[Delivered] = []
        expect = 0  # the next consumer sequence (0: not known yet)
        while not self._stop.is_set():
            if chunk and link.buffered() == 0:
                loop.call_soon_threadsafe(self._hand, chunk)
                chunk = []
            if len(asked) < 2 and self._room.is_set() and sum(asked) < self.batch:
                link.publish(subject, ask, reply=reply)
                asked.append(self.batch)
            if not asked and link.buffered() == 0:
                # Paused with nothing asked for: nothing will come; wait for room.
                self._room.wait(self.heartbeat_s)
                continue
            line = link.line()
            if line.startswith(b"HMSG ") or line.startswith(b"MSG "):
                parts = line.split()
                size = int(parts[-1])
                hlen = int(parts[-2]) if parts[0] == b"HMSG" else 0
                msg_reply = parts[3] if len(parts) == (6 if hlen else 5) else b""
                raw = link.read_bytes(size)
                link.end_payload()
                if not msg_reply.startswith(b"$JS.ACK."):
                    self._status(raw[:hlen], asked)
                    continue
                tokens = msg_reply.split(b".")
                cseq = int(tokens[6]) if len(tokens) == 9 else int(tokens[8])
                if expect and cseq != expect:
                    raise LinkError(f"consumer sequence {cseq} after {expect - 1}")
                expect = cseq + 1
                pos = topology.ack_position(msg_reply.decode())
                if pos is None:
                    raise LinkError(f"unreadable ack subject {msg_reply[:120]!r}")
                chunk.append((pos[0], pos[1], pos[2], parts[1].decode(), raw[hlen:]))
                if asked:
                    asked[0] -= 1
                    if asked[0] <= 0:
                        asked.pop(0)
            elif line == b"PING":
                link.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise LinkError(line[4:].strip().decode(errors="replace"))
        if chunk:
            loop.call_soon_threadsafe(self._hand, chunk)

    @staticmethod
    def _status(headers: bytes, asked: list[int]) -> None:
        """A status on the pull inbox: 100 heartbeat (alive); 404/408 a request
        done; 503 no one to answer yet (a consumer just made in a cluster waits
        for its leader): the request is dropped and asked again shortly; 409 the
        consumer gone or the request refused."""
        first = headers.split(b"\r\n", 1)[0].split(None, 2)
        code = first[1] if len(first) > 1 else b""
        if code == b"100":
            return
        if code in (b"404", b"408", b"503"):
            if asked:
                asked.pop(0)
            if code == b"503":
                time.sleep(0.05)
            return
        text = first[2].decode(errors="replace") if len(first) > 2 else ""
        raise FollowError(f"pull answered {code.decode(errors='replace')} {text}".strip())
