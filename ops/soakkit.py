"""What `jetfleet bench soak` is made of: the job stream and how it is followed,
the faults and how long each took to heal, the lease tap, and the audit.

    JobStream   submits jobs with a bounded backlog, trying again while the
                server is away; follows `events.jobs.>` (a Follower: it
                resumes after a restart) to know which jobs ended
    Chaos       kill -9 of random components of a launcher Fleet, each started
                again half a second later; recovery is the time until the new
                process answers its control endpoint; a component that dies
                unkilled is a crash
    LeaseTap    every write to KV `leases`, followed as it happens; writes
                that expired before they were read split it into segments
    audit       after the run, from KV `jobs` and a fresh read of EVENTS:
                jobs not succeeded (lost), jobs with more than one result
                (duplicates), and a replay of the lease writes (two holders)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.js.api import DeliverPolicy

from bus import codec, topology
from bus.connection import Bus
from bus.consumer import Follower
from bus.control import request
from schemas.fleet import LeaseRecord
from schemas.jobs import JobState
from sdk import Client

TERMINAL = frozenset({"succeeded", "failed", "dead", "cancelled"})


class _Event(msgspec.Struct):
    kind: str
    job_id: str
    attempt: int = 0
    ts: float = 0.0


_event = msgspec.json.Decoder(_Event)


# ---- the job stream -----------------------------------------------------------------------


@dataclass
class JobStream:
    """`n` jobs: echo, and a share of short sleeps on one leased (simulated) GPU."""

    client: Client
    prefix: str
    gpu_share: float = 0.2
    window: int = 2000  # submitted and not yet ended, at most
    seed: int = 1
    submitted: list[str] = field(default_factory=list)
    pending: set[str] = field(default_factory=set)  # submitted, not yet ended
    ended: dict[str, str] = field(default_factory=dict)  # job id -> terminal kind
    end_times: list[float] = field(default_factory=list)  # wall clock
    first_submit: float = 0.0
    last_end: float = 0.0
    _follower: Follower | None = None
    _task: asyncio.Task[None] | None = None

    async def follow(self) -> None:
        """Start following job events from now on."""
        bus = self.client.bus
        last = (await bus.js.stream_info(topology.EVENTS)).state.last_seq
        self._follower = Follower(bus, topology.JOB_EVENTS_ALL, after_seq=int(last))
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        assert self._follower is not None
        mine = f"{self.prefix}-"
        while True:
            try:
                msg = await self._follower.next(timeout=5.0)
            except TimeoutError:
                continue
            try:
                ev = _event.decode(msg.data)
            except msgspec.DecodeError:
                continue
            if ev.kind in TERMINAL and ev.job_id.startswith(mine) and ev.job_id not in self.ended:
                self.ended[ev.job_id] = ev.kind
                self.pending.discard(ev.job_id)
                self.last_end = time.time()
                # When the job ended (the event's own time), not when we heard.
                self.end_times.append(ev.ts or self.last_end)

    @property
    def backlog(self) -> int:
        return len(self.pending)

    async def submit_one(self, job_id: str, *, gpu: bool = False) -> None:
        while True:
            try:
                if gpu:
                    await self.client.submit("sleep", {"seconds": 0.02, "steps": 1},
                                             job_id=job_id, resources={"gpus": 1},
                                             max_attempts=20)
                else:
                    await self.client.submit("echo", {"id": job_id}, job_id=job_id,
                                             max_attempts=20)
                break
            except (nats.errors.Error, TimeoutError, OSError):
                # The server is away (a restart, a new leader): the same job id
                # again is deduplicated if the first did land.
                await asyncio.sleep(0.2)
        self.submitted.append(job_id)
        if job_id not in self.ended:  # (its end may have been heard already)
            self.pending.add(job_id)

    async def run(self, n: int, batch: int = 100) -> None:
        rng = random.Random(self.seed)
        self.first_submit = time.time()
        for start in range(0, n, batch):
            while self.backlog > self.window:
                await asyncio.sleep(0.01)
            await asyncio.gather(*(self.submit_one(f"{self.prefix}-{i:07d}",
                                                   gpu=rng.random() < self.gpu_share)
                                   for i in range(start, min(n, start + batch))))

    async def wait_ended(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.backlog > 0 and loop.time() < deadline:
            await asyncio.sleep(0.2)
        return self.backlog <= 0

    def stall(self, at: float, window_s: float = 60.0) -> float:
        """The longest spell with no job ending, from `at` (a fault) on, within
        `window_s`: how long the fault stopped the flow."""
        times = [at, *sorted(t for t in self.end_times if at < t <= at + window_s)]
        return round(max((b - a for a, b in itertools.pairwise(times)), default=0.0), 2)

    def jobs_per_s(self) -> float:
        span = self.last_end - self.first_submit
        return len(self.ended) / span if span > 0 else 0.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._follower is not None:
            await self._follower.close()


# ---- faults and recovery ------------------------------------------------------------------


@dataclass
class Fault:
    what: str  # the component, or "server restart" / "server kill -9"
    victim: str
    at_s: float  # into the run
    at: float = 0.0  # wall clock
    recovered_s: float | None = None  # None: not (yet) recovered
    detail: str = ""


async def answers(bus: Bus, kind: str, instance: str, timeout: float = 1.0) -> bool:
    try:
        return bool(await request(bus, kind, instance, "info", timeout=timeout))
    except Exception:
        return False


class Chaos:
    """kill -9 of random members of a launcher Fleet, each started again after
    `restart_s`, as a supervisor with a fixed restart delay would. (The Fleet's
    own backoff is for crash loops: under a kill every few seconds it would keep
    most of the fleet waiting out doubling delays.) A member that dies without
    being killed is a crash: started again too, and counted."""

    WEIGHTS = {"worker": 4, "dispatcher": 2, "monitor": 1, "query": 1, "agent": 1}

    def __init__(self, fleet: Any, bus: Bus, started: float, every_s: float, seed: int,
                 restart_s: float = 0.5) -> None:
        self.fleet = fleet
        self.bus = bus
        self.started = started
        self.every_s = every_s
        self.restart_s = restart_s
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.crashes: list[str] = []
        self._killed: dict[int, float] = {}  # pid -> when it is to be started again
        self._tasks: set[asyncio.Task[None]] = set()

    async def supervise(self) -> None:
        while True:
            t = time.monotonic()
            for child in self.fleet.children:
                if child.alive():
                    continue
                due = self._killed.get(child.proc.pid)
                if due is None:
                    self.crashes.append(f"{child.name} (exit {child.proc.returncode})")
                    due = self._killed[child.proc.pid] = t
                if t >= due:
                    del self._killed[child.proc.pid]
                    child.start()
            await asyncio.sleep(0.05)

    async def run(self, until: asyncio.Event) -> None:
        while not until.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), self.rng.expovariate(1 / self.every_s))
            if until.is_set():
                return
            self.kill_one()

    def kill_one(self) -> Fault | None:
        kinds = [k for k in self.WEIGHTS if any(c.component == k and c.alive()
                                                for c in self.fleet.children)]
        if not kinds:
            return None
        kind = self.rng.choices(kinds, [self.WEIGHTS[k] for k in kinds])[0]
        victim = self.rng.choice([c for c in self.fleet.children
                                  if c.component == kind and c.alive()])
        self._killed[victim.proc.pid] = time.monotonic() + self.restart_s
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.proc.pid, signal.SIGKILL)
        fault = Fault(what=kind, victim=victim.name, at_s=time.time() - self.started)
        self.faults.append(fault)
        self._spawn(self._recovery(fault, victim, victim.proc.pid, time.monotonic()))
        return fault

    async def _recovery(self, fault: Fault, child: Any, old_pid: int, t0: float) -> None:
        """Until the replacement process answers on its control endpoint."""
        while time.monotonic() - t0 < 300:
            if (child.alive() and child.proc.pid != old_pid
                    and await answers(self.bus, child.kind, child.instance)):
                fault.recovered_s = round(time.monotonic() - t0, 2)
                return
            await asyncio.sleep(0.1)

    async def all_answer(self, timeout: float) -> float | None:
        """Seconds until every member answers its control endpoint (None: timed out)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            results = await asyncio.gather(*(answers(self.bus, c.kind, c.instance)
                                             for c in self.fleet.children))
            if all(results):
                return round(time.monotonic() - t0, 2)
            await asyncio.sleep(0.2)
        return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float = 60.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


