"""Attack family: switching the checks off.

The checks that decide live in the trusted evaluator, out of the candidate's
reach: clearing the candidate-side guard, patching torch's comparison
functions or answering them from a tensor subclass changes nothing about how
the evaluator compares the bytes it received. Each test also checks that
nothing of the sandbox survives it.
"""

from __future__ import annotations

from agents.kernels.library import ProblemInfo

from .conftest import SandboxLog, hostile, run

RUN = {"run_rejected": True}

# The real kernel told the rows are one column shorter: wrong values, no torch compute.
WRONG_LAUNCH = (
    "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
    "        out = torch.empty_like(x2)\n"
    "        _softmax_kernel[(x2.shape[0],)](x2, out, x2.shape[1] - 1, x2.stride(0), BLOCK=BLOCK_SIZE)\n"
)

SWITCH_OFF = '''
import gc


def _switch_off():
    cleared = 0
    for obj in gc.get_objects():
        if type(obj).__name__ == "Guard" and hasattr(obj, "findings"):
            obj.findings.clear()
            obj._snapshot.clear()
            obj._keys.clear()
            obj.flag = lambda *a, **k: None
            cleared += 1
    torch.equal = lambda *a, **k: True
    torch.allclose = lambda *a, **k: True
    torch.isclose = lambda a, b, *r, **k: torch.ones_like(a, dtype=torch.bool)
    return cleared
'''


def test_cleared_guard_and_patched_comparison_change_nothing(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    body = WRONG_LAUNCH + "        assert _switch_off() == 1\n        return out.view(x.shape)\n"
    out = run(softmax, hostile(softmax, body, header=SWITCH_OFF), **RUN)
    # The static findings reject it; what matters here is that the comparison still ran, and saw.
    assert out.outcome == "rejected" and "value_mismatch" in out.flags
    assert out.max_abs_error is not None and out.max_abs_error > 1e-3
    assert any("elements outside tolerance" in m for m in out.messages)


LIAR = '''
class _Liar(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("equal", "allclose"):
            return True
        if name in ("all", "any"):
            return torch.tensor(True)
        if name in ("sub", "abs", "max"):
            return torch.zeros(())
        plain = [a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args]
        return func(*plain, **(kwargs or {}))
'''


def test_tensor_subclass_answering_the_checker_is_not_a_tensor(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Uninitialised memory wrapped in a subclass that says "equal" to everything.
    body = WRONG_LAUNCH + "        return torch.empty_like(x).as_subclass(_Liar)\n"
    src = hostile(softmax, body, header=LIAR)
    out = run(softmax, src)
    assert out.isolation == "namespaces"  # nothing static: it ran by default
    assert out.outcome == "mismatch" and out.flags == ["type_mismatch"]
    assert any("expected a tensor, got _Liar" in m for m in out.messages)


ADDED_METHODS = '''
def _add_methods():
    # Inherited from the C base class, so not in torch.Tensor's own namespace.
    torch.Tensor.equal = lambda a, b: True
    torch.Tensor.sub = lambda a, b, **k: torch.zeros_like(a)
    torch.Tensor.all = lambda a, *r, **k: torch.tensor(True)
'''


def test_methods_added_to_the_tensor_class_change_nothing(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    body = WRONG_LAUNCH + "        _add_methods()\n        return out.view(x.shape)\n"
    out = run(softmax, hostile(softmax, body, header=ADDED_METHODS), **RUN)
    assert out.outcome == "rejected" and "value_mismatch" in out.flags
    # The candidate-side guard noticed too (best effort, and here it held).
    assert any("Tensor.equal (added)" in m for m in out.messages)
