"""Simulated GPUs for scale tests and demos on machines without any.

Plausible, smoothly varying numbers (utilization, memory, power and an energy
counter that integrates it, temperatures, clocks, PCIe), and every record
says `simulated: true`: nobody can take them for a real device.
"""

from __future__ import annotations

import hashlib
import math
import time

from agents.node.gpu import GpuSnapshot
from schemas.telemetry import GpuInventory, GpuProcessSample, GpuSample

MODEL = "Simulated H100 80GB (jetfleet)"
MEMORY_MB = 81559
POWER_LIMIT_W = 700.0


def sim_uuid(node: str, index: int) -> str:
    h = hashlib.sha1(f"{node}/{index}".encode()).hexdigest()
    return f"GPU-SIM-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:28]}"


class SimulatedGpus:
    name = "simulated"
    simulated = True

    def __init__(self, node: str, count: int, memory_mb: int = MEMORY_MB) -> None:
        self.node = node
        self.count = count
        self.memory_mb = memory_mb
        self._energy_mj = [0.0] * count
        self._last = time.monotonic()
        # A per-node phase, so a simulated fleet does not move in lockstep.
        self._phase = int(hashlib.sha1(node.encode()).hexdigest()[:6], 16) % 1000

    def inventory(self) -> list[GpuInventory]:
        return [GpuInventory(index=i, uuid=sim_uuid(self.node, i), name=MODEL,
                             pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                             memory_total_mb=self.memory_mb, mig_mode="disabled",
                             compute_capability="9.0", simulated=True)
                for i in range(self.count)]

    def driver_version(self) -> str | None:
        return "simulated"

    def cuda_driver_version(self) -> str | None:
        return "simulated"

    def load(self, index: int, t: float) -> float:
        """Utilization 0..1 of GPU `index` at time `t`."""
        x = (t + self._phase * 7 + index * 13) / 60.0
        return max(0.0, min(1.0, 0.55 + 0.35 * math.sin(x) + 0.1 * math.sin(x * 7.3)))

    def sample(self, jobs: list[tuple[int, list[int]]] | None = None) -> GpuSnapshot:
        """`jobs`: (pid, GPU indices) of simulated processes to report on the GPUs."""
        t = time.time()
        now = time.monotonic()
        dt, self._last = now - self._last, now
        snap = GpuSnapshot()
        for i in range(self.count):
            u = self.load(i, t)
            power = 90.0 + u * (POWER_LIMIT_W - 120.0)
            self._energy_mj[i] += power * dt * 1000.0
            used = self.memory_mb * (0.15 + 0.7 * u)
            snap.gpus.append(GpuSample(
                index=i, uuid=sim_uuid(self.node, i), name=MODEL,
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                gpu_util_pct=round(u * 100, 1), mem_copy_util_pct=round(u * 60, 1),
                fb_used_mb=round(used), fb_free_mb=round(self.memory_mb - used),
                fb_total_mb=self.memory_mb, power_w=round(power, 1),
                energy_mj=round(self._energy_mj[i]), gpu_temp_c=round(35 + u * 40, 1),
                mem_temp_c=round(40 + u * 35, 1), sm_clock_mhz=round(1200 + u * 780),
                mem_clock_mhz=2619, pcie_tx_kbps=round(u * 2.0e6), pcie_rx_kbps=round(u * 3.1e6),
                pcie_replay=0, xid_errors=0, remapped_rows_correctable=0,
                remapped_rows_uncorrectable=0, ecc_sbe_volatile=0, ecc_dbe_volatile=0,
                enc_util_pct=0.0, dec_util_pct=0.0, power_limit_w=POWER_LIMIT_W, simulated=True))
        for pid, indices in jobs or []:
            for i in indices:
                if 0 <= i < self.count:
                    u = self.load(i, t)
                    snap.processes.append(GpuProcessSample(
                        pid=pid, gpu_index=i, gpu_uuid=sim_uuid(self.node, i),
                        used_memory_mb=round(self.memory_mb * (0.1 + 0.6 * u)),
                        sm_util_pct=round(u * 95, 1), mem_util_pct=round(u * 50, 1),
                        enc_util_pct=0.0, dec_util_pct=0.0, simulated=True))
        return snap

    def close(self) -> None:
        return None
