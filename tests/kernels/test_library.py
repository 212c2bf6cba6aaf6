"""Every library problem's candidate passes a real sandboxed verify under the interpreter."""

from __future__ import annotations

import pytest

from agents.kernels.anticheat import check_source
from agents.kernels.evaluate import evaluate
from agents.kernels.generate import find_tunables
from agents.kernels.library import list_problems, load_problem, problem_names

FAMILIES = {"elementwise", "activation", "reduction", "softmax", "normalization", "matmul", "fused"}


def test_library_shape() -> None:
    problems = list_problems()
    assert len(problems) >= 12
    assert {p.family for p in problems} >= FAMILIES
    for p in problems:
        assert "class Model(" in p.reference_source and "def get_inputs" in p.reference_source
        assert "def get_init_inputs" in p.reference_source
        assert "class ModelNew(" in p.candidate_source and "@triton.jit" in p.candidate_source
        assert "is_cuda" not in p.candidate_source
        assert check_source(p.candidate_source) == [], p.name
        assert find_tunables(p.candidate_source), f"{p.name} exposes no tunable launch constant"


def test_unknown_problem_lists_valid_names() -> None:
    with pytest.raises(KeyError) as err:
        load_problem("no_such_problem")
    assert "softmax" in str(err.value) and "matmul" in str(err.value)


@pytest.mark.parametrize("name", problem_names())
def test_library_candidate_passes_verify(name: str) -> None:
    p = load_problem(name)
    out = evaluate("verify", p.reference_source, p.candidate_source, trials=5, timeout_s=90)
    assert out.outcome == "pass", (out.error, out.messages, out.traceback, out.stderr_tail)
    assert out.correct and out.flags == [] and out.trials == 5
    assert out.interpreted and out.max_abs_error is not None
    assert out.isolation == "namespaces"
