"""Start, watch and end one candidate's process (trusted side).

`Sandbox.start(level, ...)` runs the candidate-side runner (agents.kernels.child)
under the isolation level chosen by agents.kernels.isolation and hands back
the trusted end of its channel. A watchdog thread enforces, for the sandbox as
a whole:

- the wall-clock limit;
- memory: resident memory of all its processes (each shared page counted
  once), plus (namespaces) what its private tmpfs mounts and its open memfds
  hold, against `memory_mb`;
- the number of processes (namespaces also get RLIMIT_NPROC on their own
  outer uid, which the kernel enforces at fork time).

`finish()` waits briefly for the runner to exit by itself, then kills every
process of the sandbox and reaps it: with namespaces, a SIGKILL to the pid
namespace's init takes all of them (setsid, double forks and emptied
environments do not leave a pid namespace); with the process level, the
group, the child's descendants and anything carrying the sandbox's marker.
stdout and stderr are pipes drained into bounded tails, never files.

What the sandbox observes (limits hit, exit status, signal) is the only
account of the candidate's process that the verdict trusts.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agents.kernels import isolation
from agents.kernels.isolation import Level

MARKER_ENV = "JETFLEET_SANDBOX_ID"
TAIL_BYTES = 8192
_MB = 1024 * 1024

# Variables copied from the parent when set. Everything else is dropped.
_ENV_ALLOW = (
    "PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "CUDA_HOME",
    "CUDA_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
)
_ENV_ALLOW_PREFIXES = ("TRITON_",)
_ENV_OWNED = ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR")
BOOT = "import sys; sys.path.insert(0, {root!r}); from agents.kernels.child import main; main()"

# Process level: applies the rlimits in a fresh interpreter and execs the runner
# (not Popen's preexec_fn, which is unsafe in a threaded caller).
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
    # Everything the sandbox holds in memory together, its tmpfs included.
    memory_mb: int = 4096
    max_procs: int = 32
    # RLIMIT_AS per process; must be off when the child uses CUDA (it reserves
    # huge virtual ranges). Set above memory_mb: torch reserves what it never touches.
    address_space_limit: bool = True
    address_space_headroom_mb: int = 1024
    file_size_mb: int = 256
    poll_s: float = 0.05

    @property
    def tmp_mb(self) -> int:
        return max(16, min(512, self.memory_mb // 8))

    @property
    def shm_mb(self) -> int:
        return max(8, min(256, self.memory_mb // 16))


@dataclass
class SandboxResult:
    isolation: Level
    returncode: int | None
    signal: int | None
    timed_out: bool
    memory_exceeded: bool
    too_many_processes: bool
    stdout_tail: str
    stderr_tail: str
    wall_s: float
    peak_memory_mb: float
    peak_procs: int
    notes: list[str] = field(default_factory=list)

    @property
    def killed_by_watchdog(self) -> bool:
        return self.timed_out or self.memory_exceeded or self.too_many_processes


class _Tail:
    """The last TAIL_BYTES of a pipe, drained by a thread so the writer never blocks."""

    def __init__(self, fd: int) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._thread = threading.Thread(target=self._drain, args=(fd,), daemon=True)
        self._thread.start()

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as fh:
            while chunk := fh.read(65536):
                self._chunks.append(chunk)
                self._size += len(chunk)
                while self._size - len(self._chunks[0]) >= TAIL_BYTES:
                    self._size -= len(self._chunks.popleft())

    def text(self, join_s: float = 2.0) -> str:
        self._thread.join(join_s)
        data = b"".join(self._chunks)[-TAIL_BYTES:]
        return data.decode("utf-8", errors="replace")


def runner_env(level: Level, home: str, devices: Sequence[str], *, interpreted: bool, marker: str,
               parent_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner's whole environment, built from an allow-list."""
    src = os.environ if parent_env is None else parent_env
    env = {k: v for k, v in src.items()
           if k not in _ENV_OWNED and (k in _ENV_ALLOW or k.startswith(_ENV_ALLOW_PREFIXES))}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    # Concurrent evaluations on one host should not oversubscribe its cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    tmp = f"{home}/tmp" if level == "process" else "/tmp"
    env.update({
        "HOME": home, "TMPDIR": tmp, "USER": "sandbox", "LOGNAME": "sandbox",
        "XDG_CACHE_HOME": f"{home}/.cache", "TRITON_CACHE_DIR": f"{home}/.triton",
        "TRITON_HOME": home, "CUDA_CACHE_PATH": f"{home}/.nv",
        "TORCHINDUCTOR_CACHE_DIR": f"{home}/.inductor",
        # Only the leased devices; an empty value hides every GPU.
        "CUDA_VISIBLE_DEVICES": ",".join(devices),
    })
    if level == "process":
        env[MARKER_ENV] = marker
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    return env


