"""Compiled Triton on a real GPU: verify every library problem, profile with device events.

Deselected by default (`-m gpu` runs them); they need torch with CUDA and a GPU.
"""

from __future__ import annotations

import pytest

from agents.kernels.evaluate import evaluate
from agents.kernels.library import load_problem, problem_names

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _need_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("name", problem_names())
def test_verify_compiled(name: str) -> None:
    p = load_problem(name)
    out = evaluate("verify", p.reference_source, p.candidate_source, devices=["0"], timeout_s=300)
    assert out.outcome == "pass", (out.error, out.messages, out.traceback, out.stderr_tail)
    assert not out.interpreted and out.device.startswith("cuda")


@pytest.mark.parametrize("name", ["softmax", "matmul", "layernorm"])
def test_profile_device_events(name: str) -> None:
    p = load_problem(name)
    out = evaluate("profile", p.reference_source, p.candidate_source, devices=["0"], trials=2, timeout_s=300)
    assert out.outcome == "pass", (out.error, out.messages, out.traceback, out.stderr_tail)
    t = out.timings
    assert t is not None and t.method == "cuda_events" and t.representative and t.l2_flush
    assert t.runs == 100 and t.warmup == 10
    assert 0 < t.candidate_p10_ms <= t.candidate_ms <= t.candidate_p90_ms
    assert out.trials == 2 + 100
    print(f"{name}: cand {t.candidate_ms:.4f} ms ref {t.reference_ms:.4f} ms speedup {t.speedup:.2f}x")


def test_gpu_cheats_still_caught() -> None:
    p = load_problem("softmax")
    src = p.candidate_source.replace("return out.view(x.shape)", "return torch.softmax(x, dim=-1)")
    out = evaluate("verify", p.reference_source, src, devices=["0"], timeout_s=300)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags


def test_gpu_hang_times_out() -> None:
    p = load_problem("softmax")
    src = p.candidate_source.replace("return out.view(x.shape)", "while True:\n            pass")
    out = evaluate("verify", p.reference_source, src, devices=["0"], timeout_s=60)
    assert out.outcome == "timeout"
