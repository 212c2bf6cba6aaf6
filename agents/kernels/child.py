"""The candidate's process: builds ModelNew and runs it on the inputs it is sent.

    python -I -B -u -c "...; from agents.kernels.child import main; main()" <channel fd>

Runs inside the sandbox (agents.kernels.sandbox) as an untrusted process: the
candidate's code shares it, and can change anything here. Nothing this
process says is believed on its own word:

- outputs travel as plain bytes and are compared by the trusted evaluator;
- its timings are checked against the trusted side's clock;
- its flags (launch counts, op log, threads, tampering: guards.py) can only
  condemn a candidate, never clear one;
- it never sees the problem's source, the reference's outputs or the seed of
  the inputs.

It imports only the standard library, msgspec, torch, triton and its two
sibling modules (wire, guards): nothing else of the project is in the sandbox.
Exit is always `os._exit`: a candidate may leave threads or a broken CUDA
context behind, and the process is discarded after one evaluation anyway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.kernels import wire

if TYPE_CHECKING:
    from agents.kernels.guards import Guard

CANDIDATE_FILE = "candidate_kernel.py"
ERROR_CHARS = 2000
TRACEBACK_CHARS = 6000
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


class _CandidateFailed(Exception):
    def __init__(self, status: str, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.status = status
        self.exc = exc
        self.tb = traceback.format_exc()


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


@dataclass
class _State:
    sock: socket.socket
    guard: Guard
    device: Any
    model: Any = None
    prev_out: tuple[Any, ...] = ()
    # Captured before the candidate loads; a swapped clock shows up as a
    # disagreement with the trusted side's clock anyway.
    perf_counter: Any = time.perf_counter
    sync: Any = None
    event_cls: Any = None
    l2_buffer: Any = None


def _load_candidate(path: Path) -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("jetfleet_candidate", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(st: _State, setup: wire.Setup, payload: bytearray) -> None:
    import torch

    path = Path.cwd() / CANDIDATE_FILE
    path.write_text(setup.candidate_source)
    try:
        with st.guard.candidate_call(record_ops=False):
            module = _load_candidate(path)
        if not isinstance(getattr(module, "ModelNew", None), type):
            raise AttributeError("candidate defines no class ModelNew")
    except BaseException as exc:
        raise _CandidateFailed("compile_error", exc) from exc
    init = wire.unpack_tree(setup.init_tree, wire.tensors_from_wire(setup.tensors, payload))
    try:
        with st.guard.candidate_call(record_ops=False):
            torch.manual_seed(setup.construct_seed)
            model = module.ModelNew(*init)
    except BaseException as exc:
        raise _CandidateFailed("compile_error" if _is_compile_error(exc) else "runtime_error", exc) from exc
    params: list[wire.ParamSpec] = []
    try:
        if isinstance(model, torch.nn.Module):
            for name, t in model.state_dict().items():
                if type(t) is torch.Tensor and wire.dtype_name(t.dtype) in wire.ITEMSIZE:
                    params.append(wire.ParamSpec(str(name), wire.dtype_name(t.dtype),
                                                 [int(d) for d in t.shape]))
    except BaseException as exc:
        raise _CandidateFailed("runtime_error", exc) from exc
    wire.send_frame(st.sock, wire.Built(params=params))
    msg, data = wire.recv_to_candidate(st.sock)
    if not isinstance(msg, wire.Weights):
        raise wire.ProtocolError(f"expected weights, got {type(msg).__name__}")
    try:
        with st.guard.candidate_call(record_ops=False):
            if msg.names:
                tensors = wire.tensors_from_wire(msg.tensors, data)
                model.load_state_dict(dict(zip(msg.names, tensors, strict=True)))
            if isinstance(model, torch.nn.Module):
                model = model.to(st.device)
    except BaseException as exc:
        raise _CandidateFailed("runtime_error", exc) from exc
    st.model = model


def _forward(st: _State, args: list[Any], *, timed: bool) -> tuple[Any, float | None]:
    if not timed:
        out = st.model(*args)
        if st.device.type == "cuda":
            st.sync()
        return out, None
    if st.device.type == "cuda":
        st.l2_buffer.zero_()
        start, end = st.event_cls(enable_timing=True), st.event_cls(enable_timing=True)
        start.record()
        out = st.model(*args)
        end.record()
        st.sync()
        return out, float(start.elapsed_time(end))
    t0 = st.perf_counter()
    out = st.model(*args)
    return out, (st.perf_counter() - t0) * 1000.0


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, tuple | list):
        flat: list[Any] = []
        for item in out:
            flat.extend(_flatten(item))
        return flat
    return [out]


def _outputs_to_wire(out: Any) -> tuple[list[Any], list[wire.TensorSpec], list[memoryview]]:
    import torch

    leaves: list[Any] = []
    specs: list[wire.TensorSpec] = []
    data: list[memoryview] = []
    for leaf in _flatten(out):
        # Exactly a tensor: a subclass's methods (detach, cpu, __torch_function__)
        # are never called.
        if type(leaf) is torch.Tensor and wire.dtype_name(leaf.dtype) in wire.ITEMSIZE:
            spec, raw = wire.tensor_to_wire(leaf)
            leaves.append({"$t": len(specs)})
            specs.append(spec)
            data.append(raw)
        elif leaf is None or type(leaf) in (bool, int, float):
            leaves.append(leaf if type(leaf) is not float or leaf == leaf else None)
        else:
            leaves.append({"$bad": type(leaf).__name__})
    return leaves, specs, data


def _check_caching(st: _State, out: Any) -> None:
    import torch

    new = tuple(t for t in _flatten(out) if type(t) is torch.Tensor and t.numel() > 0)
    # The previous outputs are still referenced, so their memory cannot have been
    # reused: sharing an object or a data pointer means a cached result.
    for t in new:
        for p in st.prev_out:
            if t is p or t.data_ptr() == p.data_ptr():
                st.guard.flag("output_caching", "forward returned the same output storage twice")
    st.prev_out = new


def _run(st: _State, msg: wire.Run, payload: bytearray) -> None:
    import torch

    from agents.kernels.guards import inputs_equal

    inputs = wire.tensors_from_wire(msg.tensors, payload)
    on_device = [t.to(st.device) for t in inputs]
    args = wire.unpack_tree(msg.args_tree, on_device)
    # Timed runs skip the copy so it does not weigh on their clock.
    pristine = None if msg.timed else [t.clone() for t in inputs]
    try:
        with st.guard.candidate_call(record_ops=msg.observe) as rec, torch.no_grad():
            out, ms = _forward(st, args, timed=msg.timed)
    except BaseException as exc:
        raise _CandidateFailed("compile_error" if _is_compile_error(exc) else "runtime_error", exc) from exc
    st.guard.judge(rec, check_ops=msg.observe)
    _check_caching(st, out)
    mutated = pristine is not None and not inputs_equal([t.cpu() for t in on_device], pristine)
    if mutated:
        st.guard.flag("mutates_inputs", "candidate modified its input tensors")
    leaves, specs, data = _outputs_to_wire(out)
    wire.send_frame(st.sock, wire.Output(run_id=msg.run_id, leaves=leaves, tensors=specs, ms=ms,
                                         mutated_inputs=mutated), data)


def _fail(sock: socket.socket, fail: _CandidateFailed) -> None:
    exc = fail.exc
    msg = wire.Failed(status="compile_error" if fail.status == "compile_error" else "runtime_error",
                      error=f"{type(exc).__name__}: {exc}"[:ERROR_CHARS],
                      traceback=fail.tb[-TRACEBACK_CHARS:], out_of_memory=_is_oom(exc))
    with contextlib.suppress(OSError):
        wire.send_frame(sock, msg)


def _report(st: _State) -> wire.Report:
    st.guard.check_tampering()
    messages = [f"{name}: {m}" for name in sorted(st.guard.findings) for m in st.guard.findings[name]]
    return wire.Report(flags=sorted(st.guard.findings), messages=messages[:40],
                       launches=st.guard.total_launches)


def serve(sock: socket.socket) -> None:
    """The candidate side of one evaluation: Setup, Weights, Run..., Finish."""
    warnings.filterwarnings("ignore")
    msg, payload = wire.recv_to_candidate(sock)
    if not isinstance(msg, wire.Setup):
        raise wire.ProtocolError(f"expected setup, got {type(msg).__name__}")
    import torch
    import triton  # noqa: F401

    from agents.kernels.guards import Guard

    if msg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the evaluator asked for CUDA, but no GPU is usable inside the sandbox")
    device = torch.device(msg.device)
    guard = Guard(str(Path.cwd() / CANDIDATE_FILE))
    guard.install()
    st = _State(sock=sock, guard=guard, device=device, sync=torch.cuda.synchronize,
                event_cls=getattr(torch.cuda, "Event", None))
    if device.type == "cuda" and msg.l2_flush_mb:
        # Writing this buffer before each timed run evicts the L2 cache.
        st.l2_buffer = torch.empty(msg.l2_flush_mb * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    # Nothing of the candidate has run yet: a failure before this line is the
    # sandbox's (infrastructure), after it the candidate's.
    wire.send_frame(sock, wire.Ready(device=str(device)))
    try:
        _build(st, msg, payload)
        while True:
            msg, payload = wire.recv_to_candidate(sock)
            if isinstance(msg, wire.Run):
                _run(st, msg, payload)
            elif isinstance(msg, wire.Finish):
                wire.send_frame(sock, _report(st))
                return
            else:
                raise wire.ProtocolError(f"unexpected {type(msg).__name__}")
    except _CandidateFailed as fail:
        _fail(sock, fail)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    code = 0
    try:
        serve(sock)
    except wire.ChannelClosed:
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
