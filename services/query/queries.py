"""The read side: every SQL statement the API runs, as functions of a cursor.

Each takes already-validated values and returns response Structs. The SQL
text is built here only (`*_sql` functions), so `jetfleet bench query` runs
exactly the same statements directly on DuckDB as its baseline.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from . import models as m

Cursor = duckdb.DuckDBPyConnection


class NotFound(LookupError):
    pass


class BadQuery(ValueError):
    pass


# ---- jobs ------------------------------------------------------------------------------------

JOB_SUMMARY_COLS = ("job_id", "origin", "state", "capability_type", "priority", "user",
                    "parent_job_id", "attempt", "worker_id", "node", "devices", "submitted_at",
                    "started_at", "ended_at", "duration_s", "error_code", "reason", "stale",
                    "progress")
_SELECT_SUMMARY = ", ".join(f'"{c}"' for c in JOB_SUMMARY_COLS)


@dataclass
class JobFilter:
    status: list[str] = field(default_factory=list)
    origin: str | None = None
    capability: list[str] = field(default_factory=list)
    node: str | None = None
    user: str | None = None
    worker: str | None = None
    parent: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.status:
            clauses.append(f"state IN ({', '.join('?' * len(self.status))})")
            params += self.status
        if self.capability:
            clauses.append(f"capability_type IN ({', '.join('?' * len(self.capability))})")
            params += self.capability
        for col, value in (("origin", self.origin), ("node", self.node), ("user", self.user),
                           ("worker_id", self.worker), ("parent_job_id", self.parent)):
            if value is not None:
                clauses.append(f'"{col}" = ?')
                params.append(value)
        if self.since is not None:
            clauses.append("submitted_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("submitted_at < ?")
            params.append(self.until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def list_jobs_sql(f: JobFilter, limit: int, offset: int, order: str = "desc",
                  reverse: bool = False) -> tuple[str, list[Any], str, list[Any]]:
    """The page and the count. `reverse` reads the page from the other end (the
    caller flips the rows), which is how a page past the middle stays cheap."""
    where, params = f.where()
    ascending = (order == "asc") != reverse
    direction = "ASC" if ascending else "DESC"
    nulls = "NULLS FIRST" if reverse else "NULLS LAST"
    order_by = f"ORDER BY submitted_at {direction} {nulls}, job_id {direction}"
    # Sort the keys alone, then read the page's rows: the sort (a heap as deep as
    # the offset) carries two columns instead of every column of the summary.
    page = (f"WITH page AS (SELECT job_id FROM jobs{where} {order_by} LIMIT ? OFFSET ?) "
            f"SELECT {_SELECT_SUMMARY} FROM jobs WHERE job_id IN (SELECT job_id FROM page) "
            f"{order_by}")
    count = f"SELECT count(*) FROM jobs{where}"
    return page, [*params, limit, offset], count, params


def _summary(row: tuple[Any, ...]) -> m.JobSummary:
    d = dict(zip(JOB_SUMMARY_COLS, row, strict=True))
    d["devices"] = list(d["devices"] or [])
    d["state"] = d["state"] or "submitted"
    return m.JobSummary(**d)


def list_jobs(cur: Cursor, f: JobFilter, limit: int, offset: int, order: str = "desc"
              ) -> m.JobPage:
    _, _, count, cparams = list_jobs_sql(f, limit, offset, order)
    total_row = cur.execute(count, cparams).fetchone()
    total = int(total_row[0]) if total_row else 0
    rows: list[Any] = []
    if offset < total:
        if offset > total // 2:
            # Deep pages: skipping most of a million rows costs a sort of all of
            # them; counted from the other end the skip is the short way round.
            n = min(limit, total - offset)
            page, params, _, _ = list_jobs_sql(f, n, total - offset - n, order, reverse=True)
            rows = cur.execute(page, params).fetchall()[::-1]
        else:
            page, params, _, _ = list_jobs_sql(f, limit, offset, order)
            rows = cur.execute(page, params).fetchall()
    return m.JobPage(items=[_summary(r) for r in rows], total=total, limit=limit, offset=offset)


def job_detail(cur: Cursor, job_id: str, events_limit: int = 1000) -> m.JobDetail:
    cols = (*JOB_SUMMARY_COLS, "capability", "result", "error_message", "exit_code",
            "cancel_requested", "process", "processes")
    row = cur.execute(f"SELECT {', '.join(repr_col(c) for c in cols)} FROM jobs "
                      "WHERE job_id = ?", [job_id]).fetchone()
    if row is None:
        raise NotFound(f"no job {job_id}")
    d = dict(zip(cols, row, strict=True))
    summary = _summary(row[: len(JOB_SUMMARY_COLS)])
    process = json.loads(d["process"]) if d["process"] else None
    attempts = [m.Attempt(attempt=a[0], worker_id=a[1], node=a[2], devices=list(a[3] or []),
                          gpus=a[4], started_at=a[5], ended_at=a[6], outcome=a[7],
                          error_code=a[8], error_message=a[9])
                for a in cur.execute(
                    "SELECT attempt, worker_id, node, devices, gpus, started_at, ended_at, "
                    "outcome, error_code, error_message FROM attempts WHERE job_id = ? "
                    "ORDER BY attempt", [job_id]).fetchall()]
    rows = cur.execute("SELECT seq, kind, ts, attempt, worker_id, body, count(*) OVER () "
                       "FROM job_events WHERE job_id = ? ORDER BY seq LIMIT ?",
                       [job_id, events_limit]).fetchall()
    events = [m.JobEventRecord(seq=e[0], kind=e[1], ts=e[2], attempt=e[3], worker_id=e[4],
                               event=json.loads(e[5])) for e in rows]
    capability = json.loads(d["capability"]) if d["capability"] else {}
    if process:
        parameters = dict(process.get("parameters") or {})
    else:
        parameters = {k: v for k, v in capability.items() if k != "type"}
    error = (m.ErrorBody(code=d["error_code"], message=d["error_message"])
             if d["error_code"] else None)
    fields = {f: getattr(summary, f) for f in summary.__struct_fields__}
    return m.JobDetail(
        **fields, capability=capability,
        result=json.loads(d["result"]) if d["result"] is not None else None, error=error,
        exit_code=d["exit_code"], cancel_requested=d["cancel_requested"],
        parameters=parameters, script=(process or {}).get("script"),
        code=(process or {}).get("code"), process=process,
        processes=json.loads(d["processes"]) if d["processes"] else [],
        attempts=attempts, events=events, events_total=int(rows[0][6]) if rows else _count(
            cur, "SELECT count(*) FROM job_events WHERE job_id = ?", [job_id]))


def _count(cur: Cursor, sql: str, params: list[Any]) -> int:
    row = cur.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def repr_col(c: str) -> str:
    return f'"{c}"'


# ---- nodes ---------------------------------------------------------------------------------

NODE_COLS = ("node", "hostname", "last_heartbeat", "heartbeat_interval", "gpus", "jobs", "load1",
             "cpu_percent", "memory_used_mb", "memory_total_mb", "hb_simulated",
             "event_state", "event_ts", "inventory")
SILENT_INTERVALS = 3.0


def _node_status(d: dict[str, Any], now: float) -> tuple[str, float | None]:
    hb, interval = d["last_heartbeat"], d["heartbeat_interval"] or 5.0
    silent = None if hb is None else max(0.0, now - hb)
    if d["event_state"] == "lost" and (hb is None or hb <= (d["event_ts"] or 0.0)):
        return "lost", silent
    if silent is None:
        return "unknown", None
    if silent > SILENT_INTERVALS * interval:
        return "silent", silent
    return "up", silent


def _node_summary(row: tuple[Any, ...], now: float) -> tuple[m.NodeSummary, dict[str, Any]]:
    d = dict(zip(NODE_COLS, row, strict=True))
    inventory = json.loads(d["inventory"]) if d["inventory"] else None
    status, silent = _node_status(d, now)
    gpus = d["gpus"]
    if gpus is None and inventory is not None:
        gpus = len(inventory.get("gpus") or [])
    simulated = d["hb_simulated"]
    if simulated is None and inventory is not None:
        simulated = bool(inventory.get("simulated"))
    return m.NodeSummary(
        node=d["node"], hostname=d["hostname"], status=status, last_heartbeat=d["last_heartbeat"],
        silent_s=silent, heartbeat_interval=d["heartbeat_interval"], gpus=gpus, jobs=d["jobs"],
        load1=d["load1"], cpu_percent=d["cpu_percent"], memory_used_mb=d["memory_used_mb"],
        memory_total_mb=d["memory_total_mb"], simulated=simulated), {"inventory": inventory}


def list_nodes(cur: Cursor, status: str | None = None, now: float | None = None) -> m.NodeList:
    now = time.time() if now is None else now
    rows = cur.execute(f"SELECT {', '.join(map(repr_col, NODE_COLS))} FROM nodes "
                       "ORDER BY node").fetchall()
    items = [_node_summary(r, now)[0] for r in rows]
    if status is not None:
        items = [n for n in items if n.status == status]
    return m.NodeList(items=items, total=len(items))


DEVICE_COLS = ("node", "gpu", "uuid", "name", "ts", "gpu_util_pct", "fb_used_mb", "fb_total_mb",
               "power_w", "gpu_temp_c", "simulated")


def node_detail(cur: Cursor, node: str, now: float | None = None) -> m.NodeDetail:
    now = time.time() if now is None else now
    row = cur.execute(f"SELECT {', '.join(map(repr_col, NODE_COLS))} FROM nodes WHERE node = ?",
                      [node]).fetchone()
    if row is None:
        raise NotFound(f"no node {node}")
    summary, extra = _node_summary(row, now)
    devices = [m.Device(**dict(zip(DEVICE_COLS, r, strict=True))) for r in cur.execute(
        f"SELECT {', '.join(map(repr_col, DEVICE_COLS))} FROM devices WHERE node = ? "
        "ORDER BY gpu", [node]).fetchall()]
    running = [_summary(r) for r in cur.execute(
        f"SELECT {_SELECT_SUMMARY} FROM jobs WHERE node = ? AND state IN ('running', 'lost') "
        "ORDER BY started_at DESC LIMIT 1000", [node]).fetchall()]
    events = [json.loads(r[0]) for r in cur.execute(
        "SELECT body FROM node_events WHERE node = ? ORDER BY seq DESC LIMIT 50",
        [node]).fetchall()]
    fields = {f: getattr(summary, f) for f in summary.__struct_fields__}
    return m.NodeDetail(**fields, inventory=extra["inventory"], devices=devices,
                        running_jobs=running, events=events)


# ---- metrics -------------------------------------------------------------------------------

GPU_FIELDS = ("gpu_util_pct", "mem_copy_util_pct", "fb_used_mb", "fb_total_mb", "power_w",
              "gpu_temp_c", "mem_temp_c", "sm_clock_mhz", "mem_clock_mhz", "pcie_tx_kbps",
              "pcie_rx_kbps")
PROCESS_FIELDS = ("cpu_percent", "rss_mb", "vms_mb", "threads", "open_files", "gpu_memory_mb")
GPU_PROCESS_FIELDS = ("used_memory_mb", "sm_util_pct", "mem_util_pct")
AGGREGATES = ("avg", "min", "max", "sum", "p50", "p95", "p99", "last")
MAX_POINTS = 20_000


def _agg(expr: str, agg: str) -> str:
    """An aggregate of a metric column; rows carry `n` raw samples (downsampled rows
    are averages of n), so avg and sum weigh by n."""
    c = f'"{expr}"'
    if agg == "avg":
        return f"sum({c} * n) / sum(CASE WHEN {c} IS NOT NULL THEN n END)"
    if agg == "sum":
        return f"sum({c} * n)"
    if agg in ("min", "max"):
        return f"{agg}({c})"
    if agg == "last":
        return f"arg_max({c}, ts)"
    q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[agg]
    return f"quantile_cont({c}, {q})"


@dataclass
class MetricQuery:
    since: float
    until: float
    bucket_s: float
    agg: str = "avg"
    node: str | None = None
    gpu: int | None = None
    pid: int | None = None
    job: str | None = None
    fields: tuple[str, ...] = ()

    def check(self) -> None:
        if self.until <= self.since:
            raise BadQuery(f"until ({self.until}) must be after since ({self.since})")
        buckets = (self.until - self.since) / self.bucket_s
        if buckets > MAX_POINTS:
            raise BadQuery(f"{buckets:.0f} buckets of {self.bucket_s:g}s in the range: at most "
                           f"{MAX_POINTS} per series; widen bucket or narrow since/until")


def metrics_sql(kind: str, q: MetricQuery, windows: bool = False) -> tuple[str, list[Any]]:
    table, series = {"gpu": ("gpu_metrics", ("node", "gpu")),
                     "process": ("process_metrics", ("node", "pid")),
                     "gpu-process": ("gpu_process_metrics", ("node", "pid", "gpu"))}[kind]
    b = repr(float(q.bucket_s))
    sel = [f"t.{s}" for s in series]
    aggs = [f"{_agg(f, q.agg)} AS \"{f}\"" for f in q.fields]
    clauses: list[str] = ["t.ts >= ?", "t.ts < ?"]
    params: list[Any] = [q.since, q.until]
    for col, value in (("node", q.node), ("gpu", q.gpu), ("pid", q.pid)):
        if value is not None and col in series:
            clauses.append(f"t.{col} = ?")
            params.append(value)
    join = ""
    if q.job is not None:
        if windows:
            join = (" JOIN job_windows w ON t.node = w.node AND (t.gpu = w.gpu OR t.uuid = w.uuid)"
                    " AND t.ts >= w.start AND t.ts < w.stop")
        else:
            clauses.append("t.job_id = ?")
            params.append(q.job)
    sql = (f"SELECT {', '.join(sel)}, floor(t.ts / {b}) * {b} AS bucket, sum(t.n) AS samples, "
           f"{', '.join(aggs)} FROM {table} t{join} WHERE {' AND '.join(clauses)} "
           f"GROUP BY ALL ORDER BY {', '.join(sel)}, bucket")
    return sql, params


def job_gpu_windows(cur: Cursor, job_id: str, now: float) -> pa.Table:
    """(node, gpu index or uuid, start, stop) of every GPU the job's attempts held."""
    rows = cur.execute("SELECT node, devices, started_at, coalesce(ended_at, ?) FROM attempts "
                       "WHERE job_id = ? AND node IS NOT NULL", [now, job_id]).fetchall()
    if not rows and cur.execute("SELECT 1 FROM jobs WHERE job_id = ?", [job_id]).fetchone() is None:
        raise NotFound(f"no job {job_id}")
    out: dict[str, list[Any]] = {"node": [], "gpu": [], "uuid": [], "start": [], "stop": []}
    for node, devices, start, stop in rows:
        for d in devices or []:
            match = re.search(r"\.gpu(\d+)", d)
            index = int(match.group(1)) if match else (int(d) if d.isdigit() else None)
            out["node"].append(node)
            out["gpu"].append(index)
            out["uuid"].append(None if match or d.isdigit() else d)
            out["start"].append(start)
            out["stop"].append(stop)
    return pa.table({"node": pa.array(out["node"], pa.string()),
                     "gpu": pa.array(out["gpu"], pa.int32()),
                     "uuid": pa.array(out["uuid"], pa.string()),
                     "start": pa.array(out["start"], pa.float64()),
                     "stop": pa.array(out["stop"], pa.float64())})


