"""A worker's attempt ledger: every change it makes to a job's record in KV
`jobs`, each a compare-and-set followed by the event that announces it.

An attempt is owned while the record says `running` with this attempt number
and this worker: only the owner may settle it. A transition that finds the job
owned elsewhere raises `Abandon` (the newer attempt settles the message), one
that ends the job's attempts raises `Reject` (the message goes to DEAD), and a
retry raises `Retry` with its backoff: the consumer loop settles accordingly.
"""

from __future__ import annotations

import contextlib
from typing import Any

from bus.connection import Bus
from bus.consumer import Abandon, Reject, Retry, backoff
from bus.jobtable import JobTable, emit
from schemas.common import ErrorInfo, now
from schemas.events import Cancelled, Dead, Failed, Lost, Retrying, Succeeded
from schemas.jobs import AttemptRecord, JobState, WorkItem


class Ledger:
    def __init__(self, bus: Bus, jobs: JobTable, worker_id: str, node: str) -> None:
        self.bus = bus
        self.jobs = jobs
        self.worker_id = worker_id
        self.node = node

    async def reannounce(self, s: JobState) -> None:
        if s.ended_at is not None and now() - s.ended_at > self.bus.settings.duplicate_window_s / 2:
            return  # outside the dedup window a second copy would not be dropped
        event: Any
        if s.state == "succeeded":
            event = Succeeded(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                              result=s.result)
        elif s.state == "failed" and s.attempt > 0 and s.error is not None:
            event = Failed(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                           error=s.error)
        elif s.state == "cancelled":
            event = Cancelled(job_id=s.job_id, attempt=s.attempt, reason=s.reason or "")
        elif s.state == "dead" and s.error is not None:
            event = Dead(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                         error=s.error, errors=[a.error for a in s.attempts if a.error])
        else:
            return
        with contextlib.suppress(Exception):
            await emit(self.bus, event)
        if s.state == "dead" and s.error is not None:
            # Its DEAD entry has a stable id too: dead-letter it (again) and term.
            raise Reject(f"{s.error.code}: {s.error.message}", job_id=s.job_id)

    async def start(self, item: WorkItem, attempt: int, devices: list[str]) -> bool:

        def start(s: JobState) -> JobState | None:
            if s.terminal or s.cancel_requested or s.attempt != attempt - 1:
                return None
            s.state, s.attempt, s.worker_id, s.node = "running", attempt, self.worker_id, self.node
            s.devices, s.started_at, s.reason, s.progress = devices, now(), None, None
            s.attempts = [*s.attempts, AttemptRecord(attempt=attempt, worker_id=self.worker_id,
                                                     devices=devices, started_at=now())]
            return s

        return await self.jobs.transition(item.job_id, start) is not None

    def owns(self, s: JobState, attempt: int) -> bool:
        return s.state == "running" and s.attempt == attempt and s.worker_id == self.worker_id

    async def finish(self, item: WorkItem, attempt: int, kind: str, *, result: Any = None,
                      error: ErrorInfo | None = None, duration_s: float | None = None) -> None:
        def end(s: JobState) -> JobState | None:
            if not self.owns(s, attempt):
                return None
            s.state, s.ended_at, s.progress = kind, now(), 1.0 if kind == "succeeded" else s.progress  # type: ignore[assignment]
            s.result, s.error = result, error
            _close_attempt(s, attempt, kind, error)
            return s

        if await self.jobs.transition(item.job_id, end) is None:
            raise Abandon()  # another attempt owns the job now: its result, not ours
        if kind == "succeeded":
            await emit(self.bus, Succeeded(job_id=item.job_id, attempt=attempt,
                                           worker_id=self.worker_id, result=result,
                                           duration_s=duration_s))
        else:
            assert error is not None
            await emit(self.bus, Failed(job_id=item.job_id, attempt=attempt,
                                        worker_id=self.worker_id, error=error))

    async def cancelled(self, item: WorkItem, attempt: int, reason: str) -> None:
        def end(s: JobState) -> JobState | None:
            if s.terminal:
                return None
            s.state, s.ended_at, s.reason = "cancelled", now(), reason
            _close_attempt(s, attempt, "cancelled", None)
            return s

        if await self.jobs.transition(item.job_id, end) is not None:
            await emit(self.bus, Cancelled(job_id=item.job_id, attempt=attempt,
                                           worker_id=self.worker_id, reason=reason))

    async def retry_or_die(self, item: WorkItem, attempt: int, error: ErrorInfo) -> None:
        error.attempt = attempt
        if attempt >= item.max_attempts:
            def end(s: JobState) -> JobState | None:
                if not self.owns(s, attempt):
                    return None
                _close_attempt(s, attempt, "failed", error)
                return s

            if await self.jobs.transition(item.job_id, end) is None:
                raise Abandon()
            await self.dead(item, attempt, error)
        delay = backoff(attempt)

        def again(s: JobState) -> JobState | None:
            if not self.owns(s, attempt):
                return None
            s.state, s.error, s.worker_id = "retrying", error, None
            _close_attempt(s, attempt, "failed", error)
            return s

        if await self.jobs.transition(item.job_id, again) is None:
            raise Abandon()
        await emit(self.bus, Retrying(job_id=item.job_id, attempt=attempt,
                                      worker_id=self.worker_id, error=error, delay_s=delay))
        raise Retry(delay)

    async def dead(self, item: WorkItem, attempt: int, error: ErrorInfo) -> None:
        """Attempts spent: the job is dead and its message goes to DEAD."""
        errors: list[ErrorInfo] = []

        def end(s: JobState) -> JobState | None:
            if s.terminal:
                return None
            s.state, s.ended_at, s.error = "dead", now(), error
            errors.extend(a.error for a in s.attempts if a.error is not None)
            return s

        if await self.jobs.transition(item.job_id, end) is not None:
            await emit(self.bus, Dead(job_id=item.job_id, attempt=attempt,
                                      worker_id=self.worker_id, error=error, errors=errors))
        raise Reject(f"{error.code}: {error.message}", job_id=item.job_id)

    async def lost(self, s: JobState) -> None:
        """The previous attempt's worker went silent (its message came back)."""
        error = ErrorInfo(code="worker_lost", attempt=s.attempt,
                          message=f"worker {s.worker_id} stopped heartbeating the job")

        def lose(cur: JobState) -> JobState | None:
            if cur.state != "running" or cur.attempt != s.attempt:
                return None
            cur.state, cur.error = "lost", error
            _close_attempt(cur, s.attempt, "lost", error)
            return cur

        if await self.jobs.transition(s.job_id, lose) is not None:
            await emit(self.bus, Lost(job_id=s.job_id, attempt=s.attempt, worker_id=s.worker_id,
                                      reason=error.message))

    async def undo(self, item: WorkItem, attempt: int) -> None:
        def back(s: JobState) -> JobState | None:
            if not self.owns(s, attempt):
                return None
            s.state, s.attempt, s.worker_id, s.devices = "queued", attempt - 1, None, []
            s.attempts = [a for a in s.attempts if a.attempt != attempt]
            return s

        await self.jobs.transition(item.job_id, back)


def _close_attempt(s: JobState, attempt: int, outcome: str, error: ErrorInfo | None) -> None:
    for a in s.attempts:
        if a.attempt == attempt and a.ended_at is None:
            a.ended_at, a.outcome, a.error = now(), outcome, error
