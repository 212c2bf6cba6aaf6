"""Output comparison for kernel verification (trusted side; imports torch).

Runs in the trusted evaluator on tensors it built itself from the bytes the
candidate's process sent (agents.kernels.wire): plain, dense tensors of a
declared dtype and shape, whatever the candidate returned.

Tolerance is scale-aware: an element passes when

    |cand - ref| <= atol * scale + rtol * |ref|

where `scale` is the largest finite |ref| of that output (or 1 when the
reference is all zero). Scaling atol by the output's magnitude keeps one
tolerance meaningful for outputs of size 1e-6 (where a plain atol would let an
all-zero candidate pass) and of size 1e3 (where fp32 rounding of long sums is
legitimately larger than 1e-4). NaN and +/-Inf must sit at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) by the reference output's dtype: 1e-2 for fp16/bf16, else 1e-4."""
    if dtype in LOW_PRECISION:
        return 1e-2, 1e-2
    return 1e-4, 1e-4


@dataclass(frozen=True)
class Foreign:
    """An output leaf that was not exactly a torch.Tensor in the candidate's process."""

    type_name: str


@dataclass
class Comparison:
    matched: bool
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float = 0.0
    flags: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def flatten_outputs(out: Any) -> list[Any]:
    """Outputs as a flat list: a tensor, or the leaves of nested tuples/lists."""
    if isinstance(out, (tuple, list)):
        flat: list[Any] = []
        for item in out:
            flat.extend(flatten_outputs(item))
        return flat
    return [out]


def _is_constant(t: torch.Tensor) -> bool:
    if t.numel() < 2:
        return False
    flat = t.reshape(-1)
    return bool(torch.all(flat == flat[0]).item())


def _compare_tensor(
    ref: torch.Tensor, cand: Any, atol: float | None, rtol: float | None, where: str
) -> Comparison:
    if not isinstance(cand, torch.Tensor):
        got = cand.type_name if isinstance(cand, Foreign) else type(cand).__name__
        return Comparison(False, flags=["type_mismatch"], messages=[f"{where}: expected a tensor, got {got}"])
    if tuple(cand.shape) != tuple(ref.shape):
        return Comparison(
            False,
            flags=["shape_mismatch"],
            messages=[f"{where}: shape {tuple(cand.shape)} != reference {tuple(ref.shape)}"],
        )
    res = Comparison(True)
    if cand.dtype != ref.dtype:
        res.matched = False
        res.flags.append("dtype_mismatch")
        res.messages.append(f"{where}: dtype {cand.dtype} != reference {ref.dtype}")
    d_atol, d_rtol = default_tolerances(ref.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    r = ref.detach().to(dtype=torch.float64)
    c = cand.detach().to(device=ref.device, dtype=torch.float64)
    for name, fn in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        if not torch.equal(fn(r), fn(c)):
            res.matched = False
            res.flags.append("nonfinite_mismatch")
            res.messages.append(f"{where}: {name} positions differ from the reference")
    finite = torch.isfinite(r) & torch.isfinite(c)
    if bool(finite.any().item()):
        rf, cf = r[finite], c[finite]
        scale = float(rf.abs().max().item())
        atol_eff = atol * (scale if scale > 0.0 else 1.0)
        err = (cf - rf).abs()
        res.max_abs = float(err.max().item())
        res.mean_abs = float(err.mean().item())
        res.max_rel = float((err / (rf.abs() + atol_eff)).max().item())
        bad = err > atol_eff + rtol * rf.abs()
        n_bad = int(bad.sum().item())
        if n_bad:
            res.matched = False
            res.flags.append("value_mismatch")
            res.messages.append(
                f"{where}: {n_bad}/{rf.numel()} elements outside tolerance "
                f"(max abs {res.max_abs:.3g}, atol {atol:g} x scale {scale:.3g}, rtol {rtol:g})"
            )
    # An all-zero or constant output can slip through loose tolerances; call it
    # out whenever the reference varies.
    if _is_constant(c) and not _is_constant(r):
        res.matched = False
        res.flags.append("constant_output")
        res.messages.append(f"{where}: candidate output is constant while the reference varies")
    return res


def compare_outputs(ref_out: Any, cand_out: Any, atol: float | None, rtol: float | None) -> Comparison:
    """Compare (possibly nested) outputs; errors are the worst over all tensors."""
    refs, cands = flatten_outputs(ref_out), flatten_outputs(cand_out)
    if len(refs) != len(cands):
        return Comparison(
            False,
            flags=["shape_mismatch"],
            messages=[f"candidate returned {len(cands)} outputs, reference {len(refs)}"],
        )
    total = Comparison(True)
    means: list[float] = []
    for i, (r, c) in enumerate(zip(refs, cands, strict=True)):
        where = f"output[{i}]" if len(refs) > 1 else "output"
        if isinstance(r, torch.Tensor):
            part = _compare_tensor(r, c, atol, rtol, where)
        elif not isinstance(c, torch.Tensor | Foreign) and r == c:
            part = Comparison(True)
        else:
            part = Comparison(False, flags=["value_mismatch"], messages=[f"{where}: {c!r} != {r!r}"])
        total.matched = total.matched and part.matched
        total.max_abs = max(total.max_abs, part.max_abs)
        total.max_rel = max(total.max_rel, part.max_rel)
        means.append(part.mean_abs)
        total.flags.extend(f for f in part.flags if f not in total.flags)
        total.messages.extend(part.messages)
    total.mean_abs = sum(means) / len(means) if means else 0.0
    return total