def _rlimits(lim: SandboxLimits, level: Level) -> dict[str, int]:
    out = {"RLIMIT_CORE": 0, "RLIMIT_FSIZE": lim.file_size_mb * _MB, "RLIMIT_MSGQUEUE": 0}
    if lim.address_space_limit:
        out["RLIMIT_AS"] = (lim.memory_mb + lim.address_space_headroom_mb) * _MB
    if level == "namespaces":
        # Counts threads too, of this evaluation's own outer uid only: a hard
        # stop for fork bombs between two watchdog polls.
        out["RLIMIT_NPROC"] = max(64, 4 * lim.max_procs)
        out["RLIMIT_NOFILE"] = 1024
    return out


class Sandbox:
    """One running candidate process tree and its watchdog."""

    def __init__(self, level: Level, proc: subprocess.Popen[bytes], channel: socket.socket,
                 lim: SandboxLimits, tails: tuple[_Tail, _Tail], *, marker: str,
                 init_pid: int | None, workdir: tempfile.TemporaryDirectory[str] | None,
                 outer: tuple[int, int] | None) -> None:
        self.level = level
        self.proc = proc
        self.channel = channel
        self.limits = lim
        self.marker = marker
        self.init_pid = init_pid
        self.outer = outer
        self.workdir = workdir.name if workdir is not None else None
        self._tails = tails
        self._workdir = workdir
        self._t0 = time.monotonic()
        self._started_wall = time.time()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self._result: SandboxResult | None = None
        self.timed_out = self.memory_exceeded = self.too_many = False
        self.peak_mem = 0.0
        self.peak_procs = 1
        self.notes: list[str] = []
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()

    # ---- start ------------------------------------------------------------------------
    @classmethod
    def start(cls, level: Level, *, devices: Sequence[str], interpreted: bool,
              limits: SandboxLimits, evaluator_pid: int | None = None,
              workdir_root: str | None = None) -> Sandbox:
        lim = limits
        marker = uuid.uuid4().hex
        parent, child = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        workdir: tempfile.TemporaryDirectory[str] | None = None
        init_pid: int | None = None
        outer: tuple[int, int] | None = None
        try:
            rlimits = _rlimits(lim, level)
            if level == "namespaces":
                home = isolation.SANDBOX_CWD
                argv = [sys.executable, "-I", "-B", "-u", "-c",
                        BOOT.format(root=isolation.PKG_ROOT), str(3)]
                cfg = isolation.NamespaceConfig(
                    argv=argv, env=runner_env(level, home, devices, interpreted=interpreted, marker=marker),
                    channel_fd=child.fileno(), tmp_mb=lim.tmp_mb, shm_mb=lim.shm_mb,
                    rlimits=rlimits, gpu=bool(devices) and not interpreted)
                proc = subprocess.Popen(
                    isolation.launch_argv(cfg.to_json()), pass_fds=(child.fileno(),),
                    stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, start_new_session=True,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                child.close()
                pid = evaluator_pid if evaluator_pid is not None else os.getpid()
                try:
                    isolation.handshake(parent, proc.pid, pid)
                    init_pid = _only_child(proc.pid)
                except BaseException:
                    _kill_quietly(proc)
                    raise
                outer = isolation.outer_ids(pid)
            else:
                workdir = tempfile.TemporaryDirectory(prefix="jetfleet-kernel-", dir=workdir_root,
                                                      ignore_cleanup_errors=True)
                home = workdir.name
                Path(home, "tmp").mkdir()
                argv = [sys.executable, "-I", "-B", "-u", "-c",
                        BOOT.format(root=str(isolation.project_root())), str(child.fileno())]
                # It dies with the evaluator; its descendants are swept by marker.
                setpriv = shutil.which("setpriv")
                prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-c", _LAUNCHER, json.dumps(rlimits), *argv],
                    pass_fds=(child.fileno(),), cwd=home,
                    env=runner_env(level, home, devices, interpreted=interpreted, marker=marker),
                    stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, start_new_session=True)
                child.close()
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            parent.close()
            with contextlib.suppress(OSError):
                child.close()
            if workdir is not None:
                workdir.cleanup()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return cls(level, proc, parent, lim, (_Tail(out_r), _Tail(err_r)), marker=marker,
                   init_pid=init_pid, workdir=workdir, outer=outer)

    # ---- watching -----------------------------------------------------------------------
    def members(self) -> list[psutil.Process]:
        """Live processes of this sandbox (zombies hold nothing and are skipped)."""
        if self.level == "namespaces":
            return _tree(self.init_pid) if self.init_pid else []
        return _marked(self.proc.pid, self.marker, self._started_wall)

    def cpu_ms(self) -> float:
        """CPU time used so far by every process of the sandbox, in milliseconds."""
        root = self.init_pid if self.level == "namespaces" else self.proc.pid
        return cpu_ns(descendants(root)) / 1e6 if root else 0.0

    def memory_mb(self, procs: Iterable[psutil.Process]) -> float:
        procs = list(procs)
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        if total > self.limits.memory_mb * _MB and len(procs) > 1:
            # Forked processes share their pages, which RSS counts once per process:
            # before calling it a breach, count each page once (PSS).
            total = float(sum(_pss(p.pid) for p in procs))
        if self.level == "namespaces" and self.init_pid:
            for mount in ("tmp", "dev/shm"):
                with contextlib.suppress(OSError):
                    st = os.statvfs(f"/proc/{self.init_pid}/root/{mount}")
                    total += (st.f_blocks - st.f_bfree) * st.f_frsize
            total += _memfd_bytes(procs)
        return total / _MB

    def _watch(self) -> None:
        lim = self.limits
        while not self._done.wait(lim.poll_s):
            if self.proc.poll() is not None:
                if self.level == "process":
                    # Its descendants may hold the channel open: they go with it.
                    self.kill()
                return
            if time.monotonic() - self._t0 > lim.timeout_s:
                self._trip("timed_out", f"wall-clock limit of {lim.timeout_s:g} s")
                return
            procs = self.members()
            self.peak_procs = max(self.peak_procs, len(procs))
            if len(procs) > lim.max_procs:
                self._trip("too_many", f"{len(procs)} processes > limit {lim.max_procs}")
                return
            mem = self.memory_mb(procs)
            self.peak_mem = max(self.peak_mem, mem)
            if mem > lim.memory_mb:
                self._trip("memory_exceeded", f"memory {mem:.0f} MB > limit {lim.memory_mb} MB")
                return

    def _trip(self, what: str, note: str) -> None:
        with self._lock:
            setattr(self, what, True)
            self.notes.append(note)
        self.kill()

    @property
    def tripped(self) -> bool:
        return self.timed_out or self.memory_exceeded or self.too_many

    # ---- ending -------------------------------------------------------------------------
    def kill(self) -> None:
        """SIGKILL every process of the sandbox (idempotent, returns at once)."""
        if self.level == "namespaces":
            if self.init_pid and self.outer:
                # By pid only while it still runs as this sandbox's root id: the
                # pid may have been reaped and reused since.
                _kill_if_uid(self.init_pid, self.outer[0])
            _kill_quietly(self.proc)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for p in _marked(self.proc.pid, self.marker, self._started_wall):
                with contextlib.suppress(psutil.Error):
                    p.kill()

    def finish(self, wait_s: float = 0.0) -> SandboxResult:
        """Let the runner exit for up to `wait_s`, then kill everything and reap it (once)."""
        with self._finish_lock:
            if self._result is None:
                self._result = self._finish(wait_s)
            return self._result

    def _finish(self, wait_s: float) -> SandboxResult:
        rc: int | None
        try:
            rc = self.proc.wait(timeout=max(0.0, wait_s))
        except subprocess.TimeoutExpired:
            rc = None
        self._done.set()
        self.kill()
        rc_final = self.proc.wait()
        self._watchdog.join(5)
        self.notes.extend(self._sweep())
        with contextlib.suppress(OSError):
            self.channel.close()
        if self._workdir is not None:
            self._workdir.cleanup()
        code, sig = _decode_status(self.level, rc if rc is not None else rc_final)
        if rc is None:  # we killed it: what ran inside ended by our SIGKILL
            code, sig = None, signal.SIGKILL
        return SandboxResult(
            isolation=self.level, returncode=code, signal=sig, timed_out=self.timed_out,
            memory_exceeded=self.memory_exceeded, too_many_processes=self.too_many,
            stdout_tail=self._tails[0].text(), stderr_tail=self._tails[1].text(),
            wall_s=time.monotonic() - self._t0, peak_memory_mb=self.peak_mem,
            peak_procs=self.peak_procs, notes=list(self.notes))

    def _sweep(self) -> list[str]:
        """Kill until nothing of the sandbox is alive; a note if something survives 10 s."""
        deadline = time.monotonic() + 10.0
        while True:
            left = self.survivors()
            if not left:
                return []
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            if time.monotonic() > deadline:
                return [f"{len(left)} sandbox processes survived SIGKILL for 10 s"]
            time.sleep(0.02)

    def survivors(self) -> list[psutil.Process]:
        """Processes of this sandbox still alive (after finish(): none)."""
        if self.level == "namespaces" and self.outer is not None:
            return processes_of_uids(set(self.outer))
        return _marked(self.proc.pid, self.marker, self._started_wall)


