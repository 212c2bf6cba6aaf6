"""Compiled Triton on a real GPU: verify every library problem, profile with device
events, and the CUDA paths (events, synchronize, streams) under attack.

Deselected by default (`-m gpu` runs them); they need torch with CUDA and a GPU.
"""

from __future__ import annotations

import pytest

from agents.kernels.evaluate import evaluate
from agents.kernels.library import ProblemInfo, load_problem, problem_names
from schemas.kernels import KernelOutcome

from .conftest import SandboxLog, hostile

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
    assert out.isolation == "namespaces"


@pytest.mark.parametrize("name", ["softmax", "matmul", "layernorm"])
def test_profile_device_events(name: str) -> None:
    p = load_problem(name)
    out = evaluate("profile", p.reference_source, p.candidate_source, devices=["0"], trials=2, timeout_s=300)
    assert out.outcome == "pass", (out.error, out.messages, out.traceback, out.stderr_tail)
    t = out.timings
    assert t is not None and t.method == "cuda_events" and t.representative and t.l2_flush
    assert t.runs == 100 and t.warmup == 10
    assert 0 < t.candidate_p10_ms <= t.candidate_ms <= t.candidate_p90_ms
    assert t.candidate_wall_ms is not None and t.candidate_wall_ms >= t.candidate_ms
    assert out.trials == 2 + 100 and "timing_mismatch" not in out.flags
    print(f"{name}: cand {t.candidate_ms:.4f} ms (trusted clock {t.candidate_wall_ms:.4f} ms) "
          f"ref {t.reference_ms:.4f} ms speedup {t.speedup:.2f}x")


def test_gpu_cheats_still_caught() -> None:
    p = load_problem("softmax")
    src = p.candidate_source.replace("return out.view(x.shape)", "return torch.softmax(x, dim=-1)")
    out = evaluate("verify", p.reference_source, src, devices=["0"], timeout_s=300, run_rejected=True)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags
    assert any("aten._softmax" in m for m in out.messages)


def test_gpu_hang_times_out(sandboxes: SandboxLog) -> None:
    p = load_problem("softmax")
    src = p.candidate_source.replace("return out.view(x.shape)", "while True:\n            pass")
    out = evaluate("verify", p.reference_source, src, devices=["0"], timeout_s=60)
    assert out.outcome == "timeout"


# ---- the CUDA paths under attack ----------------------------------------------------------

# A deliberately slow but correct kernel (the row is recomputed REPEAT times), so
# its device time is milliseconds while its inputs and outputs stay small.
SLOW = '''
REPEAT = 3000


@triton.jit
def _slow_softmax(x_ptr, out_ptr, n_cols, stride_row, REPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    for _ in range(REPS):
        x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(out_ptr + row * stride_row + cols, e / tl.sum(e, axis=0), mask=mask)
'''
SLOW_LAUNCH = (
    "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
    "        out = torch.empty_like(x2)\n"
    "        _slow_softmax[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), REPS=REPEAT, BLOCK=256)\n"
)

FAKE_EVENTS = '''
import gc


def _fake_events(factor):
    for obj in gc.get_objects():
        if type(obj).__name__ == "_State" and hasattr(obj, "event_cls"):
            real = obj.event_cls

            class _Event(real):
                def elapsed_time(self, end):
                    return real.elapsed_time(self, end) / factor

            obj.event_cls = _Event
            return True
    return False
'''

SIDE_STREAM = '''
_side = torch.cuda.Stream()
'''


def _profile(p: ProblemInfo, src: str, *, run_rejected: bool = False) -> KernelOutcome:
    return evaluate("profile", p.reference_source, src, devices=["0"], trials=1, runs=20, warmup=2,
                    timeout_s=300, run_rejected=run_rejected)


def test_gpu_slow_honest_kernel_agrees_with_the_clock(sandboxes: SandboxLog) -> None:
    p = load_problem("softmax")
    out = _profile(p, hostile(p, SLOW_LAUNCH + "        return out.view(x.shape)\n", header=SLOW))
    assert out.outcome == "pass", (out.error, out.messages)
    t = out.timings
    assert t is not None and t.candidate_wall_ms is not None
    assert t.candidate_ms > 1.0 and t.candidate_wall_ms >= t.candidate_ms
    print(f"slow honest: events {t.candidate_ms:.3f} ms, trusted clock {t.candidate_wall_ms:.3f} ms")


@pytest.mark.parametrize("factor", [5, 50])
def test_gpu_faked_device_events_are_caught(sandboxes: SandboxLog, factor: int) -> None:
    p = load_problem("softmax")
    src = hostile(p, SLOW_LAUNCH + "        return out.view(x.shape)\n", header=SLOW + FAKE_EVENTS,
                  init=f"        assert _fake_events({factor})\n")
    out = _profile(p, src, run_rejected=True)
    assert out.outcome == "rejected" and "timing_mismatch" in out.flags, (out.error, out.messages)
    t = out.timings
    assert t is not None and t.candidate_wall_ms is not None
    print(f"{factor}x lie: claimed {t.candidate_ms:.3f} ms, trusted clock {t.candidate_wall_ms:.3f} ms")


def test_gpu_work_hidden_on_a_side_stream_is_caught(sandboxes: SandboxLog) -> None:
    # The kernel goes to another stream, outside the events on the current one.
    p = load_problem("softmax")
    body = ("        with torch.cuda.stream(_side):\n" + "".join("    " + line + "\n" for line in SLOW_LAUNCH.splitlines())
            + "        return out.view(x.shape)\n")
    out = _profile(p, hostile(p, body, header=SLOW + SIDE_STREAM), run_rejected=True)
    assert out.outcome == "rejected", (out.error, out.messages)
    # Best effort (the stream hook) and structural (the clock) both see it.
    assert "streams_or_threads" in out.flags and "timing_mismatch" in out.flags, out.messages
    print("side stream:", out.flags, out.timings)


def test_gpu_skipped_synchronize_is_caught(sandboxes: SandboxLog) -> None:
    # The runner's synchronize is replaced by a no-op: the end event is recorded
    # before the kernel finishes, or the output is read half-written.
    p = load_problem("softmax")
    header = SLOW + '''
import gc


def _no_sync():
    for obj in gc.get_objects():
        if type(obj).__name__ == "_State" and hasattr(obj, "sync"):
            obj.sync = lambda *a: None
            return True
    return False
'''
    src = hostile(p, SLOW_LAUNCH + "        return out.view(x.shape)\n", header=header,
                  init="        assert _no_sync()\n")
    out = _profile(p, src, run_rejected=True)
    # Either the events are read before they completed (an error in its own
    # process), or the time they show disagrees with the trusted clock.
    assert out.outcome == "runtime_error" or "timing_mismatch" in out.flags, (out.error, out.messages)
    print("no sync:", out.outcome, out.flags, out.error)
