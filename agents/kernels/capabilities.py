"""The kernel capabilities a worker serves: `kernel.verify` and `kernel.profile`.

    payload (strict; schemas.kernels.VerifyPayload / ProfilePayload):
        problem | problem_source | problem_ref     the PyTorch reference
        candidate_source | candidate_ref           the Triton ModelNew (default:
                                                   the library problem's candidate)
        trials, atol, rtol, seed, eval_timeout_s, (profile) runs, warmup
    result: schemas.kernels.KernelOutcome, with `problem` and `candidate_hash`
        (the normalized program hash). The payload is decoded from the handler's
        annotation: a field out of range fails the job at once (`invalid_payload`).

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
from typing import Any, Literal

from agents.kernels.evaluate import KernelEvalCancelled, cuda_present, evaluate
from agents.kernels.generate import normalized_hash
from agents.kernels.sources import SourceError, resolve_candidate, resolve_problem
from agents.worker.app import App
from agents.worker.context import JobContext, JobError
from schemas.kernels import KernelOutcome, ProfilePayload, VerifyPayload

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


def sandbox_mode() -> Literal["best", "strict"]:
    """`strict` (`jetfleet run worker --sandbox strict`): evaluate only under full
    isolation; `best` (default): the strongest this host has, named in each result."""
    mode = os.environ.get("JETFLEET_SANDBOX", "best").strip().lower()
    return "strict" if mode == "strict" else "best"

kernels = App("kernels")


@kernels.on_start
async def warm_evaluator() -> None:
    """Probe the isolation and start the evaluator's fork server in the background,
    so the first evaluation does not pay for importing torch."""
    from agents.kernels.evaluate import warm_up

    task = asyncio.get_running_loop().run_in_executor(None, warm_up)
    task.add_done_callback(lambda f: f.exception())  # a failure shows at the first evaluation


def leased_devices(ctx: JobContext) -> list[str]:
    """The GPU indices leased to this job (empty on a CPU node)."""
    if GPUS == 0:
        return []
    raw = ctx.env.get("CUDA_VISIBLE_DEVICES", "")
    return [d.strip() for d in raw.split(",") if d.strip()]


async def run_evaluation(ctx: JobContext, p: VerifyPayload | ProfilePayload) -> KernelOutcome:
    kind = "profile" if isinstance(p, ProfilePayload) else "verify"
    try:
        problem = await resolve_problem(ctx.bus, p)
        candidate = await resolve_candidate(ctx.bus, p, problem)
    except SourceError as exc:
        raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc
    extra: dict[str, Any] = {}
    if isinstance(p, ProfilePayload):
        extra = {"runs": p.runs, "warmup": p.warmup}
    devices = leased_devices(ctx)
    where = f"GPU {','.join(devices)}" if devices else "cpu (interpreter)"
    ctx.progress(0.0, f"{kind} {problem.label} on {where}")
    try:
        outcome = await asyncio.to_thread(
            evaluate, kind, problem.source, candidate,  # type: ignore[arg-type]
            trials=p.trials, atol=p.atol, rtol=p.rtol, seed=p.seed,
            timeout_s=p.eval_timeout_s, memory_mb=MEMORY_MB, devices=devices,
            cancel_event=ctx.cancel_flag, isolation=sandbox_mode(), **extra)
    except KernelEvalCancelled as exc:
        raise JobError("cancelled", "evaluation cancelled", retryable=False) from exc
    except (OSError, RuntimeError) as exc:  # could not start or read the sandbox
        raise JobError("evaluation_infrastructure", f"{type(exc).__name__}: {exc}") from exc
    outcome.problem = problem.label
    outcome.candidate_hash = normalized_hash(candidate)
    return outcome


@kernels.capability(type="kernel.verify", gpus=GPUS, backend=BACKEND, dsl="triton",
                    concurrency=CONCURRENCY)
async def verify(ctx: JobContext, p: VerifyPayload) -> KernelOutcome:
    """Seeded trials of candidate against reference in a sandbox."""
    return await run_evaluation(ctx, p)


@kernels.capability(type="kernel.profile", gpus=GPUS, backend=BACKEND, dsl="triton",
                    concurrency=CONCURRENCY)
async def profile(ctx: JobContext, p: ProfilePayload) -> KernelOutcome:
    """Verify, then time candidate and reference."""
    return await run_evaluation(ctx, p)
