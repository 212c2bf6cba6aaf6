"""The evaluation child: `python -m agents.kernels.child <request.json> <result.json>`.

Runs inside the sandbox (agents.kernels.sandbox) with the problem and the
candidate as files in its working directory. It never raises: every failure
becomes a ChildReport. A process that dies before writing one (segfault,
os._exit, watchdog kill) is classified by the parent from its exit status.

Exit is always `os._exit`: a candidate may leave non-daemon threads or a broken
CUDA context behind, and this process is discarded after one evaluation anyway.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agents.kernels.protocol import (
    CANDIDATE_FILE,
    REFERENCE_FILE,
    ChildReport,
    ChildStatus,
    EvalRequest,
)
from schemas.kernels import KernelTimings

if TYPE_CHECKING:
    import torch

    from agents.kernels.compare import Comparison
    from agents.kernels.guards import Guard

ERROR_CHARS = 2000
TRACEBACK_CHARS = 6000
MAX_MESSAGES = 40
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


class _Failure(Exception):
    """A classified failure: which side failed and the original exception."""

    def __init__(self, status: ChildStatus, exc: BaseException, tb: str) -> None:
        super().__init__(str(exc))
        self.status = status
        self.exc = exc
        self.tb = tb


def _is_compile_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(cls.__name__ == "CompilationError" for cls in type(cur).__mro__):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def _candidate_failure(exc: BaseException) -> _Failure:
    status: ChildStatus = "compile_error" if _is_compile_error(exc) else "runtime_error"
    return _Failure(status, exc, traceback.format_exc())


def _load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _isolate_sys_path(cwd: Path) -> None:
    # `python -m` puts the cwd first on sys.path; drop it so the candidate cannot
    # `import reference_problem` and get an unwrapped copy of the reference.
    here = str(cwd)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]


def _percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class _Ctx:
    req: EvalRequest
    device: torch.device
    interpreted: bool
    guard: Guard
    ref_mod: types.ModuleType
    ref_model: Any
    cand_model: Any
    messages: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    prev_cand_out: list[Any] = field(default_factory=list)
    # Originals captured before the candidate is loaded: it cannot swap our clock.
    sync: Any = None
    event_cls: Any = None
    perf_counter: Any = None
    l2_buffer: Any = None


def _to_device(ctx: _Ctx, items: list[Any]) -> list[Any]:
    import torch

    return [x.to(ctx.device) if isinstance(x, torch.Tensor) else x for x in items]


def _clone(items: list[Any]) -> list[Any]:
    import torch

    return [x.clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x) for x in items]


def _sync(ctx: _Ctx) -> None:
    if ctx.device.type == "cuda":
        ctx.sync()


def _fresh_inputs(ctx: _Ctx, seed: int) -> list[Any]:
    import torch

    torch.manual_seed(seed)
    try:
        return _to_device(ctx, list(ctx.ref_mod.get_inputs()))
    except BaseException as exc:
        raise _Failure("reference_error", exc, traceback.format_exc()) from exc


def _run_reference(ctx: _Ctx, args: list[Any]) -> Any:
    import torch

    try:
        with torch.no_grad():
            out = ctx.ref_model(*args)
        _sync(ctx)
        return out
    except BaseException as exc:
        raise _Failure("reference_error", exc, traceback.format_exc()) from exc


def _check_caching(ctx: _Ctx, out: Any) -> None:
    import torch

    from agents.kernels.compare import flatten_outputs

    new = [t for t in flatten_outputs(out) if isinstance(t, torch.Tensor) and t.numel() > 0]
    # The previous outputs are still referenced, so their memory cannot have been
    # reused: sharing an object or a data pointer means a cached/reused result.
    for t in new:
        for p in ctx.prev_cand_out:
            if t is p or t.data_ptr() == p.data_ptr():
                ctx.guard.flag("output_caching", "forward returned the same output storage twice")
    ctx.prev_cand_out = new


def _run_candidate(ctx: _Ctx, args: list[Any], *, record_ops: bool, timed: bool = False) -> tuple[Any, float]:
    """One guarded candidate forward; returns (output, milliseconds if timed)."""
    import torch

    ms = 0.0
    try:
        with ctx.guard.candidate_call(record_ops) as rec, torch.no_grad():
            if timed:
                out, ms = _timed(ctx, ctx.cand_model, args)
            else:
                out = ctx.cand_model(*args)
                _sync(ctx)
    except _Failure:
        raise
    except BaseException as exc:
        raise _candidate_failure(exc) from exc
    ctx.guard.judge(rec, check_ops=record_ops)
    _check_caching(ctx, out)
    return out, ms


def _timed(ctx: _Ctx, model: Any, args: list[Any]) -> tuple[Any, float]:
    if ctx.device.type == "cuda":
        ctx.l2_buffer.zero_()
        start = ctx.event_cls(enable_timing=True)
        end = ctx.event_cls(enable_timing=True)
        start.record()
        out = model(*args)
        end.record()
        ctx.sync()
        return out, float(start.elapsed_time(end))
    t0 = ctx.perf_counter()
    out = model(*args)
    return out, (ctx.perf_counter() - t0) * 1000.0


def _timed_reference(ctx: _Ctx, args: list[Any]) -> tuple[Any, float]:
    import torch

    try:
        with torch.no_grad():
            return _timed(ctx, ctx.ref_model, args)
    except BaseException as exc:
        raise _Failure("reference_error", exc, traceback.format_exc()) from exc


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    means: list[float] = field(default_factory=list)
    trials: int = 0

    def add(self, cmp: Comparison) -> None:
        self.max_abs = max(self.max_abs, cmp.max_abs)
        self.max_rel = max(self.max_rel, cmp.max_rel)
        self.means.append(cmp.mean_abs)
        self.trials += 1


def _note(ctx: _Ctx, cmp: Comparison, label: str) -> None:
    ctx.flags.update(cmp.flags)
    for msg in cmp.messages:
        ctx.messages.append(f"{label}: {msg}")


def _one_trial(ctx: _Ctx, seed: int, errors: _Errors, label: str) -> bool:
    from agents.kernels.compare import compare_outputs, inputs_equal

    inputs = _fresh_inputs(ctx, seed)
    pristine = _clone(inputs)
    ref_in, cand_in = _clone(inputs), _clone(inputs)
    # Reference first, on its own clone; its output stays alive while the
    # candidate runs so the candidate cannot pick it up from freed memory.
    ref_out = _run_reference(ctx, ref_in)
    cand_out, _ = _run_candidate(ctx, cand_in, record_ops=True)
    if not inputs_equal(cand_in, pristine):
        ctx.guard.flag("mutates_inputs", "candidate modified its input tensors")
    cmp = compare_outputs(ref_out, cand_out, ctx.req.atol, ctx.req.rtol)
    errors.add(cmp)
    _note(ctx, cmp, label)
    return cmp.matched


def _verify(ctx: _Ctx, errors: _Errors) -> bool:
    for t in range(max(1, ctx.req.trials)):
        if not _one_trial(ctx, ctx.req.seed + t, errors, f"trial {t}"):
            return False
    return True


def _profile(ctx: _Ctx, errors: _Errors) -> KernelTimings | None:
    import torch

    from agents.kernels.compare import compare_outputs

    if not _verify(ctx, errors):
        return None
    if ctx.device.type == "cuda":
        # Writing this buffer before each timed run evicts the L2 cache.
        ctx.l2_buffer = torch.empty(
            ctx.req.l2_flush_mb * 1024 * 1024 // 4, dtype=torch.int32, device=ctx.device
        )
    warm_in = _fresh_inputs(ctx, ctx.req.seed)
    for _ in range(ctx.req.warmup):
        _run_reference(ctx, _clone(warm_in))
        _run_candidate(ctx, _clone(warm_in), record_ops=False)
    cand_ms: list[float] = []
    ref_ms: list[float] = []
    for i in range(ctx.req.runs):
        # Fresh inputs per timed run: a result cached by data_ptr goes stale and
        # the re-check below catches it.
        inputs = _fresh_inputs(ctx, ctx.req.seed + 100_000 + i)
        ref_in, cand_in = _clone(inputs), _clone(inputs)
        if i % 2 == 0:  # alternate order so neither side always runs on a warm cache
            ref_out, r = _timed_reference(ctx, ref_in)
            cand_out, c = _run_candidate(ctx, cand_in, record_ops=False, timed=True)
        else:
            cand_out, c = _run_candidate(ctx, cand_in, record_ops=False, timed=True)
            ref_out, r = _timed_reference(ctx, ref_in)
        cand_ms.append(c)
        ref_ms.append(r)
        cmp = compare_outputs(ref_out, cand_out, ctx.req.atol, ctx.req.rtol)
        errors.add(cmp)
        if not cmp.matched:
            _note(ctx, cmp, f"timed run {i}")
            return None
    c_med, r_med = _percentile(cand_ms, 0.5), _percentile(ref_ms, 0.5)
    speedup = r_med / c_med if c_med > 0 else None
    if speedup is not None and speedup > ctx.req.suspicious_speedup:
        ctx.flags.add("suspicious_speedup")
        ctx.messages.append(f"speed-up {speedup:.1f}x exceeds {ctx.req.suspicious_speedup:g}x")
    return KernelTimings(
        candidate_ms=c_med,
        reference_ms=r_med,
        candidate_p10_ms=_percentile(cand_ms, 0.1),
        candidate_p90_ms=_percentile(cand_ms, 0.9),
        reference_p10_ms=_percentile(ref_ms, 0.1),
        reference_p90_ms=_percentile(ref_ms, 0.9),
        runs=len(cand_ms),
        warmup=ctx.req.warmup,
        speedup=speedup,
        method="cuda_events" if ctx.device.type == "cuda" else "perf_counter",
        l2_flush=ctx.device.type == "cuda",
        representative=not ctx.interpreted,
    )


def _error_report(fail: _Failure, base: ChildReport) -> ChildReport:
    exc = fail.exc
    base.status = fail.status
    base.error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    base.traceback = fail.tb[-TRACEBACK_CHARS:]
    if _is_oom(exc):
        base.flags = sorted({*base.flags, "out_of_memory"})
    return base


def _finish(ctx: _Ctx, report: ChildReport) -> ChildReport:
    ctx.guard.check_tampering()
    flags = set(ctx.flags) | set(ctx.guard.findings) | set(report.flags)
    msgs = list(ctx.messages)
    for name in sorted(ctx.guard.findings):
        msgs.extend(f"{name}: {m}" for m in ctx.guard.findings[name])
    report.flags = sorted(flags)
    report.messages = msgs[:MAX_MESSAGES]
    return report


def evaluate_request(req: EvalRequest, cwd: Path) -> ChildReport:
    """Evaluate the files in `cwd` as `req` says; never raises."""
    _isolate_sys_path(cwd)
    warnings.filterwarnings("ignore")
    interpreted = req.device == "cpu"
    base_msgs: list[str] = []
    import torch

    if not interpreted and not torch.cuda.is_available():
        # The jit decorator reads TRITON_INTERPRET when the candidate is loaded.
        os.environ["TRITON_INTERPRET"] = "1"
        interpreted = True
        base_msgs.append("CUDA requested but not available: ran under the Triton interpreter")
    device = torch.device("cpu" if interpreted else "cuda")
    report = ChildReport(status="ok", interpreted=interpreted, device=_device_name(device))
    try:
        import triton  # noqa: F401

        from agents.kernels import compare
        from agents.kernels.guards import Guard
    except BaseException as exc:
        return _error_report(_Failure("runtime_error", exc, traceback.format_exc()), report)

    guard = Guard(str(cwd / CANDIDATE_FILE))
    guard.install_launch_hooks()
    guard.install_thread_hooks()
    guard.install_stream_hooks()
    if not guard.hooks:
        base_msgs.append("could not hook Triton launches; launch check skipped")

    try:
        ref_mod = _load_module(cwd / REFERENCE_FILE, "jetfleet_reference")
        for name in ("Model", "get_inputs", "get_init_inputs"):
            if not hasattr(ref_mod, name):
                raise AttributeError(f"reference problem defines no {name}")
    except BaseException as exc:
        return _error_report(_Failure("reference_error", exc, traceback.format_exc()), report)
    guard.wrap_reference(ref_mod.Model)
    # torch._dynamo rebinds torch.manual_seed when first imported; import it
    # before the snapshot so that is not mistaken for tampering.
    with contextlib.suppress(Exception):
        import torch._dynamo
    guard.snapshot([compare, sys.modules[__name__], msgspec.json, *_triton_classes()])

    ctx = _Ctx(
        req=req, device=device, interpreted=interpreted, guard=guard, ref_mod=ref_mod,
        ref_model=None, cand_model=None, messages=base_msgs,
        sync=torch.cuda.synchronize, event_cls=getattr(torch.cuda, "Event", None),
        perf_counter=__import__("time").perf_counter,
    )
    errors = _Errors()
    try:
        try:
            with guard.candidate_call(record_ops=False):
                cand_mod = _load_module(cwd / CANDIDATE_FILE, "jetfleet_candidate")
            if not isinstance(getattr(cand_mod, "ModelNew", None), type):
                raise AttributeError("candidate defines no class ModelNew")
        except BaseException as exc:
            raise _Failure("compile_error", exc, traceback.format_exc()) from exc
        _build_models(ctx, cand_mod)
        timings = _profile(ctx, errors) if req.kind == "profile" else None
        if req.kind == "verify":
            _verify(ctx, errors)
        report.timings = timings
    except _Failure as fail:
        report = _error_report(fail, report)
    _fill_errors(report, errors, ctx)
    return _finish(ctx, report)


def _fill_errors(report: ChildReport, errors: _Errors, ctx: _Ctx) -> None:
    report.trials = errors.trials
    if errors.trials:
        report.max_abs_error = errors.max_abs
        report.max_rel_error = errors.max_rel
        report.mean_abs_error = sum(errors.means) / len(errors.means)
    if report.status == "ok":
        mismatch_flags = {"value_mismatch", "shape_mismatch", "dtype_mismatch", "type_mismatch",
                          "nonfinite_mismatch", "constant_output"}
        report.matched = errors.trials > 0 and not (ctx.flags & mismatch_flags)


def _build_models(ctx: _Ctx, cand_mod: types.ModuleType) -> None:
    import torch

    seed = ctx.req.seed
    try:
        torch.manual_seed(seed)
        init = list(ctx.ref_mod.get_init_inputs())
        torch.manual_seed(seed)
        ctx.ref_model = ctx.ref_mod.Model(*copy.deepcopy(init)).to(ctx.device)
    except BaseException as exc:
        raise _Failure("reference_error", exc, traceback.format_exc()) from exc
    try:
        with ctx.guard.candidate_call(record_ops=False):
            torch.manual_seed(seed)
            cand = cand_mod.ModelNew(*copy.deepcopy(init))
            if isinstance(cand, torch.nn.Module):
                _share_weights(ctx, cand)
                cand = cand.to(ctx.device)
            ctx.cand_model = cand
    except _Failure:
        raise
    except BaseException as exc:
        raise _candidate_failure(exc) from exc


def _share_weights(ctx: _Ctx, cand: Any) -> None:
    """Give the candidate the reference's weights when both declare the same ones.

    Seeding before each constructor already makes identical declarations draw
    identical values; copying also covers candidates that create them in another order.
    """
    ref_sd = ctx.ref_model.state_dict()
    cand_sd = cand.state_dict()
    if ref_sd and ref_sd.keys() == cand_sd.keys() and all(
        ref_sd[k].shape == cand_sd[k].shape for k in ref_sd
    ):
        cand.load_state_dict({k: v.detach().cpu() for k, v in ref_sd.items()})


def _triton_classes() -> list[object]:
    out: list[object] = []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        out.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.compiler.compiler import CompiledKernel

        out.append(CompiledKernel)
    except ImportError:
        pass
    return out


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu (triton interpreter)"
    import torch

    return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        print("usage: python -m agents.kernels.child <request.json> <result.json>", file=sys.stderr)
        os._exit(2)
    req_path, res_path = Path(argv[0]), Path(argv[1])
    req = msgspec.json.decode(req_path.read_bytes(), type=EvalRequest)
    report = evaluate_request(req, Path.cwd())
    tmp = res_path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(report))
    os.replace(tmp, res_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
