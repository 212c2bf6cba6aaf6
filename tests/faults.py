"""What the fault tests share: a TCP relay that can be frozen (a partition), a
submitter that rides out a server away, reading a whole stream back after the
fact, and the end-of-run audit (nothing lost, no result twice).

The audit reads the EVENTS stream afresh at the end rather than trusting a
subscription that lived through the faults: a follower that went quiet during
a restart would hide exactly what the test looks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from bus import codec, topology
from bus.connection import Bus
from bus.server import free_port
from schemas.fleet import LeaseRecord
from schemas.jobs import JobState
from tests.helpers import KvOp, replay

# ---- a partition ---------------------------------------------------------------------------


class TcpProxy:
    """A TCP relay from a free local port to `target`, in a thread of its own.

    Frozen, it still accepts connections and reads what either side sends, but
    forwards nothing in either direction: to both ends the network simply went
    silent (no reset, no close), as in a partition. Thawed, what was held flows
    on. `cut()` closes every relayed connection at once.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = free_port(host)
        self.loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="tcp-proxy")
        self.connections = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._relay, self.host, self.port)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_w))
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer),
                             return_exceptions=True)
        for w in (writer, up_w):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass  # one side went away: the other is closed below
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def freeze(self) -> None:
        assert self._flowing is not None
        self.loop.call_soon_threadsafe(self._flowing.clear)

    def thaw(self) -> None:
        assert self._flowing is not None
        self.loop.call_soon_threadsafe(self._flowing.set)

    def cut(self) -> None:
        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self.loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        async def down() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(down(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def port_answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


# ---- load that rides out a server away ------------------------------------------------------


async def submit_retrying(client: Any, capability: str, payload: dict[str, Any], *,
                          job_id: str, timeout: float = 120.0, **kw: Any) -> str:
    """Submit, trying again while the server is away. The job id is the
    Nats-Msg-Id, so a submission stored but whose ack was lost is not doubled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return str(await client.submit(capability, payload, job_id=job_id, **kw))
        except (nats.errors.Error, TimeoutError, OSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def job_stream(client: Any, n: int, rng: random.Random, submitted: list[str], *,
                     rate: float, prefix: str = "r", long_s: float = 4.0) -> None:
    """A job stream at about `rate` a second: echo; short `hold`s of a simulated
    GPU (tests/faultapp.py, which keeps its own account of device use); and a
    few that hold it for `long_s`, past a lease renewal or two, so a fault
    catches some holding a lease."""
    for i in range(n):
        job_id = f"{prefix}{i:05d}"
        kind = rng.random()
        if kind < 0.4:
            await submit_retrying(client, "echo", {"i": i}, job_id=job_id, max_attempts=10)
        else:
            seconds = 0.3 if kind < 0.85 else long_s
            await submit_retrying(client, "hold", {"seconds": seconds}, job_id=job_id,
                                  max_attempts=10)
        submitted.append(job_id)
        await asyncio.sleep(rng.expovariate(rate))


def device_overlaps(runs: list[dict[str, Any]]) -> list[str]:
    """Runs that used one device at the same time, by the handlers' own account
    (tests/faultapp.py); a run that never ended counts as still running."""
    per: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        for d in r["devices"]:
            per.setdefault(d, []).append(r)
    bad = []
    for d, rs in per.items():
        rs.sort(key=lambda r: r["start"])
        for a, b in itertools.pairwise(rs):
            end = a["end"] if a["end"] is not None else float("inf")
            if b["start"] < end:
                bad.append(f"{d}: {a['job_id']}#{a['attempt']} ran until {end:.3f}, "
                           f"{b['job_id']}#{b['attempt']} started at {b['start']:.3f}")
    return bad


async def retrying(call: Callable[[], Any], timeout: float = 60.0) -> Any:
    """An awaitable call tried again while the server is away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await call()
        except (nats.errors.Error, TimeoutError, OSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


# ---- reading back what happened -------------------------------------------------------------


async def read_stream(bus: Bus, subject: str, *, timeout: float = 30.0) -> list[Any]:
    """Every message stored on `subject` now, oldest first, through a fresh
    ordered consumer (made after the faults, so nothing can have stalled it)."""
    out: list[Any] = []
    sub = await retrying(lambda: bus.js.subscribe(subject, ordered_consumer=True,
                                                  deliver_policy=DeliverPolicy.ALL,
                                                  pending_msgs_limit=1 << 22,
                                                  pending_bytes_limit=1 << 32))
    try:
        info = await sub.consumer_info()
        if not info.num_pending and not info.delivered.consumer_seq:
            return out  # nothing stored: an empty stream sends nothing to say so
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await sub.next_msg(timeout=max(0.1, deadline - loop.time()))
            out.append(msg)
            if msg.metadata.num_pending == 0:
                return out
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def all_job_events(bus: Bus) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await read_stream(bus, topology.JOB_EVENTS_ALL)]


async def dead_letters(bus: Bus) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await read_stream(bus, topology.DEAD_ALL)]


class LeaseTap:
    """Every write to KV `leases` in stream order, as tests.helpers.LeaseHistory
    records them, read one at a time (`next_by_subj`), so a restart or a new
    leader costs it no consumer to re-make: it asks again until it is answered.

    A write it cannot read before the bucket TTL expires it (stored by a leader
    killed before the tap read it, while a new one is elected) is `missed`,
    and the writes around it are split into `segments`: `violations()` checks
    each segment on its own, so a missed release is never taken for two
    holders, and says how many writes it could not see.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.segments: list[list[KvOp]] = [[]]
        self.missed = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def ops(self) -> list[KvOp]:
        return [op for seg in self.segments for op in seg]

    async def start(self) -> LeaseTap:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        stream = f"KV_{topology.KV_LEASES}"
        prefix = topology.kv_subject(topology.KV_LEASES)
        nxt = 1
        while True:
            try:
                raw = await self.bus.js.get_msg(stream, seq=nxt, subject=f"{prefix}>", next=True)
            except NotFoundError:
                await asyncio.sleep(0.02)  # nothing newer yet
                continue
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)  # server away, no leader yet: again
                continue
            seq = int(raw.seq or 0)
            if seq > nxt:
                self.missed += seq - nxt
                self.segments.append([])
            nxt = seq + 1
            op = (raw.headers or {}).get("KV-Operation", "PUT")
            rec = codec.decode(raw.data, LeaseRecord) if op == "PUT" and raw.data else None
            assert raw.time is not None and raw.subject is not None
            self.segments[-1].append(KvOp(key=raw.subject.removeprefix(prefix), op=op,
                                          ts=raw.time.timestamp(), record=rec))

    def violations(self, ttl_s: float) -> list[str]:
        return [v for seg in self.segments for v in replay(seg, ttl_s).violations]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None


@dataclass
class Audit:
    """Nothing lost, nothing doubled: from the records and a fresh read of EVENTS."""

    jobs: int
    states: Counter[str]
    lost: list[str]  # not succeeded
    duplicates: list[str]  # more than one `succeeded` event, or one that disagrees
    events: list[dict[str, Any]] = field(repr=False)
    records: dict[str, JobState] = field(repr=False)

    def ok(self) -> bool:
        return not self.lost and not self.duplicates

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e["kind"] == kind)


async def audit(client: Any, job_ids: list[str]) -> Audit:
    records: dict[str, JobState] = {}
    for j in job_ids:
        s = await retrying(lambda j=j: client.status(j))
        assert s is not None, f"no record of job {j}"
        records[j] = s
    events = await all_job_events(client.bus)
    wanted = set(job_ids)
    events = [e for e in events if e.get("job_id") in wanted]
    succeeded: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["kind"] == "succeeded":
            succeeded.setdefault(e["job_id"], []).append(e)
    lost = [j for j in job_ids if records[j].state != "succeeded" or j not in succeeded]
    duplicates = [j for j, es in succeeded.items()
                  if len(es) > 1 or es[0]["attempt"] != records[j].attempt]
    return Audit(jobs=len(job_ids), states=Counter(s.state for s in records.values()),
                 lost=lost, duplicates=duplicates, events=events, records=records)


async def settled(client: Any, job_ids: list[str]) -> bool:
    """Every job in a terminal state (server away counts as not yet)."""
    try:
        for j in job_ids:
            s = await client.status(j)
            if s is None or not s.terminal:
                return False
    except (nats.errors.Error, TimeoutError):
        return False
    return True

