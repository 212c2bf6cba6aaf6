"""The file protocol between the evaluating parent and the sandboxed child.

The parent writes an `EvalRequest` as JSON into the sandbox directory, the child
writes a `ChildReport` back. Both sides import only msgspec here (no torch), so
the parent stays light.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.kernels import KernelTimings

REFERENCE_FILE = "reference_problem.py"
CANDIDATE_FILE = "candidate_kernel.py"
REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"

ChildStatus = Literal["ok", "compile_error", "runtime_error", "reference_error"]


class EvalRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schema: int = 1
    kind: Literal["verify", "profile"]
    trials: int
    seed: int
    atol: float | None
    rtol: float | None
    # "cuda" or "cpu"; "cpu" always means Triton's interpreter.
    device: Literal["cuda", "cpu"]
    warmup: int
    runs: int
    l2_flush_mb: int = 256
    # Above this speed-up a profile carries the `suspicious_speedup` flag.
    suspicious_speedup: float = 10.0


class ChildReport(msgspec.Struct, kw_only=True):
    schema: int = 1
    status: ChildStatus
    # None when the comparison never happened (compile or runtime error first).
    matched: bool | None = None
    flags: list[str] = msgspec.field(default_factory=list)
    messages: list[str] = msgspec.field(default_factory=list)
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    max_rel_error: float | None = None
    trials: int = 0
    interpreted: bool = True
    device: str = "cpu"
    timings: KernelTimings | None = None
    error: str | None = None
    traceback: str | None = None
