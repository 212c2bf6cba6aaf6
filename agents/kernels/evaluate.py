"""Parent-side kernel evaluation: the API the worker's kernel capabilities call.

`evaluate()` is synchronous and blocking (the worker runs it in a thread). It
runs the static checks, then one sandboxed child process, and maps everything
to exactly one outcome:

    what happened                                        outcome         extra flags
    ---------------------------------------------------  --------------  ------------------
    wall-clock limit hit (hang, endless loop)            timeout
    resident-memory watchdog, MemoryError, CUDA/CPU OOM  runtime_error   out_of_memory
    more processes than allowed (fork bomb)              crashed         too_many_processes
    died without a result (signal, os._exit, abort)      crashed
    candidate import / ModelNew missing / Triton         compile_error
      CompilationError
    exception in the candidate's constructor/forward     runtime_error
    reference problem failed (import, init, forward)     runtime_error   reference_error
    ran, and any reject flag (static or dynamic)         rejected        the reject flags
    ran, outputs differ (values, shape, dtype, NaN/Inf,  mismatch        value_mismatch, ...
      constant output)
    ran, outputs match, no reject flag                   pass

Cancellation (cancel_event set) kills the process group and raises
KernelEvalCancelled: a cancelled evaluation has no result.

Precedence is top to bottom: what the sandbox saw beats what the child wrote,
and a rejection beats a mismatch. Flags that never change the outcome:
suspicious_speedup (profile speed-up > 10x; reported for a human to look at).
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from agents.kernels.anticheat import REJECT_FLAGS, check_source, flags_of
from agents.kernels.protocol import (
    CANDIDATE_FILE,
    REFERENCE_FILE,
    REQUEST_FILE,
    RESULT_FILE,
    ChildReport,
    EvalRequest,
)
from agents.kernels.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from schemas.kernels import KernelOutcome, Outcome

GPU_RUNS, GPU_WARMUP = 100, 10
INTERPRETED_RUNS, INTERPRETED_WARMUP = 3, 1


class KernelEvalCancelled(Exception):
    """The evaluation was cancelled through its cancel_event; its process group is gone."""


def cuda_present() -> bool:
    """Whether this host has an NVIDIA driver, without importing torch or touching CUDA."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def evaluate(
    kind: Literal["verify", "profile"],
    reference_source: str,
    candidate_source: str,
    *,
    trials: int = 5,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    timeout_s: float = 120.0,
    memory_mb: int = 4096,
    devices: Sequence[str] = (),
    warmup: int | None = None,
    runs: int | None = None,
    cancel_event: threading.Event | None = None,
    max_procs: int = 32,
    run_rejected: bool = True,
    workdir_root: str | None = None,
) -> KernelOutcome:
    """Verify or profile `candidate_source` against `reference_source` in a sandbox.

    devices: GPU indices leased to this evaluation (e.g. ["0"]); empty, or no GPU
    on this host, means CPU tensors under Triton's interpreter.
    run_rejected: still run a candidate the static checks reject, so its errors
    and timings are reported (its outcome stays `rejected`).
    """
    if kind not in ("verify", "profile"):
        raise ValueError(f"kind must be 'verify' or 'profile', not {kind!r}")
    findings = check_source(candidate_source)
    static_flags = flags_of(findings)
    static_msgs = [f"static: {f}" for f in findings]
    interpreted = not devices or not cuda_present()
    if set(static_flags) & REJECT_FLAGS and not run_rejected:
        return KernelOutcome(
            kind=kind, outcome="rejected", correct=False, flags=static_flags,
            messages=static_msgs, interpreted=interpreted, device=_device_label(interpreted),
        )
    req = EvalRequest(
        kind=kind,
        trials=trials,
        seed=seed,
        atol=atol,
        rtol=rtol,
        device="cpu" if interpreted else "cuda",
        warmup=warmup if warmup is not None else (INTERPRETED_WARMUP if interpreted else GPU_WARMUP),
        runs=runs if runs is not None else (INTERPRETED_RUNS if interpreted else GPU_RUNS),
    )
    limits = SandboxLimits(
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_procs=max_procs,
        # CUDA maps far more address space than it uses: RLIMIT_AS would break it.
        address_space_limit=interpreted,
    )
    with tempfile.TemporaryDirectory(
        prefix="jetfleet-kernel-", dir=workdir_root, ignore_cleanup_errors=True
    ) as tmp:
        workdir = Path(tmp)
        (workdir / REFERENCE_FILE).write_text(reference_source)
        (workdir / CANDIDATE_FILE).write_text(candidate_source)
        (workdir / REQUEST_FILE).write_bytes(msgspec.json.encode(req))
        result = run_sandboxed(
            [sys.executable, "-B", "-m", "agents.kernels.child", REQUEST_FILE, RESULT_FILE],
            workdir=workdir,
            devices=[] if interpreted else list(devices),
            interpreted=interpreted,
            limits=limits,
            cancel_event=cancel_event,
        )
        if result.cancelled:
            raise KernelEvalCancelled("kernel evaluation cancelled")
        report = _read_report(workdir / RESULT_FILE)
    return classify(kind, result, report, static_flags, static_msgs, interpreted)


