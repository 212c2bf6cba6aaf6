"""Run one untrusted evaluation in a fresh, killable child process.

What the sandbox guarantees to the worker (not to the honesty of the result):

- the child runs in its own session and process group, in its own directory,
  with HOME/TMPDIR/caches pointing into that directory;
- its environment is rebuilt from an allow-list: tokens, NATS credentials,
  cloud keys and anything else the worker holds never reach it;
- a wall-clock limit, a memory limit and a process-count limit are enforced by
  a watchdog in the parent that SIGKILLs the whole group and reaps the child;
- resource limits: no core dumps, bounded file sizes, and RLIMIT_AS when the
  child does not use CUDA (CUDA reserves huge virtual ranges, so with CUDA only
  the resident-set watchdog applies).

We run as root, where RLIMIT_NPROC is not enforced, so the process-count limit
is the watchdog's job. The watchdog counts members of the group, descendants of
the child and any process carrying this sandbox's marker in its environment (a
process that calls setsid() leaves the group but keeps the marker unless it
also scrubs its environment; only cgroups/namespaces would close that gap).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKER_ENV = "JETFLEET_SANDBOX_ID"
TAIL_BYTES = 8192
_MB = 1024 * 1024

# Variables copied from the parent when set. Everything else is dropped.
_ENV_ALLOW = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "VIRTUAL_ENV",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
_ENV_ALLOW_PREFIXES = ("TRITON_",)
# Set by the sandbox itself, never inherited.
_ENV_OWNED = ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR")

# Applies the rlimits in the fresh interpreter and execs the real command. A
# separate exec (rather than Popen's preexec_fn) because preexec_fn is unsafe when
# the caller has threads, and the worker calls us from a thread.
_LAUNCHER = (
    "import json, os, resource, sys\n"
    "for name, value in json.loads(sys.argv[1]).items():\n"
    "    res = getattr(resource, name)\n"
    "    _soft, hard = resource.getrlimit(res)\n"
    "    if hard != resource.RLIM_INFINITY:\n"
    "        value = min(value, hard)\n"
    "    resource.setrlimit(res, (value, value))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 120.0
    # Resident memory of all processes of the sandbox together.
    memory_mb: int = 4096
    max_procs: int = 32
    # RLIMIT_AS per process; must be off when the child uses CUDA. Set a little
    # above memory_mb because torch/triton reserve address space they never touch.
    address_space_limit: bool = True
    address_space_headroom_mb: int = 1024
    file_size_mb: int = 1024
    poll_s: float = 0.05


@dataclass
class SandboxResult:
    returncode: int | None
    signal: int | None
    timed_out: bool
    memory_exceeded: bool
    too_many_processes: bool
    cancelled: bool
    stdout_tail: str
    stderr_tail: str
    wall_s: float
    pid: int
    pgid: int
    peak_rss_mb: float
    peak_procs: int
    marker: str
    notes: list[str] = field(default_factory=list)

    @property
    def killed_by_watchdog(self) -> bool:
        return self.timed_out or self.memory_exceeded or self.too_many_processes or self.cancelled


def project_root() -> Path:
    """The directory that holds the `agents` package (so the child can import it)."""
    return Path(__file__).resolve().parents[2]


def build_env(
    workdir: Path,
    devices: Sequence[str],
    *,
    interpreted: bool,
    marker: str,
    parent_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The child's whole environment, built from an allow-list."""
    src = os.environ if parent_env is None else parent_env
    env: dict[str, str] = {}
    for key, value in src.items():
        if key in _ENV_OWNED:
            continue
        if key in _ENV_ALLOW or key.startswith(_ENV_ALLOW_PREFIXES):
            env[key] = value
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    # Concurrent evaluations on one host should not oversubscribe its cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(project_root())]
    if src.get("PYTHONPATH"):
        paths.extend(p for p in src["PYTHONPATH"].split(os.pathsep) if p)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(
        {
            "HOME": str(workdir),
            "TMPDIR": str(tmp),
            "XDG_CACHE_HOME": str(workdir / ".cache"),
            "TRITON_CACHE_DIR": str(workdir / ".triton"),
            "TRITON_HOME": str(workdir),
            "CUDA_CACHE_PATH": str(workdir / ".nv"),
            "TORCHINDUCTOR_CACHE_DIR": str(workdir / ".inductor"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONHASHSEED": "0",
            # Only the leased devices; an empty value hides every GPU.
            "CUDA_VISIBLE_DEVICES": ",".join(devices),
            MARKER_ENV: marker,
        }
    )
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    return env


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    out = {"RLIMIT_CORE": 0, "RLIMIT_FSIZE": limits.file_size_mb * _MB}
    if limits.address_space_limit:
        out["RLIMIT_AS"] = (limits.memory_mb + limits.address_space_headroom_mb) * _MB
    return out


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return bool(proc.environ().get(MARKER_ENV) == marker)
    except (psutil.Error, OSError):
        return False


def _members(pgid: int, root: int, marker: str, started: float) -> list[psutil.Process]:
    """Live processes that belong to the sandbox (zombies hold nothing and are skipped)."""
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            proc = psutil.Process(pid)
            in_group = os.getpgid(pid) == pgid
            # Only processes born after the sandbox can carry its marker; checking
            # just those keeps the scan cheap on a busy host.
            if not in_group and not (proc.create_time() >= started - 1.0 and _has_marker(proc, marker)):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[pid] = proc
        except (psutil.Error, OSError):
            continue
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(root).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.setdefault(child.pid, child)
    return list(found.values())


def _rss_mb(procs: Iterable[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / _MB


def kill_sandbox(pgid: int, root: int, marker: str, started: float) -> list[str]:
    """SIGKILL the group and every stray member until none is left alive."""
    notes: list[str] = []
    deadline = time.monotonic() + 10.0
    while True:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        left = _members(pgid, root, marker, started)
        if not left:
            return notes
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if time.monotonic() > deadline:
            notes.append(f"{len(left)} sandbox processes survived SIGKILL for 10 s")
            return notes
        time.sleep(0.02)


def _tail(path: Path, limit: int = TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_sandboxed(
    argv: Sequence[str],
    *,
    workdir: Path,
    devices: Sequence[str] = (),
    interpreted: bool = True,
    limits: SandboxLimits | None = None,
    cancel_event: threading.Event | None = None,
) -> SandboxResult:
    """Run `argv` (argv[0] an absolute executable) under the sandbox in `workdir`."""
    lim = limits or SandboxLimits()
    workdir = Path(workdir)
    marker = uuid.uuid4().hex
    env = build_env(workdir, devices, interpreted=interpreted, marker=marker)
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    cmd = [sys.executable, "-c", _LAUNCHER, json.dumps(_rlimits(lim)), *argv]
    started_wall = time.time()
    t0 = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
    pgid = proc.pid  # start_new_session makes the child its own group leader
    timed_out = memory_exceeded = too_many = cancelled = False
    peak_rss = 0.0
    peak_procs = 1
    notes: list[str] = []
    while True:
        try:
            proc.wait(timeout=lim.poll_s)
            break
        except subprocess.TimeoutExpired:
            pass
        if cancel_event is not None and cancel_event.is_set():
            cancelled = True
            break
        if time.monotonic() - t0 > lim.timeout_s:
            timed_out = True
            break
        members = _members(pgid, proc.pid, marker, started_wall)
        peak_procs = max(peak_procs, len(members))
        if len(members) > lim.max_procs:
            too_many = True
            notes.append(f"{len(members)} processes > limit {lim.max_procs}")
            break
        rss = _rss_mb(members)
        peak_rss = max(peak_rss, rss)
        if rss > lim.memory_mb:
            memory_exceeded = True
            notes.append(f"resident memory {rss:.0f} MB > limit {lim.memory_mb} MB")
            break
    # Always sweep: a child that exited normally may have left grandchildren behind.
    notes.extend(kill_sandbox(pgid, proc.pid, marker, started_wall))
    rc = proc.wait()
    wall = time.monotonic() - t0
    return SandboxResult(
        returncode=rc,
        signal=-rc if rc < 0 else None,
        timed_out=timed_out,
        memory_exceeded=memory_exceeded,
        too_many_processes=too_many,
        cancelled=cancelled,
        stdout_tail=_tail(out_path),
        stderr_tail=_tail(err_path),
        wall_s=wall,
        pid=proc.pid,
        pgid=pgid,
        peak_rss_mb=peak_rss,
        peak_procs=peak_procs,
        marker=marker,
        notes=notes,
    )