def metrics(cur: Cursor, kind: str, q: MetricQuery, now: float | None = None) -> m.MetricSeries:
    q.check()
    windows = kind == "gpu" and q.job is not None
    sql, params = metrics_sql(kind, q, windows)
    if windows:
        job_windows = job_gpu_windows(cur, q.job or "", time.time() if now is None else now)
        cur.register("job_windows", job_windows)
        try:
            rows = cur.execute(sql, params).fetchall()
        finally:
            cur.unregister("job_windows")
    else:
        rows = cur.execute(sql, params).fetchall()
    nkeys = {"gpu": 2, "process": 2, "gpu-process": 3}[kind]
    grouped: dict[tuple[Any, ...], list[m.Point]] = {}
    for r in rows:
        key, bucket, samples, values = r[:nkeys], r[nkeys], r[nkeys + 1], r[nkeys + 2:]
        grouped.setdefault(key, []).append(m.Point(
            ts=float(bucket), samples=int(samples or 0),
            values={f: (None if v is None else float(v))
                    for f, v in zip(q.fields, values, strict=True)}))
    series = []
    for key, points in grouped.items():
        if kind == "gpu":
            series.append(m.Series(node=key[0], gpu=key[1], points=points))
        elif kind == "process":
            series.append(m.Series(node=key[0], pid=key[1], points=points))
        else:
            series.append(m.Series(node=key[0], pid=key[1], gpu=key[2], points=points))
    return m.MetricSeries(kind=kind, agg=q.agg, bucket_s=q.bucket_s, since=q.since,
                          until=q.until, fields=list(q.fields), series=series)


