"""What every GPU backend is (agents.node.backends picks one): NVML (real GPUs),
simulated (says so everywhere), or none.

A backend is opened once (NVML initialised once, device handles cached) and
sampled every metrics interval from the agent's sampling thread, so a slow
driver call delays GPU metrics but never the heartbeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from schemas.telemetry import GpuInventory, GpuProcessSample, GpuSample

log = logging.getLogger(__name__)


@dataclass
class GpuSnapshot:
    gpus: list[GpuSample] = field(default_factory=list)
    processes: list[GpuProcessSample] = field(default_factory=list)

    def by_pid(self) -> dict[int, list[GpuProcessSample]]:
        out: dict[int, list[GpuProcessSample]] = {}
        for p in self.processes:
            out.setdefault(p.pid, []).append(p)
        return out


class GpuBackend(Protocol):
    # "nvml", "simulated", "absent" or "error: <why>" (NodeInventory.gpu_backend)
    name: str
    simulated: bool

    def inventory(self) -> list[GpuInventory]: ...

    def driver_version(self) -> str | None: ...

    def cuda_driver_version(self) -> str | None: ...

    def sample(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class NoGpus:
    """A CPU-only node: no GPU records at all (not zeros)."""

    simulated = False

    def __init__(self, why: str = "absent") -> None:
        self.name = why

    def inventory(self) -> list[GpuInventory]:
        return []

    def driver_version(self) -> str | None:
        return None

    def cuda_driver_version(self) -> str | None:
        return None

    def sample(self) -> GpuSnapshot:
        return GpuSnapshot()

    def close(self) -> None:
        return None
