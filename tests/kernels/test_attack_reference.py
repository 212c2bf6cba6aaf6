"""Attack family: getting the reference's answer instead of computing it.

Structural: the reference model, its outputs and the problem's source exist
only in the trusted evaluator. Best effort: computing the op with numpy, with
torch under a disabled op log, or only when not observed, is caught by the
candidate-side guards (which these tests show holding). Each test also checks
that nothing of the sandbox survives it.
"""

from __future__ import annotations

import secrets

from agents.kernels.evaluate import evaluate
from agents.kernels.library import ProblemInfo

from .conftest import LAUNCH, SandboxLog, hostile, run

RUN = {"run_rejected": True}

HUNT_OUTPUT = '''
import gc
import sys


def _hunt(x, answer):
    frames = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            frames += 1
            for value in list(frame.f_locals.values()):
                if type(value).__name__ in ("Model", "Evaluation"):
                    raise RuntimeError("found the reference in a frame")
            frame = frame.f_back
    # Any tensor holding the right answer, other than the one its own kernel made.
    found = [o for o in gc.get_objects()
             if isinstance(o, torch.Tensor) and o is not answer and o.shape == answer.shape
             and o.dtype == answer.dtype and torch.equal(o, answer)]
    models = [o for o in gc.get_objects() if type(o).__name__ == "Model"]
    raise RuntimeError(f"HUNT frames={frames} answers={len(found)} models={len(models)}")
'''


def test_reference_output_and_model_are_not_in_the_process(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    out = run(softmax, hostile(softmax, LAUNCH + "        _hunt(x, out)\n", header=HUNT_OUTPUT), **RUN)
    assert out.outcome == "runtime_error"
    err = out.error or ""
    assert "HUNT frames=" in err and "answers=0 models=0" in err


FIND_PROBLEM = '''
import os


def _find(marker):
    matches, scanned = [], 0
    for root in ("/", ):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames
                           if os.path.join(dirpath, d) not in ("/proc", "/sys", "/dev", "/usr", "/root")]
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.path.getsize(path) < (4 << 20):
                        scanned += 1
                        if marker.encode() in open(path, "rb").read():
                            matches.append(path)
                except OSError:
                    pass
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        for name in ("environ", "cmdline"):
            try:
                if marker.encode() in open(f"/proc/{pid}/{name}", "rb").read():
                    matches.append(f"/proc/{pid}/{name}")
            except OSError:
                pass
    import sys
    loaded = [m for m in sys.modules if m in ("jetfleet_reference", "reference_problem", "reference")]
    raise RuntimeError(f"FIND scanned={scanned} matches={len(matches)} modules={loaded}")
'''


def test_problem_source_is_not_readable(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    token = secrets.token_hex(8)
    reference = softmax.reference_source.replace(
        '"""Softmax over the last dimension."""', f'"""Softmax over the last dimension. problem-{token}"""')
    assert token in reference
    # The marker is assembled at run time, so the candidate's own file does not hold it.
    body = LAUNCH + f"        _find('problem-' + {token[:8]!r} + {token[8:]!r})\n"
    out = evaluate("verify", reference, hostile(softmax, body, header=FIND_PROBLEM), trials=1,
                   timeout_s=60, memory_mb=2048, run_rejected=True)
    assert out.outcome == "runtime_error"
    err = out.error or ""
    assert "matches=0" in err and "modules=[]" in err
    assert int(err.split("scanned=")[1].split()[0]) > 0  # it did look


NUMPY = '''
def _host(x):
    # numpy reached without naming it, then brought back into torch.
    a = getattr(x, "num" + "py")()
    m = a.max(axis=-1, keepdims=True)
    e = (a - m)
    import math
    flat = [[math.exp(v) for v in row] for row in e.tolist()]
    s = [sum(row) for row in flat]
    return torch.tensor([[v / t for v in row] for row, t in zip(flat, s)])
'''


def test_numpy_fallback_is_found(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    out = run(softmax, hostile(softmax, LAUNCH + "        return _host(x)\n", header=NUMPY), **RUN)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags
    assert "value_mismatch" not in out.flags  # it did compute the right answer
    assert any(m.startswith("torch_fallback: forward moved a tensor to host code") for m in out.messages)


DISABLED_LOG = '''
import importlib

_modes = importlib.import_module("torch.utils." + "_python_dispatch")


def _quiet_softmax(x):
    op = getattr(torch, "soft" + "max")
    with getattr(_modes, "_disable_" + "current_modes")():
        return op(x, -1)
'''


def test_torch_under_a_disabled_op_log_is_found(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    out = run(softmax, hostile(softmax, LAUNCH + "        return _quiet_softmax(x)\n", header=DISABLED_LOG), **RUN)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags
    assert any("turned the op log off (_disable_current_modes)" in m for m in out.messages)


UNOBSERVED = '''
class _Count:
    n = 0


_COUNT = _Count()
'''


def test_torch_only_in_the_timed_runs_is_found(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Honest while verified (1 trial, 1 warm-up), torch once timing starts: on the
    # CPU the op log watches the timed runs too.
    body = (LAUNCH + "        _COUNT.n += 1\n"
            "        if _COUNT.n > 2:\n            return self.fn(x, -1)\n"
            "        return out.view(x.shape)\n")
    init = "        self.fn = torch.softmax\n"
    src = hostile(softmax, body, header=UNOBSERVED, init=init)
    out = run(softmax, src, kind="profile", trials=1, **RUN)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags
    assert any("forward ran torch compute ops: aten._softmax" in m for m in out.messages)
