"""Jobs nobody submitted, and processes of jobs somebody did, through the lifecycle.

A discovered process becomes a job of origin `discovered` in KV `jobs`
(`lc.discovered_job`) with a `discovered` event; when it exits, `lc.end_process`
and an `ended` event. A process carrying JETFLEET_JOB_ID is linked to that
submitted job (`lc.link_process`, a `linked` event) instead of becoming a
second job; if no such job exists it is a discovered job after all.

Every step is retried on the next cycle until the bus confirms it, and each
is idempotent: creating a record that exists adopts it (an agent restart
finds the same stable ids), ending an ended job is a no-op. A restarted agent
first ends what its predecessor reported running and is gone now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import psutil

from agents.node.scanner import Ended as ProcessEnded
from agents.node.scanner import Job, Scanner
from bus import codec, topology
from bus.connection import Bus
from bus.jobtable import JobTable, emit
from bus.objects import ObjectStore
from schemas import lifecycle as lc
from schemas.events import Discovered, Ended, Linked
from schemas.telemetry import DiscoveredJobs, ProcessLink

log = logging.getLogger(__name__)
# Failures of one step while the bus is up before it is given up (a record
# the server refuses, say); failures while the bus is away do not count.
MAX_TRIES = 3


@dataclass
class _Pending:
    job: Job
    created: bool = False  # the record exists; only its event is still owed
    tries: int = 0


class JobTracker:
    def __init__(self, bus: Bus, node: str, scanner: Scanner, timeout: float = 5.0) -> None:
        self.bus = bus
        self.node = node
        self.scanner = scanner
        self.table = JobTable(bus)
        self.timeout = timeout
        self._new: dict[tuple[int, float], _Pending] = {}
        self._ended: list[ProcessEnded] = []
        self._end_tries = 0
        self.discovered = 0
        self.linked = 0
        self.ended = 0

    @property
    def pending(self) -> int:
        return len(self._new) + len(self._ended)

    async def apply(self, new: list[Job], ended: list[ProcessEnded]) -> None:
        for job in new:
            self._new[(job.root.pid, job.root.create_time)] = _Pending(job)
        self._ended.extend(ended)
        await self.flush()

    async def flush(self) -> None:
        """Announce new jobs, then end gone ones; stop at the first bus failure
        (the rest waits for the next cycle, in order). A step that keeps failing
        while the bus is up is given up after MAX_TRIES, so it cannot block the rest."""
        for key, pending in list(self._new.items()):
            if not await self._step(self._announce(pending), pending, f"announcing {pending.job.job_id}"):
                if pending.tries < MAX_TRIES:
                    return
            del self._new[key]
        while self._ended:
            gone = self._ended[0]
            key = (gone.job.root.pid, gone.job.root.create_time)
            first = self._new.get(key)
            if first is not None:  # vanished before it could be announced: it still ran
                if not await self._step(self._announce(first), first, f"announcing {first.job.job_id}"):
                    if first.tries < MAX_TRIES:
                        return
                del self._new[key]
            holder = _Pending(gone.job, tries=self._end_tries)
            if not await self._step(self._end(gone), holder, f"ending {gone.job.job_id}"):
                self._end_tries = holder.tries
                if holder.tries < MAX_TRIES:
                    return
            self._end_tries = 0
            self._ended.pop(0)

    async def _step(self, step: Coroutine[Any, Any, None], pending: _Pending, what: str) -> bool:
        try:
            await asyncio.wait_for(step, self.timeout)
            return True
        except Exception as exc:
            if self.bus.nc.is_connected:
                pending.tries += 1
            level = logging.WARNING if pending.tries >= MAX_TRIES else logging.INFO
            log.log(level, "%s failed (%s: %s)%s", what, type(exc).__name__, exc,
                    "; given up" if pending.tries >= MAX_TRIES else "; retried next cycle")
            return False

    # ---- steps -------------------------------------------------------------------------

    async def _announce(self, pending: _Pending) -> None:
        job = pending.job
        if job.origin == "submitted":
            if await self.table.get(job.job_id) is None:
                self.scanner.unlink(job)
            else:
                await self._link(job)
                return
        info = job.captured.info
        if not pending.created:
            for blob in job.captured.blobs:
                ref = await ObjectStore(self.bus).put(blob.data, name=blob.name)
                if blob.field == "code":
                    info.code_ref = ref
                else:
                    info.config_ref = ref
            job.captured.blobs = []
            devices = sorted(job.gpus)
            rev = await self.table.create(lc.discovered_job(job.job_id, info, node=self.node,
                                                            devices=devices))
            if rev is None:
                # Known already: this agent restarted, or the id was linked before.
                log.info("job %s is known already; tracking it again", job.job_id)
                return
            pending.created = True
        await emit(self.bus, Discovered(job_id=job.job_id, attempt=1, node=self.node,
                                        process=info, devices=sorted(job.gpus)))
        self.discovered += 1

    async def _link(self, job: Job) -> None:
        info = job.captured.info
        link = ProcessLink(node=self.node, pid=info.pid, create_time=info.create_time,
                           cmdline=info.cmdline[:64])
        got = await self.table.transition(job.job_id, lc.link_process(link))
        if got is None:
            return  # linked already (agent restart), or the job has ended
        state, _ = got
        await emit(self.bus, Linked(
            job_id=job.job_id, attempt=state.attempt, worker_id=state.worker_id, process=link,
            event_id=f"{job.job_id}.{state.attempt}.linked.{self.node}-{info.pid}-"
                     f"{round(info.create_time * 100):x}"))
        self.linked += 1

    async def _end(self, gone: ProcessEnded) -> None:
        job = gone.job
        if job.origin != "discovered":
            return  # a submitted job is settled by its worker, not by its processes
        await self.end_job(job.job_id, gone.exit_code, gone.runtime_s)

    async def end_job(self, job_id: str, exit_code: int | None, runtime_s: float | None) -> None:
        got = await self.table.transition(job_id, lc.end_process(exit_code))
        if got is None:
            return  # ended already, or never recorded
        state, _ = got
        await emit(self.bus, Ended(job_id=job_id, attempt=state.attempt, node=self.node,
                                   exit_code=exit_code, runtime_s=runtime_s))
        self.ended += 1

    # ---- after a restart -----------------------------------------------------------------

    async def reconcile(self) -> int:
        """End the discovered jobs the previous agent on this node last reported
        whose processes are gone now. Returns how many it ended."""
        try:
            raw = await self.bus.js.get_last_msg(
                topology.TELEMETRY, topology.telemetry(self.node, topology.DISCOVERED))
        except Exception:
            return 0  # nothing reported yet (or the stream aged it out)
        try:
            last = codec.decode(raw.data or b"", DiscoveredJobs)
        except codec.DecodeError:
            return 0
        ended = 0
        for ref in last.jobs:
            if ref.origin != "discovered" or _running(ref.pid, ref.create_time):
                continue
            try:
                await asyncio.wait_for(self.end_job(ref.job_id, None, None), self.timeout)
                ended += 1
            except Exception as exc:
                log.warning("could not end %s after restart: %s", ref.job_id, exc)
        return ended


def _running(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return bool(abs(p.create_time() - create_time) < 0.02
                    and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
