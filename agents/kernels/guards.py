"""Dynamic anti-cheat checks inside the evaluation child (imports torch and triton).

These complement the static AST checks: they watch what the candidate actually
does while its forward runs.

- Triton launches are counted by wrapping the launch entry points on the
  classes: `JITFunction.run` (compiled path; `kernel[grid](...)` and autotuners
  end there), `InterpretedFunction.run` (TRITON_INTERPRET=1) and
  `CompiledKernel.__getitem__` (a kernel compiled ahead with `.warmup()` and
  launched directly). Checked against triton 3.9; every hook is optional so a
  triton without one of these classes still works with the others.
- Torch compute in forward is seen at the dispatcher: a TorchDispatchMode logs
  every aten op the candidate's host code runs outside a Triton launch; only
  allocation, view and copy ops are allowed.
- Reference calls: the reference class's forward and __init__ are wrapped.
- Threads/streams: Thread.start, _thread.start_new_thread and
  torch.cuda.stream/set_stream are wrapped and attributed to the candidate by the caller's file.
- Tampering: identities of callables on time, torch, torch.Tensor, torch.cuda,
  triton hooks, builtins and our own helpers are snapshotted before the
  candidate loads and compared after each candidate step.

This is best-effort against accidental or LLM-style cheating. Code running in
the same process can defeat any in-process check; the sandbox, not these
checks, is what protects the worker.
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
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


@dataclass
class CallRecord:
    """What one guarded candidate step did."""

    launches: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    reference_calls: int = 0


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
        # flag -> messages; flags raised outside any particular call.
        self.findings: dict[str, list[str]] = {}
        self._snapshot: dict[str, tuple[object, str, object]] = {}
        self._threads_before: set[int] = set()

    # ---- findings ---------------------------------------------------------
    def flag(self, name: str, message: str) -> None:
        msgs = self.findings.setdefault(name, [])
        if message not in msgs:
            msgs.append(message)

    def _from_candidate(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename == self.candidate_file:
                return True
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
        guard = self
        cuda = torch.cuda
        # Only the functions that switch streams are wrapped: replacing the Stream
        # class would break isinstance checks inside torch. Creating a stream
        # without switching to it is harmless (and the static check flags it).
        for name in ("stream", "set_stream"):
            orig = getattr(cuda, name, None)
            if orig is None:
                continue

            def make(orig: Any, name: str) -> Callable[..., Any]:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    if guard._from_candidate():
                        guard.flag("streams_or_threads", f"candidate used torch.cuda.{name}")
                    return orig(*args, **kwargs)

                return wrapper

            setattr(cuda, name, make(orig, name))

    # ---- reference ----------------------------------------------------------
    def wrap_reference(self, model_cls: Any) -> None:
        guard = self
        orig_forward = model_cls.forward
        orig_init = model_cls.__init__

        def forward(self_: Any, *args: Any, **kwargs: Any) -> Any:
            if guard.current is not None:
                guard.current.reference_calls += 1
            return orig_forward(self_, *args, **kwargs)

        def init(self_: Any, *args: Any, **kwargs: Any) -> None:
            if guard._from_candidate():
                guard.flag("calls_reference", "candidate constructed the reference Model")
            orig_init(self_, *args, **kwargs)

        model_cls.forward = forward
        model_cls.__init__ = init

    # ---- tampering ----------------------------------------------------------
    def snapshot(self, extra: list[object]) -> None:
        """Remember the callables a candidate could patch to fake time or results."""
        owners: list[object] = [time, torch, torch.Tensor, torch.nn.Module, torch.cuda, json, builtins, threading, *extra]
        with contextlib.suppress(AttributeError):
            owners.append(torch.cuda.Event)
        with contextlib.suppress(ImportError):
            from triton.runtime.jit import JITFunction

            owners.append(JITFunction)
        for owner in owners:
            label = getattr(owner, "__name__", type(owner).__name__)
            for attr, value in list(vars(owner).items()):
                if callable(value) and not isinstance(value, type(sys)):
                    self._snapshot[f"{label}.{attr}"] = (owner, attr, value)

    def check_tampering(self) -> None:
        changed = []
        for key, (owner, attr, value) in self._snapshot.items():
            now = vars(owner).get(attr, None)
            if now is not value:
                changed.append(key)
        if changed:
            self.flag("timer_tampering", "candidate replaced: " + ", ".join(sorted(changed)[:10]))

    def check_threads(self) -> None:
        new = [
            t for t in threading.enumerate()
            if (t.ident or 0) not in self._threads_before and t.is_alive()
        ]
        if new:
            self.flag("streams_or_threads", f"{len(new)} thread(s) alive after the candidate ran")

    # ---- guarded calls --------------------------------------------------------
    @contextlib.contextmanager
    def candidate_call(self, record_ops: bool) -> Iterator[CallRecord]:
        """Guard one candidate step; `record_ops` turns on the aten op log (slow on GPU)."""
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
        if rec.reference_calls:
            self.flag("calls_reference", "candidate called the reference Model.forward")

