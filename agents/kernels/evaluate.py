"""Kernel evaluation: the API the worker's kernel capabilities call.

`evaluate()` is synchronous and blocking (the worker runs it in a thread). It
runs the static checks, then hands the evaluation to a trusted evaluator
process (agents.kernels.trusted, forked from a warm server) that holds the
problem, runs the candidate in a sandbox, compares, times and decides; see
docs/sandbox.md. The outcome is whatever that process decided, so
`KernelOutcome.outcome` is exactly one of:

    timeout, runtime_error, crashed, compile_error, rejected, mismatch, pass

(precedence and meanings: agents.kernels.trusted). Every result names the
isolation it ran under (`isolation`: "namespaces", "process", or "none" for a
candidate rejected by the static checks and not run).

Cancellation (cancel_event set) kills the evaluator and its sandbox and raises
KernelEvalCancelled: a cancelled evaluation has no result. `OSError` or
`RuntimeError` (IsolationUnavailable among them) mean the evaluation could not
be carried out at all: infrastructure, not the candidate.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from agents.kernels import forkserver, wire
from agents.kernels.anticheat import REJECT_FLAGS, check_source, flags_of
from agents.kernels.isolation import IsolationUnavailable, Mode, available, choose
from agents.kernels.protocol import Broken, EvalRequest, SandboxUp, Started, Verdict, from_evaluator
from agents.kernels.sandbox import kill_remains
from schemas.kernels import KernelOutcome

GPU_RUNS, GPU_WARMUP = 100, 10
INTERPRETED_RUNS, INTERPRETED_WARMUP = 3, 1
# Past the evaluation's own limit (which the evaluator enforces), how long the
# worker waits for a verdict before it kills the evaluator itself.
BACKSTOP_GRACE_S = 15.0
POLL_S = 0.1
# The sandboxes of the latest evaluations in this process, newest last: what an
# operator or a test needs to check that nothing of them is left.
recent_sandboxes: collections.deque[SandboxUp] = collections.deque(maxlen=64)

__all__ = ["IsolationUnavailable", "KernelEvalCancelled", "available", "cuda_present", "evaluate", "warm_up"]


class KernelEvalCancelled(Exception):
    """The evaluation was cancelled through its cancel_event; its processes are gone."""


def cuda_present() -> bool:
    """Whether this host has an NVIDIA driver, without importing torch or touching CUDA."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def warm_up() -> None:
    """Probe the isolation and start the evaluator server (call at worker start)."""
    available()
    forkserver.warm()


def evaluate(
    kind: Literal["verify", "profile"],
    reference_source: str,
    candidate_source: str,
    *,
    trials: int = 5,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    timeout_s: float = 120.0,
    memory_mb: int = 4096,
    devices: Sequence[str] = (),
    warmup: int | None = None,
    runs: int | None = None,
    cancel_event: threading.Event | None = None,
    max_procs: int = 32,
    run_rejected: bool = False,
    workdir_root: str | None = None,
    isolation: Mode = "best",
) -> KernelOutcome:
    """Verify or profile `candidate_source` against `reference_source`.

    devices: GPU indices leased to this evaluation (e.g. ["0"]); empty, or no GPU
    on this host, means CPU tensors under Triton's interpreter.
    run_rejected: still run a candidate the static checks reject, so its errors
    and timings are reported (its outcome stays `rejected`).
    isolation: "best" (the strongest this host has), "strict" (namespaces or
    IsolationUnavailable), "process" (no namespaces, e.g. to test that level).
    """
    if kind not in ("verify", "profile"):
        raise ValueError(f"kind must be 'verify' or 'profile', not {kind!r}")
    if isolation not in ("best", "strict", "process"):
        raise ValueError(f"isolation must be 'best', 'strict' or 'process', not {isolation!r}")
    findings = check_source(candidate_source)
    static_flags = flags_of(findings)
    static_msgs = [f"static: {f}" for f in findings]
    interpreted = not devices or not cuda_present()
    level = choose(isolation)
    if set(static_flags) & REJECT_FLAGS and not run_rejected:
        return KernelOutcome(
            kind=kind, outcome="rejected", correct=False, flags=static_flags,
            messages=static_msgs, interpreted=interpreted,
            device="cpu (triton interpreter)" if interpreted else "cuda", isolation="none",
            error="rejected by static checks: " + ", ".join(sorted(set(static_flags) & REJECT_FLAGS)),
        )
    req = EvalRequest(
        kind=kind, reference_source=reference_source, candidate_source=candidate_source,
        trials=trials, seed=seed, atol=atol, rtol=rtol,
        device="cpu" if interpreted else "cuda", devices=[] if interpreted else list(devices),
        warmup=warmup if warmup is not None else (INTERPRETED_WARMUP if interpreted else GPU_WARMUP),
        runs=runs if runs is not None else (INTERPRETED_RUNS if interpreted else GPU_RUNS),
        timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, isolation=level,
        static_flags=static_flags, static_messages=static_msgs, workdir_root=workdir_root,
    )
    sock = forkserver.connect()
    try:
        wire.send_frame(sock, req)
        return _await_verdict(sock, req, cancel_event)
    finally:
        sock.close()


