"""How much of a node one app worker may use, and whether that much is free now.

A worker the agent starts sees every device of the node (as any worker
does) and leases devices per job; its *share* bounds how many jobs it runs
at once, so its leases never exceed the share. Shares are counted in slots
(a whole GPU is `gpu_slots` slots):

    gpus = G            G whole GPUs           capacity = G*S // slots per job
    gpu_memory_mb = M   ceil(M / slot memory)  capacity = share // slots per job
    neither             what the app's capabilities declare per job (one job)
    a CPU-only app      no share, no device, the worker's default capacity

The app's `@app.capability(..., gpus=, gpu_memory_mb=)` declarations decide
the slots per job; a capability whose job could never fit the share, or the
node, is reported and not watched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agents.devices import Inventory
from agents.node.appconfig import AppConfig
from schemas.apps import AppDeclaration
from schemas.jobs import Resources


@dataclass(frozen=True)
class Share:
    slots: int = 0  # GPU slots this worker's jobs may hold at once (0: none)
    whole: bool = False  # the share is whole GPUs (slots is a multiple of gpu_slots)
    capacity: int | None = None  # --capacity for the worker (None: its own default)
    per_job: int = 0  # slots the widest job takes
    cpu_slots: int = 0

    def describe(self, slots_per_gpu: int) -> str:
        if not self.slots:
            return "CPU only"
        if self.whole:
            return f"{self.slots // slots_per_gpu} GPU(s)"
        return f"{self.slots} of {slots_per_gpu} slots of a GPU"


@dataclass(frozen=True)
class Plan:
    share: Share
    types: list[str]  # the capability types the agent watches for this app
    problems: list[str]  # capabilities it cannot serve here, in words


def slot_mb(inv: Inventory) -> int:
    if not inv.gpus:
        return 0
    return max(1, min(g.memory_mb for g in inv.gpus) // inv.slots_per_gpu)


def job_slots(r: Resources, inv: Inventory) -> int:
    """GPU slots one job with these resources leases on this node."""
    if r.gpus:
        return r.gpus * inv.slots_per_gpu
    if r.gpu_memory_mb:
        return max(1, math.ceil(r.gpu_memory_mb / max(1, slot_mb(inv))))
    return 0


def plan(decl: AppDeclaration, cfg: AppConfig, inv: Inventory) -> Plan:
    per_job = {c.type: job_slots(c.resources, inv) for c in decl.capabilities}
    # Without a share in the file: one job of the widest capability this node can hold.
    widest = max((per_job[c.type] for c in decl.capabilities if inv.can_ever_fit(c.resources)),
                 default=0)
    if cfg.gpus:
        slots, whole = cfg.gpus * inv.slots_per_gpu, True
    elif cfg.gpu_memory_mb:
        slots, whole = max(1, math.ceil(cfg.gpu_memory_mb / max(1, slot_mb(inv)))), False
    elif cfg.gpus == 0:  # said so: a CPU-only worker
        slots, whole = 0, False
    else:  # what one job of its widest capability needs
        slots = widest
        whole = any(c.resources.gpus and inv.can_ever_fit(c.resources)
                    for c in decl.capabilities)
    types: list[str] = []
    problems: list[str] = []
    for c in decl.capabilities:
        need = per_job[c.type]
        r = c.resources
        if not inv.can_ever_fit(r):
            problems.append(f"{c.type} declares gpus={r.gpus} gpu_memory_mb={r.gpu_memory_mb} "
                            f"cpu_slots={r.cpu_slots}, more than this node has "
                            f"({len(inv.gpus)} GPU(s), {len(inv.cpu_slots)} CPU slot(s))")
        elif need > slots:
            problems.append(f"{c.type} needs {need} GPU slot(s) per job, more than the "
                            f"worker's share ({slots}); raise gpus or gpu_memory_mb in the "
                            "apps file")
        else:
            types.append(c.type)
    # Jobs at once: as many of the widest watched capability as the share holds (a
    # capability reported above is the file's mistake, not planned for).
    widest = max((per_job[t] for t in types), default=0)
    capacity = None
    if slots and widest:
        capacity = max(1, slots // widest)
    elif slots:
        capacity = max(1, slots // inv.slots_per_gpu) if whole else 1
    return Plan(Share(slots=slots, whole=whole, capacity=capacity, per_job=widest,
                      cpu_slots=cfg.cpu_slots),
                types, problems)


def fits_now(share: Share, inv: Inventory, held_by_others: set[str], reserved_slots: int) -> bool:
    """Are `share` slots free on this node, beside the shares of the agent's
    running workers (`reserved_slots`) and the leases anyone else holds?"""
    if not share.slots:
        return True
    free = [sum(1 for k in inv.slot_keys(g) if k not in held_by_others) for g in inv.gpus]
    if share.whole:
        per_gpu = inv.slots_per_gpu
        whole_free = sum(1 for n in free if n == per_gpu)
        return whole_free - math.ceil(reserved_slots / per_gpu) >= share.slots // per_gpu
    return (sum(free) - reserved_slots >= share.slots
            and max(free, default=0) >= max(1, share.per_job))
