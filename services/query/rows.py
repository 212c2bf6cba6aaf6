"""Bus messages -> one batch of rows, decoded strictly, in stream order.

Telemetry becomes metric rows at once (tuples, transposed into Arrow columns
at flush); job events are kept decoded for the fold, which needs the jobs'
current records and so runs in the writer. A message that does not decode is
counted as skipped: its sequence is still applied, so it is never retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bus import topology
from schemas import events as ev
from schemas import telemetry as tm

log = logging.getLogger(__name__)

JOB_PREFIX = topology.job_events("")
NODE_PREFIX = topology.node_events("")
TELEMETRY_PREFIX = topology.TELEMETRY_ALL.removesuffix(">")

_heartbeat = msgspec.json.Decoder(tm.Heartbeat)
_gpu = msgspec.json.Decoder(tm.GpuMetrics)
_procs = msgspec.json.Decoder(tm.ProcessMetrics)
_jobs_seen = msgspec.json.Decoder(tm.DiscoveredJobs)


@dataclass
class Position:
    """How far one stream has been applied."""

    seq: int = 0
    ts: float | None = None
    messages: int = 0
    skipped: int = 0


@dataclass
class Batch:
    positions: dict[str, Position] = field(default_factory=dict)
    events: list[tuple[int, ev.JobEvent, str]] = field(default_factory=list)
    node_events: list[tuple[int, tm.NodeEvent, str]] = field(default_factory=list)
    heartbeats: dict[str, tm.Heartbeat] = field(default_factory=dict)
    # GPU and process metrics stay JSON (validated here): DuckDB unpacks them into
    # rows far faster than Python builds tuples (see writer.METRICS_FROM_JSON).
    gpu: list[tuple[int, str]] = field(default_factory=list)
    procs: list[tuple[int, str]] = field(default_factory=list)
    gpu_samples: int = 0
    gpu_proc_samples: int = 0
    proc_samples: int = 0
    # KV snapshots (None: not polled in this batch).
    workers: list[Any] | None = None
    leases: list[Any] | None = None
    inventories: list[Any] | None = None
    snapshot_ts: float = 0.0
    # Filled by the writer: (capability type, terminal state, duration) of jobs
    # that ended in this batch.
    finished: list[tuple[str | None, str, float | None]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return self.gpu_samples + self.gpu_proc_samples + self.proc_samples

    @property
    def size(self) -> int:
        return (len(self.events) + len(self.node_events) + len(self.heartbeats) + self.samples)

    def empty(self) -> bool:
        return not self.positions and self.workers is None and self.leases is None \
            and self.inventories is None

    def _position(self, stream: str, seq: int, ts: float | None) -> Position:
        pos = self.positions.setdefault(stream, Position())
        pos.seq, pos.messages = seq, pos.messages + 1
        if ts is not None:
            pos.ts = ts
        return pos

    def add(self, stream: str, seq: int, subject: str, data: bytes, ts: float | None) -> None:
        pos = self._position(stream, seq, ts)
        try:
            ok = self._add(seq, subject, data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            log.warning("skipped %s seq %d on %s: %s", stream, seq, subject, exc)
            ok = False
        if not ok:
            pos.skipped += 1

    def _add(self, seq: int, subject: str, data: bytes) -> bool:
        if subject.startswith(JOB_PREFIX):
            self.events.append((seq, ev.decode_event(data), data.decode()))
            return True
        if subject.startswith(NODE_PREFIX):
            self.node_events.append((seq, tm.decode_node_event(data), data.decode()))
            return True
        if subject.startswith(TELEMETRY_PREFIX):
            kind = subject.rsplit(".", 1)[-1]
            if kind == "gpu":
                g = _gpu.decode(data)
                self.gpu.append((seq, data.decode()))
                self.gpu_samples += len(g.gpus)
                self.gpu_proc_samples += len(g.processes)
            elif kind == "procs":
                p = _procs.decode(data)
                self.procs.append((seq, data.decode()))
                self.proc_samples += len(p.processes)
            elif kind == "heartbeat":
                hb = _heartbeat.decode(data)
                self.heartbeats[hb.node] = hb
            elif kind == "jobs":
                _jobs_seen.decode(data)  # running jobs come from their events
            else:
                return False
            return True
        return False


def columns(rows: list[tuple[Any, ...]], names: list[str]) -> dict[str, list[Any]]:
    """Row tuples -> column lists (one C-level transpose)."""
    if not rows:
        return {n: [] for n in names}
    return {n: list(col) for n, col in zip(names, zip(*rows, strict=True), strict=True)}
