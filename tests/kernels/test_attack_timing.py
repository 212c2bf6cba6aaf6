"""Attack family: timing lies.

The trusted evaluator measures each timed run itself (wall clock, and on the
CPU the sandbox's CPU time from the kernel) and checks the candidate's own
figure against it; timed inputs are made after the candidate was built, from
a seed it never sees, fresh per run, and every timed output is re-checked.
Each test also checks that nothing of the sandbox survives it.
"""

from __future__ import annotations

import pytest

from agents.kernels import timing
from agents.kernels.library import ProblemInfo

from .conftest import HONEST, LAUNCH, SandboxLog, hostile, run

RUN = {"run_rejected": True}

FAKE_CLOCK = '''
import gc


def _slow_down_their_clock(factor):
    real = None
    for obj in gc.get_objects():
        if type(obj).__name__ == "_State" and hasattr(obj, "perf_counter"):
            real = obj.perf_counter
            obj.perf_counter = lambda: real() / factor
    return real is not None
'''


@pytest.mark.parametrize("factor", [5, 50])
def test_a_replaced_clock_is_caught(softmax: ProblemInfo, sandboxes: SandboxLog, factor: int) -> None:
    init = f"        assert _slow_down_their_clock({factor})\n"
    out = run(softmax, hostile(softmax, HONEST, header=FAKE_CLOCK, init=init), kind="profile", trials=1, **RUN)
    assert out.outcome == "rejected" and "timing_mismatch" in out.flags, (
        out.outcome, out.flags, out.error, out.messages, out.timings)
    assert "value_mismatch" not in out.flags  # its outputs were right: only its clock lied
    t = out.timings
    assert t is not None and t.candidate_wall_ms is not None
    assert t.candidate_ms < t.candidate_wall_ms / 3  # what it claimed, beside what was seen
    assert any(m.startswith("timing: the candidate reported a median") for m in out.messages)


LAZY = '''
class _Lazy(torch.Tensor):
    """Looks done; does its work when someone detaches it (as a checker would)."""

    def detach(self):
        return torch.softmax(self.as_subclass(torch.Tensor), -1)
'''


def test_a_lazy_output_is_not_a_tensor(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    body = LAUNCH + "        return x.clone().as_subclass(_Lazy)\n"
    out = run(softmax, hostile(softmax, body, header=LAZY), kind="profile", trials=1)
    assert out.outcome == "mismatch" and out.flags == ["type_mismatch"] and out.timings is None
    assert any("expected a tensor, got _Lazy" in m for m in out.messages)


PRECOMPUTE = '''
@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


class _Calls:
    n = 0


_CALLS = _Calls()


def _guess_outputs():
    # The inputs it expects the timed runs to get: get_inputs() under the seeds an
    # evaluator that derives them from the job's seed would use.
    outs = []
    for seed in [100_000 + i for i in range(3)] + list(range(8)):
        torch.manual_seed(seed)
        outs.append(torch.softmax(torch.randn(32, 200) * 4.0, -1))
    return outs
'''


def test_precomputed_timed_runs_do_not_match(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Honest for the trial and the warm-up, then answers from its precomputed table.
    body = (LAUNCH + "        _CALLS.n += 1\n"
            "        if _CALLS.n > 2:\n"
            "            src = self.table[(_CALLS.n - 3) % len(self.table)]\n"
            "            _copy[(triton.cdiv(out.numel(), 1024),)](src, out, out.numel(), BLOCK=1024)\n"
            "        return out.view(x.shape)\n")
    init = "        self.table = _guess_outputs()\n"
    src = hostile(softmax, body, header=PRECOMPUTE, init=init)
    out = run(softmax, src, kind="profile", trials=1)
    assert out.isolation == "namespaces" and out.flags == ["value_mismatch"]  # ran by default
    assert out.outcome == "mismatch" and out.timings is None
    assert any(m.startswith("timed run 0:") for m in out.messages)


# ---- the rule itself, on figures ------------------------------------------------------------


def test_timing_rule_accepts_honest_overheads_and_refuses_lies() -> None:
    honest = [timing.TimedRun(claimed_ms=50.0, wall_ms=52.5, nbytes=50_000, cpu_ms=51.0)] * 3
    assert timing.disagreement(honest, "cpu") is None
    # A loaded host: the wall clock balloons, the CPU time does not.
    loaded = [timing.TimedRun(claimed_ms=50.0, wall_ms=140.0, nbytes=50_000, cpu_ms=51.5)] * 3
    assert timing.disagreement(loaded, "cpu") is None
    tiny_gpu = [timing.TimedRun(claimed_ms=0.004, wall_ms=0.35, nbytes=25_600)] * 100
    assert timing.disagreement(tiny_gpu, "cuda") is None
    five_x = [timing.TimedRun(claimed_ms=10.0, wall_ms=52.0, nbytes=50_000, cpu_ms=51.0)] * 3
    assert "no less than" in (timing.disagreement(five_x, "cpu") or "")
    gpu_lie = [timing.TimedRun(claimed_ms=0.2, wall_ms=3.1, nbytes=25_600)] * 100
    assert timing.disagreement(gpu_lie, "cuda") is not None
    too_long = [timing.TimedRun(claimed_ms=80.0, wall_ms=52.0, nbytes=0, cpu_ms=51.0)]
    assert "more than the" in (timing.disagreement(too_long, "cpu") or "")
    nan = [timing.TimedRun(claimed_ms=float("nan"), wall_ms=52.0, nbytes=0)]
    assert timing.disagreement(nan, "cpu") is not None
