"""The trusted evaluator: the one process whose word the verdict is.

Forked per evaluation from the warm fork server (agents.kernels.forkserver),
outside the sandbox, with no secret of the worker's in its memory or
environment. It holds the problem (reference `Model`, `get_inputs`,
`get_init_inputs`), which never leaves it; it

1. builds the reference model (seeded with the job's seed: weights are public);
2. starts the candidate's sandbox and sends it the candidate's source, the
   init inputs and, when both declare the same ones, the reference's weights;
3. for each trial makes fresh inputs from a secret seed (drawn from
   os.urandom, never sent), sends them, runs the reference on its own copy
   and compares the output bytes that come back (agents.kernels.compare);
4. for a profile, after warm-up runs that are checked too, times each run
   with inputs made after the candidate was built, fresh per run; times the
   reference itself; checks the candidate's reported times against its own
   clock (agents.kernels.timing) and re-checks every timed run's output;
5. decides the outcome from what it saw and from what the sandbox saw.

The candidate's process can end the dialogue (exit, crash, garbage), make
itself look worse (flags, errors), and nothing else.

Precedence, top first:

    evaluation wall-clock limit hit                     timeout
    sandbox memory limit hit, or the process says OOM   runtime_error  out_of_memory
    sandbox process limit hit                           crashed        too_many_processes
    reference problem failed (import, init, forward)    runtime_error  reference_error
    candidate import / ModelNew missing / Triton        compile_error
      CompilationError
    exception in the candidate's constructor/forward    runtime_error
    the candidate's process broke the protocol, ended   crashed
      early, or exited non-zero / by a signal
    any reject flag (static, candidate-side, timing)    rejected
    outputs differ (values, shape, dtype, NaN/Inf,      mismatch
      constant output, not a plain tensor)
    otherwise                                           pass
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import linecache
import os
import random
import socket
import statistics
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from agents.kernels import protocol, timing, wire
from agents.kernels.anticheat import REJECT_FLAGS
from agents.kernels.compare import Comparison, Foreign, compare_outputs, flatten_outputs
from agents.kernels.sandbox import Sandbox, SandboxLimits, SandboxResult
from schemas.kernels import KernelOutcome, KernelTimings, Outcome

ERROR_CHARS = 2000
TRACEBACK_CHARS = 6000
MAX_MESSAGES = 40
MISMATCH_FLAGS = frozenset({"value_mismatch", "shape_mismatch", "dtype_mismatch", "type_mismatch",
                            "nonfinite_mismatch", "constant_output"})
# Flags the candidate's process may add (all of them condemn); anything else it says is dropped.
CANDIDATE_FLAGS = REJECT_FLAGS
# After the wall-clock limit: how long the main thread gets to wind down before
# the deadline thread answers for it.
DEADLINE_GRACE_S = 3.0
EXIT_WAIT_S = 5.0
_FRAME = msgspec.json.Encoder()


class SandboxBroken(RuntimeError):
    """The sandbox failed before any candidate code ran: infrastructure, not the candidate."""


class _End(Exception):
    """The dialogue with the candidate's process ended; the verdict has what it needs."""


