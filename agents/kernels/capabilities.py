"""The kernel capabilities a worker serves: `kernel.verify` and `kernel.profile`.

    payload (strict; schemas.kernels.VerifyPayload / ProfilePayload):
        problem | problem_source | problem_ref     the PyTorch reference
        candidate_source | candidate_ref           the Triton ModelNew (default:
                                                   the library problem's candidate)
        trials, atol, rtol, seed, eval_timeout_s, (profile) runs, warmup
    result: schemas.kernels.KernelOutcome as a dict, plus `problem` and
        `candidate_hash` (the normalized program hash).

Every verification outcome (pass, mismatch, compile_error, timeout, ...) is a
*result*: the job succeeds. A job fails only when the payload is unusable
(`invalid_payload`, not retried) or the infrastructure failed (retried).

Labels: `backend` is "cuda" on a host with an NVIDIA driver, else "cpu"
(override with JETFLEET_KERNEL_BACKEND); `dsl` is "triton". On a CUDA host
each job leases one GPU and evaluates on it; elsewhere kernels run under
Triton's interpreter on CPU tensors and timings say `representative: false`.

Importing this module raises ImportError when torch or triton is missing, so a
worker without them simply does not serve these capabilities. It does not
import torch itself: every evaluation runs in a sandboxed child process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import msgspec

from agents.kernels.evaluate import KernelEvalCancelled, cuda_present, evaluate
from agents.kernels.generate import normalized_hash
from agents.kernels.sources import SourceError, resolve_candidate, resolve_problem
from agents.worker.app import App
from agents.worker.context import JobContext, JobError
from schemas.kernels import ProfilePayload, VerifyPayload

for _mod in ("torch", "triton"):
    if importlib.util.find_spec(_mod) is None:
        raise ImportError(f"kernel capabilities need {_mod} (pip install -e '.[kernels]')")


def _backend() -> str:
    forced = os.environ.get("JETFLEET_KERNEL_BACKEND", "").strip().lower()
    if forced in ("cuda", "cpu"):
        return forced
    return "cuda" if cuda_present() else "cpu"


BACKEND = _backend()
# On a CUDA node every evaluation leases one GPU; on a CPU node no device.
GPUS = 1 if BACKEND == "cuda" else 0
# On a CPU node an interpreted evaluation keeps a core busy: no more at once
# (per capability) than there are cores. On a GPU node the leases bound it.
CONCURRENCY = None if GPUS else max(1, os.cpu_count() or 1)
LABELS = {"backend": BACKEND, "dsl": "triton"}
# Per evaluation child (resident memory watchdog; RLIMIT_AS only when interpreted).
MEMORY_MB = int(os.environ.get("JETFLEET_KERNEL_MEMORY_MB", "4096"))

kernels = App("kernels")


def decode_payload(payload: Any, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.convert(payload, kind)
    except (msgspec.ValidationError, TypeError) as exc:
        raise JobError("invalid_payload", f"{kind.__name__}: {exc}", retryable=False) from exc


def leased_devices(ctx: JobContext) -> list[str]:
    """The GPU indices leased to this job (empty on a CPU node)."""
    if GPUS == 0:
        return []
    raw = ctx.env.get("CUDA_VISIBLE_DEVICES", "")
    return [d.strip() for d in raw.split(",") if d.strip()]


async def run_evaluation(ctx: JobContext, kind: str, p: Any) -> dict[str, Any]:
    bus = ctx.services["bus"]
    try:
        problem = await resolve_problem(bus, p)
        candidate = await resolve_candidate(bus, p, problem)
    except SourceError as exc:
        raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc
    if not 0 < p.eval_timeout_s <= 3600:
        raise JobError("invalid_payload", "eval_timeout_s must be in (0, 3600]", retryable=False)
    if not 1 <= p.trials <= 100:
        raise JobError("invalid_payload", "trials must be in [1, 100]", retryable=False)
    extra: dict[str, Any] = {}
    if kind == "profile":
        extra = {"runs": p.runs, "warmup": p.warmup}
    devices = leased_devices(ctx)
    where = f"GPU {','.join(devices)}" if devices else "cpu (interpreter)"
    ctx.progress(0.0, f"{kind} {problem.label} on {where}")
    try:
        outcome = await asyncio.to_thread(
            evaluate, kind, problem.source, candidate,  # type: ignore[arg-type]
            trials=p.trials, atol=p.atol, rtol=p.rtol, seed=p.seed,
            timeout_s=p.eval_timeout_s, memory_mb=MEMORY_MB, devices=devices,
            cancel_event=ctx.cancel_flag, **extra)
    except KernelEvalCancelled as exc:
        raise JobError("cancelled", "evaluation cancelled", retryable=False) from exc
    except (OSError, RuntimeError) as exc:  # could not start or read the sandbox
        raise JobError("evaluation_infrastructure", f"{type(exc).__name__}: {exc}") from exc
    result: dict[str, Any] = msgspec.to_builtins(outcome)
    result["problem"] = problem.label
    result["candidate_hash"] = normalized_hash(candidate)
    return result


@kernels.capability(type="kernel.verify", gpus=GPUS, backend=BACKEND, dsl="triton",
                    concurrency=CONCURRENCY)
async def verify(ctx: JobContext) -> dict[str, Any]:
    """Seeded trials of candidate against reference in a sandbox: a KernelOutcome."""
    return await run_evaluation(ctx, "verify", decode_payload(ctx.payload, VerifyPayload))


@kernels.capability(type="kernel.profile", gpus=GPUS, backend=BACKEND, dsl="triton",
                    concurrency=CONCURRENCY)
async def profile(ctx: JobContext) -> dict[str, Any]:
    """Verify, then time candidate and reference in the same sandboxed process."""
    return await run_evaluation(ctx, "profile", decode_payload(ctx.payload, ProfilePayload))
