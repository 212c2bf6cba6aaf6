"""The job lifecycle: every change of a job's state as a pure transition.

    submitted -> queued -> running(attempt n) -> succeeded | failed | cancelled
                   |  ^        |   |   |
                   v  |        |   |   +-> retrying -> running(n+1) ...
            unschedulable      |   +-----> lost -> running(n+1) | running(n) (resumed)
                               +---------> dead (attempts or deliveries exhausted)

Discovered jobs (a process nobody submitted) start `running` and end `ended`.

Each transition names the states it may start from and the state it sets; its
body may decline (return False) when the record is not what the caller
expects (another attempt owns the job, a cancel came first). A transition
never starts from a terminal state, so nothing can end a job twice. Calling a
transition with its parameters gives a `Mutation` for `JobTable.transition`,
which applies it under compare-and-set; every component that changes a job
(dispatcher, worker, monitor, node agent) goes through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, get_args

import msgspec

from schemas.common import ErrorInfo, ObjRef, now
from schemas.jobs import TERMINAL_STATES, AttemptRecord, JobState, JobStatus, JobSubmission
from schemas.telemetry import ProcessInfo, ProcessLink

P = ParamSpec("P")
Mutation = Callable[[JobState], JobState | None]

ALL_STATES: frozenset[str] = frozenset(get_args(JobStatus))
OPEN_STATES: frozenset[str] = ALL_STATES - TERMINAL_STATES
# Open, and nobody runs it right now: a cancel ends it on the spot.
IDLE_STATES: frozenset[str] = frozenset({"submitted", "queued", "unschedulable", "retrying", "lost"})
# States a new attempt may start from.
STARTABLE: frozenset[str] = IDLE_STATES


class Transition(Generic[P]):
    """One named step of the lifecycle: allowed sources, the target, the effect."""

    registry: dict[str, Transition[Any]] = {}

    def __init__(self, effect: Callable[Concatenate[JobState, P], bool | None],
                 sources: frozenset[str], target: JobStatus | None) -> None:
        assert sources <= OPEN_STATES, f"{effect.__name__}: a transition never leaves a terminal state"
        self.name = effect.__name__
        self.effect = effect
        self.sources = sources
        self.target = target
        Transition.registry[self.name] = self

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Mutation:
        def mutate(s: JobState) -> JobState | None:
            if s.state not in self.sources:
                return None
            new = _copy(s)
            if self.effect(new, *args, **kwargs) is False:
                return None
            if self.target is not None:
                new.state = self.target
            if new.state in TERMINAL_STATES and new.ended_at is None:
                new.ended_at = now()
            return new

        mutate.transition = self  # type: ignore[attr-defined]
        return mutate

    def __repr__(self) -> str:
        target = self.target or "(same)"
        return f"<transition {self.name}: {sorted(self.sources)} -> {target}>"


def transition(sources: frozenset[str] | set[str], target: JobStatus | None = None
               ) -> Callable[[Callable[Concatenate[JobState, P], bool | None]], Transition[P]]:
    def declare(effect: Callable[Concatenate[JobState, P], bool | None]) -> Transition[P]:
        return Transition(effect, frozenset(sources), target)

    return declare


def _copy(s: JobState) -> JobState:
    # Effects assign new lists and records instead of changing them in place,
    # so a shallow copy keeps the caller's state untouched.
    return msgspec.structs.replace(s)


# An attempt marked lost (its node went quiet for a while) that still finishes
# on its worker settles like a running one: the result is real.
SETTLEABLE: frozenset[str] = frozenset({"running", "lost"})


def owned(s: JobState, attempt: int, worker_id: str | None) -> bool:
    """This attempt on this worker holds the job: only it may settle it."""
    return s.state in SETTLEABLE and s.attempt == attempt and s.worker_id == worker_id


def _close_attempt(s: JobState, attempt: int, outcome: str, error: ErrorInfo | None) -> None:
    s.attempts = [
        msgspec.structs.replace(a, ended_at=now(), outcome=outcome, error=error)
        if a.attempt == attempt and (a.ended_at is None or a.outcome == "lost") else a
        for a in s.attempts
    ]


# ---- creation (no source state) -------------------------------------------------------


def new_job(sub: JobSubmission, job_id: str, *, submit_seq: int | None = None) -> JobState:
    """The record the dispatcher creates for an accepted submission."""
    return JobState(
        job_id=job_id, state="queued", capability=dict(sub.capability), priority=sub.priority,
        user=sub.user, labels=sub.labels, max_attempts=sub.max_attempts, submitted_at=now(),
        parent_job_id=sub.parent_job_id, submit_seq=submit_seq, resources=sub.resources,
        timeout_s=sub.timeout_s, depth=sub.depth,
    )


def refused_job(job_id: str, error: ErrorInfo) -> JobState:
    """The record of a submission that can never run (invalid, too large)."""
    t = now()
    return JobState(job_id=job_id, state="failed", error=error, submitted_at=t, ended_at=t,
                    reason=error.message)


def discovered_job(job_id: str, process: ProcessInfo, *, node: str,
                   devices: list[str] | None = None) -> JobState:
    """A process nobody submitted, found running on `node`."""
    started = process.create_time or now()
    return JobState(
        job_id=job_id, state="running", origin="discovered", capability={"type": "discovered"},
        user=process.username, node=node, devices=list(devices or []), submitted_at=started,
        started_at=started, process=process, attempt=1,
        attempts=[AttemptRecord(attempt=1, node=node, devices=list(devices or []),
                                started_at=started)],
    )


# ---- scheduling ---------------------------------------------------------------------------


@transition({"submitted", "queued"}, "unschedulable")
def mark_unschedulable(s: JobState, reason: str) -> bool:
    s.reason = reason
    return True


@transition({"unschedulable"}, "queued")
def requeue(s: JobState) -> bool:
    s.reason = None
    return True


# ---- attempts -------------------------------------------------------------------------------


@transition(STARTABLE, "running")
def start(s: JobState, attempt: int, worker_id: str, node: str, devices: list[str]) -> bool:
    if s.cancel_requested or s.attempt != attempt - 1 or attempt > s.max_attempts:
        return False
    t = now()
    s.attempt, s.worker_id, s.node, s.devices = attempt, worker_id, node, list(devices)
    s.started_at, s.reason, s.progress, s.stale = t, None, None, False
    s.attempts = [*s.attempts, AttemptRecord(attempt=attempt, worker_id=worker_id, node=node,
                                             devices=list(devices), started_at=t)]
    return True


@transition(SETTLEABLE, "queued")
def undo_start(s: JobState, attempt: int, worker_id: str) -> bool:
    """The handler handed the job back (Delegate): as if the attempt never began."""
    if not owned(s, attempt, worker_id):
        return False
    s.attempt, s.worker_id, s.devices = attempt - 1, None, []
    s.attempts = [a for a in s.attempts if a.attempt != attempt]
    return True


@transition({"running"})
def note_progress(s: JobState, attempt: int, fraction: float | None) -> bool:
    if s.attempt != attempt:
        return False
    s.progress, s.stale = fraction, False
    return True


@transition(SETTLEABLE, "succeeded")
def succeed(s: JobState, attempt: int, worker_id: str, result: Any,
            result_ref: ObjRef | None = None) -> bool:
    if not owned(s, attempt, worker_id):
        return False
    s.result, s.result_ref, s.error, s.progress = result, result_ref, None, 1.0
    _close_attempt(s, attempt, "succeeded", None)
    return True


@transition(SETTLEABLE, "failed")
def fail(s: JobState, attempt: int, worker_id: str, error: ErrorInfo) -> bool:
    if not owned(s, attempt, worker_id):
        return False
    s.error = error
    _close_attempt(s, attempt, "failed", error)
    return True


@transition(SETTLEABLE, "retrying")
def retry(s: JobState, attempt: int, worker_id: str, error: ErrorInfo) -> bool:
    if not owned(s, attempt, worker_id) or attempt >= s.max_attempts:
        return False
    s.error, s.worker_id = error, None
    _close_attempt(s, attempt, "failed", error)
    return True


@transition(SETTLEABLE, "dead")
def exhaust(s: JobState, attempt: int, worker_id: str, error: ErrorInfo) -> bool:
    """The last attempt failed: the job is dead."""
    if not owned(s, attempt, worker_id):
        return False
    s.error = error
    _close_attempt(s, attempt, "failed", error)
    return True


@transition(OPEN_STATES, "dead")
def kill(s: JobState, error: ErrorInfo) -> bool:
    """Deliveries or attempts ran out before an attempt could settle."""
    s.error = error
    _close_attempt(s, s.attempt, "dead", error)
    return True


@transition({"running"}, "lost")
def lose(s: JobState, attempt: int, reason: str, node: str | None = None) -> bool:
    """The attempt's worker (or, given `node`, its node) went silent."""
    if s.attempt != attempt or (node is not None and s.node != node):
        return False
    s.error = ErrorInfo(code="worker_lost", message=reason, attempt=attempt)
    s.reason = reason
    _close_attempt(s, attempt, "lost", s.error)
    return True