# ---- statistics -----------------------------------------------------------------------------

FRESH_S = 120.0  # a device whose latest sample is older is not counted "now"


# GPU-hours by user and by capability in one pass: each job's GPU-seconds inside
# the window first (cheaper than counting distinct jobs per group), then both sums.
GPU_HOURS_SQL = """
WITH per_job AS (
    SELECT "user", capability_type, job_id,
           sum(gpus * greatest(0, least(coalesce(ended_at, $now), $until)
                                  - greatest(started_at, $since))) AS s
    FROM attempts
    WHERE gpus > 0 AND started_at < $until AND coalesce(ended_at, $now) > $since
    GROUP BY ALL)
SELECT GROUPING("user") = 0 AS by_user,
       coalesce(CASE WHEN GROUPING("user") = 0 THEN "user" ELSE capability_type END,
                '(none)') AS k,
       sum(s) / 3600.0 AS h, count(*) AS jobs
FROM per_job GROUP BY GROUPING SETS (("user"), (capability_type))
ORDER BY by_user, h DESC, k
"""


IDLE_SQL = r"""
WITH l AS (
    SELECT device, holder, job_id, acquired_at,
           regexp_extract(device, '^(.*)\.gpu([0-9]+)', 1) AS lnode,
           CAST(regexp_extract(device, '^(.*)\.gpu([0-9]+)', 2) AS INTEGER) AS lgpu
    FROM leases WHERE live AND regexp_matches(device, '\.gpu[0-9]+'))
SELECT l.device, l.lnode, l.lgpu, l.holder, l.job_id,
       sum(t.gpu_util_pct * t.n) / sum(CASE WHEN t.gpu_util_pct IS NOT NULL THEN t.n END) AS util,
       sum(t.n) AS samples, $now - min(l.acquired_at) AS held
FROM l JOIN gpu_metrics t ON t.node = l.lnode AND t.gpu = l.lgpu
     AND t.ts >= greatest($wstart, l.acquired_at) AND t.ts <= $now
GROUP BY ALL HAVING util < $threshold ORDER BY l.device
"""


