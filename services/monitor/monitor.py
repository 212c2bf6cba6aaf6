"""The monitor: turns silence into events.

    heartbeats  a core subscription on telemetry.*.heartbeat records, on this
                monitor's clock, when each node was last heard (liveness.py);
                a malformed one goes to DEAD with its reason, once
    joined      the first heartbeat of a node with no record in KV node_states
    lost        not heard for --lost-after while we listened, and the stream's
                latest heartbeat of the node is no newer than the one we heard
                (so a heartbeat stuck on a slow bus saves it): every running
                job on the node is `lost`, its leases are freed
    recovered   a heartbeat from a lost node: its jobs that still run there
                (the agent lists them, or their worker is alive) are resumed
    stale       a running job with no progress or heartbeat past its deadline

Every verdict is a compare-and-set on the node's record, so of several
monitors exactly one emits each event; the record says whether the change's
effects were completed, so a monitor that died half-way is finished for by
whichever monitor looks next. A restarted monitor replays KV node_states and
KV jobs before deciding anything, and gives every node a full --lost-after
from its own start: a restart raises no false alarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
from nats.js.errors import NotFoundError

from bus import codec, topology
from bus.adverts import list_adverts
from bus.connection import Bus
from bus.jobtable import JobTable, emit
from bus.leases import reclaim_node
from schemas import lifecycle as lc
from schemas.events import Lost, Resumed, Stale
from schemas.fleet import DeadLetter
from schemas.telemetry import (
    Heartbeat,
    NodeJoined,
    NodeLost,
    NodeRecovered,
    NodeStatus,
)
from services.monitor.jobindex import JobIndex, JobView
from services.monitor.liveness import Heard, Liveness
from services.monitor.nodestates import NodeStates

log = logging.getLogger(__name__)

# A change whose effects are still owed after this long was abandoned by its
# monitor (it died half-way): another monitor finishes it.
ABANDONED_S = 30.0
# Dead letters per second for malformed telemetry (a flood is counted, not stored).
DEAD_LETTERS_PER_S = 50
CONCURRENCY = 64


class Monitor:
    def __init__(self, bus: Bus, *, lost_after: float = 30.0, stale_after: float = 300.0,
                 instance: str = "monitor", tick_s: float | None = None) -> None:
        self.bus = bus
        self.lost_after = lost_after
        self.stale_after = stale_after
        self.instance = instance
        self.tick_s = tick_s or max(0.05, min(0.25, lost_after / 20))
        self.sweep_s = max(0.5, min(5.0, stale_after / 4, lost_after))
        self.live = Liveness(lost_after)
        self.states = NodeStates(bus)
        self.index = JobIndex(bus)
        self.table = JobTable(bus)
        self.counts: dict[str, int] = {k: 0 for k in (
            "heartbeats", "malformed", "dead_lettered", "joined", "lost", "recovered",
            "jobs_lost", "jobs_resumed", "stale", "pardoned", "leases_freed")}
        self.max_stall_s = 0.0
        self._job_seen: dict[str, float] = {}
        self._actions: dict[str, str] = {}
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._stopping = asyncio.Event()
        self._sub: Any = None
        self._ready = False
        self._dead_budget = float(DEAD_LETTERS_PER_S)

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.states.start()
        await self.index.start()
        self._sub = await self.bus.nc.subscribe(
            topology.telemetry_all(topology.HEARTBEAT), cb=self._on_heartbeat,
            pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30)
        await self._wait_ready()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for node, (status, _) in list(self.states.records.items()):
            if status.state == "alive":
                self.live.expect(node, start)
            else:
                self.live.silence(node)
        self._ready = True
        log.info("monitor %s: %d nodes known, %d open jobs; lost after %gs of silence",
                 self.instance, len(self.states.records), len(self.index.jobs), self.lost_after)
        last_tick = last_sweep = loop.time()
        disconnected_at: float | None = None
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.tick_s)
                t = loop.time()
                stall = t - last_tick - self.tick_s
                last_tick = t
                if stall > max(1.0, 4 * self.tick_s):
                    # Our own loop stood still (CPU starvation, a pause): that time
                    # counts against no node.
                    self.max_stall_s = max(self.max_stall_s, stall)
                    self.live.shift(stall)
                if not self.bus.nc.is_connected:
                    disconnected_at = disconnected_at or t
                    continue
                if disconnected_at is not None:
                    # We heard nothing while away from the server: neither did we listen.
                    self.live.shift(t - disconnected_at)
                    disconnected_at = None
                # Every tick, not only after a disconnect seen above: a reconnect
                # quicker than a tick (a fail-over to another server of a cluster)
                # is seen by the connection's count alone (a cheap compare).
                await self.states.mirror.check()
                await self.index.mirror.check()
                self._dead_budget = min(DEAD_LETTERS_PER_S,
                                        self._dead_budget + DEAD_LETTERS_PER_S * self.tick_s)
                self._dispatch(t)
                if t - last_sweep >= self.sweep_s:
                    last_sweep = t
                    self._spawn("sweep", self._sweep())
        finally:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=10)
            await self.states.mirror.stop()
            await self.index.mirror.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _wait_ready(self) -> None:
        """Decide nothing before both buckets are replayed."""
        started = time.monotonic()
        said = False
        while not self._stopping.is_set():
            if self.states.mirror.ready.is_set() and self.index.mirror.ready.is_set():
                return
            if not said and time.monotonic() - started > 10:
                said = True
                log.info("monitor: still replaying KV node_states and jobs (%d jobs so far)",
                         len(self.index.jobs))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.05)

    def _dispatch(self, t: float) -> None:
        for node, action in list(self._actions.items()):
            if node in self._busy:
                continue
            del self._actions[node]
            self._spawn(node, self._join(node) if action == "join" else self._recover(node))
        for node, silent in self.live.overdue(t):
            if node not in self._busy:
                self._spawn(node, self._suspect(node, silent))

    def _spawn(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        if key in self._busy:
            work.close()
            return
        self._busy.add(key)

        async def guarded() -> None:
            try:
                async with self._sem:
                    await work
            except Exception as exc:  # retried on a later tick; never fatal
                log.warning("monitor: %s: %s: %s", key, type(exc).__name__, exc)
            finally:
                self._busy.discard(key)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- heartbeats --------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Any) -> None:
        node = topology.telemetry_node(msg.subject)
        try:
            hb = codec.decode(msg.data, Heartbeat)
        except codec.DecodeError as exc:
            self._malformed(msg.subject, msg.data, exc.reason)
            return
        if hb.node != node:
            self._malformed(msg.subject, msg.data,
                            f"heartbeat of node {hb.node!r} on the subject of {node!r}")
            return
        at, wall = time.monotonic(), time.time()
        heard = self.live.heard(node, hb, at, wall)
        self.counts["heartbeats"] += 1
        for job_id in heard.job_ids:
            self._job_seen[job_id] = wall
        if not self._ready:
            return
        status = self.states.get(node)
        if status is None:
            self._actions.setdefault(node, "join")
        elif status.state == "lost":
            self._actions[node] = "recover"

    def _malformed(self, subject: str, data: bytes, reason: str) -> None:
        self.counts["malformed"] += 1
        if self._dead_budget < 1:
            return
        self._dead_budget -= 1
        # Every monitor sees the same bad message: one dead letter, by its content.
        digest = hashlib.sha256(subject.encode() + b"\0" + data).hexdigest()[:32]
        text, encoding = codec.raw_text(data)
        letter = DeadLetter(subject=subject, reason=reason, stream=topology.TELEMETRY, raw=text,
                            raw_encoding=encoding, ts=time.time(),
                            details={"monitor": self.instance})

        async def send() -> None:
            await self.bus.publish(topology.dead_subject(topology.TELEMETRY), letter,
                                   msg_id=f"dead.telemetry.{digest}")
            self.counts["dead_lettered"] += 1
            log.warning("dead-lettered telemetry on %s: %s", subject, reason)

        self._spawn(f"dead:{digest}", send())

    # ---- joined ------------------------------------------------------------------------

    async def _join(self, node: str) -> None:
        heard = self.live.get(node)
        if heard is None or self.states.get(node) is not None:
            return
        wall = time.time()
        status = NodeStatus(node=node, since=wall, joined_at=wall, last_heard=heard.wall,
                            monitor=self.instance, hostname=heard.hostname,
                            simulated=heard.simulated)
        if await self.states.create(status) is None:
            return  # another monitor recorded it first
        if heard.interval_s * 3 > self.lost_after:
            log.warning("node %s heartbeats every %gs: --lost-after %gs leaves less than three "
                        "heartbeats of margin, so a slow bus may look like a lost node", node,
                        heard.interval_s, self.lost_after)
        await self._announce_joined(node, status, heard)

    async def _announce_joined(self, node: str, status: NodeStatus, heard: Heard | None) -> None:
        event = NodeJoined(event_id=f"{node}.joined", node=node, hostname=status.hostname,
                           gpus=heard.gpus if heard else 0, simulated=status.simulated,
                           monitor=self.instance)
        await self.bus.publish(topology.node_events(node), event, msg_id=event.event_id)
        self.counts["joined"] += 1
        await self._announced(node, status.changes)

    async def _announced(self, node: str, changes: int, **fields: Any) -> None:
        def done(s: NodeStatus) -> NodeStatus | None:
            if s.changes != changes or s.announced:
                return None
            return msgspec.structs.replace(s, announced=True, **fields)

        await self.states.change(node, done)

    # ---- lost --------------------------------------------------------------------------

    async def _suspect(self, node: str, silent: float) -> None:
        heard = self.live.get(node)
        if heard is None:
            return
        if await self._spoke_since(node, heard):
            self.live.pardon(node, time.monotonic())
            self.counts["pardoned"] += 1
            return
        status = self.states.get(node)
        if status is None:
            return  # its join is still to be recorded; decided on a later tick
        if status.state == "lost":
            self.live.silence(node)
            return
        jobs = [j.job_id for j in self.index.on_node(node, "running")]
        wall = time.time()

        def lose(s: NodeStatus) -> NodeStatus | None:
            if s.state != "alive":
                return None
            return msgspec.structs.replace(
                s, state="lost", since=wall, last_heard=heard.wall, changes=s.changes + 1,
                jobs=jobs, leases=[], monitor=self.instance, announced=False)

        changed = await self.states.change(node, lose)
        self.live.silence(node)
        if changed is None:
            return  # another monitor declared it first
        log.info("node %s lost: not heard for %.1fs; %d running jobs", node, silent, len(jobs))
        await self._announce_lost(node, changed[0], silent)

    async def _spoke_since(self, node: str, heard: Heard) -> bool:
        """Whether the stream holds a heartbeat of `node` newer than the last we
        heard. Raises when the server cannot tell us (decide later)."""
        try:
            raw = await self.bus.js.get_last_msg(topology.TELEMETRY,
                                                 topology.telemetry(node, topology.HEARTBEAT))
        except NotFoundError:
            return False
        try:
            hb = codec.decode(raw.data or b"", Heartbeat)
        except codec.DecodeError:
            return False
        return (hb.started_at, hb.seq) > (heard.started_at, heard.seq)

    async def _announce_lost(self, node: str, status: NodeStatus, silent: float) -> None:
        reason = f"node {node} lost: not heard for {silent:.1f}s"
        lost = await self._each(status.jobs, lambda job: self._lose_job(job, node, reason,
                                                                       status.changes))
        leases = await reclaim_node(self.bus, node)
        self.counts["leases_freed"] += len(leases)
        event = NodeLost(event_id=f"{node}.lost.{status.changes}", node=node,
                         last_heard=status.last_heard, silent_s=round(silent, 3), jobs=lost,
                         leases=leases, reason=reason, monitor=self.instance,
                         simulated=status.simulated)
        await self.bus.publish(topology.node_events(node), event, msg_id=event.event_id)
        self.counts["lost"] += 1
        await self._announced(node, status.changes, jobs=lost, leases=leases)

    async def _lose_job(self, job_id: str, node: str, reason: str, changes: int) -> bool:
        view = self.index.jobs.get(job_id)
        if view is None or view.node != node:
            return False
        got = await self.table.transition(job_id, lc.lose(view.attempt, reason, node))
        if got is None:
            return False
        state, _ = got
        await emit(self.bus, Lost(job_id=job_id, attempt=state.attempt, worker_id=state.worker_id,
                                  reason=reason,
                                  event_id=f"{job_id}.{state.attempt}.lost.{node}.{changes}"))
        self.counts["jobs_lost"] += 1
        return True

    # ---- recovered ---------------------------------------------------------------------

    async def _recover(self, node: str) -> None:
        heard = self.live.get(node)
        status = self.states.get(node)
        if heard is None or status is None or status.state != "lost":
            return
        wall = time.time()

        def back(s: NodeStatus) -> NodeStatus | None:
            if s.state != "lost":
                return None
            return msgspec.structs.replace(s, state="alive", since=wall, last_heard=heard.wall,
                                           changes=s.changes + 1, jobs=[], leases=[],
                                           monitor=self.instance, announced=False)

        changed = await self.states.change(node, back)
        self.live.listen(node, time.monotonic())
        if changed is None:
            return
        silent = wall - status.last_heard
        log.info("node %s recovered after about %.1fs of silence", node, silent)
        await self._announce_recovered(node, changed[0], heard, silent)

    async def _announce_recovered(self, node: str, status: NodeStatus, heard: Heard | None,
                                  silent: float) -> None:
        candidates = self.index.on_node(node, "lost")
        listed = set(heard.job_ids) if heard else set()
        workers: set[str] = set()
        if any(j.origin == "submitted" and j.job_id not in listed for j in candidates):
            workers = {a.worker_id for a in await list_adverts(self.bus)}
        still = [j for j in candidates
                 if j.job_id in listed or (j.origin == "submitted" and j.worker_id in workers)]
        resumed = await self._each([j.job_id for j in still],
                                   lambda job: self._resume_job(job, node, status.changes))
        event = NodeRecovered(event_id=f"{node}.recovered.{status.changes}", node=node,
                              silent_s=round(max(0.0, silent), 3), jobs=resumed,
                              monitor=self.instance, simulated=status.simulated)
        await self.bus.publish(topology.node_events(node), event, msg_id=event.event_id)
        self.counts["recovered"] += 1
        await self._announced(node, status.changes, jobs=resumed)

    async def _resume_job(self, job_id: str, node: str, changes: int) -> bool:
        view = self.index.jobs.get(job_id)
        if view is None:
            return False
        got = await self.table.transition(job_id, lc.resume(view.attempt, node))
        if got is None:
            return False
        state, _ = got
        await emit(self.bus, Resumed(
            job_id=job_id, attempt=state.attempt, worker_id=state.worker_id, node=node,
            event_id=f"{job_id}.{state.attempt}.resumed.{node}.{changes}"))
        self.counts["jobs_resumed"] += 1
        return True

    async def _each(self, job_ids: list[str], step: Any) -> list[str]:
        """Run `step(job_id)` for each, a few at a time; the ids it did something for."""
        done: list[str] = []
        for i in range(0, len(job_ids), 32):
            chunk = job_ids[i:i + 32]
            results = await asyncio.gather(*(step(j) for j in chunk), return_exceptions=True)
            for job_id, ok in zip(chunk, results, strict=True):
                if isinstance(ok, BaseException):
                    log.warning("job %s: %s", job_id, ok)
                elif ok:
                    done.append(job_id)
        return done

    # ---- the sweep: unfinished changes, stale jobs ---------------------------------------

    async def _sweep(self) -> None:
        wall = time.time()
        for node, (status, _) in list(self.states.records.items()):
            if status.announced or wall - status.since < ABANDONED_S:
                continue
            log.info("finishing the %s of node %s that its monitor left undone", status.state, node)
            if status.state == "lost":
                await self._announce_lost(node, status, wall - status.last_heard)
            elif status.changes == 0:
                await self._announce_joined(node, status, self.live.get(node))
            else:
                await self._announce_recovered(node, status, self.live.get(node),
                                               status.since - status.last_heard)
        await self._stale(wall)
        for job_id in [j for j in self._job_seen if j not in self.index.jobs]:
            del self._job_seen[job_id]

    def deadline(self, job: JobView) -> float:
        """When a running job becomes stale: no progress (a record change) nor a
        sighting in its node's heartbeat for --stale-after, or still running
        --lost-after past its own time limit."""
        sign = max(job.updated_at, job.started_at or 0.0, self._job_seen.get(job.job_id, 0.0))
        due = sign + self.stale_after
        if job.timeout_s and job.started_at:
            due = min(due, job.started_at + job.timeout_s + self.lost_after)
        return due

    async def _stale(self, wall: float) -> None:
        for job in self.index.running():
            if job.stale or wall <= self.deadline(job):
                continue
            status = self.states.get(job.node or "")
            if status is not None and status.state == "lost":
                continue
            reason = (f"running past its time limit of {job.timeout_s:g}s"
                      if job.timeout_s and job.started_at
                      and wall > job.started_at + job.timeout_s + self.lost_after
                      else f"no progress or heartbeat for {self.stale_after:g}s")
            got = await self.table.transition(job.job_id, lc.mark_stale(job.attempt, reason))
            if got is None:
                continue
            state, rev = got
            await emit(self.bus, Stale(job_id=job.job_id, attempt=state.attempt,
                                       worker_id=state.worker_id, reason=reason,
                                       event_id=f"{job.job_id}.{state.attempt}.stale.{rev}"))
            self.counts["stale"] += 1

    # ---- what `nats micro info` shows --------------------------------------------------

    def info(self) -> dict[str, Any]:
        states = [s for s, _ in self.states.records.values()]
        return {"instance": self.instance, "lost_after_s": self.lost_after,
                "stale_after_s": self.stale_after, "ready": self._ready,
                "nodes_alive": sum(1 for s in states if s.state == "alive"),
                "nodes_lost": sum(1 for s in states if s.state == "lost"),
                "listening": len(self.live.order), "open_jobs": len(self.index.jobs),
                "max_stall_s": round(self.max_stall_s, 3), **self.counts}

