"""A worker's writes to a job's record: each a lifecycle transition under
compare-and-set (schemas.lifecycle) and, when it applied, the event that says so.

The events are returned, not published, so the caller can pipeline them with
the message's acknowledgement (agents.worker.settle).
"""

from __future__ import annotations

from typing import Any

from bus.connection import Bus
from bus.jobtable import JobTable
from schemas import lifecycle as lc
from schemas.common import ErrorInfo, ObjRef, now
from schemas.events import Cancelled, Dead, Failed, JobEvent, Lost, Retrying, Succeeded
from schemas.jobs import JobState


class Ledger:
    def __init__(self, bus: Bus, jobs: JobTable, worker_id: str, node: str) -> None:
        self.bus = bus
        self.jobs = jobs
        self.worker_id = worker_id
        self.node = node

    async def apply(self, job_id: str, mutation: lc.Mutation) -> JobState | None:
        got = await self.jobs.transition(job_id, mutation)
        return got[0] if got is not None else None

    async def start(self, job_id: str, attempt: int, devices: list[str]) -> JobState | None:
        return await self.apply(job_id, lc.start(attempt, self.worker_id, self.node, devices))

    async def succeed(self, job_id: str, attempt: int, result: Any, duration_s: float,
                      result_ref: ObjRef | None = None) -> JobEvent | None:
        if await self.apply(job_id, lc.succeed(attempt, self.worker_id, result,
                                               result_ref)) is None:
            return None
        return Succeeded(job_id=job_id, attempt=attempt, worker_id=self.worker_id,
                         result=result, result_ref=result_ref, duration_s=duration_s)

    async def fail(self, job_id: str, attempt: int, error: ErrorInfo) -> JobEvent | None:
        error.attempt = attempt
        if await self.apply(job_id, lc.fail(attempt, self.worker_id, error)) is None:
            return None
        return Failed(job_id=job_id, attempt=attempt, worker_id=self.worker_id, error=error)

    async def retry(self, job_id: str, attempt: int, error: ErrorInfo,
                    delay_s: float) -> JobEvent | None:
        error.attempt = attempt
        if await self.apply(job_id, lc.retry(attempt, self.worker_id, error)) is None:
            return None
        return Retrying(job_id=job_id, attempt=attempt, worker_id=self.worker_id, error=error,
                        delay_s=delay_s)

    async def dead(self, job_id: str, attempt: int, error: ErrorInfo,
                   started: bool) -> JobEvent | None:
        """Attempts spent: from this worker's own failed attempt, or before one began."""
        error.attempt = error.attempt or attempt
        mutation = (lc.exhaust(attempt, self.worker_id, error) if started else lc.kill(error))
        state = await self.apply(job_id, mutation)
        if state is None:
            return None
        return Dead(job_id=job_id, attempt=attempt, worker_id=self.worker_id, error=error,
                    errors=[a.error for a in state.attempts if a.error is not None])

    async def cancelled(self, job_id: str, attempt: int, reason: str) -> JobEvent | None:
        if await self.apply(job_id, lc.confirm_cancel(attempt, reason)) is None:
            return None
        return Cancelled(job_id=job_id, attempt=attempt, worker_id=self.worker_id, reason=reason)

    async def lost(self, s: JobState) -> JobEvent | None:
        """The previous attempt's worker stopped heartbeating the job (its message came back)."""
        reason = f"worker {s.worker_id} stopped heartbeating the job"
        if await self.apply(s.job_id, lc.lose(s.attempt, reason)) is None:
            return None
        return Lost(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id, reason=reason)

    async def undo(self, job_id: str, attempt: int) -> bool:
        return await self.apply(job_id, lc.undo_start(attempt, self.worker_id)) is not None

    def reannouncement(self, s: JobState) -> JobEvent | None:
        """The terminal event of an ended job, to say again under its stable event id
        (the EVENTS dedup window drops it when it was said). None when too old to
        be deduplicated, or nothing to say."""
        if s.ended_at is not None and now() - s.ended_at > self.bus.settings.duplicate_window_s / 2:
            return None
        if s.state == "succeeded":
            return Succeeded(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                             result=s.result, result_ref=s.result_ref)
        if s.state == "failed" and s.attempt > 0 and s.error is not None:
            return Failed(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id, error=s.error)
        if s.state == "cancelled":
            return Cancelled(job_id=s.job_id, attempt=s.attempt, reason=s.reason or "")
        if s.state == "dead" and s.error is not None:
            return Dead(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id, error=s.error,
                        errors=[a.error for a in s.attempts if a.error])
        return None
