"""The built-in generator: distinct launch-parameter variants that still verify."""

from __future__ import annotations

import ast
import random

import pytest

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

from .conftest import FAST, replace_once


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


# ---- launch sites: literals where the kernel is launched -----------------------------------------

_HEADER = "import torch\nimport torch.nn as nn\nimport triton\nimport triton.language as tl\n\n\n"
_ELEMENTWISE = '''@triton.jit
def {name}(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, {expr}, mask=mask)


'''

# Elementwise add, the block size written at the launch and again in the grid.
ADD_LAUNCH = _HEADER + _ELEMENTWISE.format(name="_add_kernel", expr="x + y") + '''class ModelNew(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.max_batch = 1024  # same number, nothing to do with the launch

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.contiguous()
        b = b.contiguous()
        out = torch.empty_like(a)
        n = a.numel()
        _add_kernel[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024, num_warps=4)
        return out
'''

# ReLU through a grid variable with the ceiling division written out; num_stages too.
RELU_LAUNCH = _HEADER + '''@triton.jit
def _relu_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    tl.store(out_ptr + offs, tl.maximum(tl.load(x_ptr + offs, mask=mask), 0.0), mask=mask)


class ModelNew(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        grid = ((n + 511) // 512,)
        _relu_kernel[grid](x, out, n, BLOCK=512, num_warps=2, num_stages=2)
        return out
'''

# Row softmax looping over column blocks; the grid is one program per row.
SOFTMAX_LAUNCH = replace_once(replace_once(
    load_problem("softmax").candidate_source,
    "BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)", "BLOCK=64, num_warps=4)"),
    "BLOCK_SIZE = 128  # tune: 16, 32, 64, 128, 256, 512, 1024\nNUM_WARPS = 4  # tune: 1, 2, 4, 8\n", "")

# The same add behind @triton.autotune with one config (what Triton's interpreter can run).
ADD_AUTOTUNED = _HEADER + '''@triton.autotune(
    configs=[
        triton.Config({"BLOCK": 256}, num_warps=4, num_stages=2),
    ],
    key=["n_elements"],
)
''' + _ELEMENTWISE.format(name="_add_kernel", expr="x + y") + '''class ModelNew(nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.contiguous()
        b = b.contiguous()
        out = torch.empty_like(a)
        n = a.numel()
        _add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](a, b, out, n)
        return out
'''

LAUNCH_CANDIDATES = {"add": ADD_LAUNCH, "relu": RELU_LAUNCH, "softmax": SOFTMAX_LAUNCH}


def _launch(source: str) -> str:
    """The line of `source` that launches a kernel (the last one, when several)."""
    return [ln.strip() for ln in source.splitlines() if "](" in ln and "kernel[" in ln][-1]


def test_launch_kwargs_found_and_varied() -> None:
    t = {x.name: x for x in find_tunables(ADD_LAUNCH)}
    assert set(t) == {"_add_kernel.BLOCK", "_add_kernel.num_warps"}
    assert t["_add_kernel.BLOCK"].kind == "launch" and t["_add_kernel.BLOCK"].value == 1024
    assert t["_add_kernel.BLOCK"].choices == (16, 32, 64, 128, 256, 512, 1024)
    assert tunable_values(SOFTMAX_LAUNCH) == {"_softmax_kernel.BLOCK": 64, "_softmax_kernel.num_warps": 4}
    # Before this search knew launch sites, such a candidate had no variants at all.
    blocks = {tunable_values(v)["_add_kernel.BLOCK"] for v in template_variants(ADD_LAUNCH, 20, seed=2)}
    assert len(blocks) >= 4 and blocks - {1024}


