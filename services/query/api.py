"""The Litestar app: /api/v1 over the projection, /health, /schema, /metrics.

Reads run in worker threads, each on its own DuckDB cursor; submit and cancel
publish to the bus like any other client. Every error is a JSON problem
(RFC 9457) with a message that says what to change, and bad input is a 4xx,
never a 5xx: unknown query parameters, malformed times, out-of-range pages,
invalid bodies and wrong content types are all refused before any SQL runs.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
    ValidationException,
)
from litestar.middleware.rate_limit import DurationUnit, RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from bus import topology
from bus.connection import Bus
from bus.jobtable import JobTable
from schemas.common import is_valid_id, new_id
from schemas.jobs import CancelRequest, JobStatus, JobSubmission, is_valid_capability_type
from schemas.kernels import Outcome

from . import models as m
from . import queries as q
from .auth import Tokens, guard
from .metrics import FleetMetrics
from .writer import Projection

log = logging.getLogger(__name__)

API_VERSION = "1"
MAX_OFFSET = 2**62
MAX_RANGE_S = 10 * 366 * 86400.0
PROBLEM = "application/problem+json"

GpuField = Literal["gpu_util_pct", "mem_copy_util_pct", "fb_used_mb", "fb_total_mb", "power_w",
                   "gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "mem_clock_mhz", "pcie_tx_kbps",
                   "pcie_rx_kbps"]
ProcessField = Literal["cpu_percent", "rss_mb", "vms_mb", "threads", "open_files",
                       "gpu_memory_mb", "used_memory_mb", "sm_util_pct", "mem_util_pct"]
Aggregate = Literal["avg", "min", "max", "sum", "p50", "p95", "p99", "last"]
NodeStatus = Literal["up", "silent", "lost", "unknown"]
Origin = Literal["submitted", "discovered"]
Order = Literal["asc", "desc"]

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="page size (1..1000)")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]
Time = Annotated[str | None, QueryParameter(
    description="epoch seconds, ISO 8601 (2024-02-05T10:30:00Z) or relative to now "
                "(-90s, -15m, -2h, -7d)")]
Bucket = Annotated[float, QueryParameter(ge=1, le=31 * 86400, description="bucket width, seconds")]


@dataclass
class ApiContext:
    projection: Projection
    bus: Bus | None
    instance: str
    lag: Callable[[], list[m.StreamLag]]
    metrics: FleetMetrics | None = None
    rebuild: Callable[[], Awaitable[None]] | None = None
    batches: Callable[[], int] = lambda: 0
    max_payload_bytes: int = 1 << 20


@dataclass
class ApiConfig:
    tokens: Tokens = field(default_factory=Tokens)
    cors_origins: list[str] = field(default_factory=list)
    # (unit, requests) per client address, e.g. ("second", 100); None: unlimited.
    rate_limit: tuple[DurationUnit, int] | None = None


# ---- input ------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(value: str | None, name: str, now: float) -> float | None:
    """Epoch seconds, ISO 8601, or `-<n><s|m|h|d>`; a clear 400 otherwise."""
    if value is None or value == "":
        return None
    text = value.strip()
    rel = _RELATIVE.match(text)
    out: float | None = None
    if rel:
        out = now - float(rel.group(1)) * _UNITS[rel.group(2)]
    else:
        try:
            out = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                out = None
            else:
                out = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if out is None or not math.isfinite(out) or abs(out) > 1e11:
        raise ClientException(
            f"{name}={value!r} is not a time: give epoch seconds, ISO 8601 "
            "(2024-02-05T10:30:00Z) or a time before now (-15m, -2h, -7d)")
    return out


def _range(since: str | None, until: str | None, default_span: float, now: float
           ) -> tuple[float, float]:
    t1 = parse_time(until, "until", now)
    t1 = now if t1 is None else t1
    t0 = parse_time(since, "since", now)
    t0 = t1 - default_span if t0 is None else t0
    if t1 <= t0:
        raise ClientException(f"until must be after since (got since={t0:.3f}, until={t1:.3f})")
    if t1 - t0 > MAX_RANGE_S:
        raise ClientException("since..until spans more than ten years: narrow it")
    return t0, t1


def _query_names(handler: Any) -> frozenset[str]:
    cached: frozenset[str] | None = handler.opt.get("_query_names")
    if cached is None:
        params = handler.parsed_fn_signature.parameters
        path = set(re.findall(r"{(\w+)", "".join(handler.paths)))
        cached = frozenset(p for p in params if p not in {"request", "data"} | path)
        handler.opt["_query_names"] = cached
    return cached


async def _check_request(request: Request[Any, Any, Any]) -> None:
    """Refuse what the handler would silently ignore: unknown query parameters
    and bodies that are not JSON."""
    handler = request.route_handler
    allowed = _query_names(handler)
    unknown = sorted(set(request.query_params.keys()) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ClientException(f"unknown query parameter(s): {', '.join(unknown)} "
                              f"(this endpoint takes: {known})")
    if request.method == "POST" and handler.opt.get("json_body"):
        ctype = request.headers.get("content-type", "")
        base = ctype.split(";", 1)[0].strip().lower()
        if base != "application/json" and not base.endswith("+json"):
            raise HTTPException(status_code=415, detail=(
                f"send the body as JSON (Content-Type: application/json), not {ctype or 'none'}"))


# ---- errors -----------------------------------------------------------------------------------


def _problem(status: int, detail: str, errors: list[dict[str, Any]] | None = None,
             headers: dict[str, str] | None = None) -> Response[m.Problem]:
    from http import HTTPStatus

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return Response(m.Problem(title=title, status=status, detail=detail, errors=errors),
                    status_code=status, media_type=PROBLEM, headers=headers)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[m.Problem]:
    errors = None
    detail = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        errors = [e for e in exc.extra if isinstance(e, dict)]
        parts = [f"{e.get('key') or e.get('source') or 'body'}: {e.get('message')}"
                 for e in errors]
        detail = "invalid request: " + ("; ".join(parts) if parts else exc.detail)
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404 and detail in ("Not Found", ""):
        detail = f"nothing at {request.url.path}"
    return _problem(exc.status_code, detail, errors, dict(exc.headers or {}))


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[m.Problem]:
    log.exception("%s %s failed", request.method, request.url.path)
    return _problem(500, f"internal error ({type(exc).__name__}); the service log has details")


def _not_found(exc: q.NotFound) -> NotFoundException:
    return NotFoundException(str(exc))


# ---- the app ----------------------------------------------------------------------------------


def create_app(ctx: ApiContext, config: ApiConfig | None = None) -> Litestar:
    config = config or ApiConfig()
    cur = ctx.projection.reader

    @get("/jobs", sync_to_thread=True, opt={"scope": "read"}, summary="List jobs")
    def jobs(status: FromQuery[list[JobStatus] | None] = None, origin: FromQuery[Origin | None] = None,
             capability: FromQuery[list[str] | None] = None, node: FromQuery[str | None] = None,
             user: FromQuery[str | None] = None, worker: FromQuery[str | None] = None, parent: FromQuery[str | None] = None,
             since: Time = None, until: Time = None, limit: Limit = 50, offset: Offset = 0,
             order: FromQuery[Order] = "desc") -> m.JobPage:
        """Jobs, newest first, filtered; `total` counts every match (no cap)."""
        now = time.time()
        f = q.JobFilter(status=list(status or []), origin=origin,
                        capability=list(capability or []), node=node, user=user,
                        worker=worker, parent=parent, since=parse_time(since, "since", now),
                        until=parse_time(until, "until", now))
        return q.list_jobs(cur(), f, limit, offset, order)

    @get("/jobs/{job_id:str}", sync_to_thread=True, opt={"scope": "read"}, summary="One job")
    def job(job_id: FromPath[str], events_limit: Annotated[int, QueryParameter(ge=0, le=100_000)] = 1000
            ) -> m.JobDetail:
        """A job with its attempts, events, parameters, code, devices and result or error."""
        try:
            return q.job_detail(cur(), job_id, events_limit)
        except q.NotFound as exc:
            raise _not_found(exc) from None

    @post("/jobs", status_code=202, opt={"scope": "write", "json_body": True},
          summary="Submit a job")
    async def submit(data: JSONBody[JobSubmission]) -> m.Submitted:
        """Publishes the submission on `jobs.submit` (the bus contract) and returns its id."""
        return m.Submitted(job_id=await publish_submission(data))

    async def publish_submission(data: JobSubmission) -> str:
        """Check a submission as the dispatcher would, publish it, return its job id."""
        ctype = data.capability.get("type", "")
        if not is_valid_capability_type(ctype):
            raise ClientException(
                f"capability.type {ctype!r}: dot-separated lower-case words ([a-z0-9_-]), "
                "e.g. echo or kernel.verify")
        if data.job_id is None:
            data.job_id = new_id()
        body = msgspec.json.encode(data)
        if len(body) > ctx.max_payload_bytes:
            raise HTTPException(status_code=413, detail=(
                f"submission is {len(body)} bytes, over the {ctx.max_payload_bytes}-byte limit: "
                "put large inputs in the object store and pass payload_ref"))
        await _bus(ctx).publish(topology.SUBMIT, body, msg_id=data.job_id)
        return data.job_id

    @post("/call", status_code=200, opt={"scope": "write", "json_body": True},
          summary="Run a capability and wait for its result")
    async def call(request: Request[Any, Any, Any], data: JSONBody[dict[str, Any]],
                   timeout: Annotated[float, QueryParameter(gt=0, le=3600)] = 60.0
                   ) -> Response[m.CallResult]:
        """Request/response over the bus: the body is a submission (`capability` may
        instead come as `X-Capability-Type` and `X-Capability-<label>` headers, as
        in anyserve's `POST /infer`, with the body as the payload). 200 with the
        result when the job succeeded; 422 when it failed or nobody can run it
        (the reason in `error` / `reason`); 504 with the job id when it did not
        settle within `timeout` seconds (it goes on; follow it at /jobs/{id})."""
        sub = _call_submission(request, data)
        job_id = await publish_submission(sub)
        from sdk.client import Client

        try:
            state = await Client(_bus(ctx)).wait(job_id, timeout=timeout)
        except TimeoutError:
            return Response(m.CallResult(job_id=job_id, state="running",
                                         reason=f"not settled within {timeout:g}s; follow it "
                                                f"at /api/v1/jobs/{job_id}"),
                            status_code=504)
        out = m.CallResult(job_id=job_id, state=state.state, result=state.result,
                           error=msgspec.to_builtins(state.error) if state.error else None,
                           reason=state.reason)
        return Response(out, status_code=200 if state.state == "succeeded" else 422)

    @post("/jobs/{job_id:str}/cancel", status_code=202, opt={"scope": "write"},
          summary="Cancel a job")
    async def cancel(job_id: FromPath[str], reason: FromQuery[str | None] = None) -> m.CancelAccepted:
        """Asks for the job to stop (published on `jobs.cancel`); 409 when it already ended."""
        if not is_valid_id(job_id):
            raise NotFoundException(f"no job {job_id!r} (ids are letters, digits, _ and -)")
        bus = _bus(ctx)
        got = await JobTable(bus).get(job_id)
        if got is None:
            raise NotFoundException(f"no job {job_id}")
        state = got[0]
        if state.terminal:
            raise HTTPException(status_code=409,
                                detail=f"job {job_id} already ended ({state.state})")
        await bus.publish(topology.CANCEL, CancelRequest(
            job_id=job_id, reason=(reason or "cancelled through the API")[:1000]))
        return m.CancelAccepted(job_id=job_id, cancel_requested=True, state=state.state)

    @get("/nodes", sync_to_thread=True, opt={"scope": "read"}, summary="List nodes")
    def nodes(status: FromQuery[NodeStatus | None] = None) -> m.NodeList:
        return q.list_nodes(cur(), status)

    @get("/nodes/{node:str}", sync_to_thread=True, opt={"scope": "read"}, summary="One node")
    def node(node: FromPath[str]) -> m.NodeDetail:
        """A node with its devices, latest metrics, running jobs and recent events."""
        try:
            return q.node_detail(cur(), node)
        except q.NotFound as exc:
            raise _not_found(exc) from None

    @get("/metrics/gpu", sync_to_thread=True, opt={"scope": "read"}, summary="GPU metrics")
    def gpu_metrics(node: FromQuery[str | None] = None,
                    gpu: Annotated[int | None, QueryParameter(ge=0, le=4095)] = None,
                    job: FromQuery[str | None] = None, since: Time = None, until: Time = None,
                    bucket: Bucket = 60.0, agg: FromQuery[Aggregate] = "avg",
                    fields: FromQuery[list[GpuField] | None] = None) -> m.MetricSeries:
        """GPU samples bucketed per device; `job` keeps the devices and times its attempts held."""
        t0, t1 = _range(since, until, 3600.0, time.time())
        query = q.MetricQuery(since=t0, until=t1, bucket_s=bucket, agg=agg, node=node, gpu=gpu,
                              job=job, fields=tuple(dict.fromkeys(fields or q.GPU_FIELDS)))
        return _metrics(cur(), "gpu", query)

    @get("/metrics/process", sync_to_thread=True, opt={"scope": "read"},
         summary="Process metrics")
    def process_metrics(node: FromQuery[str | None] = None,
                        pid: Annotated[int | None, QueryParameter(ge=0, le=2**31)] = None,
                        job: FromQuery[str | None] = None, since: Time = None, until: Time = None,
                        bucket: Bucket = 60.0, agg: FromQuery[Aggregate] = "avg",
                        source: FromQuery[Literal["host", "gpu"]] = "host",
                        fields: FromQuery[list[ProcessField] | None] = None) -> m.MetricSeries:
        """Process samples bucketed per (node, pid): host metrics (`source=host`) or each
        process's share of its GPUs (`source=gpu`)."""
        t0, t1 = _range(since, until, 3600.0, time.time())
        allowed = q.PROCESS_FIELDS if source == "host" else q.GPU_PROCESS_FIELDS
        chosen = tuple(dict.fromkeys(fields or allowed))
        wrong = [f for f in chosen if f not in allowed]
        if wrong:
            raise ClientException(f"fields {', '.join(wrong)} are not {source} process metrics "
                                  f"(those are: {', '.join(allowed)})")
        query = q.MetricQuery(since=t0, until=t1, bucket_s=bucket, agg=agg, node=node, pid=pid,
                              job=job, fields=chosen)
        return _metrics(cur(), "process" if source == "host" else "gpu-process", query)

    @get("/stats/cluster", sync_to_thread=True, opt={"scope": "read"},
         summary="Cluster statistics")
    def stats(window: Annotated[float, QueryParameter(ge=1, le=366 * 86400)] = 3600.0,
              since: Time = None, until: Time = None,
              idle_threshold: Annotated[float, QueryParameter(ge=0, le=100)] = 5.0
              ) -> m.ClusterStats:
        """Jobs by state, GPU utilization now and over `window` seconds, GPU-hours by user and
        capability over since..until (default: all time), idle-but-leased GPUs, lost nodes."""
        now = time.time()
        t0 = parse_time(since, "since", now)
        t1 = parse_time(until, "until", now)
        if t0 is not None and t1 is not None and t1 <= t0:
            raise ClientException("until must be after since")
        return q.cluster_stats(cur(), ctx.lag(), window_s=window,
                               since=0.0 if t0 is None else t0, until=t1,
                               idle_threshold=idle_threshold, now=now)

    @get("/workers", sync_to_thread=True, opt={"scope": "read"}, summary="Workers")
    def workers(all: FromQuery[bool] = False) -> m.WorkerList:
        """Live workers (KV capabilities); `all=true` adds those seen before and gone."""
        return q.list_workers(cur(), None if all else True)

    @get("/capabilities", sync_to_thread=True, opt={"scope": "read"}, summary="Capabilities")
    def capabilities(type: FromQuery[str | None] = None) -> m.CapabilityList:
        """What live workers serve, with who serves it and their capacity and load."""
        return q.list_capabilities(cur(), type)

    @get("/leases", sync_to_thread=True, opt={"scope": "read"}, summary="Device leases")
    def leases(all: FromQuery[bool] = False, node: FromQuery[str | None] = None, job: FromQuery[str | None] = None,
               limit: Limit = 1000) -> m.LeaseList:
        """Leases held now; `all=true` adds released ones (as seen by polling KV leases)."""
        return q.list_leases(cur(), None if all else True, node, job, limit)

    @get("/kernels/results", sync_to_thread=True, opt={"scope": "read"},
         summary="Kernel verify/profile outcomes")
    def kernel_results(kind: FromQuery[Literal["verify", "profile"] | None] = None,
                       outcome: FromQuery[Outcome | None] = None, correct: FromQuery[bool | None] = None,
                       parent: FromQuery[str | None] = None, limit: Limit = 50, offset: Offset = 0
                       ) -> m.KernelResultPage:
        return q.kernel_results(cur(), kind=kind, outcome=outcome, correct=correct,
                                parent=parent, limit=limit, offset=offset)

    @get("/kernels/candidates", sync_to_thread=True, opt={"scope": "read"},
         summary="Kernel candidates of evolve and single jobs")
    def kernel_candidates(evolve_job: FromQuery[str | None] = None, correct: FromQuery[bool | None] = None,
                          limit: Limit = 100, source: FromQuery[bool] = False) -> m.KernelCandidateList:
        """Best first (correct, then speed-up); `source=true` includes each candidate's code."""
        return q.kernel_candidates(cur(), evolve_job=evolve_job, correct=correct, limit=limit,
                                   with_source=source)

    @get("/kernels/evolve/{job_id:str}", sync_to_thread=True, opt={"scope": "read"},
         summary="Candidates of one evolve job")
    def kernel_evolve(job_id: FromPath[str], source: FromQuery[bool] = False) -> m.KernelCandidateList:
        c = cur()
        if c.execute("SELECT 1 FROM jobs WHERE job_id = ?", [job_id]).fetchone() is None:
            raise NotFoundException(f"no job {job_id}")
        return q.kernel_candidates(c, evolve_job=job_id, correct=None, limit=10_000,
                                   with_source=source)

    @post("/admin/rebuild", status_code=202, opt={"scope": "write"},
          summary="Rebuild the projection by replay")
    async def rebuild() -> m.Rebuilding:
        """Forget the projection's replayed tables and replay EVENTS and TELEMETRY."""
        if ctx.rebuild is None:
            raise HTTPException(status_code=409, detail="this API has no live projection")
        await ctx.rebuild()
        return m.Rebuilding(rebuilding=True, streams=[topology.EVENTS, topology.TELEMETRY])

    @get("/health", sync_to_thread=False, summary="Liveness and projection position")
    def health() -> m.Health:
        return m.Health(status="ok", instance=ctx.instance, streams=ctx.lag(),
                        batches=ctx.batches())

    @get("/metrics", sync_to_thread=True, media_type=MediaType.TEXT, include_in_schema=False)
    def prometheus() -> Response[bytes]:
        body = ctx.metrics.render() if ctx.metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    api = Router(path="/api/v1", guards=[guard(config.tokens)], route_handlers=[
        jobs, job, submit, call, cancel, nodes, node, gpu_metrics, process_metrics, stats, workers,
        capabilities, leases, kernel_results, kernel_candidates, kernel_evolve, rebuild],
        security=[{"bearer": []}])

    rate = None
    if config.rate_limit is not None:
        rate = RateLimitConfig(rate_limit=config.rate_limit,
                               exclude=["/health", "/schema", "/metrics"])
    cors = None
    if config.cors_origins:
        cors = CORSConfig(allow_origins=config.cors_origins,
                          allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["Authorization", "Content-Type"])
    return Litestar(
        route_handlers=[api, health, prometheus],
        before_request=_check_request,
        exception_handlers={HTTPException: _on_http_error, Exception: _on_error},
        cors_config=cors,
        middleware=[rate.middleware] if rate else [],
        request_max_body_size=ctx.max_payload_bytes + 64 * 1024,
        openapi_config=OpenAPIConfig(
            title="jetfleet query API", version=API_VERSION, path="/schema",
            description="Jobs, nodes, metrics and statistics of a jetfleet, from the query "
                        "service's DuckDB projection of the EVENTS and TELEMETRY streams.",
            components=Components(security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer")})),
        debug=False,
        logging_config=None,
    )


def _call_submission(request: Request[Any, Any, Any], data: dict[str, Any]) -> JobSubmission:
    """A call's submission: the body, or the body as payload with the capability
    in X-Capability-* headers."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    ctype = headers.get("x-capability-type")
    if ctype is not None:
        labels = {k.removeprefix("x-capability-").replace("-", "_"): v
                  for k, v in headers.items()
                  if k.startswith("x-capability-") and k != "x-capability-type"}
        data = {"capability": {"type": ctype, **labels}, "payload": data}
    try:
        return msgspec.convert(data, JobSubmission)
    except msgspec.ValidationError as exc:
        raise ClientException(f"invalid submission: {exc}") from None


def _bus(ctx: ApiContext) -> Bus:
    if ctx.bus is None:
        raise HTTPException(status_code=503, detail="this API is not connected to a bus")
    return ctx.bus


def _metrics(cur: q.Cursor, kind: str, query: q.MetricQuery) -> m.MetricSeries:
    try:
        return q.metrics(cur, kind, query)
    except q.BadQuery as exc:
        raise ClientException(str(exc)) from None
    except q.NotFound as exc:
        raise _not_found(exc) from None


