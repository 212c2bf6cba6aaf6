"""Payloads and results of the kernel capabilities (kernel.verify, kernel.profile).

Inputs are strict (`forbid_unknown_fields`) so a typo in a submitted payload is an
error, not a silently ignored option. Results are lenient so an older reader can
still decode a newer worker's result.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Outcome = Literal[
    "pass", "mismatch", "compile_error", "runtime_error", "timeout", "crashed", "rejected"
]
OUTCOMES: tuple[str, ...] = (
    "pass",
    "mismatch",
    "compile_error",
    "runtime_error",
    "timeout",
    "crashed",
    "rejected",
)

Dsl = Literal["triton"]

# Payload ranges, declared once: msgspec enforces them when a handler's payload
# is decoded, and its message names the field ("Expected `int` <= 100 - at `$.trials`").
EvalTimeout = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Trials = Annotated[int, msgspec.Meta(ge=1, le=100)]
Runs = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Warmup = Annotated[int, msgspec.Meta(ge=0, le=1_000)]
Tolerance = Annotated[float, msgspec.Meta(ge=0, le=1e6)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class KernelTimings(msgspec.Struct, kw_only=True):
    """Timings of one profile run. Milliseconds; medians and 10th/90th percentiles."""

    schema: int = 1
    candidate_ms: float
    reference_ms: float
    candidate_p10_ms: float
    candidate_p90_ms: float
    reference_p10_ms: float
    reference_p90_ms: float
    runs: int
    warmup: int
    speedup: float | None
    # cuda_events on a GPU; perf_counter under the interpreter.
    method: Literal["cuda_events", "perf_counter"]
    l2_flush: bool
    # False under Triton's interpreter: the numbers measure numpy, not a kernel.
    representative: bool
    # Median per timed run of the trusted evaluator's own clock around the
    # candidate's run (inputs and outputs in transit included); the candidate's
    # figures above were checked against it.
    candidate_wall_ms: float | None = None


class KernelOutcome(msgspec.Struct, kw_only=True):
    """The result of one verify or profile evaluation: always a result, never a job failure."""

    schema: int = 1
    kind: Literal["verify", "profile"]
    outcome: Outcome
    correct: bool
    # Sorted, unique; see agents.kernels.anticheat and agents.kernels.evaluate for meanings.
    flags: list[str] = msgspec.field(default_factory=list)
    # Human-readable details behind the flags and the outcome.
    messages: list[str] = msgspec.field(default_factory=list)
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    max_rel_error: float | None = None
    # Trials compared (verify) or timed runs re-checked (profile).
    trials: int = 0
    interpreted: bool = False
    device: str = "cpu"
    timings: KernelTimings | None = None
    error: str | None = None
    traceback: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    returncode: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    # What the candidate ran under: "namespaces" (full isolation), "process",
    # or "none" (rejected by the static checks and never run). See docs/sandbox.md.
    isolation: str = ""
    # What was evaluated: the problem's label and the candidate's normalized program hash.
    problem: str | None = None
    candidate_hash: str | None = None


class _KernelPayloadBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schema: int = 1
    # A library problem by name (agents.kernels.library), or an inline/ref source.
    problem: str | None = None
    problem_source: str | None = None
    problem_ref: dict[str, Any] | None = None
    candidate_source: str | None = None
    candidate_ref: dict[str, Any] | None = None
    dsl: Dsl = "triton"
    seed: Seed = 0
    atol: Tolerance | None = None
    rtol: Tolerance | None = None
    eval_timeout_s: EvalTimeout = 120.0


class VerifyPayload(_KernelPayloadBase, kw_only=True, forbid_unknown_fields=True):
    trials: Trials = 5


class ProfilePayload(_KernelPayloadBase, kw_only=True, forbid_unknown_fields=True):
    trials: Trials = 1
    # None: the evaluator picks (100 runs / 10 warm-ups on a GPU, 3 / 1 interpreted).
    runs: Runs | None = None
    warmup: Warmup | None = None


# ---- kernel.generate / kernel.single / kernel.evolve (served by services.evolver) ----------

Generator = Literal["auto", "template", "llm"]
ChildKind = Literal["profile", "verify"]


class _GenPayloadBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    schema: int = 1
    problem: str | None = None
    problem_source: str | None = None
    problem_ref: dict[str, Any] | None = None
    # The candidate to start from (template search / mutation); default: the
    # library problem's own candidate.
    seed_candidate_source: str | None = None
    dsl: Dsl = "triton"
    # "auto": the LLM designer/coder when JETFLEET_LLM_BASE_URL and a model are
    # configured, else the template search. "llm" fails when none is configured.
    generator: Generator = "auto"
    seed: Seed = 0
    # Fields the kernel-generation client sends (agents.kernels.sdk.KernelClient.submit_job);
    # recorded, not interpreted.
    task_desc: str = ""
    framework: Literal["torch"] = "torch"
    workflow: str | None = None


class GeneratePayload(_GenPayloadBase, kw_only=True, forbid_unknown_fields=True):
    n: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4


class _EvalSettings(_GenPayloadBase, kw_only=True, forbid_unknown_fields=True):
    atol: Tolerance | None = None
    rtol: Tolerance | None = None
    eval_timeout_s: EvalTimeout = 120.0
    trials: Trials | None = None
    runs: Runs | None = None
    warmup: Warmup | None = None
    # Labels every child evaluation job must match, e.g. {"backend": "cuda"}.
    child_labels: dict[str, str] = msgspec.field(default_factory=dict)
    # Attempt limit of each child job (seconds); default eval_timeout_s * 2 + 60.
    child_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None
    child_priority: Annotated[int, msgspec.Meta(ge=0, le=2)] = 1


class SinglePayload(_EvalSettings, kw_only=True, forbid_unknown_fields=True):
    candidate_source: str | None = None
    candidate_ref: dict[str, Any] | None = None
    # profile verifies too; "verify" skips the timing.
    evaluate: ChildKind = "profile"


class EvolvePayload(_EvalSettings, kw_only=True, forbid_unknown_fields=True):
    max_rounds: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    parallel_num: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    islands: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    elite_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 5
    # Every this many rounds each island's best is copied to the next island (0: never).
    migration_interval: Annotated[int, msgspec.Meta(ge=0, le=100)] = 2
    evaluate: ChildKind = "profile"
