"""Progress: coalesced events, and the job record updated at most once a second.

`ctx.progress()` is cheap and callable from any thread. Events go out at once
while a small burst allowance lasts (`burst` reports, refilled at
`1 / event_interval_s` a second); beyond it reports are coalesced, the latest
winning, and none is lost at the end (pending progress is flushed before the
outcome is announced). The record's `progress` field follows at most once
every `record_interval_s`, so a handler reporting in a tight loop costs the
bus next to nothing while one that reports now and then loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from agents.worker.middleware import Middleware
from agents.worker.outcome import Outcome
from bus.connection import Bus
from bus.jobtable import JobTable, emit
from schemas import lifecycle as lc
from schemas.events import Progress as ProgressEvent

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt


class Reporter:
    def __init__(self, att: Attempt, bus: Bus, jobs: JobTable, worker_id: str,
                 event_interval_s: float, record_interval_s: float, burst: int = 10) -> None:
        self.att = att
        self.bus = bus
        self.jobs = jobs
        self.worker_id = worker_id
        self.event_interval_s = event_interval_s
        self.record_interval_s = record_interval_s
        self.loop = asyncio.get_running_loop()
        self.latest: tuple[float | None, str | None, dict[str, Any] | None] | None = None
        self.burst = burst
        self.tokens = float(burst)
        self.refilled = time.monotonic()
        self.last_record = 0.0
        self.event_timer: asyncio.TimerHandle | None = None
        self.record_timer: asyncio.TimerHandle | None = None
        self.record_fraction: float | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.flushing = False

    def report(self, fraction: float | None, message: str | None,
               data: dict[str, Any] | None) -> None:
        """From the handler: its loop or any thread."""
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._on(fraction, message, data)
        else:
            self.loop.call_soon_threadsafe(self._on, fraction, message, data)

    def _on(self, fraction: float | None, message: str | None,
            data: dict[str, Any] | None) -> None:
        if self.closed:
            return
        self.latest = (fraction, message, data)
        if self.event_timer is not None:
            return  # coalescing: the timer sends the latest
        t = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (t - self.refilled) / self.event_interval_s)
        self.refilled = t
        if self.tokens >= 1.0:
            self._fire()
        else:
            delay = (1.0 - self.tokens) * self.event_interval_s
            self.event_timer = self.loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self.event_timer = None
        if self.latest is None:
            return
        fraction, message, data = self.latest
        self.latest = None
        t = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (t - self.refilled) / self.event_interval_s)
        self.tokens = max(0.0, self.tokens - 1.0)
        self.refilled = t
        att = self.att
        self._spawn(emit(self.bus, ProgressEvent(job_id=att.job_id, attempt=att.number,
                                                 worker_id=self.worker_id, progress=fraction,
                                                 message=message, data=data)))
        if fraction is not None and not self.flushing:
            self.record_fraction = fraction
            if self.record_timer is None:
                delay = max(0.0, self.last_record + self.record_interval_s - time.monotonic())
                self.record_timer = self.loop.call_later(delay, self._record)

    def _record(self) -> None:
        self.record_timer = None
        self.last_record = time.monotonic()
        self._spawn(self.jobs.transition(self.att.job_id,
                                         lc.note_progress(self.att.number, self.record_fraction)))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            pass  # progress is best effort: a lost report is superseded by the next

    async def flush(self) -> None:
        """Send what is pending, so progress precedes the outcome on the stream.
        A record write still waiting for its slot is dropped: the outcome's own
        write follows at once, and racing it would only cost a compare-and-set."""
        if self.record_timer is not None:
            self.record_timer.cancel()
            self.record_timer = None
        self.flushing = True
        if self.event_timer is not None:
            self.event_timer.cancel()
            self._fire()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5.0)

    def close(self) -> None:
        self.closed = True
        for timer in (self.event_timer, self.record_timer):
            if timer is not None:
                timer.cancel()
        for task in self.tasks:
            task.cancel()


class ProgressReports(Middleware):
    name = "progress"

    def __init__(self, bus: Bus, jobs: JobTable, worker_id: str, *,
                 event_interval_s: float = 0.05, record_interval_s: float = 1.0) -> None:
        self.bus = bus
        self.jobs = jobs
        self.worker_id = worker_id
        self.event_interval_s = event_interval_s
        self.record_interval_s = record_interval_s

    async def after_start(self, att: Attempt) -> None:
        reporter = Reporter(att, self.bus, self.jobs, self.worker_id, self.event_interval_s,
                            self.record_interval_s)
        att.notes["progress"] = reporter
        att.on_progress = reporter.report

    async def after_invoke(self, att: Attempt, outcome: Outcome) -> Outcome:
        reporter: Reporter | None = att.notes.get("progress")
        if reporter is not None:
            with contextlib.suppress(Exception):
                await reporter.flush()
        return outcome

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        att.on_progress = None
        reporter: Reporter | None = att.notes.pop("progress", None)
        if reporter is not None:
            reporter.close()