def test_grid_literal_rewritten_with_the_block() -> None:
    new = apply_values(ADD_LAUNCH, {"_add_kernel.BLOCK": 256})
    assert _launch(new) == "_add_kernel[(triton.cdiv(n, 256),)](a, b, out, n, BLOCK=256, num_warps=4)"
    new = apply_values(RELU_LAUNCH, {"_relu_kernel.BLOCK": 64})
    assert "grid = ((n + 63) // 64,)" in new and "BLOCK=64," in new
    # Every variant keeps grid and block in step.
    for v in template_variants(ADD_LAUNCH, 10, seed=5):
        block = tunable_values(v)["_add_kernel.BLOCK"]
        assert f"triton.cdiv(n, {block}),)](a, b, out, n, BLOCK={block}," in v
    # A grid that reads the block from meta needs nothing.
    lam = ADD_LAUNCH.replace("[(triton.cdiv(n, 1024),)]", '[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)]')
    new = apply_values(lam, {"_add_kernel.BLOCK": 128})
    assert '[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](a, b, out, n, BLOCK=128,' in new


def test_unrelated_equal_literal_untouched() -> None:
    new = apply_values(ADD_LAUNCH, {"_add_kernel.BLOCK": 128})
    assert "self.max_batch = 1024  # same number" in new and "1024" not in _launch(new)
    # Where the same number also stands in the grid (or the launch) in a role we cannot
    # name, the block is not tuned at all; num_warps still is.
    for old, new_launch in [
        ("(triton.cdiv(n, 1024),)", "(triton.cdiv(n, 1024), min(a.shape[0], 1024))"),
        ("(a, b, out, n, BLOCK=1024", "(a, b, out, 1024, BLOCK=1024"),  # n_elements = 1024?
        ("(triton.cdiv(n, 1024),)", "self._grid(n)"),  # code the search cannot see
    ]:
        src = ADD_LAUNCH.replace(old, new_launch)
        assert set(tunable_values(src)) == {"_add_kernel.num_warps"}, new_launch
        for v in template_variants(src, 10, seed=0):
            assert v.count("1024") == src.count("1024")
    # Nor when the grid reads a parameter whose default is that number.
    src = replace_once(replace_once(ADD_LAUNCH, "b: torch.Tensor) -> torch.Tensor:",
                                    "b: torch.Tensor, div: int = 1024) -> torch.Tensor:"),
                       "[(triton.cdiv(n, 1024),)]", "[(triton.cdiv(n, div),)]")
    assert set(tunable_values(src)) == {"_add_kernel.num_warps"}
    # A constexpr whose meaning we cannot know stays put.
    src = ADD_LAUNCH.replace("BLOCK: tl.constexpr)", "BLOCK: tl.constexpr, MODE: tl.constexpr)").replace(
        "BLOCK=1024,", "BLOCK=1024, MODE=2,")
    assert set(tunable_values(src)) == {"_add_kernel.BLOCK", "_add_kernel.num_warps"}


def test_equal_blocks_sharing_a_grid_move_together() -> None:
    # BM and BN both 32 and the grid divides by 32 twice: which is which cannot be told,
    # so they are one tunable and every 32 of the grid follows it.
    src = load_problem("matmul").candidate_source.replace(
        "grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))",
        "grid = (triton.cdiv(m, 32), triton.cdiv(n, 32))").replace(
        "BM=BLOCK_M, BN=BLOCK_N,", "BM=32, BN=32,")
    names = set(tunable_values(src))
    assert "_matmul_kernel.BM" in names and "_matmul_kernel.BN" not in names
    # BLOCK_M / BLOCK_N (still 32, no longer read) keep their own tunables.
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= names
    new = apply_values(src, {"_matmul_kernel.BM": 64})
    assert "grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))" in new and "BM=64, BN=64," in new
    # A grid that reads a constant while the launch spells its value out: one tunable.
    src = "BLOCK_SIZE = 1024\n" + replace_once(ADD_LAUNCH, "[(triton.cdiv(n, 1024),)]",
                                                "[(triton.cdiv(n, BLOCK_SIZE),)]")
    assert set(tunable_values(src)) == {"BLOCK_SIZE", "_add_kernel.num_warps"}
    new = apply_values(src, {"BLOCK_SIZE": 128})
    assert new.startswith("BLOCK_SIZE = 128\n") and "BLOCK=128, num_warps=4)" in new
    # One grid variable shared by two launches ties their blocks together.
    two = ADD_LAUNCH.replace(
        "        _add_kernel[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024, num_warps=4)\n",
        "        grid = (triton.cdiv(n, 1024),)\n"
        "        _add_kernel[grid](a, b, out, n, BLOCK=1024, num_warps=4)\n"
        "        _add_kernel[grid](out, b, out, n, BLOCK=1024)\n")
    assert set(tunable_values(two)) == {"_add_kernel.BLOCK", "_add_kernel.num_warps"}
    new = apply_values(two, {"_add_kernel.BLOCK": 64})
    assert new.count("BLOCK=64") == 2 and "triton.cdiv(n, 64)" in new and "1024)" not in new