def cluster_stats(cur: Cursor, ingest_lag: list[m.StreamLag], *, window_s: float,
                  since: float, until: float | None, idle_threshold: float,
                  now: float | None = None) -> m.ClusterStats:
    now = time.time() if now is None else now
    until = now if until is None else until
    by_state = {str(s or "submitted"): int(n) for s, n in cur.execute(
        "SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state").fetchall()}
    gpus, util_now = _one(cur, "SELECT count(*), avg(gpu_util_pct) FROM devices WHERE ts >= ?",
                          [now - FRESH_S])
    (util_window,) = _one(cur, "SELECT sum(gpu_util_pct * n) / sum(CASE WHEN gpu_util_pct IS "
                               "NOT NULL THEN n END) FROM gpu_metrics WHERE ts >= ? AND ts <= ?",
                          [now - window_s, now])
    by_user: list[m.GpuHours] = []
    by_cap: list[m.GpuHours] = []
    for user_row, k, h, j in cur.execute(
            GPU_HOURS_SQL, {"now": now, "since": since, "until": until}).fetchall():
        (by_user if user_row else by_cap).append(
            m.GpuHours(key=k, gpu_hours=float(h or 0.0), jobs=int(j)))
    idle = [m.IdleLease(device=r[0], node=r[1], gpu=int(r[2]), holder=r[3], job_id=r[4],
                        util_pct=None if r[5] is None else float(r[5]), samples=int(r[6]),
                        held_s=float(r[7]))
            for r in cur.execute(IDLE_SQL, {"now": now, "wstart": now - window_s,
                                            "threshold": idle_threshold}).fetchall()]
    lost = [m.LostNode(node=n.node, status=n.status,
                       since=n.last_heartbeat, silent_s=n.silent_s)
            for n in list_nodes(cur, now=now).items if n.status in ("lost", "silent")]
    return m.ClusterStats(
        ts=now, window_s=window_s, jobs_total=sum(by_state.values()), jobs_by_state=by_state,
        gpus=int(gpus or 0), gpu_util_now_pct=_f(util_now), gpu_util_window_pct=_f(util_window),
        gpu_hours_since=since, gpu_hours_until=until,
        gpu_hours_total=sum(g.gpu_hours for g in by_user), gpu_hours_by_user=by_user,
        gpu_hours_by_capability=by_cap, idle_leased_gpus=idle,
        idle_threshold_pct=idle_threshold, lost_nodes=lost, projection=ingest_lag)


