"""The built-in generator: distinct launch-parameter variants that still verify."""

from __future__ import annotations

import random

from agents.kernels.anticheat import check_source
from agents.kernels.evaluate import evaluate
from agents.kernels.generate import (
    apply_values,
    find_tunables,
    mutate,
    normalized_hash,
    template_variants,
    tunable_values,
)
from agents.kernels.library import ProblemInfo, list_problems, load_problem

from .conftest import FAST


def test_tunables_read_from_comments_and_names() -> None:
    mm = load_problem("matmul").candidate_source
    t = {x.name: x for x in find_tunables(mm)}
    assert set(t) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES"}
    assert t["BLOCK_K"].choices == (16, 32, 64)  # from its `# tune:` comment
    src = "X = 3\nBLOCK_SIZE = 128\nNUM_WARPS = 4\nlower = 7\n"
    t2 = {x.name: x for x in find_tunables(src)}
    assert set(t2) == {"BLOCK_SIZE", "NUM_WARPS"}  # X has no known meaning
    assert t2["NUM_WARPS"].choices == (1, 2, 4, 8)
    assert 1024 in t2["BLOCK_SIZE"].choices and 16 in t2["BLOCK_SIZE"].choices


def test_apply_values_only_touches_numbers(softmax: ProblemInfo) -> None:
    new = apply_values(softmax.candidate_source, {"BLOCK_SIZE": 32})
    assert tunable_values(new)["BLOCK_SIZE"] == 32
    assert "BLOCK_SIZE = 32  # tune:" in new
    assert len(new.splitlines()) == len(softmax.candidate_source.splitlines())


def test_variants_distinct_and_clean() -> None:
    for p in list_problems():
        vs = template_variants(p.candidate_source, 6, seed=1)
        assert len(vs) == 6, p.name
        hashes = {normalized_hash(v) for v in vs}
        assert len(hashes) == 6 and normalized_hash(p.candidate_source) not in hashes
        assert all(check_source(v) == [] for v in vs)
    # Same seed, same variants; a different seed explores elsewhere.
    src = load_problem("softmax").candidate_source
    assert template_variants(src, 4, seed=3) == template_variants(src, 4, seed=3)


def test_variant_space_exhausts() -> None:
    src = "import triton\nBLOCK = 32  # tune: 32, 64\nNUM_WARPS = 4  # tune: 4, 8\n"
    vs = template_variants(src, 10, seed=0)
    assert len(vs) == 3  # 2 x 2 combinations minus the seed itself
    assert template_variants("x = 1\n", 5) == []


def test_mutate_changes_program() -> None:
    rng = random.Random(0)
    src = load_problem("matmul").candidate_source
    children = {normalized_hash(mutate(src, rng)) for _ in range(10)}
    assert normalized_hash(src) not in children and len(children) >= 3
    assert mutate("x = 1\n", rng) == "x = 1\n"


def test_variants_pass_verify() -> None:
    for name in ("softmax", "matmul"):
        p = load_problem(name)
        for v in template_variants(p.candidate_source, 2, seed=7):
            out = evaluate("verify", p.reference_source, v, trials=2, **FAST)  # type: ignore[arg-type]
            assert out.outcome == "pass", (name, tunable_values(v), out.error, out.messages)
