"""Profiling under the interpreter: real correctness, timings marked unrepresentative."""

from __future__ import annotations

from agents.kernels.evaluate import evaluate
from agents.kernels.library import ProblemInfo

from .conftest import FAST, replace_once


def test_profile_interpreted(softmax: ProblemInfo) -> None:
    out = evaluate("profile", softmax.reference_source, softmax.candidate_source, trials=1, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "pass" and out.kind == "profile"
    assert out.interpreted is True
    t = out.timings
    assert t is not None and t.representative is False and t.method == "perf_counter"
    assert t.runs == 3 and t.candidate_ms > 0 and t.reference_ms > 0
    assert t.candidate_p10_ms <= t.candidate_ms <= t.candidate_p90_ms
    assert t.speedup is not None and abs(t.speedup - t.reference_ms / t.candidate_ms) < 1e-9
    assert out.trials == 1 + 3  # one verify trial, then each timed run re-checked
    # The trusted clock's own figure, around the same runs, bounds the candidate's.
    assert t.candidate_wall_ms is not None and t.candidate_wall_ms >= t.candidate_ms
    assert "timing_mismatch" not in out.flags


def test_profile_of_wrong_candidate_has_no_timings(softmax: ProblemInfo) -> None:
    bad = replace_once(softmax.candidate_source, "/ row_sum, mask=mask)", "/ (row_sum * 2.0), mask=mask)")
    out = evaluate("profile", softmax.reference_source, bad, trials=1, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "mismatch" and out.timings is None
