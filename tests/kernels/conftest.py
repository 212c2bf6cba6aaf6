"""Helpers for the kernel evaluation tests: candidates built from the softmax problem,
and the checks that an evaluation left nothing behind and leaked nothing.

Every evaluation here is real: a trusted evaluator process and a sandboxed
candidate process running Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

import agents.kernels.evaluate as evaluate_mod
from agents.kernels.library import ProblemInfo, load_problem
from agents.kernels.protocol import SandboxUp
from agents.kernels.sandbox import MARKER_ENV, processes_of_uids
from schemas.kernels import KernelOutcome

# Small limits keep misbehaving candidates cheap on a 2-core CI box.
FAST = {"timeout_s": 60.0, "memory_mb": 2048}


@pytest.fixture(scope="session")
def softmax() -> ProblemInfo:
    return load_problem("softmax")


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"expected exactly one {old!r} in the candidate"
    return source.replace(old, new)


def with_forward(problem: ProblemInfo, body: str, header: str = "") -> str:
    """The softmax candidate with its forward body replaced by `body` (8-space indented)."""
    src = problem.candidate_source
    start = src.index("    def forward(")
    sig_end = src.index("\n", start) + 1
    return header + src[:sig_end] + body


# A launch of the real kernel, so a test candidate is not also "no kernel launched".
LAUNCH = (
    "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
    "        out = torch.empty_like(x2)\n"
    "        _softmax_kernel[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
)


def leftovers(sb: SandboxUp) -> list[psutil.Process]:
    """Live processes of one finished sandbox."""
    if sb.level == "namespaces":
        # Its two outer ids belong to no other process on the host.
        return processes_of_uids(set(sb.outer_ids))
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == sb.pid or proc.environ().get(MARKER_ENV) == sb.marker:
                left.append(proc)
        except (psutil.Error, OSError):
            continue
    return left


class SandboxLog:
    """The sandboxes evaluate() started since the log was opened."""

    def __init__(self) -> None:
        self._before = list(evaluate_mod.recent_sandboxes)

    @property
    def started(self) -> list[SandboxUp]:
        return [sb for sb in evaluate_mod.recent_sandboxes if sb not in self._before]


@pytest.fixture
def sandboxes() -> Iterator[SandboxLog]:
    """The sandboxes evaluate() started during the test; none may outlive it."""
    log = SandboxLog()
    yield log
    for sb in log.started:
        assert leftovers(sb) == [], f"processes of sandbox {sb} survived the evaluation"


def _host_traces() -> dict[str, set[str]]:
    shm = Path("/proc/sysvipc/shm")
    return {
        "tmp": {p.name for p in Path("/tmp").iterdir() if p.name.startswith("jetfleet-")},
        "dev_shm": set(os.listdir("/dev/shm")),
        "sysv_shm": set(shm.read_text().splitlines()[1:]) if shm.exists() else set(),
    }


@pytest.fixture
def no_host_traces(sandboxes: SandboxLog) -> Iterator[None]:
    """No file, shared memory or SysV segment of an evaluation is left on the host."""
    before = _host_traces()
    yield
    after = _host_traces()
    for key, names in after.items():
        new = names - before[key]
        assert not new, f"left in {key}: {sorted(new)[:5]}"


@pytest.fixture
def worker_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret the worker holds in its environment and in its memory."""
    value = "jfsecret-" + secrets.token_hex(16)
    monkeypatch.setenv("JETFLEET_NATS_TOKEN", value)
    held = bytearray(value.encode()) * 4
    yield value
    del held


def assert_no_secret(outcome: KernelOutcome, secret: str) -> None:
    text = msgspec.json.encode(outcome).decode()
    assert secret not in text
    assert secret[len("jfsecret-"):] not in text


def run(problem: ProblemInfo, candidate: str, kind: str = "verify", **kw: Any) -> KernelOutcome:
    opts: dict[str, Any] = {"trials": 2, **FAST, **kw}
    return evaluate_mod.evaluate(kind, problem.reference_source, candidate, **opts)  # type: ignore[arg-type]


def hostile(problem: ProblemInfo, body: str, header: str = "", init: str = "") -> str:
    """The softmax candidate with `body` as forward, `header` on top and `init`
    (8-space indented) run in ModelNew.__init__."""
    src = with_forward(problem, body, header="import torch\nimport triton\nimport triton.language as tl\n" + header)
    if init:
        src = src.replace("        super().__init__()\n", "        super().__init__()\n" + init, 1)
        assert init in src
    return src


# The honest result, from the real kernel, for candidates that cheat elsewhere.
HONEST = LAUNCH + "        return out.view(x.shape)\n"
