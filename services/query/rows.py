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
    gpu: list[tuple[Any, ...]] = field(default_factory=list)
    devices: dict[tuple[str, int], tuple[Any, ...]] = field(default_factory=dict)
    gpu_procs: list[tuple[Any, ...]] = field(default_factory=list)
    procs: list[tuple[Any, ...]] = field(default_factory=list)
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
        return len(self.gpu) + len(self.gpu_procs) + len(self.procs)

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
                self._gpu(_gpu.decode(data))
            elif kind == "procs":
                self._procs(_procs.decode(data))
            elif kind == "heartbeat":
                hb = _heartbeat.decode(data)
                self.heartbeats[hb.node] = hb
            elif kind == "jobs":
                _jobs_seen.decode(data)  # running jobs come from their events
            else:
                return False
            return True
        return False

    def _gpu(self, m: tm.GpuMetrics) -> None:
        ts, node, sim = m.ts, m.node, m.simulated
        append = self.gpu.append
        for g in m.gpus:
            append((ts, node, g.index, g.uuid, g.gpu_util_pct, g.mem_copy_util_pct, g.fb_used_mb,
                    g.fb_total_mb, g.power_w, g.gpu_temp_c, g.mem_temp_c, g.sm_clock_mhz,
                    g.mem_clock_mhz, g.energy_mj, g.pcie_tx_kbps, g.pcie_rx_kbps,
                    sim or g.simulated, 1))
            self.devices[(node, g.index)] = (
                node, g.index, g.uuid, g.name, ts, g.gpu_util_pct, g.fb_used_mb, g.fb_total_mb,
                g.power_w, g.gpu_temp_c, sim or g.simulated)
        proc = self.gpu_procs.append
        for p in m.processes:
            proc((ts, node, p.pid, p.gpu_index, p.job_id, p.used_memory_mb, p.sm_util_pct,
                  p.mem_util_pct, 1))

    def _procs(self, m: tm.ProcessMetrics) -> None:
        ts, node = m.ts, m.node
        append = self.procs.append
        for p in m.processes:
            append((ts, node, p.pid, p.job_id, p.cpu_percent, p.rss_mb, p.vms_mb, p.threads,
                    p.open_files, p.gpu_memory_mb, 1))


def columns(rows: list[tuple[Any, ...]], names: list[str]) -> dict[str, list[Any]]:
    """Row tuples -> column lists (one C-level transpose)."""
    if not rows:
        return {n: [] for n in names}
    return {n: list(col) for n, col in zip(names, zip(*rows, strict=True), strict=True)}
