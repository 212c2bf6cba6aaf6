"""Lifecycle events: every one is published on `events.jobs.<job_id>` (EVENTS stream).

The union is tagged by `kind`, so `nats sub 'events.jobs.>'` shows plain JSON
and `decode_event` gives back the right Struct.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.common import SCHEMA_VERSION, ErrorInfo, ObjRef, now
from schemas.telemetry import ProcessInfo, ProcessLink


class JobEventBase(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="kind"):
    schema: int = SCHEMA_VERSION
    event_id: str = ""
    job_id: str
    ts: float = msgspec.field(default_factory=now)
    attempt: int = 0
    worker_id: str | None = None


class Submitted(JobEventBase, tag="submitted"):
    capability: dict[str, str] = {}
    priority: int = 1
    user: str | None = None
    parent_job_id: str | None = None


class Queued(JobEventBase, tag="queued"):
    subject: str = ""


class Unschedulable(JobEventBase, tag="unschedulable"):
    reason: str = ""


class Running(JobEventBase, tag="running"):
    node: str | None = None
    devices: list[str] = []


class Progress(JobEventBase, tag="progress"):
    progress: float | None = None
    message: str | None = None
    data: dict[str, Any] | None = None


class Succeeded(JobEventBase, tag="succeeded"):
    result: Any = None
    result_ref: ObjRef | None = None  # a large result, in the object store
    duration_s: float | None = None


class Failed(JobEventBase, tag="failed"):
    error: ErrorInfo


class Retrying(JobEventBase, tag="retrying"):
    error: ErrorInfo | None = None
    delay_s: float = 0.0


class Cancelled(JobEventBase, tag="cancelled"):
    reason: str = ""


class Lost(JobEventBase, tag="lost"):
    reason: str = ""


class Delegated(JobEventBase, tag="delegated"):
    reason: str = ""


class Dead(JobEventBase, tag="dead"):
    error: ErrorInfo | None = None
    errors: list[ErrorInfo] = []


class Duplicate(JobEventBase, tag="duplicate"):
    """A second submission of a job id that is already known: recorded, not run."""

    reason: str = ""


class Stale(JobEventBase, tag="stale"):
    """No progress or heartbeat past its deadline; the job may still be running."""

    reason: str = ""


class Resumed(JobEventBase, tag="resumed"):
    """A lost job's node came back and the same attempt is still running there."""

    node: str | None = None


class Discovered(JobEventBase, tag="discovered"):
    """A process nobody submitted, found by a node agent: a job of origin `discovered`."""

    node: str
    process: ProcessInfo
    devices: list[str] = []


class Ended(JobEventBase, tag="ended"):
    """A discovered job's process exited."""

    node: str | None = None
    exit_code: int | None = None
    runtime_s: float | None = None


class Linked(JobEventBase, tag="linked"):
    """A process of a submitted job was seen on a node."""

    process: ProcessLink


JobEvent = (
    Submitted
    | Queued
    | Unschedulable
    | Running
    | Progress
    | Succeeded
    | Failed
    | Retrying
    | Cancelled
    | Lost
    | Delegated
    | Dead
    | Duplicate
    | Stale
    | Resumed
    | Discovered
    | Ended
    | Linked
)

TERMINAL_KINDS = frozenset({"succeeded", "failed", "cancelled", "dead", "ended"})

_decoder = msgspec.json.Decoder(JobEvent)


def decode_event(data: bytes) -> JobEvent:
    event: JobEvent = _decoder.decode(data)
    return event


def event_kind(event: JobEvent) -> str:
    kind = type(event).__struct_config__.tag
    assert isinstance(kind, str)
    return kind