@transition({"lost"}, "running")
def resume(s: JobState, attempt: int, node: str) -> bool:
    """The node came back and the same attempt is still running there."""
    if s.attempt != attempt or s.node != node:
        return False
    s.error, s.reason, s.stale = None, None, False
    s.attempts = [msgspec.structs.replace(a, ended_at=None, outcome=None, error=None)
                  if a.attempt == attempt else a for a in s.attempts]
    return True


@transition(SETTLEABLE)
def note_reads(s: JobState, attempt: int, reads: dict[str, list[int]]) -> bool:
    """The shared resources (and their versions) the attempt read."""
    if s.attempt != attempt or not reads:
        return False
    s.attempts = [msgspec.structs.replace(a, resources_read={**a.resources_read, **reads})
                  if a.attempt == attempt else a for a in s.attempts]
    return True


@transition({"running"})
def mark_stale(s: JobState, attempt: int, reason: str) -> bool:
    if s.attempt != attempt or s.stale:
        return False
    s.stale, s.reason = True, reason
    return True


# ---- cancel -------------------------------------------------------------------------------


@transition(IDLE_STATES, "cancelled")
def cancel(s: JobState, reason: str) -> bool:
    """Nobody runs it: cancelled on the spot."""
    s.reason = reason
    return True


@transition({"running"})
def request_cancel(s: JobState, reason: str) -> bool:
    """It runs somewhere: flag it; its worker stops it and confirms."""
    if s.cancel_requested:
        return False
    s.cancel_requested, s.reason = True, reason
    return True


