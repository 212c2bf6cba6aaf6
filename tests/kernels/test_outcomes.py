"""Wrong and cheating candidates each get their one right outcome."""

from __future__ import annotations

import pytest

from agents.kernels.evaluate import evaluate
from agents.kernels.library import ProblemInfo, load_problem

from .conftest import FAST, LAUNCH, replace_once, run, with_forward

# Candidates the static checks reject run only when asked: these tests ask, so
# the dynamic checks are exercised too.
RUN = {"run_rejected": True}


def test_wrong_values_mismatch(softmax: ProblemInfo) -> None:
    bad = replace_once(softmax.candidate_source, "/ row_sum, mask=mask)", "/ (row_sum * 1.01), mask=mask)")
    out = run(softmax, bad)
    assert out.outcome == "mismatch" and not out.correct
    assert "value_mismatch" in out.flags and out.max_abs_error and out.max_abs_error > 1e-4


def test_wrong_shape_mismatch(softmax: ProblemInfo) -> None:
    bad = replace_once(softmax.candidate_source, "return out.view(x.shape)", "return out.view(x.shape)[:, :-1]")
    out = run(softmax, bad)
    assert out.outcome == "mismatch" and "shape_mismatch" in out.flags


def test_torch_fallback_rejected(softmax: ProblemInfo) -> None:
    out = run(softmax, with_forward(softmax, LAUNCH + "        return torch.softmax(x, dim=-1)\n"), **RUN)
    assert out.outcome == "rejected" and "torch_fallback" in out.flags
    # Both the static and the dynamic (aten dispatch) check saw it.
    assert any(m.startswith("static: torch_fallback") for m in out.messages)
    assert any("aten._softmax" in m for m in out.messages)


def test_dynamic_fallback_rejected_when_static_check_is_blind(softmax: ProblemInfo) -> None:
    # `x - ...` arithmetic is invisible to the AST check; the dispatcher sees aten ops.
    body = LAUNCH + "        return out.view(x.shape) + x * 0.0\n"
    out = run(softmax, with_forward(softmax, body))
    assert out.isolation == "namespaces"
    assert out.outcome == "rejected" and out.flags == ["torch_fallback"]
    assert not any(m.startswith("static:") for m in out.messages)
    assert any("aten.add" in m and "aten.mul" in m for m in out.messages)


def test_oversized_output_is_not_read(softmax: ProblemInfo) -> None:
    # 40 MB where the reference's output has 25 KB: refused from the header alone.
    out = run(softmax, with_forward(softmax, LAUNCH + "        return torch.empty(10**7)\n"))
    assert out.outcome == "mismatch" and out.flags == ["shape_mismatch"]
    assert any("more data than the reference's output holds" in m for m in out.messages)


def test_no_kernel_defined_rejected(softmax: ProblemInfo) -> None:
    ref = softmax.reference_source.replace("class Model(", "class ModelNew(")
    out = run(softmax, ref.split("\n\ndef get_inputs")[0] + "\n", **RUN)
    assert out.outcome == "rejected" and "no_triton_kernel" in out.flags
    assert any(m.startswith("no_triton_kernel: forward returned without") for m in out.messages)


def test_kernel_never_launched_rejected(softmax: ProblemInfo) -> None:
    # The static check sees a launch; only the launch hook notices it never runs.
    body = (
        "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
        "        out = torch.empty_like(x2)\n"
        "        if x2.shape[0] < 0:\n"
        "            _softmax_kernel[(1,)](x2, out, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
        "        return out.view(x.shape)\n"
    )
    out = run(softmax, with_forward(softmax, body))
    assert out.outcome == "rejected" and "no_triton_kernel" in out.flags
    assert not any(m.startswith("static:") for m in out.messages)


def test_all_zero_output_mismatch(softmax: ProblemInfo) -> None:
    out = run(softmax, with_forward(softmax, LAUNCH + "        return torch.zeros_like(x)\n"))
    assert out.outcome == "mismatch" and "constant_output" in out.flags