class _ReferenceError(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.tb = traceback.format_exc()


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    means: list[float] = field(default_factory=list)
    trials: int = 0

    def add(self, cmp: Comparison, *, count: bool = True) -> None:
        self.max_abs = max(self.max_abs, cmp.max_abs)
        self.max_rel = max(self.max_rel, cmp.max_rel)
        if count:
            self.means.append(cmp.mean_abs)
            self.trials += 1


class Reply:
    """The evaluator's side of the socket to evaluate(); one verdict, whoever sends it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._done = False

    def send(self, msg: msgspec.Struct) -> bool:
        with self._lock:
            if self._done:
                return False
            if isinstance(msg, protocol.Verdict | protocol.Broken):
                self._done = True
            with contextlib.suppress(OSError):
                wire.send_frame(self._sock, msg)
            return True


class Evaluation:
    def __init__(self, req: protocol.EvalRequest, reply: Reply) -> None:
        self.req = req
        self.reply = reply
        self.t0 = time.monotonic()
        self.device = torch.device(req.device if req.device == "cpu" or torch.cuda.is_available() else "cpu")
        self.interpreted = self.device.type == "cpu"
        self.flags: set[str] = set(req.static_flags)
        self.messages: list[str] = list(req.static_messages)
        self.errors = _Errors()
        self.sandbox: Sandbox | None = None
        self.sock: socket.socket | None = None
        self.secret = os.urandom(32)
        self.draws = 0
        self.deadline_hit = False
        self.ref_mod: types.ModuleType | None = None
        self.ref_model: Any = None
        self.failed: wire.Failed | None = None
        self.reference_error: _ReferenceError | None = None
        self.protocol_error: str | None = None
        self.ended_early = False
        # The evaluator stopped reading on purpose (the verdict was already clear).
        self.abandoned = False
        self.report: wire.Report | None = None
        self.matched: bool | None = None
        self.timings: KernelTimings | None = None
        self.l2_buffer: Any = None
        self.init: list[Any] = []
        # The largest output the reference produced, so a timed run's answer can
        # be bounded before the reference has run on its inputs.
        self.out_bytes = 0
        if req.device == "cuda" and self.interpreted:
            self.messages.append("CUDA requested but not available: ran under the Triton interpreter")

    # ---- the reference ----------------------------------------------------------------
    def load_reference(self) -> None:
        mod = types.ModuleType("jetfleet_reference")
        name = "<jetfleet reference problem>"
        mod.__file__ = name
        linecache.cache[name] = (len(self.req.reference_source), None,
                                 self.req.reference_source.splitlines(True), name)
        try:
            exec(compile(self.req.reference_source, name, "exec"), mod.__dict__)
            for attr in ("Model", "get_inputs", "get_init_inputs"):
                if not hasattr(mod, attr):
                    raise AttributeError(f"reference problem defines no {attr}")
            torch.manual_seed(self.req.seed)
            init = list(mod.get_init_inputs())
            torch.manual_seed(self.req.seed)
            self.ref_model = mod.Model(*copy.deepcopy(init)).to(self.device)
        except BaseException as exc:
            raise _ReferenceError(exc) from exc
        self.ref_mod = mod
        self.init = init

    def fresh_inputs(self) -> list[Any]:
        """Inputs from a seed the candidate never sees, different on every draw."""
        self.draws += 1
        # Each draw's seed from a keyed hash: one seed recovered from the inputs
        # it produced (the generator is not a cryptographic one) tells nothing
        # about the next.
        digest = hashlib.blake2b(self.draws.to_bytes(8, "little"), key=self.secret, digest_size=8)
        seed = int.from_bytes(digest.digest(), "little") >> 1
        torch.manual_seed(seed)
        random.seed(seed)
        with contextlib.suppress(ImportError):
            import numpy

            numpy.random.seed(seed % 2**32)
        try:
            assert self.ref_mod is not None
            return list(self.ref_mod.get_inputs())
        except BaseException as exc:
            raise _ReferenceError(exc) from exc

    def _on_device(self, items: list[Any]) -> list[Any]:
        # Always a copy: a reference that works in place must not change what
        # the candidate is sent.
        return [x.to(self.device, copy=True) if isinstance(x, torch.Tensor) else copy.deepcopy(x)
                for x in items]

    def run_reference(self, args: list[Any], *, timed: bool = False) -> tuple[Any, float]:
        try:
            with torch.no_grad():
                if timed and self.device.type == "cuda":
                    self.l2_buffer.zero_()
                    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    start.record()
                    out = self.ref_model(*args)
                    end.record()
                    torch.cuda.synchronize()
                    return out, float(start.elapsed_time(end))
                t0 = time.perf_counter()
                out = self.ref_model(*args)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                return out, (time.perf_counter() - t0) * 1000.0
        except BaseException as exc:
            raise _ReferenceError(exc) from exc

    # ---- the candidate's process ------------------------------------------------------
    def start_sandbox(self) -> None:
        req = self.req
        remaining = max(1.0, req.timeout_s - (time.monotonic() - self.t0))
        limits = SandboxLimits(
            # The deadline thread is the clock of record; this is a backstop.
            timeout_s=remaining + 30.0, memory_mb=req.memory_mb, max_procs=req.max_procs,
            # CUDA maps far more address space than it uses: RLIMIT_AS would break it.
            address_space_limit=self.interpreted)
        self.sandbox = Sandbox.start(req.isolation, devices=[] if self.interpreted else req.devices,
                                     interpreted=self.interpreted, limits=limits,
                                     workdir_root=req.workdir_root)
        self.sock = self.sandbox.channel
        sb = self.sandbox
        self.reply.send(protocol.SandboxUp(level=sb.level, pid=sb.proc.pid, init_pid=sb.init_pid,
                                           outer_ids=list(sb.outer or ()), marker=sb.marker,
                                           started_wall=time.time(), workdir=sb.workdir))

    def send(self, msg: msgspec.Struct, tensors: list[Any] | None = None) -> int:
        assert self.sock is not None
        specs, data = wire.wire_tensors(tensors or [])
        if tensors is not None and hasattr(msg, "tensors"):
            msg.tensors = specs
        try:
            wire.send_frame(self.sock, msg, data)
        except OSError as exc:
            self.ended_early = True
            raise _End from exc
        return sum(s.nbytes for s in specs)

    def recv(self, *, max_payload: int = 0) -> tuple[wire.ToTrusted, bytearray]:
        assert self.sock is not None
        try:
            msg, payload = wire.recv_to_trusted(self.sock, max_payload=max_payload)
        except wire.ChannelClosed as exc:
            self.ended_early = True
            raise _End from exc
        except wire.ProtocolError as exc:
            self.protocol_error = str(exc)
            raise _End from exc
        except OSError as exc:
            self.ended_early = True
            raise _End from exc
        if isinstance(msg, wire.Failed):
            self.failed = msg
            raise _End
        return msg, payload

    def expect(self, kind: type[Any], *, max_payload: int = 0) -> tuple[Any, bytearray]:
        msg, payload = self.recv(max_payload=max_payload)
        if not isinstance(msg, kind):
            self.protocol_error = f"expected {kind.__name__}, got {type(msg).__name__}"
            raise _End
        return msg, payload

    def build_candidate(self) -> None:
        tensors: list[Any] = []
        tree = wire.pack_tree(copy.deepcopy(self.init), tensors)
        self.send(wire.Setup(candidate_source=self.req.candidate_source,
                             device="cpu" if self.interpreted else "cuda",
                             construct_seed=self.req.seed, init_tree=tree, tensors=[],
                             l2_flush_mb=self.req.l2_flush_mb), tensors)
        try:
            self.expect(wire.Ready)
        except _End as exc:
            if self.deadline_hit or (self.sandbox is not None and self.sandbox.tripped):
                raise
            # No candidate code had run: the sandbox itself could not start the runner.
            result = self.sandbox.finish(2.0) if self.sandbox else None
            tail = result.stderr_tail[-1500:] if result else ""
            raise SandboxBroken(f"the candidate's runner did not start: {self.protocol_error or ''} "
                                f"exit {result.returncode if result else None} "
                                f"signal {result.signal if result else None}\n{tail}") from exc
        built, _ = self.expect(wire.Built)
        ref_sd = self.ref_model.state_dict()
        declared = {p.name: p.shape for p in built.params}
        share = bool(ref_sd) and declared.keys() == ref_sd.keys() and all(
            list(ref_sd[k].shape) == declared[k] for k in ref_sd)
        # Seeding before each constructor already makes identical declarations draw
        # identical values; sharing also covers candidates that create them in another order.
        names = sorted(ref_sd) if share else []
        self.send(wire.Weights(names=names, tensors=[]), [ref_sd[k].detach() for k in names])

    # ---- one run ------------------------------------------------------------------------
    def _expected_bytes(self, ref_out: Any) -> int:
        return sum(t.numel() * t.element_size() for t in flatten_outputs(ref_out)
                   if isinstance(t, torch.Tensor))

    def _receive_output(self, run_id: int, expected_bytes: int) -> tuple[list[Any], wire.Output]:
        # Room for a wider dtype (then compared and reported as dtype_mismatch);
        # anything larger is a wrong shape, and is read no further.
        allowed = 2 * expected_bytes + 65536
        try:
            msg, payload = self.expect(wire.Output, max_payload=allowed)
        except _End:
            if self.protocol_error and "payload of" in self.protocol_error:
                # A wrong answer, not a broken dialogue: the verdict is mismatch,
                # and the rest of the channel is abandoned unread.
                self.protocol_error = None
                self.abandoned = True
                self._note(Comparison(False, flags=["shape_mismatch"],
                                      messages=["output: more data than the reference's output holds"]),
                           f"run {run_id}")
                self.matched = False
            raise
        if msg.run_id != run_id:
            self.protocol_error = f"answer for run {msg.run_id}, expected run {run_id}"
            raise _End
        tensors = wire.tensors_from_wire(msg.tensors, payload)
        leaves: list[Any] = []
        for leaf in msg.leaves:
            if isinstance(leaf, dict) and "$t" in leaf and isinstance(leaf["$t"], int) \
                    and 0 <= leaf["$t"] < len(tensors):
                leaves.append(tensors[leaf["$t"]])
            elif isinstance(leaf, dict) and "$bad" in leaf:
                leaves.append(Foreign(str(leaf["$bad"])[:100]))
            elif leaf is None or isinstance(leaf, bool | int | float):
                leaves.append(leaf)
            else:
                self.protocol_error = "malformed output leaf"
                raise _End
        if msg.mutated_inputs:
            self.flags.add("mutates_inputs")
        return leaves, msg

    def _note(self, cmp: Comparison, label: str) -> None:
        self.flags.update(cmp.flags)
        self.messages.extend(f"{label}: {m}" for m in cmp.messages)

    def check(self, ref_out: Any, cand_leaves: list[Any], label: str, *, count: bool = True) -> bool:
        ref_flat = flatten_outputs(ref_out)
        cmp = compare_outputs(ref_flat, cand_leaves, self.req.atol, self.req.rtol)
        self.errors.add(cmp, count=count)
        self._note(cmp, label)
        if not cmp.matched:
            self.matched = False
        return cmp.matched

    def trial(self, label: str, *, count: bool = True, observe: bool = True) -> bool:
        inputs = self.fresh_inputs()
        tensors: list[Any] = []
        tree = wire.pack_tree(inputs, tensors)
        run_id = self.draws
        ref_args = self._on_device(inputs)
        # The candidate computes while the reference does, on separate copies.
        self.send(wire.Run(run_id=run_id, args_tree=tree, tensors=[], observe=observe), tensors)
        ref_out, _ = self.run_reference(ref_args)
        self.out_bytes = max(self.out_bytes, self._expected_bytes(ref_out))
        leaves, _ = self._receive_output(run_id, self._expected_bytes(ref_out))
        return self.check(ref_out, leaves, label, count=count)

    def timed_candidate(self, run_id: int, tree: Any, tensors: list[Any],
                        observe: bool) -> tuple[list[Any], timing.TimedRun]:
        """One timed candidate run between two readings of the trusted clock."""
        assert self.sandbox is not None
        cpu0 = self.sandbox.cpu_ms() if self.interpreted else None
        t0 = time.perf_counter()
        sent = self.send(wire.Run(run_id=run_id, args_tree=tree, tensors=[], timed=True,
                                  observe=observe), tensors)
        leaves, msg = self._receive_output(run_id, self.out_bytes)
        wall = (time.perf_counter() - t0) * 1000.0
        cpu = self.sandbox.cpu_ms() - cpu0 if cpu0 is not None else None
        received = sum(s.nbytes for s in msg.tensors)
        claimed = msg.ms if msg.ms is not None else float("nan")
        return leaves, timing.TimedRun(claimed_ms=claimed, wall_ms=wall, nbytes=sent + received,
                                       cpu_ms=cpu)

    def timed_run(self, i: int, observe: bool) -> tuple[timing.TimedRun, float] | None:
        # Made now, after the candidate was built, and fresh for every run.
        inputs = self.fresh_inputs()
        tensors: list[Any] = []
        tree = wire.pack_tree(inputs, tensors)
        ref_args = self._on_device(inputs)
        if i % 2 == 0:  # alternate so neither side always runs on a warm cache
            ref_out, ref_ms = self.run_reference(ref_args, timed=True)
            leaves, sample = self.timed_candidate(self.draws, tree, tensors, observe)
        else:
            leaves, sample = self.timed_candidate(self.draws, tree, tensors, observe)
            ref_out, ref_ms = self.run_reference(ref_args, timed=True)
        if not self.check(ref_out, leaves, f"timed run {i}"):
            return None
        return sample, ref_ms

    # ---- the evaluation -----------------------------------------------------------------
    def verify(self) -> bool:
        for t in range(max(1, self.req.trials)):
            if not self.trial(f"trial {t}"):
                return False
        return True

    def profile(self) -> None:
        if not self.verify():
            return
        if self.device.type == "cuda":
            self.l2_buffer = torch.empty(self.req.l2_flush_mb * 1024 * 1024 // 4, dtype=torch.int32,
                                         device=self.device)
        for w in range(self.req.warmup):
            if not self.trial(f"warm-up {w}", count=False, observe=self.interpreted):
                return
        samples: list[timing.TimedRun] = []
        ref_ms: list[float] = []
        # Under the interpreter timings are not representative anyway, so the op
        # log stays on for the timed runs too; on a GPU it would distort them.
        for i in range(self.req.runs):
            got = self.timed_run(i, observe=self.interpreted)
            if got is None:
                return
            samples.append(got[0])
            ref_ms.append(got[1])
        reason = timing.disagreement(samples, self.device.type)
        if reason:
            self.flags.add("timing_mismatch")
            self.messages.append(f"timing: {reason}")
        self.timings = _timings(samples, ref_ms, self.req, cuda=self.device.type == "cuda")
        speedup = self.timings.speedup
        if speedup is not None and speedup > self.req.suspicious_speedup:
            self.flags.add("suspicious_speedup")
            self.messages.append(f"speed-up {speedup:.1f}x exceeds {self.req.suspicious_speedup:g}x")

    def finish_candidate(self) -> None:
        self.send(wire.Finish())
        msg, _ = self.expect(wire.Report)
        self.report = msg

    def run(self) -> None:
        try:
            self.load_reference()
            self.start_sandbox()
            self.build_candidate()
            if self.req.kind == "profile":
                self.profile()
            else:
                self.verify()
            if self.matched is None:
                self.matched = self.errors.trials > 0
            self.finish_candidate()
        except _ReferenceError as exc:
            self.reference_error = exc
        except _End:
            pass

    # ---- the verdict --------------------------------------------------------------------
    def verdict(self) -> KernelOutcome:
        result: SandboxResult | None = None
        if self.sandbox is not None:
            # Long enough to learn how the process ended by itself; a protocol
            # breach or a tripped limit ends it at once.
            wait = (EXIT_WAIT_S if self.report is not None else 0.5 if self.failed
                    else 2.0 if self.ended_early else 0.0)
            result = self.sandbox.finish(wait)
        outcome, error, tb = self._classify(result)
        flags = self.flags
        messages = self.messages
        if result is not None:
            messages = [*messages, *(f"sandbox: {n}" for n in result.notes)]
        return KernelOutcome(
            kind=self.req.kind,
            outcome=outcome,
            correct=outcome == "pass",
            flags=sorted(flags),
            messages=messages[:MAX_MESSAGES],
            max_abs_error=_finite(self.errors.max_abs) if self.errors.trials else None,
            mean_abs_error=(_finite(sum(self.errors.means) / len(self.errors.means))
                            if self.errors.means else None),
            max_rel_error=_finite(self.errors.max_rel) if self.errors.trials else None,
            trials=self.errors.trials,
            interpreted=self.interpreted,
            device=_device_name(self.device),
            timings=self.timings,
            error=error[:ERROR_CHARS] if error else None,
            traceback=tb[-TRACEBACK_CHARS:] if tb else None,
            stdout_tail=result.stdout_tail if result else "",
            stderr_tail=result.stderr_tail if result else "",
            returncode=result.returncode if result else None,
            signal=result.signal if result else None,
            wall_s=round(time.monotonic() - self.t0, 3),
            isolation=self.req.isolation,
        )

    def _classify(self, result: SandboxResult | None) -> tuple[Outcome, str | None, str | None]:
        failed = self.failed
        if self.report is not None:
            self.flags.update(f for f in self.report.flags if f in CANDIDATE_FLAGS)
            self.messages.extend(m[:500] for m in self.report.messages[:MAX_MESSAGES])
        if self.deadline_hit:
            return "timeout", f"wall-clock limit of {self.req.timeout_s:g} s exceeded", None
        if result is not None and result.memory_exceeded:
            self.flags.add("out_of_memory")
            return "runtime_error", "memory limit exceeded: " + "; ".join(result.notes), None
        if result is not None and result.too_many_processes:
            self.flags.add("too_many_processes")
            return "crashed", "process limit exceeded: " + "; ".join(result.notes), None
        if self.reference_error is not None:
            self.flags.add("reference_error")
            return "runtime_error", f"reference problem failed: {self.reference_error}", self.reference_error.tb
        if failed is not None:
            if failed.out_of_memory:
                self.flags.add("out_of_memory")
            return failed.status, failed.error, failed.traceback
        if self.protocol_error is not None:
            return "crashed", f"the candidate's process broke the evaluation protocol: {self.protocol_error}", None
        exit_problem = _exit_problem(result)
        if self.abandoned:
            exit_problem = None
        elif self.ended_early or self.report is None:
            return "crashed", exit_problem or "the candidate's process ended before the evaluation did", None
        if exit_problem:
            return "crashed", exit_problem, None
        rejects = self.flags & REJECT_FLAGS
        if rejects:
            return "rejected", "rejected by anti-cheat checks: " + ", ".join(sorted(rejects)), None
        if not self.matched:
            return "mismatch", "candidate output differs from the reference", None
        return "pass", None, None


def _exit_problem(result: SandboxResult | None) -> str | None:
    if result is None:
        return None
    if result.signal is not None:
        return f"evaluation process killed by {_signal_name(result.signal)}"
    if result.returncode not in (0, None):
        return f"evaluation process exited with status {result.returncode}"
    return None


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _finite(x: float | None) -> float | None:
    # JSON has no NaN/Inf; an unmeasurable error is reported as absent.
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return x


def _percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _timings(samples: list[timing.TimedRun], ref_ms: list[float], req: protocol.EvalRequest,
             *, cuda: bool) -> KernelTimings:
    cand = [s.claimed_ms if s.claimed_ms == s.claimed_ms else s.wall_ms for s in samples]
    c_med, r_med = _percentile(cand, 0.5), _percentile(ref_ms, 0.5)
    return KernelTimings(
        candidate_ms=c_med,
        reference_ms=r_med,
        candidate_p10_ms=_percentile(cand, 0.1),
        candidate_p90_ms=_percentile(cand, 0.9),
        reference_p10_ms=_percentile(ref_ms, 0.1),
        reference_p90_ms=_percentile(ref_ms, 0.9),
        runs=len(cand),
        warmup=req.warmup,
        speedup=r_med / c_med if c_med > 0 else None,
        method="cuda_events" if cuda else "perf_counter",
        l2_flush=cuda,
        representative=cuda,
        candidate_wall_ms=statistics.median(s.wall_ms for s in samples),
    )


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu (triton interpreter)"
    return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"


def _deadline(ev: Evaluation, finished: threading.Event) -> None:
    if finished.wait(ev.req.timeout_s):
        return
    ev.deadline_hit = True
    if ev.sandbox is not None:
        ev.sandbox.kill()
    if finished.wait(DEADLINE_GRACE_S):
        return
    # The main thread is stuck (a reference that never returns): answer for it.
    if ev.sandbox is not None:
        ev.sandbox.kill()
        ev.sandbox.finish(0.0)
    ev.reply.send(protocol.Verdict(outcome=KernelOutcome(
        kind=ev.req.kind, outcome="timeout", correct=False, flags=sorted(ev.flags),
        messages=[*ev.messages, "the reference or the evaluator did not return"][:MAX_MESSAGES],
        error=f"wall-clock limit of {ev.req.timeout_s:g} s exceeded",
        interpreted=ev.interpreted, device=_device_name(ev.device) if ev.interpreted else "cuda",
        wall_s=round(time.monotonic() - ev.t0, 3), isolation=ev.req.isolation)))
    os._exit(0)


def serve(sock: socket.socket) -> None:
    """The whole life of one evaluator process, answering on `sock`."""
    reply = Reply(sock)
    reply.send(protocol.Started(evaluator_pid=os.getpid()))
    try:
        header, _ = wire.recv_frame(sock, max_payload=0)
        req = protocol.request_decoder.decode(header)
        if req.device == "cuda":
            # Before CUDA initialises in this process: only the leased devices.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(req.devices)
        ev = Evaluation(req, reply)
        finished = threading.Event()
        threading.Thread(target=_deadline, args=(ev, finished), daemon=True).start()
        ev.run()
        outcome = ev.verdict()
        finished.set()
        reply.send(protocol.Verdict(outcome=outcome))
    except BaseException as exc:
        reply.send(protocol.Broken(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"[-4000:]))
