"""Hostile candidates: hangs, crashes, memory and process hogs, secret snooping."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.kernels.evaluate import KernelEvalCancelled, evaluate
from agents.kernels.library import ProblemInfo
from agents.kernels.sandbox import SandboxLimits, SandboxResult, run_sandboxed

from .conftest import FAST, LAUNCH, leftovers, with_forward


def test_hang_times_out_and_group_is_gone(softmax: ProblemInfo, sandboxes: list[SandboxResult]) -> None:
    src = with_forward(softmax, LAUNCH + "        while True:\n            pass\n")
    t0 = time.monotonic()
    out = evaluate("verify", softmax.reference_source, src, timeout_s=12, memory_mb=2048)
    assert out.outcome == "timeout" and not out.correct
    assert time.monotonic() - t0 < 12 + 8
    assert sandboxes and leftovers(sandboxes[0]) == []


def test_segfault_is_crashed(softmax: ProblemInfo) -> None:
    header = "import ctypes\n"
    src = with_forward(softmax, LAUNCH + "        ctypes.string_at(0)\n        return out\n", header=header)
    out = evaluate("verify", softmax.reference_source, src, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "crashed" and out.signal is not None
    assert "SIGSEGV" in (out.error or "")
    assert "unsafe_import" in out.flags  # static finding still reported


def test_memory_hog_is_runtime_error_oom(softmax: ProblemInfo) -> None:
    # 12 GB of fp32; RLIMIT_AS (interpreted mode) stops it at once.
    src = with_forward(softmax, LAUNCH + "        junk = torch.ones(3 * 1024**3)\n        return out.view(x.shape) + junk[0]\n")
    t0 = time.monotonic()
    out = evaluate("verify", softmax.reference_source, src, timeout_s=60, memory_mb=1024)
    assert out.outcome == "runtime_error" and "out_of_memory" in out.flags, (out.error, out.flags)
    assert time.monotonic() - t0 < 30


def test_rss_watchdog_kills_gradual_hog(tmp_path: Path) -> None:
    # The CUDA path has no RLIMIT_AS: the resident-set watchdog must stop it.
    code = "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 * 1024))\n"
    lim = SandboxLimits(timeout_s=30, memory_mb=400, address_space_limit=False)
    res = run_sandboxed([sys.executable, "-c", code], workdir=tmp_path, limits=lim)
    assert res.memory_exceeded and res.signal == 9 and res.wall_s < 20
    assert leftovers(res) == []


def test_fork_bomb_killed_cleanly(softmax: ProblemInfo, sandboxes: list[SandboxResult]) -> None:
    # Bounded at 2**9 processes so a broken watchdog cannot take the CI box down.
    header = "import os\nimport time as _t\n"
    body = LAUNCH + "        for _ in range(9):\n            os.fork()\n        _t.sleep(120)\n        return out\n"
    src = with_forward(softmax, body, header=header)
    out = evaluate("verify", softmax.reference_source, src, timeout_s=60, memory_mb=8192, max_procs=16)
    assert out.outcome == "crashed" and "too_many_processes" in out.flags
    assert out.wall_s < 40
    assert leftovers(sandboxes[0]) == []


def test_setsid_escapee_is_still_killed(tmp_path: Path) -> None:
    # A grandchild that leaves the process group keeps the sandbox marker.
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    )
    res = run_sandboxed([sys.executable, "-c", code], workdir=tmp_path, limits=SandboxLimits(timeout_s=3))
    assert res.timed_out and res.peak_procs >= 2
    assert leftovers(res) == []


def test_secrets_not_visible(softmax: ProblemInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_TOKEN", "s3cr3t-nats")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-aws")
    monkeypatch.setenv("JETFLEET_LLM_API_KEY", "s3cr3t-llm")
    header = "import os\n"
    body = (
        "        names = sorted(os.environ)\n"
        "        raise RuntimeError('ENV=' + ','.join(names) + ' HOME=' + os.environ['HOME'] + "
        "' CVD=[' + os.environ['CUDA_VISIBLE_DEVICES'] + ']')\n"
    )
    src = with_forward(softmax, body, header=header)
    out = evaluate("verify", softmax.reference_source, src, **FAST)  # type: ignore[arg-type]
    assert out.outcome == "runtime_error"
    err = out.error or ""
    assert "ENV=" in err
    for secret in ("NATS_TOKEN", "AWS_SECRET_ACCESS_KEY", "JETFLEET_LLM_API_KEY", "s3cr3t"):
        assert secret not in err and secret not in out.stderr_tail
    assert "TRITON_INTERPRET" in err and "CVD=[]" in err
    home = err.split("HOME=")[1].split(" ")[0]
    assert "jetfleet-kernel-" in home and not os.path.exists(home)  # its directory is removed


def test_cancel_kills_the_evaluation(softmax: ProblemInfo, sandboxes: list[SandboxResult]) -> None:
    src = with_forward(softmax, LAUNCH + "        while True:\n            pass\n")
    cancel = threading.Event()
    threading.Timer(2.0, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(KernelEvalCancelled):
        evaluate("verify", softmax.reference_source, src, timeout_s=60, cancel_event=cancel)
    assert time.monotonic() - t0 < 10
    assert leftovers(sandboxes[0]) == []