def test_num_warps_and_num_stages_at_launch() -> None:
    t = {x.name: x for x in find_tunables(RELU_LAUNCH)}
    assert set(t) == {"_relu_kernel.BLOCK", "_relu_kernel.num_warps", "_relu_kernel.num_stages"}
    assert t["_relu_kernel.num_warps"].choices == (1, 2, 4, 8)
    assert t["_relu_kernel.num_stages"].choices == (1, 2, 3, 4)
    assert t["_relu_kernel.num_stages"].sites == ()  # they never touch the grid
    new = apply_values(RELU_LAUNCH, {"_relu_kernel.num_warps": 8, "_relu_kernel.num_stages": 3})
    assert "BLOCK=512, num_warps=8, num_stages=3)" in new and "(n + 511) // 512" in new


def test_powers_of_two_where_a_block_shapes_a_tensor() -> None:
    # A `# tune:` comment may list any values; a block that reaches tl.arange keeps the
    # powers of two among them, whether it is a launch literal or a module constant.
    lit = ADD_LAUNCH.replace("BLOCK=1024, num_warps=4)", "BLOCK=1024)  # tune: 96, 256, 1000")
    assert {x.name: x.choices for x in find_tunables(lit)} == {"_add_kernel.BLOCK": (256, 1024)}
    const = "BLOCK_SIZE = 256  # tune: 96, 128, 1000\n" + ADD_LAUNCH.replace(
        "[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024,",
        "[(triton.cdiv(n, BLOCK_SIZE),)](a, b, out, n, BLOCK=BLOCK_SIZE,")
    assert find_tunables(const)[0].choices == (128, 256)
    # Not a shape: num_stages may take any value it lists.
    stages = RELU_LAUNCH.replace("num_stages=2)", "num_stages=2)  # tune: 3, 5").replace(
        "num_warps=2, num_stages", "num_warps=2,\n                           num_stages")
    assert {x.name: x.choices for x in find_tunables(stages)}["_relu_kernel.num_stages"] == (2, 3, 5)
    # num_warps must be a power of two, as a launch literal or a constant passed to it.
    warps = replace_once(ADD_LAUNCH, "num_warps=4)", "\n            num_warps=4)  # tune: 3, 8")
    assert {x.name: x.choices for x in find_tunables(warps)}["_add_kernel.num_warps"] == (4, 8)
    const = "NUM_WARPS = 4  # tune: 2, 6\n" + replace_once(ADD_LAUNCH, "num_warps=4)", "num_warps=NUM_WARPS)")
    assert {x.name: x.choices for x in find_tunables(const)}["NUM_WARPS"] == (2, 4)


