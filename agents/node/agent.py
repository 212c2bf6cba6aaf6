"""The node agent's main loop: one per machine.

    start      open the GPU backend once, record the node in KV `nodes`, end the
               jobs a previous agent reported whose processes are gone
    heartbeat  every --heartbeat s on the event loop: nothing else runs there
               long, so a slow NVML call or a huge process table never delays it
    sample     every --metrics-interval s in a thread: GPUs, then processes; then
               on the loop: job transitions, GPU/process/jobs telemetry
    publish    a background flush of bounded queues (see publisher.py)

Everything the agent does survives the bus going away: telemetry waits in
bounded queues, job steps are retried, and both catch up on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from agents.node import identity
from agents.node.backends import open_backend
from agents.node.capture import CaptureLimits
from agents.node.gpu import GpuBackend, GpuSnapshot, NoGpus
from agents.node.patterns import JobPatterns
from agents.node.publisher import Publisher
from agents.node.scanner import Scanner, ScanResult
from agents.node.tracker import JobTracker
from bus import codec, topology
from bus.connection import Bus
from schemas.telemetry import (
    MAX_HEARTBEAT_JOBS,
    DiscoveredJobs,
    GpuMetrics,
    Heartbeat,
    NodeInventory,
    ProcessMetrics,
)

log = logging.getLogger(__name__)
INVENTORY_REFRESH_S = 300.0


@dataclass
class AgentConfig:
    node: str
    heartbeat_s: float = 5.0
    metrics_interval_s: float = 10.0
    simulate_gpus: int = 0
    use_nvml: bool = True
    patterns: JobPatterns = field(default_factory=JobPatterns)
    limits: CaptureLimits = field(default_factory=CaptureLimits)
    labels: dict[str, str] = field(default_factory=dict)


class NodeAgent:
    def __init__(self, bus: Bus, config: AgentConfig) -> None:
        self.bus = bus
        self.config = config
        self.node = config.node
        self.started_at = time.time()
        self.backend: GpuBackend = NoGpus()
        self.scanner = Scanner(self.node, config.patterns, config.limits)
        self.tracker = JobTracker(bus, self.node, self.scanner)
        self.publisher = Publisher(bus)
        self.inventory: NodeInventory | None = None
        self.cycles = 0
        self.last_cycle_cpu_s = 0.0
        self._seq = 0
        self._beats = 0
        self._job_ids: list[str] = []
        self._sampling_since: float | None = None
        self._registered_at = 0.0
        self._stamp = f"{int(self.started_at * 1000):x}"

    # ---- the loop ----------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        c = self.config
        self.backend = await asyncio.to_thread(open_backend, self.node, c.simulate_gpus, c.use_nvml)
        self.inventory = identity.inventory(
            self.node, self.backend, started_at=self.started_at, heartbeat_s=c.heartbeat_s,
            metrics_interval_s=c.metrics_interval_s, labels=c.labels,
            job_patterns=list(c.patterns.patterns))
        await self._register()
        ended = await self.tracker.reconcile()
        if ended:
            log.info("ended %d discovered jobs whose processes went while no agent watched", ended)
        log.info("node agent %s: %d GPUs (%s), heartbeat %gs, metrics every %gs", self.node,
                 len(self.inventory.gpus), self.backend.name, c.heartbeat_s, c.metrics_interval_s)
        tasks = [asyncio.create_task(self._heartbeats(stopping)),
                 asyncio.create_task(self._sampling(stopping)),
                 asyncio.create_task(self.publisher.run(stopping))]
        try:
            await stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.publisher.drain(2.0)
            await asyncio.to_thread(self.backend.close)

    async def _register(self) -> bool:
        assert self.inventory is not None
        self.inventory.updated_at = time.time()
        try:
            kv = await self.bus.kv(topology.KV_NODES)
            await asyncio.wait_for(kv.put(self.node, codec.encode(self.inventory)), 5.0)
        except Exception as exc:
            log.info("recording the node in KV nodes failed (%s); retried next cycle", exc)
            return False
        self._registered_at = time.monotonic()
        return True

    async def _heartbeats(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat_s
        next_at = loop.time()
        psutil.cpu_percent(None)  # primes the system-wide counter
        while not stopping.is_set():
            try:
                self.publisher.put(topology.HEARTBEAT, topology.telemetry(self.node, topology.HEARTBEAT),
                                   self.heartbeat(), self._msg_id("hb"), now=True)
            except Exception as exc:  # a heartbeat that cannot be built is logged, not fatal
                log.warning("heartbeat failed: %s", exc)
            next_at += interval
            if next_at < loop.time():  # we were frozen or starved: no burst to catch up
                next_at = loop.time() + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.0, next_at - loop.time()))

    def heartbeat(self) -> Heartbeat:
        mem = psutil.virtual_memory()
        try:
            load1: float | None = os.getloadavg()[0]
        except OSError:
            load1 = None
        late = None
        if self._sampling_since is not None:
            over = time.monotonic() - self._sampling_since - self.config.metrics_interval_s
            late = round(over, 2) if over > 0 else None
        self._beats += 1
        return Heartbeat(
            node=self.node, seq=self._beats, agent_pid=os.getpid(), started_at=self.started_at,
            interval_s=self.config.heartbeat_s, load1=load1, cpu_percent=psutil.cpu_percent(None),
            memory_used_mb=round((mem.total - mem.available) / 1048576, 1),
            memory_total_mb=round(mem.total / 1048576, 1),
            gpus=len(self.inventory.gpus) if self.inventory else 0, jobs=len(self._job_ids),
            job_ids=self._job_ids[:MAX_HEARTBEAT_JOBS], backlog=self.publisher.backlog,
            simulated=self.backend.simulated,
            hostname=self.inventory.hostname if self.inventory else None, sampling_late_s=late)

    async def _sampling(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.metrics_interval_s
        while not stopping.is_set():
            started = loop.time()
            try:
                await self.cycle()
            except Exception:
                log.exception("sampling cycle failed; next one in %gs", interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.05, started + interval - loop.time()))

    async def cycle(self) -> ScanResult:
        """One sampling cycle: sample (in a thread), track jobs, queue telemetry."""
        self._sampling_since = time.monotonic()
        try:
            snap, result = await asyncio.to_thread(self.sample)
        finally:
            self._sampling_since = None
        self._job_ids = self.scanner.job_ids
        await self.tracker.apply(result.new, result.ended)
        self._job_ids = self.scanner.job_ids  # unlinking may have renamed some
        self._queue_telemetry(snap, result)
        if (not self._registered_at
                or time.monotonic() - self._registered_at > INVENTORY_REFRESH_S):
            await self._register()
        self.cycles += 1
        return result

    def sample(self) -> tuple[GpuSnapshot, ScanResult]:
        """The CPU side of a cycle (runs in a thread): GPUs first, so the process
        scan knows which pids hold one."""
        t0 = time.thread_time()
        try:
            snap = self.backend.sample()
        except Exception as exc:  # a backend bug must not stop process tracking
            log.warning("GPU sampling failed: %s", exc)
            snap = GpuSnapshot()
        result = self.scanner.scan(snap)
        self.last_cycle_cpu_s = time.thread_time() - t0
        return snap, result

    def _queue_telemetry(self, snap: GpuSnapshot, result: ScanResult) -> None:
        node, pub = self.node, self.publisher
        if snap.gpus or snap.processes:
            pub.put(topology.GPU, topology.telemetry(node, topology.GPU), GpuMetrics(
                node=node, hostname=self.inventory.hostname if self.inventory else None,
                driver=self.backend.driver_version(), gpus=snap.gpus, processes=snap.processes,
                simulated=self.backend.simulated), self._msg_id("gpu"))
        pub.put(topology.PROCS, topology.telemetry(node, topology.PROCS),
                ProcessMetrics(node=node, processes=result.samples), self._msg_id("procs"))
        pub.put(topology.DISCOVERED, topology.telemetry(node, topology.DISCOVERED),
                DiscoveredJobs(node=node, jobs=result.refs), self._msg_id("jobs"), now=True)

    def _msg_id(self, kind: str) -> str:
        self._seq += 1
        return f"{self.node}.{kind}.{self._stamp}.{self._seq}"

    def info(self) -> dict[str, Any]:
        return {"node": self.node, "gpu_backend": self.backend.name, "jobs": self._job_ids,
                "cycles": self.cycles, "backlog": self.publisher.backlog,
                "dropped": self.publisher.dropped, "discovered": self.tracker.discovered,
                "linked": self.tracker.linked, "ended": self.tracker.ended,
                "last_cycle_cpu_ms": round(self.last_cycle_cpu_s * 1000, 2)}
