"""The projection's DuckDB schema, declared once: each table's columns with their
DuckDB and Arrow types, so a batch built in Python lands with one
`INSERT ... SELECT` and no per-row SQL.

Times are epoch seconds (DOUBLE), as on the bus. Metric tables carry `n`, the
number of raw samples a row stands for: 1 at full resolution, more once
downsampled, so an average stays an average across resolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

SCHEMA_VERSION = 1

STR, F64, I64, I32, BOOL = pa.string(), pa.float64(), pa.int64(), pa.int32(), pa.bool_()
STRS = pa.list_(pa.string())
_DUCK = {STR: "VARCHAR", F64: "DOUBLE", I64: "BIGINT", I32: "INTEGER", BOOL: "BOOLEAN",
         STRS: "VARCHAR[]"}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, pa.DataType], ...]
    key: tuple[str, ...] = ()
    # Columns stored as JSON (sent as text).
    json: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(list(self.columns))

    def ddl(self) -> str:
        cols = [f'"{c}" {"JSON" if c in self.json else _DUCK[t]}' for c, t in self.columns]
        if self.key:
            cols.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})"


def _t(name: str, cols: str, key: tuple[str, ...] = (), json: tuple[str, ...] = ()) -> Table:
    types = {"s": STR, "f": F64, "i": I64, "n": I32, "b": BOOL, "l": STRS}
    parsed = []
    for item in cols.split():
        col, kind = item.split(":")
        parsed.append((col, types[kind]))
    return Table(name, tuple(parsed), key, json)


APPLIED = _t("applied", "stream:s seq:i ts:f messages:i skipped:i", key=("stream",))

JOBS = _t(
    "jobs",
    "job_id:s origin:s state:s capability_type:s capability:s priority:n user:s "
    "parent_job_id:s attempt:n worker_id:s node:s devices:l submitted_at:f updated_at:f "
    "started_at:f ended_at:f duration_s:f result:s error_code:s error_message:s reason:s "
    "stale:b cancel_requested:b progress:f exit_code:n process:s processes:s events:n "
    "first_seq:i last_seq:i",
    key=("job_id",), json=("capability", "result", "process", "processes"))

ATTEMPTS = _t(
    "attempts",
    "job_id:s attempt:n worker_id:s node:s devices:l gpus:n started_at:f ended_at:f outcome:s "
    "error_code:s error_message:s user:s capability_type:s",
    key=("job_id", "attempt"))

JOB_EVENTS = _t("job_events", "seq:i job_id:s kind:s ts:f attempt:n worker_id:s body:s",
                json=("body",))

NODE_EVENTS = _t("node_events", "seq:i node:s kind:s ts:f body:s", json=("body",))

# Heartbeat columns come from TELEMETRY only, state columns from EVENTS only,
# inventory from KV only: each column has one source, so the order in which
# the two streams interleave never changes the result.
NODES = _t(
    "nodes",
    "node:s hostname:s last_heartbeat:f heartbeat_interval:f agent_pid:i load1:f "
    "cpu_percent:f memory_used_mb:f memory_total_mb:f gpus:n jobs:n backlog:n "
    "hb_simulated:b event_state:s event_ts:f joined_at:f inventory:s inventory_at:f",
    key=("node",), json=("inventory",))

DEVICES = _t(
    "devices",
    "node:s gpu:n uuid:s name:s ts:f gpu_util_pct:f fb_used_mb:f fb_total_mb:f power_w:f "
    "gpu_temp_c:f simulated:b",
    key=("node", "gpu"))

GPU_METRICS = _t(
    "gpu_metrics",
    "ts:f node:s gpu:n uuid:s gpu_util_pct:f mem_copy_util_pct:f fb_used_mb:f fb_total_mb:f "
    "power_w:f gpu_temp_c:f mem_temp_c:f sm_clock_mhz:f mem_clock_mhz:f energy_mj:f "
    "pcie_tx_kbps:f pcie_rx_kbps:f simulated:b n:n")

GPU_PROCESS_METRICS = _t(
    "gpu_process_metrics",
    "ts:f node:s pid:i gpu:n job_id:s used_memory_mb:f sm_util_pct:f mem_util_pct:f n:n")

PROCESS_METRICS = _t(
    "process_metrics",
    "ts:f node:s pid:i job_id:s cpu_percent:f rss_mb:f vms_mb:f threads:n open_files:n "
    "gpu_memory_mb:f n:n")

WORKERS = _t(
    "workers",
    "worker_id:s node:s pid:i capabilities:s devices:s capacity:n load:n started_at:f "
    "updated_at:f simulated:b live:b last_seen:f",
    key=("worker_id",), json=("capabilities", "devices"))

LEASES = _t(
    "leases",
    "device:s holder:s job_id:s node:s acquired_at:f renewed_at:f released_at:f live:b",
    key=("device", "holder", "acquired_at"))

KERNEL_RESULTS = _t(
    "kernel_results",
    "job_id:s kind:s capability_type:s parent_job_id:s node:s ts:f outcome:s correct:b "
    "speedup:f candidate_ms:f reference_ms:f representative:b interpreted:b device:s "
    "flags:l max_abs_error:f wall_s:f",
    key=("job_id",))

KERNEL_CANDIDATES = _t(
    "kernel_candidates",
    "evolve_job_id:s candidate_id:s job_id:s round:n island:n origin:s parent:s hash:s "
    "outcome:s correct:b speedup:f candidate_ms:f reference_ms:f params:s source:s ts:f",
    key=("evolve_job_id", "candidate_id"), json=("params",))

ALL = (APPLIED, JOBS, ATTEMPTS, JOB_EVENTS, NODE_EVENTS, NODES, DEVICES, GPU_METRICS,
       GPU_PROCESS_METRICS, PROCESS_METRICS, WORKERS, LEASES, KERNEL_RESULTS,
       KERNEL_CANDIDATES)

# Tables that come from the streams (rebuilt by replay); the rest are KV snapshots.
REPLAYED = tuple(t for t in ALL if t not in (WORKERS, LEASES))

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS job_events_job ON job_events (job_id)",
    "CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id)",
)


def create(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is not None and int(row[0]) != SCHEMA_VERSION:
        raise SchemaMismatch(
            f"the projection was written by schema version {row[0]}, this is "
            f"{SCHEMA_VERSION}: rebuild it (`jetfleet query rebuild --db FILE`)")
    for table in ALL:
        con.execute(table.ddl())
    for index in _INDEXES:
        con.execute(index)
    con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


class SchemaMismatch(RuntimeError):
    pass


def arrow(table: Table, columns: dict[str, list[Any]]) -> pa.Table:
    """A column batch as an Arrow table of the declared types."""
    return pa.table({c: pa.array(columns[c], type=t) for c, t in table.columns},
                    schema=table.arrow_schema)