def _one(cur: Cursor, sql: str, params: list[Any]) -> tuple[Any, ...]:
    row = cur.execute(sql, params).fetchone()
    assert row is not None
    return tuple(row)


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


# ---- workers, capabilities, leases ---------------------------------------------------------


def list_workers(cur: Cursor, live: bool | None = True) -> m.WorkerList:
    where = "" if live is None else f" WHERE live = {'true' if live else 'false'}"
    items = [m.WorkerInfo(worker_id=r[0], node=r[1], pid=r[2], capabilities=json.loads(r[3]),
                          devices=json.loads(r[4]), capacity=r[5], load=r[6], started_at=r[7],
                          updated_at=r[8], simulated=r[9], live=bool(r[10]), last_seen=r[11])
             for r in cur.execute(
                 "SELECT worker_id, node, pid, capabilities, devices, capacity, load, "
                 f"started_at, updated_at, simulated, live, last_seen FROM workers{where} "
                 "ORDER BY worker_id").fetchall()]
    return m.WorkerList(items=items, total=len(items))


def list_capabilities(cur: Cursor, type_: str | None = None) -> m.CapabilityList:
    caps: dict[str, m.CapabilityInfo] = {}
    for w in list_workers(cur, live=True).items:
        for c in w.capabilities:
            ctype = c.get("type", "")
            if type_ is not None and ctype != type_:
                continue
            labels = {k: v for k, v in c.items() if k != "type"}
            key = json.dumps([ctype, labels], sort_keys=True)
            info = caps.get(key)
            if info is None:
                info = caps[key] = m.CapabilityInfo(type=ctype, labels=labels, workers=[],
                                                    capacity=0, load=0)
            info.workers.append(w.worker_id)
            info.capacity += w.capacity or 0
            info.load += w.load or 0
    items = sorted(caps.values(), key=lambda c: (c.type, json.dumps(c.labels, sort_keys=True)))
    return m.CapabilityList(items=items, total=len(items))


