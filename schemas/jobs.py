"""Job submission, the routed work item, and the job's latest state."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from schemas.common import SCHEMA_VERSION, ErrorInfo, Id, ObjRef, Struct
from schemas.telemetry import ProcessInfo, ProcessLink

Priority = Annotated[int, msgspec.Meta(ge=0, le=2)]
# A capability label value: a short plain string (they become subject tokens
# for the type label, and are matched by equality for the rest).
LabelValue = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# A capability type becomes the tail of a WORK subject, so it is dot-separated
# lower-case words.
CAPABILITY_TYPE_PATTERN = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$"
CapabilityType = Annotated[str, msgspec.Meta(pattern=CAPABILITY_TYPE_PATTERN, max_length=128)]


def is_valid_capability_type(value: str) -> bool:
    return len(value) <= 128 and re.match(CAPABILITY_TYPE_PATTERN, value) is not None

JobStatus = Literal[
    "submitted",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "lost",
    "unschedulable",
    "dead",
    "ended",
]
# `ended`: a discovered process exited (nobody submitted it, so nobody says
# whether it succeeded; its exit status is kept where the agent could read it).
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "dead", "ended"})


class Resources(Struct, kw_only=True, forbid_unknown_fields=True):
    """Devices a job needs leased before it runs."""

    gpus: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    gpu_memory_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    cpu_slots: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0

    def any(self) -> bool:
        return bool(self.gpus or self.gpu_memory_mb or self.cpu_slots)

    def at_least(self, other: Resources | None) -> Resources:
        """The larger of each: a job gets at least what its capability declares."""
        if other is None:
            return self
        return Resources(gpus=max(self.gpus, other.gpus),
                         gpu_memory_mb=max(self.gpu_memory_mb, other.gpu_memory_mb),
                         cpu_slots=max(self.cpu_slots, other.cpu_slots))


class JobSubmission(Struct, kw_only=True, forbid_unknown_fields=True):
    """What a user publishes on `jobs.submit`."""

    schema: int = SCHEMA_VERSION
    capability: dict[str, LabelValue]
    payload: dict[str, Any] = {}
    payload_ref: ObjRef | None = None
    job_id: Id | None = None
    priority: Priority = 1
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    labels: dict[str, str] = {}
    resources: Resources | None = None
    parent_job_id: Id | None = None
    # How deep in a chain of ctx.call()s this job is (0: submitted by a client).
    depth: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0

    @property
    def capability_type(self) -> str:
        return self.capability.get("type", "")


class WorkItem(Struct, kw_only=True):
    """A routed job on `work.p<priority>.<type>`: what a worker fetches."""

    schema: int = SCHEMA_VERSION
    job_id: Id
    capability: dict[str, str]
    payload: dict[str, Any] = {}
    payload_ref: ObjRef | None = None
    priority: int = 1
    max_attempts: int = 3
    timeout_s: float | None = None
    user: str | None = None
    labels: dict[str, str] = {}
    resources: Resources | None = None
    submitted_at: float = 0.0
    parent_job_id: str | None = None
    depth: int = 0
    # The record the dispatcher created and its KV revision: the worker's first
    # compare-and-set tries it instead of reading the record back.
    record: JobState | None = None
    revision: int | None = None


class AttemptRecord(Struct, kw_only=True):
    attempt: int
    worker_id: str | None = None
    node: str | None = None
    devices: list[str] = []
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None
    error: ErrorInfo | None = None
    # Versions of shared resources (KV resources) the attempt read, by name.
    resources_read: dict[str, list[int]] = {}


class JobState(Struct, kw_only=True):
    """The latest state of one job: the value of its key in KV `jobs`."""

    schema: int = SCHEMA_VERSION
    job_id: str
    state: JobStatus
    origin: Literal["submitted", "discovered"] = "submitted"
    capability: dict[str, str] = {}
    priority: int = 1
    user: str | None = None
    labels: dict[str, str] = {}
    attempt: int = 0
    max_attempts: int = 3
    worker_id: str | None = None
    node: str | None = None
    devices: list[str] = []
    submitted_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    result: Any = None
    # A result too large for the record lives in the object store; this points at it.
    result_ref: ObjRef | None = None
    error: ErrorInfo | None = None
    reason: str | None = None
    cancel_requested: bool = False
    progress: float | None = None
    attempts: list[AttemptRecord] = []
    parent_job_id: str | None = None
    depth: int = 0
    # JOBS stream sequence of the submission that created this record: tells a
    # redelivery of the same submission (carry on) from a duplicate (refuse).
    submit_seq: int | None = None
    resources: Resources | None = None
    timeout_s: float | None = None
    # No progress or heartbeat past its deadline (the monitor says so; progress clears it).
    stale: bool = False
    # Discovered jobs: the process as found, and its exit status once it ended.
    process: ProcessInfo | None = None
    exit_code: int | None = None
    # Submitted jobs: the processes seen working for them on nodes.
    processes: list[ProcessLink] = []

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class CancelRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """Published on `jobs.cancel`: stop a job wherever it is."""

    schema: int = SCHEMA_VERSION
    job_id: Id
    reason: str = "cancelled by request"
    user: str | None = None


class StopRequest(Struct, kw_only=True):
    """The body of a worker's `cancel` control request (jetfleet.worker.<id>.cancel)."""

    job_id: str
    reason: str = "cancelled by request"
    # "cancelled" (a user's cancel) or "superseded" (a newer attempt took the job).
    kind: Literal["cancelled", "superseded"] = "cancelled"
    attempt: int | None = None
