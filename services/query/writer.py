"""The projection's one writer: a batch, and the stream sequences it brings the
projection to, in one DuckDB transaction.

After a crash the file holds either the whole batch and its sequences, or
neither, so a restart resumes right after the last applied message: nothing
counted twice, nothing skipped. Every insert is an Arrow batch through
`INSERT ... SELECT` (row-by-row `executemany` runs at about 3k rows/s).

Reads use a cursor per thread (a DuckDB connection is not thread-safe); the
writer's own cursor is used only from the writer thread.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from schemas.events import event_kind
from schemas.jobs import TERMINAL_STATES
from schemas.telemetry import node_event_kind

from . import fold, kernels, tables
from .rows import Batch, Position, columns

log = logging.getLogger(__name__)

_JOB_JSON = ("capability", "result", "process", "processes")


class ProjectionLocked(RuntimeError):
    """Another process holds the projection file open for writing."""


@dataclass(frozen=True)
class Retention:
    """Metrics older than `full_resolution_s` are averaged into `bucket_s` rows;
    older than `keep_s` they are dropped (0: never)."""

    full_resolution_s: float = 24 * 3600.0
    bucket_s: float = 60.0
    keep_s: float = 30 * 24 * 3600.0


_METRIC_TABLES = (tables.GPU_METRICS, tables.GPU_PROCESS_METRICS, tables.PROCESS_METRICS)
# Series identity of each metric table (the rest of its columns are averaged).
_SERIES = {"gpu_metrics": ("node", "gpu"), "gpu_process_metrics": ("node", "pid", "gpu"),
           "process_metrics": ("node", "pid")}


def _json_type(fields: dict[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"))


_F = "DOUBLE"
_GPU_TYPE = _json_type({
    "node": "VARCHAR", "ts": _F, "simulated": "BOOLEAN",
    "gpus": [{"index": "INTEGER", "uuid": "VARCHAR", "name": "VARCHAR", "gpu_util_pct": _F,
              "mem_copy_util_pct": _F, "fb_used_mb": _F, "fb_total_mb": _F, "power_w": _F,
              "gpu_temp_c": _F, "mem_temp_c": _F, "sm_clock_mhz": _F, "mem_clock_mhz": _F,
              "energy_mj": _F, "pcie_tx_kbps": _F, "pcie_rx_kbps": _F,
              "simulated": "BOOLEAN"}],
    "processes": [{"pid": "BIGINT", "gpu_index": "INTEGER", "job_id": "VARCHAR",
                   "used_memory_mb": _F, "sm_util_pct": _F, "mem_util_pct": _F}]})
_SIM = "coalesce(p.m.simulated, false) OR coalesce(g.simulated, false)"
_GPU_SQL = (
    "INSERT INTO gpu_metrics SELECT p.m.ts, p.m.node, g.index, g.uuid, g.gpu_util_pct, "
    "g.mem_copy_util_pct, g.fb_used_mb, g.fb_total_mb, g.power_w, g.gpu_temp_c, g.mem_temp_c, "
    f"g.sm_clock_mhz, g.mem_clock_mhz, g.energy_mj, g.pcie_tx_kbps, g.pcie_rx_kbps, {_SIM}, 1 "
    "FROM parsed p, LATERAL (SELECT unnest(p.m.gpus) AS g) u",
    "INSERT INTO gpu_process_metrics SELECT p.m.ts, p.m.node, x.pid, x.gpu_index, x.job_id, "
    "x.used_memory_mb, x.sm_util_pct, x.mem_util_pct, 1 "
    "FROM parsed p, LATERAL (SELECT unnest(p.m.processes) AS x) u",
    # The latest sample of each device in this batch (stream order decides).
    "INSERT OR REPLACE INTO devices SELECT p.m.node, g.index, g.uuid, g.name, p.m.ts, "
    f"g.gpu_util_pct, g.fb_used_mb, g.fb_total_mb, g.power_w, g.gpu_temp_c, {_SIM} "
    "FROM parsed p, LATERAL (SELECT unnest(p.m.gpus) AS g) u "
    "QUALIFY row_number() OVER (PARTITION BY p.m.node, g.index ORDER BY p.seq DESC) = 1",
)
_PROCS_TYPE = _json_type({
    "node": "VARCHAR", "ts": _F,
    "processes": [{"pid": "BIGINT", "job_id": "VARCHAR", "cpu_percent": _F, "rss_mb": _F,
                   "vms_mb": _F, "threads": "INTEGER", "open_files": "INTEGER",
                   "gpu_memory_mb": _F}]})
_PROCS_SQL = (
    "INSERT INTO process_metrics SELECT p.m.ts, p.m.node, x.pid, x.job_id, x.cpu_percent, "
    "x.rss_mb, x.vms_mb, x.threads, x.open_files, x.gpu_memory_mb, 1 "
    "FROM parsed p, LATERAL (SELECT unnest(p.m.processes) AS x) u",
)


class Projection:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self.con = duckdb.connect(self.path)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise ProjectionLocked(
                    f"{self.path} is open in another process (a running query service?): "
                    "stop it, or give this one its own --db") from None
            raise
        tables.create(self.con)
        self._write = self.con.cursor()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()

    # ---- reads ------------------------------------------------------------------------------

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor."""
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            with self._lock:
                cur = self.con.cursor()
                self._cursors.append(cur)
            self._local.cursor = cur
        return cur

    def positions(self) -> dict[str, Position]:
        rows = self.reader().execute(
            "SELECT stream, seq, ts, messages, skipped FROM applied").fetchall()
        return {r[0]: Position(seq=r[1], ts=r[2], messages=r[3], skipped=r[4]) for r in rows}

    # ---- the batch --------------------------------------------------------------------------

    def apply(self, batch: Batch) -> None:
        con = self._write
        con.execute("BEGIN TRANSACTION")
        try:
            if batch.events:
                self._jobs(con, batch)
            if batch.node_events:
                self._node_events(con, batch)
            if batch.heartbeats:
                self._heartbeats(con, batch)
            if batch.gpu:
                self._from_json(con, batch.gpu, _GPU_TYPE, _GPU_SQL)
            if batch.procs:
                self._from_json(con, batch.procs, _PROCS_TYPE, _PROCS_SQL)
            self._snapshots(con, batch)
            self._positions(con, batch.positions)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @staticmethod
    def _from_json(con: duckdb.DuckDBPyConnection, bodies: list[tuple[int, str]],
                   json_type: str, statements: tuple[str, ...]) -> None:
        """Unpack validated JSON messages into rows inside DuckDB (each parsed once)."""
        import pyarrow as pa

        seqs, texts = zip(*bodies, strict=True)
        raw = pa.table({"seq": pa.array(seqs, pa.int64()),  # noqa: F841 (scanned by name)
                        "body": pa.array(texts, pa.string())})
        con.execute("CREATE OR REPLACE TEMP TABLE parsed AS "
                    f"SELECT seq, from_json(body, '{json_type}') AS m FROM raw")
        for sql in statements:
            con.execute(sql)
        con.execute("DROP TABLE parsed")

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: tables.Table,
                rows: list[tuple[Any, ...]], how: str = "INSERT INTO") -> None:
        if not rows:
            return
        arrow_batch = tables.arrow(table, columns(rows, table.names))  # noqa: F841 (scanned by name)
        con.execute(f"{how} {table.name} SELECT * FROM arrow_batch")

    def _upsert(self, con: duckdb.DuckDBPyConnection, table: tables.Table,
                rows: list[tuple[Any, ...]]) -> None:
        self._insert(con, table, rows, "INSERT OR REPLACE INTO")

    @staticmethod
    def _upsert_columns(con: duckdb.DuckDBPyConnection, table: tables.Table, names: list[str],
                        rows: list[tuple[Any, ...]]) -> None:
        """Set only `names` (the key first) of each row, leaving its other columns."""
        if not rows:
            return
        types = dict(table.columns)
        import pyarrow as pa

        cols = columns(rows, names)
        arrow_batch = pa.table({n: pa.array(cols[n], type=types[n]) for n in names})  # noqa: F841
        quoted = ", ".join(f'"{n}"' for n in names)
        sets = ", ".join(f'"{n}" = excluded."{n}"' for n in names if n not in table.key)
        con.execute(f"INSERT INTO {table.name} ({quoted}) SELECT {quoted} FROM arrow_batch "
                    f"ON CONFLICT ({', '.join(table.key)}) DO UPDATE SET {sets}")

    # ---- jobs -------------------------------------------------------------------------------

    def _jobs(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
        ids = list(dict.fromkeys(e.job_id for _, e, _ in batch.events))
        jobs, attempts = self._load_jobs(con, ids)
        known_jobs = set(jobs)
        known_attempts = {(j, n) for j, mine in attempts.items() for n in mine}
        touched: dict[tuple[str, int], dict[str, Any]] = {}
        events, outcomes, candidates = [], [], []
        finished = batch.finished
        for seq, event, raw in batch.events:
            job_id = event.job_id
            row = jobs.get(job_id)
            if row is None:
                row = jobs[job_id] = fold.new_job(job_id)
            mine = attempts.get(job_id)
            if mine is None:
                mine = attempts[job_id] = {}
            was = row["state"]
            changed = fold.apply(row, mine, event, seq)
            if changed is not None:
                touched[(job_id, changed)] = mine[changed]
            kind = event_kind(event)
            state = row["state"]
            if state != was and state in TERMINAL_STATES and was not in TERMINAL_STATES:
                finished.append((row["capability_type"], state, row["duration_s"]))
            events.append((seq, job_id, kind, event.ts, event.attempt, event.worker_id, raw))
            if kind == "succeeded" and was != "succeeded" and state == "succeeded":
                ctype = row["capability_type"]
                if ctype in kernels.EVAL_TYPES:
                    got = kernels.outcome_row(row, event.ts)
                    if got is not None:
                        outcomes.append(got)
                elif ctype in kernels.SEARCH_TYPES:
                    candidates.extend(kernels.candidate_rows(row, event.ts))
        self._insert(con, tables.JOB_EVENTS, events)
        # Rows new to the table are inserted; only those that were loaded are
        # replaced (an upsert costs DuckDB a key lookup and a delete per row).
        job_rows: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = ([], [])
        for job_id, r in jobs.items():
            if r["state"] is not None or r["events"]:
                job_rows[job_id in known_jobs].append(_job_tuple(r))
        self._insert(con, tables.JOBS, job_rows[0])
        self._upsert(con, tables.JOBS, job_rows[1])
        names = tables.ATTEMPTS.names
        attempt_rows: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = ([], [])
        for key, a in touched.items():
            attempt_rows[key in known_attempts].append(tuple(a[c] for c in names))
        self._insert(con, tables.ATTEMPTS, attempt_rows[0])
        self._upsert(con, tables.ATTEMPTS, attempt_rows[1])
        self._upsert(con, tables.KERNEL_RESULTS, outcomes)
        self._upsert(con, tables.KERNEL_CANDIDATES, candidates)

    def _load_jobs(self, con: duckdb.DuckDBPyConnection, ids: list[str]
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[int, dict[str, Any]]]]:
        import pyarrow as pa

        wanted = pa.table({"job_id": pa.array(ids, type=pa.string())})  # noqa: F841
        names = tables.JOBS.names
        jobs: dict[str, dict[str, Any]] = {}
        for r in con.execute(f"SELECT {', '.join(_q(names))} FROM jobs "
                             "WHERE job_id IN (SELECT job_id FROM wanted)").fetchall():
            row = dict(zip(names, r, strict=True))
            for c in _JOB_JSON:
                row[c] = None if row[c] is None else json.loads(row[c])
            row["capability"] = row["capability"] or {}
            row["processes"] = row["processes"] or []
            row["devices"] = list(row["devices"] or [])
            jobs[row["job_id"]] = row
        attempts: dict[str, dict[int, dict[str, Any]]] = {}
        anames = tables.ATTEMPTS.names
        for r in con.execute(f"SELECT {', '.join(_q(anames))} FROM attempts "
                             "WHERE job_id IN (SELECT job_id FROM wanted)").fetchall():
            a = dict(zip(anames, r, strict=True))
            a["devices"] = list(a["devices"] or [])
            attempts.setdefault(a["job_id"], {})[a["attempt"]] = a
        return jobs, attempts

    # ---- nodes ------------------------------------------------------------------------------

    def _node_events(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
        rows, state = [], {}
        joined: dict[str, float] = {}
        for seq, e, raw in batch.node_events:
            kind = node_event_kind(e)
            rows.append((seq, e.node, kind, e.ts, raw))
            if kind in ("joined", "lost", "recovered"):
                state[e.node] = ("up" if kind != "lost" else "lost", e.ts)
            if kind == "joined":
                joined[e.node] = e.ts
        self._insert(con, tables.NODE_EVENTS, rows)
        self._upsert_columns(con, tables.NODES, ["node", "event_state", "event_ts"],
                             [(n, s, t) for n, (s, t) in state.items()])
        self._upsert_columns(con, tables.NODES, ["node", "joined_at"], list(joined.items()))

    def _heartbeats(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
        names = ["node", "last_heartbeat", "heartbeat_interval", "agent_pid", "load1",
                 "cpu_percent", "memory_used_mb", "memory_total_mb", "gpus", "jobs", "backlog",
                 "hb_simulated"]
        self._upsert_columns(con, tables.NODES, names, [
            (h.node, h.ts, h.interval_s, h.agent_pid, h.load1, h.cpu_percent, h.memory_used_mb,
             h.memory_total_mb, h.gpus, h.jobs, h.backlog, h.simulated)
            for h in batch.heartbeats.values()])

    # ---- KV snapshots -----------------------------------------------------------------------

    def _snapshots(self, con: duckdb.DuckDBPyConnection, batch: Batch) -> None:
        at = batch.snapshot_ts
        if batch.inventories is not None:
            self._upsert_columns(con, tables.NODES, ["node", "hostname", "inventory",
                                                     "inventory_at"], [
                (inv.node, inv.hostname, msgspec.json.encode(inv).decode(), at)
                for inv in batch.inventories])
        if batch.workers is not None:
            con.execute("UPDATE workers SET live = false WHERE live")
            self._upsert(con, tables.WORKERS, [
                (a.worker_id, a.node, a.pid, json.dumps(a.capabilities),
                 msgspec.json.encode(a.devices).decode(), a.capacity, a.load, a.started_at,
                 a.updated_at, a.simulated, True, at) for a in batch.workers])
        if batch.leases is not None:
            # A lease is one (device, holder, acquired_at); one no longer in the
            # bucket was released (or expired) somewhere since the last look.
            con.execute("UPDATE leases SET live = false, released_at = ? WHERE live", [at])
            self._upsert(con, tables.LEASES, [
                (r.device, r.holder, r.job_id, r.node, r.acquired_at, r.renewed_at, None, True)
                for r in batch.leases])

    def _positions(self, con: duckdb.DuckDBPyConnection, positions: dict[str, Position]) -> None:
        for stream, p in positions.items():
            # An UPDATE of the row that is nearly always there costs DuckDB half
            # what the equivalent upsert does; the first batch of a stream inserts.
            got = con.execute(
                "UPDATE applied SET seq = ?, ts = coalesce(?, ts), messages = messages + ?, "
                "skipped = skipped + ? WHERE stream = ?",
                [p.seq, p.ts, p.messages, p.skipped, stream]).fetchone()
            if not got or not got[0]:
                con.execute("INSERT INTO applied VALUES (?, ?, ?, ?, ?)",
                            [stream, p.seq, p.ts, p.messages, p.skipped])

    # ---- retention --------------------------------------------------------------------------

    def downsample(self, retention: Retention, now: float | None = None) -> int:
        """Average full-resolution metrics older than the window into buckets; drop
        what is past `keep_s`. Returns the raw rows folded. A watermark in `meta`
        says how far this has gone, so no row is averaged twice."""
        now = time.time() if now is None else now
        b = retention.bucket_s
        cutoff = (now - retention.full_resolution_s) // b * b
        con = self._write
        con.execute("BEGIN TRANSACTION")
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'downsampled_until'").fetchone()
            since = float(row[0]) if row else float("-inf")
            folded = 0
            if cutoff > since:
                for table in _METRIC_TABLES:
                    folded += self._fold_metrics(con, table, max(since, -1e18), cutoff, b)
                con.execute("INSERT OR REPLACE INTO meta VALUES ('downsampled_until', ?)",
                            [repr(cutoff)])
            if retention.keep_s > 0:
                for table in _METRIC_TABLES:
                    con.execute(f"DELETE FROM {table.name} WHERE ts < ?",
                                [now - retention.keep_s])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return folded

    @staticmethod
    def _fold_metrics(con: duckdb.DuckDBPyConnection, table: tables.Table, since: float,
                      until: float, bucket: float) -> int:
        series = _SERIES[table.name]
        select = []
        for c, t in table.columns:
            if c == "ts":
                select.append(f"floor(ts / {bucket!r}) * {bucket!r}")
            elif c in series:
                select.append(f'"{c}"')
            elif c == "n":
                select.append("sum(n)::INTEGER")
            elif t in (tables.F64,) or c in ("threads", "open_files"):
                cast = "::INTEGER" if t == tables.I32 else ""
                select.append(f'(sum("{c}" * n) / sum(CASE WHEN "{c}" IS NOT NULL THEN n END)){cast}')
            elif t == tables.BOOL:
                select.append(f'bool_or("{c}")')
            else:
                select.append(f'any_value("{c}")')
        where = "ts >= ? AND ts < ?"
        count = con.execute(f"SELECT count(*) FROM {table.name} WHERE {where}",
                            [since, until]).fetchone()
        n = int(count[0]) if count else 0
        if not n:
            return 0
        con.execute(f"CREATE TEMP TABLE folded AS SELECT {', '.join(select)} FROM {table.name} "
                    f"WHERE {where} GROUP BY {', '.join(select[0:1] + [_q1(s) for s in series])}",
                    [since, until])
        con.execute(f"DELETE FROM {table.name} WHERE {where}", [since, until])
        con.execute(f"INSERT INTO {table.name} SELECT * FROM folded")
        con.execute("DROP TABLE folded")
        return n

    # ---- rebuild ----------------------------------------------------------------------------

    def truncate(self) -> None:
        """Forget everything replayed (and where replay stood), in one transaction."""
        con = self._write
        con.execute("BEGIN TRANSACTION")
        try:
            for table in tables.REPLAYED:
                con.execute(f"DELETE FROM {table.name}")
            con.execute("DELETE FROM meta WHERE key = 'downsampled_until'")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def close(self) -> None:
        for cur in self._cursors:
            cur.close()
        self._write.close()
        self.con.close()


def _q(names: Iterable[str]) -> list[str]:
    return [f'"{n}"' for n in names]


def _q1(name: str) -> str:
    return f'"{name}"'


_JOB_VALUES = operator.itemgetter(*tables.JOBS.names)
_JOB_JSON_AT = tuple(tables.JOBS.names.index(c) for c in _JOB_JSON)
_encode = msgspec.json.Encoder().encode


def _job_tuple(row: dict[str, Any]) -> tuple[Any, ...]:
    values = list(_JOB_VALUES(row))
    for i in _JOB_JSON_AT:
        v = values[i]
        if v is not None:
            values[i] = _encode(v).decode()
    return tuple(values)