def list_leases(cur: Cursor, live: bool | None = True, node: str | None = None,
                job: str | None = None, limit: int = 1000) -> m.LeaseList:
    clauses: list[str] = []
    params: list[Any] = []
    if live is not None:
        clauses.append("live = ?")
        params.append(live)
    if node is not None:
        clauses.append("(node = ? OR starts_with(device, ? || '.'))")
        params += [node, node]
    if job is not None:
        clauses.append("job_id = ?")
        params.append(job)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    items = [m.LeaseInfo(device=r[0], holder=r[1], job_id=r[2], node=r[3], acquired_at=r[4],
                         renewed_at=r[5], released_at=r[6], live=bool(r[7]))
             for r in cur.execute(
                 "SELECT device, holder, job_id, node, acquired_at, renewed_at, released_at, "
                 f"live FROM leases{where} ORDER BY acquired_at DESC, device LIMIT ?",
                 [*params, limit]).fetchall()]
    return m.LeaseList(items=items, total=len(items))


# ---- kernels --------------------------------------------------------------------------------

KR_COLS = ("job_id", "kind", "capability_type", "parent_job_id", "node", "ts", "outcome",
           "correct", "speedup", "candidate_ms", "reference_ms", "representative",
           "interpreted", "device", "flags", "max_abs_error", "wall_s")
