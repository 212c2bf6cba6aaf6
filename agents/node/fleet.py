"""Many simulated node agents in one process, for scale tests of the monitor
and the query service (`jetfleet simulate`, `jetfleet bench monitor`).

Each simulated node records its inventory in KV `nodes`, heartbeats every
`interval` seconds (spread over the interval, as independent agents would),
publishes GPU, process and jobs telemetry every `metrics_every` heartbeats,
and runs a few discovered jobs through the real lifecycle (created, ended,
replaced). Some nodes go silent for a while and come back. Everything it
publishes says `simulated`: inventories, heartbeats, GPU and process samples,
and each job's process record (plus the job label `simulated: true`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agents.node.scanner import discovered_id
from agents.node.simulated import SimulatedGpus
from bus import codec, topology
from bus.connection import Bus
from bus.control import VERSION
from bus.jobtable import JobTable, emit
from schemas import lifecycle as lc
from schemas.events import Discovered, Ended
from schemas.telemetry import (
    DiscoveredJobs,
    DiscoveredRef,
    GpuMetrics,
    Heartbeat,
    NodeInventory,
    ProcessInfo,
    ProcessMetrics,
    ProcessSample,
)

log = logging.getLogger(__name__)
SLICES = 10  # heartbeats of one interval go out in this many even slices
_SCRIPT = "# simulated by jetfleet: no process, no code\n"


@dataclass
class SimJob:
    job_id: str
    pid: int
    create_time: float
    gpus: list[int]


@dataclass
class SimNode:
    name: str
    gpus: SimulatedGpus
    started_at: float
    seq: int = 0
    silent_until: float = 0.0  # monotonic; 0 = speaking
    last_beat: float = 0.0  # monotonic time of its last heartbeat that the server confirmed
    jobs: dict[str, SimJob] = field(default_factory=dict)


@dataclass
class FleetStats:
    heartbeats: int = 0
    metrics: int = 0
    failures: int = 0
    jobs_started: int = 0
    jobs_ended: int = 0
    silences: int = 0


class FleetSimulator:
    def __init__(self, bus: Bus, nodes: int = 1000, gpus: int = 8, interval: float = 1.0, *,
                 prefix: str = "sim", metrics_every: int = 10, jobs_per_node: int = 2,
                 job_churn: float = 0.001, flap_per_min: float | None = None,
                 silence_s: float = 45.0, seed: int = 0) -> None:
        self.bus = bus
        self.interval = interval
        self.metrics_every = max(1, metrics_every)
        self.jobs_per_node = jobs_per_node
        self.job_churn = job_churn
        # Silences per minute across the fleet (default 1% of the nodes).
        self.flap_per_min = nodes / 100 if flap_per_min is None else flap_per_min
        self.silence_s = silence_s
        self.rng = random.Random(seed)
        now = time.time()
        self.nodes = [SimNode(name=f"{prefix}-{i:05d}", gpus=SimulatedGpus(f"{prefix}-{i:05d}", gpus),
                              started_at=now) for i in range(nodes)]
        self.table = JobTable(bus)
        self.stats = FleetStats()
        self._sem = asyncio.Semaphore(256)
        self._next_pid = 100_000

    # ---- setup -----------------------------------------------------------------------

    async def setup(self) -> None:
        """Inventories in KV nodes, then each node's first jobs."""
        kv = await self.bus.kv(topology.KV_NODES)
        await self._all(self.nodes, lambda n: kv.put(n.name, codec.encode(self.inventory(n))))
        if self.jobs_per_node:
            await self._all(self.nodes, self._first_jobs)

    async def _first_jobs(self, node: SimNode) -> None:
        for _ in range(self.jobs_per_node):
            await self.start_job(node)

    def inventory(self, node: SimNode) -> NodeInventory:
        return NodeInventory(
            node=node.name, hostname=f"{node.name}.sim", addresses=[], os="simulated",
            cpu_count=96, cpu_model="simulated", memory_total_mb=1_048_576,
            gpus=node.gpus.inventory(), gpu_backend="simulated", driver_version="simulated",
            agent_version=VERSION, started_at=node.started_at, updated_at=time.time(),
            heartbeat_s=self.interval, metrics_interval_s=self.interval * self.metrics_every,
            labels={"simulated": "true"}, simulated=True)

    async def _all(self, items: list[SimNode], fn: Callable[[SimNode], Awaitable[Any]]) -> None:
        async def one(item: SimNode) -> None:
            async with self._sem:
                try:
                    await fn(item)
                except Exception as exc:
                    self.stats.failures += 1
                    log.debug("simulated %s: %s", item.name, exc)

        await asyncio.gather(*(one(i) for i in items))

    # ---- jobs --------------------------------------------------------------------------

    async def start_job(self, node: SimNode) -> None:
        self._next_pid += self.rng.randrange(1, 50)
        pid = self._next_pid
        created = round(time.time() - self.rng.uniform(0, 3600), 2)
        count = max(1, min(node.gpus.count, self.rng.choice((1, 1, 2, 4, 8))))
        first = self.rng.randrange(0, max(1, node.gpus.count - count + 1))
        gpus = list(range(first, first + count)) if node.gpus.count else []
        lr = self.rng.choice(("0.0003", "0.0001", "0.001"))
        batch = self.rng.choice(("16", "32", "64"))
        info = ProcessInfo(
            pid=pid, create_time=created,
            cmdline=["python", "train_sim.py", "--lr", lr, "--batch-size", batch],
            cwd="/sim", username="sim", framework="torch",
            parameters={"lr": lr, "batch_size": batch}, script="/sim/train_sim.py",
            code=_SCRIPT, imports=["torch"], simulated=True,
            gpus=[node.gpus.inventory()[i].uuid or str(i) for i in gpus],
            notes=["simulated by jetfleet simulate"])
        job_id = discovered_id(node.name, pid, created)
        state = lc.discovered_job(job_id, info, node=node.name, devices=info.gpus)
        state.labels = {"simulated": "true"}
        if await self.table.create(state) is not None:
            await emit(self.bus, Discovered(job_id=job_id, attempt=1, node=node.name,
                                            process=info, devices=info.gpus))
        node.jobs[job_id] = SimJob(job_id, pid, created, gpus)
        self.stats.jobs_started += 1

    async def end_job(self, node: SimNode, job: SimJob) -> None:
        node.jobs.pop(job.job_id, None)
        got = await self.table.transition(job.job_id, lc.end_process(0))
        if got is not None:
            await emit(self.bus, Ended(job_id=job.job_id, attempt=got[0].attempt, node=node.name,
                                       exit_code=0, runtime_s=time.time() - job.create_time))
        self.stats.jobs_ended += 1

    async def churn(self, node: SimNode) -> None:
        if node.jobs:
            await self.end_job(node, self.rng.choice(list(node.jobs.values())))
        await self.start_job(node)

    # ---- telemetry -----------------------------------------------------------------------

    async def beat(self, node: SimNode) -> None:
        node.seq += 1
        hb = Heartbeat(node=node.name, seq=node.seq, started_at=node.started_at,
                       interval_s=self.interval, load1=round(self.rng.uniform(1, 60), 2),
                       cpu_percent=round(self.rng.uniform(5, 95), 1), memory_total_mb=1_048_576.0,
                       memory_used_mb=round(self.rng.uniform(1e5, 9e5), 1), gpus=node.gpus.count,
                       jobs=len(node.jobs), job_ids=list(node.jobs), simulated=True,
                       hostname=f"{node.name}.sim")
        await self.bus.publish(topology.telemetry(node.name, topology.HEARTBEAT), hb,
                               msg_id=f"{node.name}.hb.{int(node.started_at)}.{node.seq}")
        node.last_beat = time.monotonic()
        self.stats.heartbeats += 1

    async def metrics(self, node: SimNode) -> None:
        snap = node.gpus.sample([(j.pid, j.gpus) for j in node.jobs.values()])
        by_pid = {j.pid: j for j in node.jobs.values()}
        for p in snap.processes:
            job = by_pid.get(p.pid)
            p.job_id = job.job_id if job else None
        stamp = f"{int(node.started_at)}.{node.seq}"
        await self.bus.publish(topology.telemetry(node.name, topology.GPU), GpuMetrics(
            node=node.name, hostname=f"{node.name}.sim", driver="simulated", gpus=snap.gpus,
            processes=snap.processes, simulated=True), msg_id=f"{node.name}.gpu.{stamp}")
        samples = [ProcessSample(pid=j.pid, create_time=j.create_time, job_id=j.job_id,
                                 status="running", cpu_percent=round(self.rng.uniform(90, 800), 1),
                                 rss_mb=round(self.rng.uniform(2e3, 6e4), 1), threads=64,
                                 open_files=120, gpus=[str(g) for g in j.gpus], simulated=True)
                   for j in node.jobs.values()]
        await self.bus.publish(topology.telemetry(node.name, topology.PROCS), ProcessMetrics(
            node=node.name, processes=samples, simulated=True), msg_id=f"{node.name}.procs.{stamp}")
        refs = [DiscoveredRef(job_id=j.job_id, pid=j.pid, create_time=j.create_time,
                              gpus=[str(g) for g in j.gpus]) for j in node.jobs.values()]
        await self.bus.publish(topology.telemetry(node.name, topology.DISCOVERED), DiscoveredJobs(
            node=node.name, jobs=refs, simulated=True), msg_id=f"{node.name}.jobs.{stamp}")
        self.stats.metrics += 1

    # ---- silence -------------------------------------------------------------------------

    def silence(self, node: SimNode, seconds: float) -> None:
        node.silent_until = time.monotonic() + seconds
        self.stats.silences += 1

    def silent(self, node: SimNode) -> bool:
        return node.silent_until > time.monotonic()

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event, duration: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        end = None if duration is None else loop.time() + duration
        slot = self.interval / SLICES
        tick = 0
        next_at = loop.time()
        while not stopping.is_set() and (end is None or loop.time() < end):
            part = tick % SLICES
            rnd = tick // SLICES
            group = self.nodes[part::SLICES]
            self._flap(group)
            speaking = [n for n in group if not self.silent(n)]
            await self._all(speaking, self.beat)
            if rnd % self.metrics_every == 0:
                await self._all(speaking, self.metrics)
            if self.job_churn:
                churning = [n for n in speaking if self.rng.random() < self.job_churn]
                await self._all(churning, self.churn)
            tick += 1
            next_at += slot
            if next_at < loop.time():
                next_at = loop.time()  # behind: do not burst to catch up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.0, next_at - loop.time()))

    def _flap(self, group: list[SimNode]) -> None:
        if not self.flap_per_min or not self.nodes:
            return
        per_node = self.flap_per_min / 60.0 / len(self.nodes) * self.interval
        for node in group:
            if not self.silent(node) and self.rng.random() < per_node:
                self.silence(node, self.silence_s)
                log.info("%s goes silent for %gs", node.name, self.silence_s)
