"""Can any live worker ever run this job? (capability labels, then resources)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from schemas.fleet import CapabilityAdvert, DeviceInfo, serves
from schemas.jobs import Resources


def fits(resources: Resources | None, devices: dict[str, DeviceInfo]) -> bool:
    """Could this node's devices hold `resources` if all of them were free?"""
    if resources is None or not resources.any():
        return True
    gpu_mem: dict[int, int] = defaultdict(int)  # whole-GPU memory, summed over its slots
    cpus = 0
    for d in devices.values():
        if d.kind == "gpu":
            gpu_mem[d.index] += d.memory_mb
        else:
            cpus += 1
    want = resources.gpus or (1 if resources.gpu_memory_mb else 0)
    if want > len(gpu_mem) or resources.cpu_slots > cpus:
        return False
    if resources.gpu_memory_mb:
        best = sorted(gpu_mem.values(), reverse=True)[:want]
        return min(best) >= resources.gpu_memory_mb
    return True


@dataclass(frozen=True)
class Unplaceable:
    """Why no live worker can run a job. `lasting`: its resources exceed every
    matching node, so waiting for the grace period cannot help."""

    reason: str
    lasting: bool = False


def unschedulable_reason(capability: dict[str, str], resources: Resources | None,
                         adverts: list[CapabilityAdvert]) -> Unplaceable | None:
    """None when some live worker could run the job; else why not, in words."""
    matching = [a for a in adverts if serves(a.capabilities, capability)]
    if not matching:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(capability.items()))
        return Unplaceable(f"no live worker advertises capability {{{labels}}}")
    ctype = capability.get("type", "")
    wanted = Resources()
    for advert in matching:
        # What the job asks for, and what the capability itself declares, on
        # the devices this worker can lease.
        need = (resources or Resources()).at_least(advert.needs.get(ctype))
        if not need.any() or fits(need, {d.key: d for d in advert.devices}):
            return None
        wanted = need
    most = max((len({d.index for d in a.devices if d.kind == "gpu"}) for a in matching),
               default=0)
    return Unplaceable(
        f"no node can satisfy resources gpus={wanted.gpus} "
        f"gpu_memory_mb={wanted.gpu_memory_mb} cpu_slots={wanted.cpu_slots} "
        f"(the most GPUs any matching node offers is {most})", lasting=True)


# ---- refusing bad input with words ------------------------------------------------------

RESOURCE_NAMES = ("gpus", "gpu_memory_mb", "cpu_slots")


def explain_submission(raw: bytes) -> str | None:
    """Name the offending field of a submission that failed to decode, in
    words a submitter can act on. msgspec's paths say `$.capability[...]` for
    a bad dict value without the key; this says which label and why. None
    when the body is not a JSON object or nothing here applies."""
    import json

    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    problems: list[str] = []
    for field in ("capability", "labels"):
        value = body.get(field)
        if value is None:
            continue
        what = "capability label" if field == "capability" else "label"
        if not isinstance(value, dict):
            problems.append(f"{field} must be an object of string labels, "
                            f"got {type(value).__name__}")
            continue
        for key, v in value.items():
            if not isinstance(v, str):
                problems.append(f"{what} {key!r} must be a string, got {json.dumps(v)}")
            elif field == "capability" and not 1 <= len(v) <= 128:
                problems.append(f"{what} {key!r} must be 1 to 128 characters, got {len(v)}")
    res = body.get("resources")
    if res is not None:
        if not isinstance(res, dict):
            problems.append(f"resources must be an object with {', '.join(RESOURCE_NAMES)}, "
                            f"got {json.dumps(res)}")
        else:
            for key, v in res.items():
                if key not in RESOURCE_NAMES:
                    problems.append(f"unknown resource {key!r} (known: "
                                    f"{', '.join(RESOURCE_NAMES)})")
                elif not isinstance(v, int) or isinstance(v, bool):
                    problems.append(f"resource {key} must be a whole number, got {json.dumps(v)}")
                elif v < 0:
                    problems.append(f"resource {key} must not be negative, got {v}")
    return "; ".join(problems) or None