KC_COLS = ("evolve_job_id", "candidate_id", "job_id", "round", "island", "origin", "parent",
           "hash", "outcome", "correct", "speedup", "candidate_ms", "reference_ms", "params",
           "source", "ts")


def kernel_results(cur: Cursor, *, kind: str | None, outcome: str | None,
                   correct: bool | None, parent: str | None, limit: int, offset: int
                   ) -> m.KernelResultPage:
    clauses: list[str] = []
    params: list[Any] = []
    for col, value in (("kind", kind), ("outcome", outcome), ("correct", correct),
                       ("parent_job_id", parent)):
        if value is not None:
            clauses.append(f"{col} = ?")
            params.append(value)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    (total,) = _one(cur, f"SELECT count(*) FROM kernel_results{where}", params)
    rows = cur.execute(f"SELECT {', '.join(KR_COLS)} FROM kernel_results{where} "
                       "ORDER BY ts DESC, job_id LIMIT ? OFFSET ?",
                       [*params, limit, offset]).fetchall()
    items = [m.KernelResult(**{**dict(zip(KR_COLS, r, strict=True)), "flags": list(r[14] or [])})
             for r in rows]
    return m.KernelResultPage(items=items, total=int(total), limit=limit, offset=offset)


def kernel_candidates(cur: Cursor, *, evolve_job: str | None, correct: bool | None,
                      limit: int, with_source: bool = False) -> m.KernelCandidateList:
    clauses: list[str] = []
    params: list[Any] = []
    if evolve_job is not None:
        clauses.append("evolve_job_id = ?")
        params.append(evolve_job)
    if correct is not None:
        clauses.append("correct = ?")
        params.append(correct)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = cur.execute(f"SELECT {', '.join(KC_COLS)} FROM kernel_candidates{where} "
                       "ORDER BY correct DESC, speedup DESC NULLS LAST, evolve_job_id, "
                       "candidate_id LIMIT ?", [*params, limit]).fetchall()
    items = []
    for r in rows:
        d = dict(zip(KC_COLS, r, strict=True))
        d["params"] = json.loads(d["params"]) if d["params"] else None
        if not with_source:
            d["source"] = None
        items.append(m.KernelCandidate(**d))
    return m.KernelCandidateList(items=items, total=len(items))
