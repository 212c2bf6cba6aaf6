"""What a node can lease: NVML GPUs, simulated GPUs, CPU slots; GPUs may be
split into slots so small jobs share a device."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

from schemas.fleet import DeviceInfo
from schemas.jobs import Resources


def node_name() -> str:
    """This node's name: JETFLEET_NODE or the host name, as a subject-safe token."""
    raw = os.environ.get("JETFLEET_NODE") or socket.gethostname()
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:64] or "node"


def nvml_gpus() -> list[tuple[int, str, int, str]]:
    """(index, name, memory_mb, uuid) of every GPU NVML sees; [] without NVML."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total // (1 << 20)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out.append((i, name if isinstance(name, str) else name.decode(), int(mem),
                        uuid if isinstance(uuid, str) else uuid.decode()))
    except Exception:
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


@dataclass
class Inventory:
    """The devices of one worker, with their lease keys."""

    node: str
    gpus: list[DeviceInfo]  # whole GPUs
    slots_per_gpu: int
    cpu_slots: list[DeviceInfo]

    @property
    def simulated(self) -> bool:
        return any(g.simulated for g in self.gpus)

    def slot_keys(self, gpu: DeviceInfo) -> list[str]:
        if self.slots_per_gpu <= 1:
            return [gpu.key]
        return [f"{gpu.key}.s{i}" for i in range(self.slots_per_gpu)]

    def leasable(self) -> list[DeviceInfo]:
        """Every lease key this worker may take, as adverts show them."""
        out: list[DeviceInfo] = []
        for g in self.gpus:
            slot_mem = g.memory_mb // max(1, self.slots_per_gpu)
            for key in self.slot_keys(g):
                out.append(DeviceInfo(key=key, kind="gpu", index=g.index, name=g.name,
                                      memory_mb=slot_mem if self.slots_per_gpu > 1 else g.memory_mb,
                                      simulated=g.simulated, uuid=g.uuid))
        return out + self.cpu_slots

    def can_ever_fit(self, r: Resources | None) -> bool:
        if r is None or not r.any():
            return True
        if r.cpu_slots > len(self.cpu_slots):
            return False
        want = r.gpus or (1 if r.gpu_memory_mb else 0)
        if want > len(self.gpus):
            return False
        if r.gpu_memory_mb and r.gpus:
            return all(g.memory_mb >= r.gpu_memory_mb for g in
                       sorted(self.gpus, key=lambda g: -g.memory_mb)[:want])
        if r.gpu_memory_mb:
            return any(g.memory_mb >= r.gpu_memory_mb for g in self.gpus)
        return True

    def candidates(self, r: Resources) -> list[list[str]]:
        """Sets of lease keys that would satisfy `r`, in order of preference.

        gpus=N takes every slot of N whole GPUs; gpu_memory_mb=M alone takes just
        enough slots of one GPU; cpu_slots=K takes K CPU slots.
        """
        options: list[list[str]] = []
        if r.gpus:
            n = r.gpus
            for start in range(0, len(self.gpus) - n + 1):
                group = self.gpus[start:start + n]
                if r.gpu_memory_mb and any(g.memory_mb < r.gpu_memory_mb for g in group):
                    continue
                options.append([k for g in group for k in self.slot_keys(g)])
        elif r.gpu_memory_mb:
            for g in self.gpus:
                if g.memory_mb < r.gpu_memory_mb:
                    continue
                keys = self.slot_keys(g)
                need = max(1, math.ceil(r.gpu_memory_mb / max(1, g.memory_mb // len(keys))))
                for start in range(0, len(keys) - need + 1):
                    options.append(keys[start:start + need])
        else:
            options.append([])
        if r.cpu_slots:
            cpu_keys = [c.key for c in self.cpu_slots]
            cpu_opts = [cpu_keys[i:i + r.cpu_slots]
                        for i in range(0, len(cpu_keys) - r.cpu_slots + 1)]
            options = [o + c for o in options for c in cpu_opts]
        return options

    def visible_devices(self, keys: list[str]) -> str:
        """CUDA_VISIBLE_DEVICES for leased keys: the GPU indices they belong to."""
        idx = sorted({g.index for g in self.gpus for k in keys
                      if k == g.key or k.startswith(g.key + ".s")})
        return ",".join(str(i) for i in idx)


def inventory(node: str | None = None, simulate_gpus: int = 0, simulated_memory_mb: int = 16384,
              slots_per_gpu: int = 1, cpu_slots: int = 0, use_nvml: bool = True) -> Inventory:
    n = node or node_name()
    gpus: list[DeviceInfo] = []
    if simulate_gpus:
        gpus = [DeviceInfo(key=f"{n}.gpu{i}", kind="gpu", index=i, name="simulated-gpu",
                           memory_mb=simulated_memory_mb, simulated=True)
                for i in range(simulate_gpus)]
    elif use_nvml:
        gpus = [DeviceInfo(key=f"{n}.gpu{i}", kind="gpu", index=i, name=name, memory_mb=mem,
                           uuid=uuid) for i, name, mem, uuid in nvml_gpus()]
    cpus = [DeviceInfo(key=f"{n}.cpu{i}", kind="cpu", index=i, name="cpu-slot")
            for i in range(cpu_slots)]
    return Inventory(node=n, gpus=gpus, slots_per_gpu=max(1, slots_per_gpu), cpu_slots=cpus)
