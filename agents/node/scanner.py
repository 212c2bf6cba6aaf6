"""Finding and measuring the processes that are jobs, with psutil.

Each cycle lists pids (one directory read) and looks closely only at:
  - pids it has not seen before: command line and start time once, plus the
    `JETFLEET_JOB_ID` variable, to decide whether they are jobs;
  - the pids NVML says hold a GPU;
  - the processes it tracks: CPU, memory, threads, open files, status.
Nothing iterates every process with `as_dict`. A process seen too young to
have exec'd its final command line is looked at again; pid reuse is caught
by a rolling check of start times. Children of a tracked job (torchrun ranks,
data loaders) belong to that job instead of becoming jobs of their own.
`NoSuchProcess` and `AccessDenied` are expected everywhere: a vanished
process ends its job, a field we may not read is None.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import psutil

from agents.node.capture import JOB_ID_VAR, Captured, CaptureLimits, RawProcess, capture
from agents.node.gpu import GpuSnapshot
from agents.node.patterns import JobPatterns
from schemas.common import is_valid_id
from schemas.telemetry import DiscoveredRef, ProcessSample

log = logging.getLogger(__name__)

# A process younger than this may not have exec'd yet (fork, then exec): its
# command line is read again on the next cycle before the verdict is kept.
SETTLE_S = 1.0
MAX_ANCESTRY = 16
_JOB_VAR = JOB_ID_VAR.encode() + b"="
Origin = Literal["submitted", "discovered"]


def discovered_id(node: str, pid: int, create_time: float) -> str:
    """Stable across agent restarts: the node, the pid and its start time."""
    return f"d-{node}-{pid}-{round(create_time * 100):x}"[:128]


@dataclass
class _Seen:
    create_time: float
    settled: bool
    candidate: bool
    job_var: str | None
    ppid: int | None


@dataclass
class Proc:
    proc: psutil.Process
    pid: int
    create_time: float
    root: bool
    primed: bool = False  # cpu_percent needs a previous sample


@dataclass
class Job:
    job_id: str
    origin: Origin
    root: Proc
    captured: Captured
    children: dict[int, Proc] = field(default_factory=dict)
    gpus: set[str] = field(default_factory=set)
    # The id JETFLEET_JOB_ID named, kept when the tracker found no such job.
    claimed: str | None = None

    def procs(self) -> list[Proc]:
        return [self.root, *self.children.values()]


@dataclass
class Ended:
    job: Job
    exit_code: int | None
    runtime_s: float


@dataclass
class ScanResult:
    new: list[Job] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    samples: list[ProcessSample] = field(default_factory=list)
    refs: list[DiscoveredRef] = field(default_factory=list)
    listed: int = 0
    examined: int = 0


class Scanner:
    def __init__(self, node: str, patterns: JobPatterns, limits: CaptureLimits | None = None,
                 ignore: set[int] | None = None) -> None:
        self.node = node
        self.patterns = patterns
        self.limits = limits or CaptureLimits()
        self.ignore = set(ignore or ()) | {os.getpid()}
        self.seen: dict[int, _Seen] = {}
        self.jobs: dict[int, Job] = {}  # by root pid
        self.by_pid: dict[int, tuple[Job, Proc]] = {}
        self._verify: list[int] = []
        self._verify_at = 0
        self._boot = psutil.boot_time()

    # ---- the cycle -----------------------------------------------------------------------

    def scan(self, gpu: GpuSnapshot | None = None) -> ScanResult:
        out = ScanResult()
        gpu_pids = gpu.by_pid() if gpu is not None else {}
        pids = set(psutil.pids())
        out.listed = len(pids)
        for pid in [p for p in self.seen if p not in pids]:
            del self.seen[pid]
        self._check_tracked(pids, out)
        self._rolling_verify()
        fresh = [p for p in pids if p not in self.by_pid and p not in self.ignore
                 and ((s := self.seen.get(p)) is None or not s.settled
                      or (p in gpu_pids and not s.candidate))]
        candidates: list[tuple[float, int, _Seen]] = []
        for pid in fresh:
            seen = self.seen.get(pid)
            if seen is None or not seen.settled:
                seen = self._examine(pid)
                out.examined += 1
                if seen is None:
                    continue
                self.seen[pid] = seen
            if seen.candidate or pid in gpu_pids:
                candidates.append((seen.create_time, pid, seen))
        for _, pid, seen in sorted(candidates):
            self._adopt(pid, seen, out)
        self._measure(gpu, out)
        return out

    # ---- tracked processes ---------------------------------------------------------------

    def _check_tracked(self, pids: set[int], out: ScanResult) -> None:
        for root_pid, job in list(self.jobs.items()):
            for cpid, child in list(job.children.items()):
                if cpid not in pids or not _alive(child):
                    del job.children[cpid]
                    self.by_pid.pop(cpid, None)
            if root_pid in pids and _alive(job.root):
                continue
            del self.jobs[root_pid]
            self.by_pid.pop(root_pid, None)
            for cpid in job.children:
                # Orphaned children are looked at afresh: they may be jobs themselves.
                self.by_pid.pop(cpid, None)
                self.seen.pop(cpid, None)
            out.ended.append(Ended(job=job, exit_code=_exit_code(job.root),
                                   runtime_s=max(0.0, time.time() - job.root.create_time)))

    def _rolling_verify(self) -> None:
        """Re-read the start time of an eighth of the remembered pids per cycle, so a
        reused pid is looked at afresh within eight cycles."""
        if self._verify_at >= len(self._verify):
            self._verify = list(self.seen)
            self._verify_at = 0
        n = max(8, len(self._verify) // 8)
        for pid in self._verify[self._verify_at:self._verify_at + n]:
            seen = self.seen.get(pid)
            if seen is None or pid in self.by_pid:
                continue
            stat = _stat(pid, self._boot)
            if stat is None or stat[0] != seen.create_time:
                del self.seen[pid]
        self._verify_at += n

    # ---- first look at a process ---------------------------------------------------------

    def _examine(self, pid: int) -> _Seen | None:
        first = _first_look(pid, self._boot)
        if first is None:
            return None
        create_time, ppid, cmdline = first
        job_var = _job_var(pid)
        candidate = job_var is not None or self.patterns.matches(cmdline)
        settled = time.time() - create_time >= SETTLE_S
        return _Seen(create_time=create_time, settled=settled, candidate=candidate,
                     job_var=job_var, ppid=ppid)

    def _ancestor_job(self, pid: int, seen: _Seen) -> Job | None:
        ppid = seen.ppid
        for _ in range(MAX_ANCESTRY):
            if not ppid or ppid <= 1:
                return None
            hit = self.by_pid.get(ppid)
            if hit is not None:
                return hit[0]
            parent = self.seen.get(ppid)
            if parent is not None:
                ppid = parent.ppid
                continue
            try:
                ppid = psutil.Process(ppid).ppid()
            except psutil.Error:
                return None
        return None

    def _adopt(self, pid: int, seen: _Seen, out: ScanResult) -> None:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != seen.create_time:
                return  # replaced since we looked; next cycle sees the new one
        except psutil.Error:
            return
        owner = self._ancestor_job(pid, seen)
        if owner is not None:
            handle = Proc(proc=proc, pid=pid, create_time=seen.create_time, root=False)
            owner.children[pid] = handle
            self.by_pid[pid] = (owner, handle)
            return
        captured = capture(_raw(proc, pid, seen), self.node, self.limits)
        claimed = seen.job_var
        if claimed is not None and is_valid_id(claimed):
            job_id, origin = claimed, "submitted"
        else:
            if claimed is not None:
                captured.info.notes.append(f"{JOB_ID_VAR}={claimed[:64]!r} is not a job id")
            job_id, origin = discovered_id(self.node, pid, seen.create_time), "discovered"
        handle = Proc(proc=proc, pid=pid, create_time=seen.create_time, root=True)
        job = Job(job_id=job_id, origin=origin, root=handle, captured=captured)  # type: ignore[arg-type]
        self.jobs[pid] = job
        self.by_pid[pid] = (job, handle)
        out.new.append(job)

    def unlink(self, job: Job) -> None:
        """JETFLEET_JOB_ID named no known job: the process is a discovered job."""
        job.claimed = job.job_id
        job.origin = "discovered"
        job.job_id = discovered_id(self.node, job.root.pid, job.root.create_time)
        job.captured.info.notes.append(
            f"{JOB_ID_VAR}={job.claimed} names no job known to the fleet")

    # ---- metrics -------------------------------------------------------------------------

    def _measure(self, gpu: GpuSnapshot | None, out: ScanResult) -> None:
        by_uuid: dict[int, tuple[list[str], float | None]] = {}
        if gpu is not None:
            for gp in gpu.processes:
                hit = self.by_pid.get(gp.pid)
                if hit is not None:
                    gp.job_id = hit[0].job_id
                ids, mem = by_uuid.get(gp.pid, ([], None))
                ids.append(gp.gpu_uuid or str(gp.gpu_index))
                if gp.used_memory_mb is not None:
                    mem = (mem or 0.0) + gp.used_memory_mb
                by_uuid[gp.pid] = (ids, mem)
        for job in list(self.jobs.values()):
            job.gpus = set()
            for handle in job.procs():
                sample = _sample(handle, job.job_id)
                if sample is None:
                    continue
                gpus, mem = by_uuid.get(handle.pid, ([], None))
                sample.gpus, sample.gpu_memory_mb = gpus, mem
                job.gpus.update(gpus)
                out.samples.append(sample)
            out.refs.append(DiscoveredRef(job_id=job.job_id, pid=job.root.pid,
                                          create_time=job.root.create_time, origin=job.origin,
                                          gpus=sorted(job.gpus), processes=1 + len(job.children)))

    @property
    def job_ids(self) -> list[str]:
        return list(dict.fromkeys(j.job_id for j in self.jobs.values()))


def _alive(handle: Proc) -> bool:
    try:
        return bool(handle.proc.is_running() and handle.proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _exit_code(handle: Proc) -> int | None:
    """Known only for our own children (the kernel keeps it for the parent)."""
    try:
        if handle.proc.ppid() == os.getpid():
            code = handle.proc.wait(timeout=0)
            return int(code) if code is not None else None
    except (psutil.Error, psutil.TimeoutExpired):
        pass
    return None


# First looks read /proc directly on Linux: one read each of stat, cmdline and
# environ per new process (psutil's Process() alone reads stat two or three
# times). The start time is computed exactly as psutil computes it, so ids
# agree with psutil.Process(pid).create_time(). Elsewhere, psutil.
_PROC = os.path.isdir("/proc/self")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int, boot: float) -> tuple[float, int] | None:
    """(create time, parent pid) of `pid`; None when it is gone."""
    if not _PROC:
        try:
            p = psutil.Process(pid)
            return p.create_time(), p.ppid()
        except psutil.Error:
            return None
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return float(fields[19]) / _TICKS + boot, int(fields[1])
    except (IndexError, ValueError):
        return None


def _first_look(pid: int, boot: float) -> tuple[float, int, list[str]] | None:
    stat = _stat(pid, boot)
    if stat is None:
        return None
    if not _PROC:
        try:
            return stat[0], stat[1], psutil.Process(pid).cmdline()
        except psutil.AccessDenied:
            return stat[0], stat[1], []
        except psutil.Error:
            return None
    data = _read(f"/proc/{pid}/cmdline")
    if data is None:
        return None
    return stat[0], stat[1], split_cmdline(data)


def split_cmdline(data: bytes) -> list[str]:
    """/proc/<pid>/cmdline as psutil splits it (NUL-separated, or spaces for a
    process that rewrote its title), undecodable bytes replaced."""
    if not data:
        return []
    text = data.decode("utf-8", errors="replace")
    sep = "\0" if text.endswith("\0") else " "
    if text.endswith(sep):
        text = text[:-1]
    args = text.split(sep)
    if sep == "\0" and len(args) == 1 and " " in text:
        args = text.split(" ")
    return args


def _job_var(pid: int) -> str | None:
    """JETFLEET_JOB_ID from the process's environment (once per process); None
    when absent or not ours to read."""
    if not _PROC:
        try:
            return psutil.Process(pid).environ().get(JOB_ID_VAR) or None
        except psutil.Error:
            return None
    data = _read(f"/proc/{pid}/environ")
    if not data:
        return None
    at = data.find(b"\0" + _JOB_VAR)
    start = 0 if data.startswith(_JOB_VAR) else (at + 1 if at >= 0 else -1)
    if start < 0:
        return None
    end = data.find(b"\0", start)
    value = data[start + len(_JOB_VAR):end if end >= 0 else None]
    return value.decode(errors="replace") or None


def _raw(proc: psutil.Process, pid: int, seen: _Seen) -> RawProcess:
    notes: list[str] = []

    def get(name: str, fn: object) -> object:
        try:
            return fn()  # type: ignore[operator]
        except psutil.AccessDenied:
            notes.append(f"{name}: permission denied")
        except psutil.Error as exc:
            notes.append(f"{name}: {type(exc).__name__}")
        except OSError as exc:
            notes.append(f"{name}: {exc.strerror or exc}")
        return None

    cmdline = get("cmdline", proc.cmdline)
    environ = get("environ", proc.environ)
    exe, cwd, user = get("exe", proc.exe), get("cwd", proc.cwd), get("username", proc.username)
    return RawProcess(
        pid=pid, create_time=seen.create_time,
        cmdline=[str(a) for a in cmdline] if isinstance(cmdline, list) else [],
        ppid=seen.ppid, exe=exe if isinstance(exe, str) and exe else None,
        cwd=cwd if isinstance(cwd, str) else None, username=user if isinstance(user, str) else None,
        environ=environ if isinstance(environ, dict) else None, notes=notes)


def _sample(handle: Proc, job_id: str) -> ProcessSample | None:
    p = handle.proc
    try:
        with p.oneshot():
            cpu = p.cpu_percent(None)
            mem = p.memory_info()
            threads = p.num_threads()
            status = p.status()
            ppid = p.ppid()
            name = p.name()
    except psutil.Error:
        return None
    try:
        fds: int | None = p.num_fds()
    except (psutil.Error, AttributeError):
        fds = None
    primed, handle.primed = handle.primed, True
    return ProcessSample(
        pid=handle.pid, create_time=handle.create_time, job_id=job_id, status=status,
        cpu_percent=cpu if primed else None, rss_mb=round(mem.rss / 1048576, 2),
        vms_mb=round(mem.vms / 1048576, 2), threads=threads, open_files=fds, ppid=ppid,
        name=name, root=handle.root)

