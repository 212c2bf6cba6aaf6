"""Which GPU backend a node uses: simulated when asked, else NVML, else none."""

from __future__ import annotations

import logging

from agents.node.gpu import GpuBackend, NoGpus

log = logging.getLogger(__name__)


def open_backend(node: str, simulate: int = 0, use_nvml: bool = True) -> GpuBackend:
    """Simulated GPUs when asked, else NVML when it loads, else none."""
    if simulate:
        from agents.node.simulated import SimulatedGpus

        return SimulatedGpus(node, simulate)
    if not use_nvml:
        return NoGpus("absent")
    from agents.node.nvml import NvmlBackend, NvmlUnavailable

    try:
        return NvmlBackend()
    except NvmlUnavailable as exc:
        log.info("no NVML GPUs on this node (%s): reporting CPU and memory only", exc)
        return NoGpus("absent" if exc.absent else f"error: {exc}")