def test_autotune_configs_varied_and_grown() -> None:
    two = ADD_AUTOTUNED.replace(
        '        triton.Config({"BLOCK": 256}, num_warps=4, num_stages=2),\n',
        '        triton.Config({"BLOCK": 256}, num_warps=4, num_stages=2),\n'
        '        triton.Config({"BLOCK": 128}, num_warps=8),\n')
    t = {x.name: x for x in find_tunables(two)}
    assert set(t) == {"_add_kernel.configs[0].BLOCK", "_add_kernel.configs[0].num_warps",
                      "_add_kernel.configs[0].num_stages", "_add_kernel.configs[1].BLOCK",
                      "_add_kernel.configs[1].num_warps"}
    assert all(x.kind == "autotune" for x in t.values())
    # Replacing values never makes two configs equal.
    vs = template_variants(two, 40, seed=4)
    assert len(vs) == 40
    for v in vs:
        assert _configs(v)[0] != _configs(v)[1]
    # Mutation sometimes adds a config: a copy of one with a value moved, distinct from all.
    rng = random.Random(1)
    src = ADD_AUTOTUNED
    sizes = []
    for _ in range(60):
        src = mutate(src, rng)
        configs = _configs(src)
        sizes.append(len(configs))
        assert len(set(configs)) == len(configs)
    assert sizes[-1] == 8 and max(sizes) == 8 and 1 < sizes[10] < 8  # grows, capped at 8
    assert "        triton.Config({" in src.splitlines()[8]  # one config per line, as written


def _configs(source: str) -> list[str]:
    """The autotune configs of a source, as normalized text."""
    tree = ast.parse(source)
    dec = next(d for node in tree.body if isinstance(node, ast.FunctionDef)
               for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "autotune")
    configs = next(k.value for k in dec.keywords if k.arg == "configs")
    assert isinstance(configs, ast.List)
    return [ast.unparse(c) for c in configs.elts]


def test_launch_variants_parse_and_are_distinct() -> None:
    for source in [*LAUNCH_CANDIDATES.values(), ADD_AUTOTUNED]:
        vs = template_variants(source, 12, seed=9)
        assert len(vs) == 12
        for v in vs:
            ast.parse(v)
            assert check_source(v) == []
        hashes = {normalized_hash(v) for v in vs}
        assert len(hashes) == 12 and normalized_hash(source) not in hashes
        rng = random.Random(3)
        kids = [mutate(source, rng) for _ in range(8)]
        for k in kids:
            ast.parse(k)
        assert normalized_hash(source) not in {normalized_hash(k) for k in kids}


def _differ(source: str, variant: str) -> set[str]:
    old, new = tunable_values(source), tunable_values(variant)
    return {k for k in old if old[k] != new.get(k)}


def test_launch_variants_pass_verify() -> None:
    # Two variants of each, chosen so the block size moves (the grid must follow it) and a
    # launch option moves; plus one of the autotuned kernel. Each run is a real sandbox.
    runs = []
    for problem, source in LAUNCH_CANDIDATES.items():
        vs = template_variants(source, 40, seed=11)
        block = next(v for v in vs if any(k.endswith(".BLOCK") for k in _differ(source, v)))
        other = next(v for v in vs if v != block and any(
            k.endswith(("num_warps", "num_stages")) for k in _differ(source, v)))
        runs += [(problem, block), (problem, other)]
    tuned = next(v for v in template_variants(ADD_AUTOTUNED, 20, seed=11)
                 if "_add_kernel.configs[0].BLOCK" in _differ(ADD_AUTOTUNED, v))
    runs.append(("add", tuned))
    for problem, v in runs:
        p = load_problem(problem)
        out = evaluate("verify", p.reference_source, v, trials=2, **FAST)  # type: ignore[arg-type]
        assert out.outcome == "pass", (problem, tunable_values(v), out.error, out.messages)


@pytest.mark.gpu
def test_grown_autotune_configs_pass_verify_on_gpu() -> None:
    # Triton's interpreter cannot benchmark between configs, so lists that mutation has
    # grown run only on a real GPU.
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = random.Random(5)
    src = ADD_AUTOTUNED
    while len(_configs(src)) < 3:
        src = mutate(src, rng)
    p = load_problem("add")
    out = evaluate("verify", p.reference_source, src, devices=["0"], trials=2, timeout_s=300)
    assert out.outcome == "pass", (out.error, out.messages, out.traceback)