@transition(OPEN_STATES, "cancelled")
def confirm_cancel(s: JobState, attempt: int, reason: str) -> bool:
    s.reason = reason
    _close_attempt(s, attempt, "cancelled", None)
    return True


# ---- processes ----------------------------------------------------------------------------


@transition({"running", "lost"}, "ended")
def end_process(s: JobState, exit_code: int | None) -> bool:
    """A discovered job's process exited."""
    if s.origin != "discovered":
        return False
    s.exit_code = exit_code
    _close_attempt(s, s.attempt, "ended", None)
    return True


@transition(OPEN_STATES)
def link_process(s: JobState, link: ProcessLink) -> bool:
    """A process of a submitted job (JETFLEET_JOB_ID in its environment) was seen."""
    key = (link.node, link.pid, link.create_time)
    if any((p.node, p.pid, p.create_time) == key for p in s.processes):
        return False
    s.processes = [*s.processes, link]
    return True


def transitions() -> dict[str, Transition[Any]]:
    """Every declared transition by name (for documentation and tests)."""
    return dict(Transition.registry)


def describe() -> str:
    """The lifecycle as a table, one transition a line."""
    rows = [f"{t.name:<20} {', '.join(sorted(t.sources)):<60} -> {t.target or '(same)'}"
            for t in Transition.registry.values()]
    return "\n".join(rows)


def can(name: str, state: str) -> bool:
    return state in Transition.registry[name].sources
