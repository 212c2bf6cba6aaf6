"""Static checks on candidate sources (no subprocess)."""

from __future__ import annotations

import pytest

from agents.kernels.anticheat import REJECT_FLAGS, check_source, flags_of
from agents.kernels.library import ProblemInfo

from .conftest import LAUNCH, with_forward


def flags(src: str) -> list[str]:
    return flags_of(check_source(src))


def test_library_candidate_is_clean(softmax: ProblemInfo) -> None:
    assert check_source(softmax.candidate_source) == []


@pytest.mark.parametrize(
    ("body", "flag"),
    [
        ("        return torch.softmax(x, -1)\n", "torch_fallback"),
        ("        return F.softmax(x, -1)\n", "torch_fallback"),
        ("        return x @ x.t()\n", "torch_fallback"),
        ("        return x.exp().sum(-1)\n", "torch_fallback"),
        ("        try:\n            return out\n        except Exception:\n            return x\n", "try_fallback"),
        ("        return Model()(x)\n", "calls_reference"),
        ("        s = torch.cuda.Stream()\n        return out\n", "streams_or_threads"),
        ("        torch.cuda.synchronize = print\n        return out\n", "timer_tampering"),
        ("        self.out = out\n        return out\n", "output_caching"),
        ("        k = x.data_ptr()\n        return out\n", "output_caching"),
        ("        return eval('out')\n", "dynamic_code"),
        ("        return getattr(x, 'ex' + 'p')()\n", "dynamic_code"),
    ],
)
def test_forward_flags(softmax: ProblemInfo, body: str, flag: str) -> None:
    src = with_forward(softmax, LAUNCH + body, header="import torch.nn.functional as F\n")
    found = check_source(src)
    assert flag in flags_of(found)
    assert all(f.line > 0 for f in found)


@pytest.mark.parametrize(
    ("header", "flag"),
    [
        ("import os\n", "unsafe_import"),
        ("import subprocess\n", "unsafe_import"),
        ("from ctypes import string_at\n", "unsafe_import"),
        ("import socket\n", "unsafe_import"),
        ("import threading\n", "streams_or_threads"),
        ("from concurrent.futures import ThreadPoolExecutor\n", "streams_or_threads"),
        ("import time\n", "timer_tampering"),
        ("from time import perf_counter\n", "timer_tampering"),
        ("_CACHE = {}\n", "output_caching"),
        ("from reference_problem import Model\n", "calls_reference"),
    ],
)
def test_module_flags(softmax: ProblemInfo, header: str, flag: str) -> None:
    assert flag in flags(header + softmax.candidate_source)


def test_no_kernel_and_no_launch(softmax: ProblemInfo) -> None:
    no_kernel = softmax.candidate_source.replace("@triton.jit\n", "")
    assert "no_triton_kernel" in flags(no_kernel)
    no_launch = with_forward(softmax, "        return torch.empty_like(x)\n")
    assert flags(no_launch) == ["no_triton_kernel"]


def test_launcher_helper_counts_as_forward(softmax: ProblemInfo) -> None:
    # A module-level launcher called from forward is host code too.
    src = softmax.candidate_source.replace("class ModelNew(", (
        "def launch(x):\n"
        "    x2 = x.contiguous().view(-1, x.shape[-1])\n"
        "    out = torch.empty_like(x2)\n"
        "    _softmax_kernel[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
        "    return out.view(x.shape)\n\n\n"
        "class ModelNew("
    ))
    clean = with_forward_src(src, "        return launch(x)\n")
    assert flags(clean) == []
    cheat = clean.replace("    return out.view(x.shape)\n\n\n", "    return torch.softmax(x, -1)\n\n\n")
    assert flags(cheat) == ["torch_fallback"]


def with_forward_src(src: str, body: str) -> str:
    start = src.index("    def forward(")
    return src[: src.index("\n", start) + 1] + body


def test_nn_submodule_call_is_fallback() -> None:
    src = (
        "import torch\nimport torch.nn as nn\nimport triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef k(x_ptr):\n    pass\n\n"
        "class ModelNew(nn.Module):\n"
        "    def __init__(self, n):\n        super().__init__()\n        self.lin = nn.Linear(n, n)\n"
        "        self.w = nn.Parameter(torch.ones(n))\n\n"
        "    def forward(self, x):\n        k[(1,)](x)\n        return self.lin(x)\n"
    )
    found = check_source(src)
    assert flags_of(found) == ["torch_fallback"]
    assert "self.lin" in found[0].message


def test_syntax_error_gives_no_findings() -> None:
    assert check_source("def broken(:\n") == []


def test_reject_flags_cover_static_flags() -> None:
    assert {"no_triton_kernel", "torch_fallback", "calls_reference", "try_fallback",
            "streams_or_threads", "timer_tampering", "output_caching", "unsafe_import"} <= REJECT_FLAGS
