"""How an attempt (or a delivery that never became one) ends: one type, settled
in one place (agents.worker.settle).

Produced by the pipeline and its middleware, never raised:

    Succeeded   the handler returned; its result is recorded
    Failed      the handler failed; `retryable` tells the retry policy what to do
    Stopped     stopped from outside (cancel, timeout, lost lease, shutdown,
                superseded); the retry policy turns it into one of the below
    Retry       try again after `delay_s` (a new attempt)
    Dead        attempts (or deliveries) are spent
    Cancelled   the job was cancelled
    Delegated   this worker cannot run it after all: back to the stream, no attempt used
    Busy        every device it could use is leased: back to the stream, no attempt used
    Abandoned   another attempt owns the job now: leave its message alone
    Announced   the job had already ended: say so again (its event may have been lost)
    Rejected    the message cannot be processed (no record of the job): dead-letter it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from schemas.common import ErrorInfo
from schemas.jobs import JobState

StopReason = Literal["cancelled", "timeout", "lease_lost", "shutdown", "superseded"]


@dataclass(frozen=True)
class Succeeded:
    result: Any
    duration_s: float


@dataclass(frozen=True)
class Failed:
    error: ErrorInfo
    retryable: bool


@dataclass(frozen=True)
class Stopped:
    reason: StopReason
    message: str
    error: ErrorInfo | None = None  # what the handler raised while being stopped


@dataclass(frozen=True)
class Retry:
    error: ErrorInfo
    delay_s: float


@dataclass(frozen=True)
class Dead:
    error: ErrorInfo


@dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclass(frozen=True)
class Delegated:
    reason: str


@dataclass(frozen=True)
class Busy:
    delay_s: float


@dataclass(frozen=True)
class Abandoned:
    reason: str


@dataclass(frozen=True)
class Announced:
    state: JobState


@dataclass(frozen=True)
class Rejected:
    reason: str


Outcome = (Succeeded | Failed | Stopped | Retry | Dead | Cancelled | Delegated | Busy
           | Abandoned | Announced | Rejected)


def describe(outcome: Outcome) -> str:
    return type(outcome).__name__.lower()