def _read_report(path: Path) -> ChildReport | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=ChildReport)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _device_label(interpreted: bool) -> str:
    return "cpu (triton interpreter)" if interpreted else "cuda"


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def classify(
    kind: Literal["verify", "profile"],
    result: SandboxResult,
    report: ChildReport | None,
    static_flags: list[str],
    static_msgs: list[str],
    interpreted: bool,
) -> KernelOutcome:
    """Map the sandbox's verdict and the child's report to one KernelOutcome."""
    flags = set(static_flags)
    messages = list(static_msgs)
    error: str | None = None
    outcome: Outcome
    if report is not None:
        flags.update(report.flags)
        messages.extend(report.messages)
    if result.timed_out:
        outcome, error = "timeout", f"wall-clock limit exceeded; killed after {result.wall_s:.1f} s"
    elif result.memory_exceeded:
        outcome, error = "runtime_error", "memory limit exceeded: " + "; ".join(result.notes)
        flags.add("out_of_memory")
    elif result.too_many_processes:
        outcome, error = "crashed", "process limit exceeded: " + "; ".join(result.notes)
        flags.add("too_many_processes")
    elif report is None:
        outcome = "crashed"
        if result.signal is not None:
            error = f"evaluation process killed by {_signal_name(result.signal)}"
        else:
            error = f"evaluation process exited with status {result.returncode} and no result"
    elif report.status == "compile_error":
        outcome, error = "compile_error", report.error
    elif report.status == "runtime_error":
        outcome, error = "runtime_error", report.error
    elif report.status == "reference_error":
        outcome, error = "runtime_error", f"reference problem failed: {report.error}"
        flags.add("reference_error")
    elif flags & REJECT_FLAGS:
        outcome = "rejected"
        error = "rejected by anti-cheat checks: " + ", ".join(sorted(flags & REJECT_FLAGS))
    elif not report.matched:
        outcome, error = "mismatch", "candidate output differs from the reference"
    else:
        outcome = "pass"
    return KernelOutcome(
        kind=kind,
        outcome=outcome,
        correct=outcome == "pass",
        flags=sorted(flags),
        messages=messages,
        max_abs_error=_finite(report.max_abs_error) if report else None,
        mean_abs_error=_finite(report.mean_abs_error) if report else None,
        max_rel_error=_finite(report.max_rel_error) if report else None,
        trials=report.trials if report else 0,
        interpreted=report.interpreted if report else interpreted,
        device=report.device if report else _device_label(interpreted),
        timings=report.timings if report else None,
        error=error,
        traceback=report.traceback if report else None,
        stdout_tail=result.stdout_tail,
        stderr_tail=result.stderr_tail,
        returncode=result.returncode,
        signal=result.signal,
        wall_s=round(result.wall_s, 3),
    )


def _finite(x: float | None) -> float | None:
    # JSON has no NaN/Inf; an unmeasurable error is reported as absent.
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return x