class _Evaluator:
    """What the worker knows of one evaluator process, to kill it and its sandbox."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.sandbox: SandboxUp | None = None

    def kill(self) -> bool:
        # Only while it is still the fork server's child: the server reaps its
        # evaluators at once, so an ended one's pid may already be someone else's.
        if self.pid is not None and _parent_of(self.pid) == forkserver.server_pid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        sb = self.sandbox
        if sb is None:
            return True
        return kill_remains(sb.level, sb.pid, outer_ids=sb.outer_ids, marker=sb.marker,
                            started_wall=sb.started_wall, workdir=sb.workdir)


def _await_verdict(sock: socket.socket, req: EvalRequest,
                   cancel_event: threading.Event | None) -> KernelOutcome:
    ev = _Evaluator()
    deadline = time.monotonic() + req.timeout_s + BACKSTOP_GRACE_S
    while True:
        ready, _, _ = select.select([sock], [], [], POLL_S)
        if ready:
            try:
                header, _ = wire.recv_frame(sock, max_payload=0)
            except (wire.ChannelClosed, wire.ProtocolError, OSError) as exc:
                ev.kill()
                raise RuntimeError(f"the trusted kernel evaluator died without a verdict: {exc}") from exc
            msg = from_evaluator.decode(header)
            if _note(ev, msg):
                continue
            if isinstance(msg, Verdict):
                return msg.outcome
            if isinstance(msg, Broken):
                ev.kill()
                raise RuntimeError(f"kernel evaluator failed: {msg.error}")
            continue
        if cancel_event is not None and cancel_event.is_set():
            _drain(sock, ev)
            ev.kill()
            raise KernelEvalCancelled("kernel evaluation cancelled")
        if time.monotonic() > deadline:
            _drain(sock, ev)
            ev.kill()
            return KernelOutcome(
                kind=req.kind, outcome="timeout", correct=False,
                flags=req.static_flags, messages=[*req.static_messages, "the evaluator did not answer"],
                error=f"wall-clock limit of {req.timeout_s:g} s exceeded",
                interpreted=req.device == "cpu", isolation=req.isolation,
                wall_s=round(req.timeout_s + BACKSTOP_GRACE_S, 3))


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # The command name may hold spaces and parentheses: read after the last ")".
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _note(ev: _Evaluator, msg: object) -> bool:
    """Keep what the evaluator says of itself (its pid, its sandbox's ids)."""
    if isinstance(msg, Started):
        ev.pid = msg.evaluator_pid
    elif isinstance(msg, SandboxUp):
        ev.sandbox = msg
        recent_sandboxes.append(msg)
    else:
        return False
    return True


def _drain(sock: socket.socket, ev: _Evaluator) -> None:
    """Read what the evaluator already said (its sandbox's ids) before killing it."""
    sock.setblocking(False)
    try:
        while True:
            header, _ = wire.recv_frame(sock, max_payload=0)
            _note(ev, from_evaluator.decode(header))
    except (OSError, wire.ChannelClosed, wire.ProtocolError, ValueError):
        pass
    finally:
        sock.setblocking(True)
