"""Candidate-side observation: what the candidate's code does while it runs.

Runs in the candidate's own process, so all of it is best effort: code that
shares the process can switch any of it off, and the verdict never depends on
it being on. Its findings can only condemn a candidate (they become reject
flags); their absence clears nothing. What is structural (outputs compared by
the trusted side, timings checked against its clock, the sandbox) lives
elsewhere; see docs/sandbox.md.

- Triton launches are counted by wrapping the launch entry points:
  `JITFunction.run` (compiled path), `InterpretedFunction.run`
  (TRITON_INTERPRET=1) and `CompiledKernel.__getitem__` (a kernel compiled
  ahead with `.warmup()`), checked against triton 3.9.
- Torch compute in forward is seen at the dispatcher: a TorchDispatchMode
  logs every aten op the candidate's host code runs outside a Triton launch;
  only allocation, view and copy ops are allowed.
- Hiding from that log (calling the functions that pop or bypass dispatch
  modes), converting tensors to numpy or Python lists outside a launch,
  starting threads or switching CUDA streams are flagged when the candidate's
  own code does it.
- Tampering: the callables of time, torch, torch.Tensor, torch.cuda, triton's
  launch classes, builtins and our own helpers are snapshotted before the
  candidate loads; a replaced or added attribute is flagged.
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _python_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops a candidate's host code may run: allocation, views, copies, casts.
ALLOWED_ATEN_OPS = frozenset(
    {
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
        "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones",
        "full", "full_like", "new_full", "fill_", "zero_", "arange", "scalar_tensor",
        "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "clone",
        "contiguous", "copy_", "_to_copy", "to", "t", "transpose", "permute", "expand",
        "squeeze", "unsqueeze", "flatten", "unflatten", "select", "slice", "split",
        "split_with_sizes", "chunk", "unbind", "narrow", "detach", "alias", "lift_fresh",
        "lift_fresh_copy", "set_", "resize_", "_local_scalar_dense", "sym_size",
        "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
        "_has_compatible_shallow_copy_type", "is_contiguous",
    }
)
# Functions that take the op log off the dispatch path. torch calls some of them
# internally; only a call made directly from the candidate's file is flagged.
_EVASIONS: tuple[tuple[Any, str], ...] = (
    (_python_dispatch, "_disable_current_modes"),
    (_python_dispatch, "_pop_mode"),
    (_python_dispatch, "_pop_mode_temporarily"),
    (torch._C, "_pop_torch_dispatch_stack"),
    (torch._C, "_unset_dispatch_mode"),
    (torch._C, "_DisableTorchDispatch"),
    (torch._C, "_DisablePythonDispatcher"),
    (torch._C, "_ExcludeDispatchKeyGuard"),
    (torch._C, "_DisableTorchFunction"),
    (torch._C, "_DisableTorchFunctionSubclass"),
)
# Tensor methods that move data out of torch's dispatcher into host compute.
_HOST_BRIDGES = ("numpy", "__array__", "tolist")


@dataclass
class CallRecord:
    """What one guarded candidate step did."""

    launches: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class _OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, guard: Guard) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._guard = guard

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        rec = self._guard.current
        # Ops inside a Triton launch are the interpreter's own tensor shuffling.
        if rec is not None and self._guard.in_launch == 0:
            name = func.overloadpacket.__name__
            rec.ops[name] = rec.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class Guard:
    def __init__(self, candidate_file: str) -> None:
        self.candidate_file = candidate_file
        self.current: CallRecord | None = None
        self.in_launch = 0
        self.total_launches = 0
        self.hooks: list[str] = []
        # flag -> messages
        self.findings: dict[str, list[str]] = {}
        self._snapshot: dict[str, tuple[object, str, object]] = {}
        self._keys: dict[int, tuple[str, set[str]]] = {}
        self._threads_before: set[int] = set()

    def install(self, extra: list[object] | None = None) -> None:
        """Every hook, then the tamper snapshot (which must see the hooks in place)."""
        self.install_launch_hooks()
        self.install_thread_hooks()
        self.install_stream_hooks()
        self.install_evasion_hooks()
        self.install_bridge_hooks()
        # torch._dynamo rebinds torch.manual_seed when first imported; import it
        # before the snapshot so that is not mistaken for tampering.
        with contextlib.suppress(Exception):
            import torch._dynamo  # noqa: F401
        self.snapshot([sys.modules[__name__], *(extra or [])])

    # ---- findings ---------------------------------------------------------
    def flag(self, name: str, message: str) -> None:
        msgs = self.findings.setdefault(name, [])
        if message not in msgs and len(msgs) < 10:
            msgs.append(message)

    def _from_candidate(self, depth: int = 2, *, direct: bool = False) -> bool:
        frame = sys._getframe(depth)
        while frame is not None:
            if frame.f_code.co_filename == self.candidate_file:
                return True
            if direct:
                return False
            frame = frame.f_back  # type: ignore[assignment]
        return False

    # ---- launch hooks -----------------------------------------------------
    def _count_launch(self) -> None:
        self.total_launches += 1
        if self.current is not None:
            self.current.launches += 1

    def _wrap_run(self, cls: Any) -> None:
        orig = cls.__dict__.get("run")
        if orig is None:
            return
        guard = self

        def run(self_: Any, *args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("warmup", False):
                guard._count_launch()
            guard.in_launch += 1
            try:
                return orig(self_, *args, **kwargs)
            finally:
                guard.in_launch -= 1

        run.__wrapped__ = orig  # type: ignore[attr-defined]
        cls.run = run
        self.hooks.append(f"{cls.__module__}.{cls.__qualname__}.run")

    def _wrap_compiled_getitem(self, cls: Any) -> None:
        orig = cls.__dict__.get("__getitem__")
        if orig is None:
            return
        guard = self

        def getitem(self_: Any, grid: Any) -> Callable[..., Any]:
            runner = orig(self_, grid)

            def launch(*args: Any, **kwargs: Any) -> Any:
                guard._count_launch()
                guard.in_launch += 1
                try:
                    return runner(*args, **kwargs)
                finally:
                    guard.in_launch -= 1

            return launch

        cls.__getitem__ = getitem
        self.hooks.append(f"{cls.__module__}.{cls.__qualname__}.__getitem__")

    def install_launch_hooks(self) -> None:
        from triton.runtime.jit import JITFunction

        self._wrap_run(JITFunction)
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            self._wrap_run(InterpretedFunction)
        with contextlib.suppress(ImportError):
            from triton.compiler.compiler import CompiledKernel

            self._wrap_compiled_getitem(CompiledKernel)

    # ---- threads and streams ----------------------------------------------
    def install_thread_hooks(self) -> None:
        guard = self
        orig_start = threading.Thread.start
        orig_new = _thread.start_new_thread

        def start(self_: threading.Thread) -> None:
            if guard._from_candidate():
                guard.flag("streams_or_threads", f"candidate started thread {self_.name!r}")
            orig_start(self_)

        def start_new_thread(*args: Any, **kwargs: Any) -> int:
            if guard._from_candidate():
                guard.flag("streams_or_threads", "candidate started a raw thread")
            return orig_new(*args, **kwargs)

        threading.Thread.start = start  # type: ignore[method-assign,assignment]
        _thread.start_new_thread = start_new_thread
        self._threads_before = {t.ident or 0 for t in threading.enumerate()}

    def install_stream_hooks(self) -> None:
        if not torch.cuda.is_available():
            return
        # Only the functions that switch streams are wrapped: replacing the Stream
        # class would break isinstance checks inside torch.
        for name in ("stream", "set_stream"):
            self._wrap_attr(torch.cuda, name, "streams_or_threads", f"candidate used torch.cuda.{name}",
                            direct=False)

    def _wrap_attr(self, owner: Any, name: str, flag: str, message: str, *, direct: bool) -> None:
        orig = getattr(owner, name, None)
        if orig is None:
            return
        guard = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if guard._from_candidate(direct=direct):
                guard.flag(flag, message)
            return orig(*args, **kwargs)

        with contextlib.suppress(AttributeError, TypeError):
            setattr(owner, name, wrapper)

    # ---- hiding from the op log, host compute ---------------------------------
    def install_evasion_hooks(self) -> None:
        for owner, name in _EVASIONS:
            self._wrap_attr(owner, name, "torch_fallback",
                            f"forward turned the op log off ({name})", direct=True)

    def install_bridge_hooks(self) -> None:
        guard = self
        for name in _HOST_BRIDGES:
            orig = getattr(torch.Tensor, name, None)
            if orig is None:
                continue

            def make(orig: Any, name: str) -> Callable[..., Any]:
                def bridge(self_: Any, *args: Any, **kwargs: Any) -> Any:
                    if guard.current is not None and guard.in_launch == 0:
                        guard.flag("torch_fallback", f"forward moved a tensor to host code (.{name}())")
                    return orig(self_, *args, **kwargs)

                return bridge

            setattr(torch.Tensor, name, make(orig, name))

    # ---- tampering ----------------------------------------------------------
    def snapshot(self, extra: list[object]) -> None:
        """Remember the callables a candidate could patch to fake time or results."""
        owners: list[object] = [time, torch, torch.Tensor, torch.nn.Module, torch.cuda, builtins,
                                threading, _python_dispatch, torch._C, *extra]
        with contextlib.suppress(AttributeError):
            owners.append(torch.cuda.Event)
        with contextlib.suppress(ImportError):
            from triton.runtime.jit import JITFunction

            owners.append(JITFunction)
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            owners.append(InterpretedFunction)
        for owner in owners:
            label = getattr(owner, "__name__", type(owner).__name__)
            attrs = vars(owner)
            self._keys[id(owner)] = (label, set(attrs))
            for attr, value in list(attrs.items()):
                if callable(value) and not isinstance(value, type(sys)):
                    self._snapshot[f"{label}.{attr}"] = (owner, attr, value)

    def check_tampering(self) -> None:
        changed = [key for key, (owner, attr, value) in self._snapshot.items()
                   if vars(owner).get(attr, None) is not value]
        owners = {id(o): o for o, _a, _v in self._snapshot.values()}
        for oid, (label, keys) in self._keys.items():
            owner = owners.get(oid)
            if owner is not None:
                changed.extend(f"{label}.{k} (added)" for k in set(vars(owner)) - keys
                               if callable(vars(owner)[k]))
        if changed:
            self.flag("timer_tampering", "candidate replaced: " + ", ".join(sorted(changed)[:10]))

    def check_threads(self) -> None:
        new = [t for t in threading.enumerate()
               if (t.ident or 0) not in self._threads_before and t.is_alive()]
        if new:
            self.flag("streams_or_threads", f"{len(new)} thread(s) alive after the candidate ran")

    # ---- guarded calls --------------------------------------------------------
    @contextlib.contextmanager
    def candidate_call(self, record_ops: bool) -> Iterator[CallRecord]:
        """Guard one candidate step; `record_ops` turns on the aten op log."""
        rec = CallRecord()
        self.current = rec
        recorder = _OpRecorder(self) if record_ops else contextlib.nullcontext()
        try:
            with recorder:
                yield rec
        finally:
            self.current = None
            self.check_tampering()
            self.check_threads()

    def judge(self, rec: CallRecord, *, expect_launch: bool = True, check_ops: bool = True) -> None:
        """Turn one step's record into flags."""
        if expect_launch and rec.launches == 0:
            self.flag("no_triton_kernel", "forward returned without launching a Triton kernel")
        if check_ops:
            bad = {k: v for k, v in rec.ops.items() if k not in ALLOWED_ATEN_OPS}
            if bad:
                ops = ", ".join(f"aten.{k} x{v}" for k, v in sorted(bad.items()))
                self.flag("torch_fallback", f"forward ran torch compute ops: {ops}")


def inputs_equal(a: list[Any], b: list[Any]) -> bool:
    """Bitwise equality of two input lists (NaN equal to NaN), to detect mutation."""
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            if not torch.equal(torch.isnan(x), torch.isnan(y)):
                return False
            if not torch.equal(torch.nan_to_num(x, nan=0.0), torch.nan_to_num(y, nan=0.0)):
                return False
        elif not torch.equal(x, y):
            return False
    return True
