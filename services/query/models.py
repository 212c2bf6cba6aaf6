"""What the query API answers: msgspec Structs, one per response shape.

They are the API's contract (OpenAPI is generated from them) and mirror the
projection's tables; times are epoch seconds like everything on the bus.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Model(msgspec.Struct, kw_only=True):
    pass


class Problem(Model, kw_only=True, omit_defaults=True):
    """Every error (RFC 9457 problem details)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


# ---- jobs ------------------------------------------------------------------------------------


class JobSummary(Model, kw_only=True):
    job_id: str
    origin: str
    state: str
    capability_type: str | None
    priority: int | None
    user: str | None
    parent_job_id: str | None
    attempt: int | None
    worker_id: str | None
    node: str | None
    devices: list[str]
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    duration_s: float | None
    error_code: str | None
    reason: str | None
    stale: bool | None
    progress: float | None


class JobPage(Model, kw_only=True):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class Attempt(Model, kw_only=True):
    attempt: int
    worker_id: str | None
    node: str | None
    devices: list[str]
    gpus: int | None
    started_at: float | None
    ended_at: float | None
    outcome: str | None
    error_code: str | None
    error_message: str | None


class JobEventRecord(Model, kw_only=True):
    seq: int
    kind: str
    ts: float
    attempt: int | None
    worker_id: str | None
    event: dict[str, Any]


class ErrorBody(Model, kw_only=True):
    code: str
    message: str | None


class JobDetail(JobSummary, kw_only=True):
    capability: dict[str, str]
    result: Any = None
    error: ErrorBody | None = None
    exit_code: int | None = None
    cancel_requested: bool | None = None
    # Discovered jobs: the command line's parsed parameters, the script and its code.
    parameters: dict[str, str] = {}
    script: str | None = None
    code: str | None = None
    process: dict[str, Any] | None = None
    processes: list[dict[str, Any]] = []
    attempts: list[Attempt] = []
    events: list[JobEventRecord] = []
    events_total: int = 0


class Submitted(Model, kw_only=True):
    job_id: str
    status: str = "submitted"


class CallResult(Model, kw_only=True):
    """`POST /api/v1/call`: the job's outcome once it settled."""

    job_id: str
    state: str
    result: Any = None
    error: dict[str, Any] | None = None
    reason: str | None = None


class CancelAccepted(Model, kw_only=True):
    job_id: str
    cancel_requested: bool
    state: str


class Rebuilding(Model, kw_only=True):
    rebuilding: bool
    streams: list[str]


# ---- nodes and devices ----------------------------------------------------------------------


class Device(Model, kw_only=True):
    node: str
    gpu: int
    uuid: str | None
    name: str | None
    ts: float | None
    gpu_util_pct: float | None
    fb_used_mb: float | None
    fb_total_mb: float | None
    power_w: float | None
    gpu_temp_c: float | None
    simulated: bool | None


class NodeSummary(Model, kw_only=True):
    node: str
    hostname: str | None
    # up | silent (no heartbeat for 3 intervals) | lost (a monitor said so) | unknown
    status: str
    last_heartbeat: float | None
    silent_s: float | None
    heartbeat_interval: float | None
    gpus: int | None
    jobs: int | None
    load1: float | None
    cpu_percent: float | None
    memory_used_mb: float | None
    memory_total_mb: float | None
    simulated: bool | None


class NodeDetail(NodeSummary, kw_only=True):
    inventory: dict[str, Any] | None = None
    devices: list[Device] = []
    running_jobs: list[JobSummary] = []
    events: list[dict[str, Any]] = []


class NodeList(Model, kw_only=True):
    items: list[NodeSummary]
    total: int


# ---- metrics --------------------------------------------------------------------------------


class Point(Model, kw_only=True):
    ts: float
    samples: int
    values: dict[str, float | None]


class Series(Model, kw_only=True):
    node: str
    gpu: int | None = None
    pid: int | None = None
    points: list[Point]


class MetricSeries(Model, kw_only=True):
    kind: str
    agg: str
    bucket_s: float
    since: float
    until: float
    fields: list[str]
    series: list[Series]


# ---- statistics -----------------------------------------------------------------------------


class GpuHours(Model, kw_only=True):
    key: str
    gpu_hours: float
    jobs: int


class IdleLease(Model, kw_only=True):
    device: str
    node: str
    gpu: int
    holder: str
    job_id: str | None
    util_pct: float | None
    samples: int
    held_s: float


class LostNode(Model, kw_only=True):
    node: str
    status: str
    since: float | None
    silent_s: float | None


class StreamLag(Model, kw_only=True):
    stream: str
    applied_seq: int
    lag_messages: int


class ClusterStats(Model, kw_only=True):
    ts: float
    window_s: float
    jobs_total: int
    jobs_by_state: dict[str, int]
    gpus: int
    gpu_util_now_pct: float | None
    gpu_util_window_pct: float | None
    gpu_hours_since: float
    gpu_hours_until: float
    gpu_hours_total: float
    gpu_hours_by_user: list[GpuHours]
    gpu_hours_by_capability: list[GpuHours]
    idle_leased_gpus: list[IdleLease]
    idle_threshold_pct: float
    lost_nodes: list[LostNode]
    projection: list[StreamLag]


# ---- workers, capabilities, leases ----------------------------------------------------------


class WorkerInfo(Model, kw_only=True):
    worker_id: str
    node: str | None
    pid: int | None
    capabilities: list[dict[str, str]]
    devices: list[dict[str, Any]]
    capacity: int | None
    load: int | None
    started_at: float | None
    updated_at: float | None
    simulated: bool | None
    live: bool
    last_seen: float | None


class WorkerList(Model, kw_only=True):
    items: list[WorkerInfo]
    total: int


class CapabilityInfo(Model, kw_only=True):
    type: str
    labels: dict[str, str]
    workers: list[str]
    capacity: int
    load: int


class CapabilityList(Model, kw_only=True):
    items: list[CapabilityInfo]
    total: int


class LeaseInfo(Model, kw_only=True):
    device: str
    holder: str
    job_id: str | None
    node: str | None
    acquired_at: float | None
    renewed_at: float | None
    released_at: float | None
    live: bool


class LeaseList(Model, kw_only=True):
    items: list[LeaseInfo]
    total: int


# ---- kernels --------------------------------------------------------------------------------


class KernelResult(Model, kw_only=True):
    job_id: str
    kind: str | None
    capability_type: str | None
    parent_job_id: str | None
    node: str | None
    ts: float | None
    outcome: str | None
    correct: bool | None
    speedup: float | None
    candidate_ms: float | None
    reference_ms: float | None
    representative: bool | None
    interpreted: bool | None
    device: str | None
    flags: list[str]
    max_abs_error: float | None
    wall_s: float | None


class KernelResultPage(Model, kw_only=True):
    items: list[KernelResult]
    total: int
    limit: int
    offset: int


class KernelCandidate(Model, kw_only=True):
    evolve_job_id: str
    candidate_id: str
    job_id: str | None
    round: int | None
    island: int | None
    origin: str | None
    parent: str | None
    hash: str | None
    outcome: str | None
    correct: bool | None
    speedup: float | None
    candidate_ms: float | None
    reference_ms: float | None
    params: Any = None
    source: str | None = None
    ts: float | None = None


class KernelCandidateList(Model, kw_only=True):
    items: list[KernelCandidate]
    total: int


# ---- service ----------------------------------------------------------------------------------


class Health(Model, kw_only=True):
    status: str
    instance: str
    streams: list[StreamLag]
    batches: int
