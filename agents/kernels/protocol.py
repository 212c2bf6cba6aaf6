"""Messages between `evaluate()` (in the worker) and the trusted evaluator process.

Framed as in agents.kernels.wire, without payloads. The worker sends one
`EvalRequest`; the evaluator answers `Started`, `SandboxUp` (so the worker can
kill the sandbox itself on cancel), then exactly one `Verdict` or `Broken`.
Neither side imports torch here.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from agents.kernels.isolation import Level
from schemas.kernels import KernelOutcome


class EvalRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schema: int = 2
    kind: Literal["verify", "profile"]
    reference_source: str
    candidate_source: str
    trials: int
    seed: int
    atol: float | None
    rtol: float | None
    # "cuda" or "cpu"; "cpu" always means Triton's interpreter.
    device: Literal["cuda", "cpu"]
    devices: list[str]
    warmup: int
    runs: int
    timeout_s: float
    memory_mb: int
    max_procs: int
    isolation: Level
    static_flags: list[str] = msgspec.field(default_factory=list)
    static_messages: list[str] = msgspec.field(default_factory=list)
    workdir_root: str | None = None
    l2_flush_mb: int = 256
    # Above this speed-up a profile carries the `suspicious_speedup` flag.
    suspicious_speedup: float = 10.0


class Started(msgspec.Struct, tag="started", kw_only=True):
    evaluator_pid: int


class SandboxUp(msgspec.Struct, tag="sandbox", kw_only=True):
    """Enough for the worker to kill the sandbox if the evaluator itself is killed."""

    level: Level
    pid: int
    init_pid: int | None = None
    outer_ids: list[int] = msgspec.field(default_factory=list)
    marker: str = ""
    started_wall: float = 0.0
    # Process level only: the host directory it works in.
    workdir: str | None = None


class Verdict(msgspec.Struct, tag="verdict", kw_only=True):
    outcome: KernelOutcome


class Broken(msgspec.Struct, tag="broken", kw_only=True):
    """The evaluator itself failed (not the candidate): an infrastructure error."""

    error: str


FromEvaluator = Started | SandboxUp | Verdict | Broken
from_evaluator = msgspec.json.Decoder(FromEvaluator)
request_decoder = msgspec.json.Decoder(EvalRequest)