def test_tiny_reference_zeros_still_mismatch() -> None:
    # Outputs ~1e-6: a plain atol=1e-4 would pass all zeros; the scale-aware one does not.
    p = load_problem("scale_clamp")
    ref = p.reference_source.replace("return [0.5, -2.0, 3.0]", "return [1e-6, -2.0, 3.0]")
    cand = replace_once(p.candidate_source, "y = tl.minimum(tl.maximum(x * scale, lo), hi)", "y = x * 0.0")
    out = evaluate("verify", ref, cand, trials=1, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "mismatch", out.messages


def test_input_mutation_rejected(softmax: ProblemInfo) -> None:
    body = LAUNCH + "        x.zero_()\n        return out.view(x.shape)\n"
    out = run(softmax, with_forward(softmax, body), **RUN)
    assert out.outcome == "rejected" and "mutates_inputs" in out.flags


def test_output_caching_rejected(softmax: ProblemInfo) -> None:
    body = (
        "        if getattr(self, 'cached', None) is None:\n"
        "            x2 = x.contiguous().view(-1, x.shape[-1])\n"
        "            self.cached = torch.empty_like(x2)\n"
        "            _softmax_kernel[(x2.shape[0],)](x2, self.cached, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
        "        return self.cached.view(x.shape)\n"
    )
    out = run(softmax, with_forward(softmax, body), **RUN)
    assert out.outcome == "rejected"
    assert "output_caching" in out.flags and "no_triton_kernel" in out.flags


def test_reference_is_not_in_the_candidates_process(softmax: ProblemInfo) -> None:
    # It used to find the live reference instance with gc; the reference now
    # lives only in the trusted evaluator, so there is nothing to find.
    header = "import gc\n"
    body = LAUNCH + (
        "        refs = [o for o in gc.get_objects() if type(o).__name__ == 'Mo' + 'del']\n"
        "        raise RuntimeError(f'found {len(refs)} reference models')\n"
    )
    src = with_forward(softmax, body, header=header)
    out = run(softmax, src, **RUN)
    assert out.outcome == "runtime_error" and "found 0 reference models" in (out.error or "")
    # By default the static checks stop it before it runs.
    quiet = run(softmax, src)
    assert quiet.outcome == "rejected" and "unsafe_import" in quiet.flags and quiet.isolation == "none"


def test_timer_patching_rejected(softmax: ProblemInfo) -> None:
    body = LAUNCH + "        torch.cuda.synchronize = lambda *a: None\n        return out.view(x.shape)\n"
    out = run(softmax, with_forward(softmax, body), **RUN)
    assert out.outcome == "rejected" and "timer_tampering" in out.flags
    assert any("candidate replaced" in m for m in out.messages)


def test_thread_rejected(softmax: ProblemInfo) -> None:
    header = "import threading\n"
    body = LAUNCH + "        threading.Thread(target=lambda: None).start()\n        return out.view(x.shape)\n"
    out = run(softmax, with_forward(softmax, body, header=header), **RUN)
    assert out.outcome == "rejected" and "streams_or_threads" in out.flags
    assert any("candidate started thread" in m for m in out.messages)


def test_syntax_error_is_compile_error(softmax: ProblemInfo) -> None:
    out = run(softmax, softmax.candidate_source.replace("def forward(self", "def forward(self,,"))
    assert out.outcome == "compile_error" and "SyntaxError" in (out.error or "")


def test_missing_model_new_is_compile_error(softmax: ProblemInfo) -> None:
    out = run(softmax, softmax.candidate_source.replace("class ModelNew(", "class Other("))
    assert out.outcome == "compile_error" and "ModelNew" in (out.error or "")


def test_exception_in_forward_is_runtime_error(softmax: ProblemInfo) -> None:
    bad = replace_once(softmax.candidate_source, "x2.stride(0), BLOCK=", "BLOCK=")
    out = run(softmax, bad)
    assert out.outcome == "runtime_error" and out.traceback


def test_broken_reference_reported(softmax: ProblemInfo) -> None:
    out = evaluate("verify", "import torch\n", softmax.candidate_source, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "runtime_error" and "reference_error" in out.flags


@pytest.mark.parametrize("kind", ["verify", "profile"])
def test_rejected_without_running(softmax: ProblemInfo, kind: str) -> None:
    src = with_forward(softmax, "        return torch.softmax(x, dim=-1)\n")
    out = evaluate(kind, softmax.reference_source, src)  # type: ignore[arg-type]
    assert out.outcome == "rejected" and out.wall_s == 0.0 and out.trials == 0
    assert out.isolation == "none" and "torch_fallback" in out.flags