def summarize(faults: list[Fault]) -> list[dict[str, Any]]:
    """Kills and recovery times per kind of fault."""
    out = []
    for what in sorted({f.what for f in faults}):
        mine = [f for f in faults if f.what == what]
        times = [f.recovered_s for f in mine if f.recovered_s is not None]
        out.append({"what": what, "kills": len(mine), "recovered": len(times),
                    "min_s": min(times, default=None),
                    "median_s": round(statistics.median(times), 2) if times else None,
                    "max_s": max(times, default=None)})
    return out


# ---- the lease tap ------------------------------------------------------------------------


@dataclass
class LeaseWrite:
    key: str
    op: str  # PUT | DEL | PURGE
    ts: float
    holder: tuple[str, str | None, float] | None  # (holder, job, acquired_at) for a PUT


class LeaseTap:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.segments: list[list[LeaseWrite]] = [[]]
        self.writes = 0
        self.missed = 0
        self._follower = Follower(bus, topology.kv_subject(topology.KV_LEASES, ">"),
                                  quiet_s=0.5)
        self._task: asyncio.Task[None] | None = None
        self._last = 0

    async def start(self) -> None:
        last = (await self.bus.js.stream_info(f"KV_{topology.KV_LEASES}")).state.last_seq
        self._follower.last_seq = self._last = int(last)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        prefix = topology.kv_subject(topology.KV_LEASES)
        while True:
            try:
                msg = await self._follower.next(timeout=5.0)
            except TimeoutError:
                continue
            seq = int(msg.metadata.sequence.stream)
            if seq > self._last + 1:
                self.missed += seq - self._last - 1
                self.segments.append([])
            self._last = seq
            op = (msg.headers or {}).get("KV-Operation", "PUT")
            holder = None
            if op == "PUT":
                try:
                    rec = codec.decode(msg.data, LeaseRecord)
                    holder = (rec.holder, rec.job_id, rec.acquired_at)
                except codec.DecodeError:
                    op = "FOREIGN"
            self.writes += 1
            self.segments[-1].append(LeaseWrite(msg.subject.removeprefix(prefix), op,
                                                msg.metadata.timestamp.timestamp(), holder))

    def violations(self, ttl_s: float) -> list[str]:
        return [v for seg in self.segments for v in _two_holders(seg, ttl_s)]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._follower.close()