def kill_remains(level: Level, pid: int, *, outer_ids: Sequence[int], marker: str,
                 started_wall: float, workdir: str | None = None, wait_s: float = 10.0) -> bool:
    """From outside the evaluator: kill what is left of a sandbox; True when nothing is."""
    try:
        return _kill_remains(level, pid, outer_ids, marker, started_wall, wait_s)
    finally:
        if workdir and Path(workdir).name.startswith("jetfleet-kernel-"):
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_remains(level: Level, pid: int, outer_ids: Sequence[int], marker: str,
                  started_wall: float, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if level == "namespaces":
            # Only this evaluation's outer ids: safe whatever pids were reused since.
            left = processes_of_uids(set(outer_ids)) if outer_ids else []
        else:
            left = [p for p in _marked(pid, marker, started_wall) if _born_after(p, started_wall)]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _born_after(p: psutil.Process, started_wall: float) -> bool:
    try:
        return bool(p.create_time() >= started_wall - 1.0)
    except psutil.Error:
        return False


def processes_of_uids(uids: set[int]) -> list[psutil.Process]:
    """Live processes whose real uid is one of `uids` (a namespace sandbox's outer ids)."""
    out = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.info["uids"].real in uids:
                out.append(p)
        except (psutil.Error, AttributeError, TypeError):
            continue
    return out


def _decode_status(level: Level, rc: int) -> tuple[int | None, int | None]:
    if rc < 0:
        return None, -rc
    if level == "namespaces" and rc > 128 and rc - 128 < 65:
        # The init exits 128 + signal when the runner was killed by a signal.
        return None, rc - 128
    return rc, None


def _only_child(pid: int) -> int:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            kids.extend(int(c) for c in fh.read().split())
    if len(kids) != 1:
        raise OSError(f"expected one sandbox init under unshare, found {len(kids)}")
    return kids[0]


def _kill_if_uid(pid: int, uid: int) -> None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            real = next(int(line.split()[1]) for line in fh if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return
    if real == uid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        proc.kill()


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from the kernel's per-task child lists."""
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.append(pid)
        for tid in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
    return out


def cpu_ns(pids: Iterable[int]) -> int:
    """CPU time used so far by every thread of `pids` (nanoseconds, from schedstat)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
    return total


def _tree(root: int) -> list[psutil.Process]:
    live = []
    for pid in descendants(root):
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
    return live


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return bool(proc.environ().get(MARKER_ENV) == marker)
    except (psutil.Error, OSError):
        return False


def _marked(root: int, marker: str, started: float) -> list[psutil.Process]:
    """Process level: the group, the child's descendants and anything with the marker."""
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            proc = psutil.Process(pid)
            in_group = os.getpgid(pid) == root
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


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages divided among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _memfd_bytes(procs: Iterable[psutil.Process]) -> int:
    """Bytes held by memfds open in `procs` (shared memory no RSS or mount shows)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in procs:
        base = f"/proc/{p.pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"{base}/{fd}").startswith("/memfd:"):
                    continue
                st = os.stat(f"{base}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
