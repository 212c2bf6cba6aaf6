"""Helpers for the kernel evaluation tests: candidates built from the softmax problem.

Every evaluation here is real: a sandboxed child process running Triton's
interpreter on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import pytest

import agents.kernels.evaluate as evaluate_mod
from agents.kernels.library import ProblemInfo, load_problem
from agents.kernels.sandbox import MARKER_ENV, SandboxResult, run_sandboxed

# Small limits keep misbehaving candidates cheap on a 2-core CI box.
FAST = {"timeout_s": 60.0, "memory_mb": 2048}


@pytest.fixture(scope="session")
def softmax() -> ProblemInfo:
    return load_problem("softmax")


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"expected exactly one {old!r} in the candidate"
    return source.replace(old, new)


def with_forward(problem: ProblemInfo, body: str, header: str = "") -> str:
    """The softmax candidate with its forward body replaced by `body` (8-space indented)."""
    src = problem.candidate_source
    start = src.index("    def forward(")
    sig_end = src.index("\n", start) + 1
    return header + src[:sig_end] + body


# A launch of the real kernel, so a test candidate is not also "no kernel launched".
LAUNCH = (
    "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
    "        out = torch.empty_like(x2)\n"
    "        _softmax_kernel[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
)


def leftovers(result: SandboxResult) -> list[psutil.Process]:
    """Live processes of one finished sandbox: in its group or carrying its marker."""
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == result.pgid or proc.environ().get(MARKER_ENV) == result.marker:
                left.append(proc)
        except (psutil.Error, OSError):
            continue
    return left


@pytest.fixture
def sandboxes(monkeypatch: pytest.MonkeyPatch) -> list[SandboxResult]:
    """Every SandboxResult that evaluate() produced during the test."""
    seen: list[SandboxResult] = []

    def spy(*args: Any, **kwargs: Any) -> SandboxResult:
        result = run_sandboxed(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(evaluate_mod, "run_sandboxed", spy)
    return seen