def _two_holders(writes: list[LeaseWrite], ttl_s: float) -> list[str]:
    """Each key: acquired, renewed by the same holder, released or silent for a
    TTL (expired). A write by anyone else while a holder's lease lives is two
    holders at once."""
    bad = []
    holder: dict[str, tuple[str, str | None, float] | None] = {}
    last: dict[str, float] = {}
    for w in writes:
        cur = holder.get(w.key)
        if cur is not None and w.ts - last[w.key] >= ttl_s:
            cur = holder[w.key] = None  # expired
        if w.op in ("DEL", "PURGE"):
            holder[w.key] = None
        elif w.holder is not None:
            if cur is None:
                holder[w.key] = w.holder
            elif w.holder != cur:
                bad.append(f"{w.key}: {w.holder} wrote while {cur} held it")
        last[w.key] = w.ts
    return bad


# ---- the audit ----------------------------------------------------------------------------


async def _read_all(bus: Bus, subject: str, policy: DeliverPolicy, handle: Any,
                    start_seq: int = 0) -> int:
    """Feed every message on `subject` now stored to `handle` (a fresh ordered consumer)."""
    config: dict[str, Any] = {"deliver_policy": policy}
    if start_seq:
        config = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
    from nats.js.api import ConsumerConfig

    sub = await bus.js.subscribe(subject, ordered_consumer=True, config=ConsumerConfig(**config),
                                 pending_msgs_limit=1 << 22, pending_bytes_limit=1 << 32)
    n = 0
    try:
        info = await sub.consumer_info()
        if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
            return 0
        while True:
            msg = await sub.next_msg(timeout=30)
            handle(msg)
            n += 1
            if msg.metadata.num_pending == 0:
                return n
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@dataclass
class Audit:
    jobs: int
    states: Counter[str]
    lost: list[str]
    duplicates: list[str]
    events: Counter[str]
    dead_letters: int


async def audit(bus: Bus, job_ids: list[str], events_from: int, dead_from: int) -> Audit:
    wanted = set(job_ids)
    records: dict[str, JobState] = {}

    def record(msg: Any) -> None:
        key = msg.subject.removeprefix(topology.kv_subject(topology.KV_JOBS))
        if key in wanted and msg.data:
            with contextlib.suppress(codec.DecodeError):
                records[key] = codec.decode(msg.data, JobState)

    await _read_all(bus, topology.kv_subject(topology.KV_JOBS, ">"),
                    DeliverPolicy.LAST_PER_SUBJECT, record)
    succeeded: dict[str, list[int]] = {}
    kinds: Counter[str] = Counter()

    def event(msg: Any) -> None:
        try:
            ev = _event.decode(msg.data)
        except msgspec.DecodeError:
            return
        if ev.job_id in wanted:
            kinds[ev.kind] += 1
            if ev.kind == "succeeded":
                succeeded.setdefault(ev.job_id, []).append(ev.attempt)

    await _read_all(bus, topology.JOB_EVENTS_ALL, DeliverPolicy.ALL, event,
                    start_seq=events_from + 1)
    dead = (await bus.js.stream_info(topology.DEAD)).state.last_seq - dead_from
    lost = [j for j in job_ids
            if j not in records or records[j].state != "succeeded" or j not in succeeded]
    dups = [j for j, attempts in succeeded.items()
            if len(attempts) > 1 or (j in records and attempts[0] != records[j].attempt)]
    return Audit(jobs=len(job_ids), states=Counter(s.state for s in records.values()),
                 lost=lost, duplicates=dups, events=kinds, dead_letters=int(dead))
