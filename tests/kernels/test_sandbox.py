"""Hostile candidates against the limits: hangs, crashes, memory and process hogs,
cancellation, the isolation switch. Each checks that nothing of the sandbox survives."""

from __future__ import annotations

import threading
import time

import pytest

from agents.kernels import isolation
from agents.kernels.evaluate import IsolationUnavailable, KernelEvalCancelled, evaluate
from agents.kernels.library import ProblemInfo

from .conftest import FAST, LAUNCH, SandboxLog, run, with_forward

RUN = {"run_rejected": True}


def test_hang_times_out_and_namespace_is_gone(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    src = with_forward(softmax, LAUNCH + "        while True:\n            pass\n")
    t0 = time.monotonic()
    out = evaluate("verify", softmax.reference_source, src, timeout_s=8, memory_mb=2048)
    assert out.outcome == "timeout" and not out.correct and out.isolation == "namespaces"
    assert time.monotonic() - t0 < 8 + 8


def test_segfault_is_crashed(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    header = "import ctypes\n"
    src = with_forward(softmax, LAUNCH + "        ctypes.string_at(0)\n        return out\n", header=header)
    out = run(softmax, src, **RUN)
    assert out.outcome == "crashed" and out.signal is not None
    assert "SIGSEGV" in (out.error or "")
    assert "unsafe_import" in out.flags  # static finding still reported


def test_nonzero_exit_after_correct_outputs_is_crashed(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Every output matches, then the runner's final exit is turned into status 3.
    header = "import os\n_real_exit = os._exit\n"
    src = with_forward(softmax, LAUNCH + "        return out.view(x.shape)\n", header=header).replace(
        "        super().__init__()\n", "        super().__init__()\n        os._exit = lambda code: _real_exit(3)\n", 1)
    assert "_real_exit(3)" in src
    out = run(softmax, src, trials=2, **RUN)
    assert out.outcome == "crashed" and out.returncode == 3 and out.trials == 2, (out.error, out.flags)


def test_memory_hog_is_runtime_error_oom(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # 12 GB of fp32; RLIMIT_AS (interpreted mode) stops it at once.
    src = with_forward(softmax, LAUNCH + "        junk = torch.ones(3 * 1024**3)\n        return out.view(x.shape) + junk[0]\n")
    t0 = time.monotonic()
    out = evaluate("verify", softmax.reference_source, src, timeout_s=60, memory_mb=1024)
    assert out.outcome == "runtime_error" and "out_of_memory" in out.flags, (out.error, out.flags)
    assert time.monotonic() - t0 < 30


def test_fork_bomb_killed_cleanly(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Bounded at 2**9 processes so a broken watchdog cannot take the CI box down.
    header = "import os\nimport time as _t\n"
    body = LAUNCH + "        for _ in range(9):\n            os.fork()\n        _t.sleep(120)\n        return out\n"
    src = with_forward(softmax, body, header=header)
    out = evaluate("verify", softmax.reference_source, src, timeout_s=60, memory_mb=8192, max_procs=16,
                   run_rejected=True)
    assert out.outcome == "crashed" and "too_many_processes" in out.flags, (out.error, out.flags)
    assert out.wall_s < 40


def test_cancel_kills_the_evaluation(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    src = with_forward(softmax, LAUNCH + "        while True:\n            pass\n")
    cancel = threading.Event()
    threading.Timer(4.0, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(KernelEvalCancelled):
        evaluate("verify", softmax.reference_source, src, timeout_s=60, cancel_event=cancel)
    assert time.monotonic() - t0 < 12
    assert [sb.level for sb in sandboxes.started] == ["namespaces"]


def test_isolation_is_full_here_and_strict_runs(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    info = isolation.available()
    assert info.full and info.level == "namespaces", info.detail
    out = evaluate("verify", softmax.reference_source, softmax.candidate_source, trials=1,
                   isolation="strict", **FAST)  # type: ignore[arg-type]
    assert out.outcome == "pass" and out.isolation == "namespaces"


def test_strict_refuses_without_namespaces(softmax: ProblemInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETFLEET_SANDBOX_DISABLE_NAMESPACES", "1")
    isolation.available.cache_clear()
    try:
        info = isolation.available()
        assert info.level == "process" and not info.full
        with pytest.raises(IsolationUnavailable, match="strict sandbox required"):
            evaluate("verify", softmax.reference_source, softmax.candidate_source, isolation="strict")
    finally:
        monkeypatch.delenv("JETFLEET_SANDBOX_DISABLE_NAMESPACES")
        isolation.available.cache_clear()
    assert isolation.available().full


def test_process_level_still_decides_and_cleans_up(
        softmax: ProblemInfo, sandboxes: SandboxLog, no_host_traces: None) -> None:
    # The fallback for hosts without user namespaces: weaker isolation, same verdicts.
    good = evaluate("verify", softmax.reference_source, softmax.candidate_source, trials=1,
                    isolation="process", **FAST)  # type: ignore[arg-type]
    assert good.outcome == "pass" and good.isolation == "process"
    header = "import os\nimport time as _t\n"
    body = (LAUNCH + "        if os.fork() == 0:\n            os.setsid()\n            _t.sleep(300)\n"
            "        while True:\n            pass\n")
    hang = evaluate("verify", softmax.reference_source, with_forward(softmax, body, header=header),
                    timeout_s=6, isolation="process", run_rejected=True)
    assert hang.outcome == "timeout" and hang.isolation == "process"
    assert [sb.level for sb in sandboxes.started] == ["process", "process"]
