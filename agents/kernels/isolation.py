"""How a candidate's process is isolated from the host, and whether it can be.

Two levels, strongest first:

- `namespaces`: util-linux `unshare` puts the candidate in new user, pid,
  mount, network, IPC, UTS and cgroup namespaces (see sandbox_init.py). It
  runs as uid 1000 of its own user namespace, an unprivileged id outside that
  no other evaluation shares, with no capabilities and no_new_privs; it sees a
  read-only root made of what it needs, a private size-limited /tmp and
  /dev/shm, a /proc of its own pid namespace only and no network. The whole
  pid namespace dies with its init.
- `process`: a plain child process in its own session with an allow-listed
  environment, rlimits and the watchdog (what the host gives when it cannot
  create user namespaces, e.g. some containers). It runs as the worker's user
  and sees the host's file system and processes.

`available()` probes once per process, by starting a real namespace sandbox.
Writing the maps needs root (CAP_SETUID/CAP_SETGID outside), as jetfleet
workers run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Level = Literal["namespaces", "process"]
Mode = Literal["best", "strict", "process"]

SANDBOX_UID = 1000
# Outer ids: two per evaluation, derived from the trusted evaluator's pid, which
# is unique on the host while the sandbox lives (the sandbox dies with it).
OUTER_ID_BASE = 1 << 30
PKG_ROOT = "/opt/jetfleet"
SANDBOX_CWD = "/tmp/work"
# The candidate-side modules, and nothing else of the project.
RUNNER_FILES = (
    "agents/__init__.py",
    "agents/kernels/__init__.py",
    "agents/kernels/child.py",
    "agents/kernels/guards.py",
    "agents/kernels/wire.py",
)
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
              "/etc/alternatives")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
HANDSHAKE_S = 20.0


class IsolationUnavailable(RuntimeError):
    """Strict isolation was required and this host cannot provide it."""


@dataclass(frozen=True)
class IsolationInfo:
    """What `available()` found: the strongest level and why not more."""

    level: Level
    full: bool
    detail: str
    mechanisms: tuple[str, ...] = ()


@dataclass(frozen=True)
class NamespaceConfig:
    """Everything sandbox_init.py needs; no secrets (the candidate can read it)."""

    argv: list[str]
    env: dict[str, str]
    channel_fd: int
    tmp_mb: int
    shm_mb: int
    rlimits: dict[str, int]
    gpu: bool
    extra_dirs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        binds, symlinks = _layout(self.gpu, self.extra_dirs)
        shm_pages = max(1, self.shm_mb * 256)
        return json.dumps({
            "binds": binds,
            "symlinks": symlinks,
            "files": {
                "/etc/passwd": f"root:x:0:0::/:/bin/false\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::/tmp:/bin/false\n",
                "/etc/group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\n",
                "/etc/hosts": "127.0.0.1 localhost\n",
                "/etc/hostname": "jetfleet-sandbox\n",
            },
            "sysctls": {
                # No nested user namespace: it would bring capabilities back,
                # and with them mounts (an unlimited tmpfs) outside our limits.
                "/proc/sys/user/max_user_namespaces": "0",
                "/proc/sys/kernel/shmall": str(shm_pages),
                "/proc/sys/kernel/shmmax": str(self.shm_mb * 1024 * 1024),
                "/proc/sys/fs/mqueue/queues_max": "0",
            },
            "tmp_mb": self.tmp_mb,
            "shm_mb": self.shm_mb,
            "uid": SANDBOX_UID,
            "gid": SANDBOX_UID,
            "cwd": SANDBOX_CWD,
            "rlimits": self.rlimits,
            "argv": self.argv,
            "env": self.env,
            "channel_fd": self.channel_fd,
        })


def project_root() -> Path:
    """The directory that holds the `agents` package."""
    return Path(__file__).resolve().parents[2]


def _module_site(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).resolve().parents[1])


def _covered(path: str, by: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in by)


def _layout(gpu: bool, extra_dirs: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Read-only binds [source, target, dir|file|dev] and symlinks [path, link] of the sandbox root."""
    dirs: list[str] = []
    symlinks: list[list[str]] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            symlinks.append([d, os.readlink(d)])
        elif os.path.isdir(d):
            dirs.append(d)
    pythons = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
               str(Path(sys.executable).resolve().parents[1])}
    for name in ("torch", "triton", "numpy", "msgspec"):
        site = _module_site(name)
        if site:
            pythons.add(site)
    if gpu:
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(var):
                pythons.add(os.environ[var])
        pythons.update(p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)
    pythons.update(extra_dirs)
    # Parents first, so a nested path is skipped when its parent is bound.
    for p in sorted({os.path.realpath(x) for x in pythons}, key=len):
        if os.path.isdir(p) and p != "/" and not _covered(p, dirs):
            dirs.append(p)
    binds = [[d, d, "dir"] for d in dirs]
    binds += [[f, f, "dir" if os.path.isdir(f) else "file"] for f in _ETC_FILES if os.path.exists(f)]
    binds += [[f"/dev/{d}", f"/dev/{d}", "dev"] for d in _DEVICES]
    if gpu:
        for entry in sorted(os.listdir("/dev")):
            if entry.startswith("nvidia"):
                path = f"/dev/{entry}"
                binds.append([path, path, "dir" if os.path.isdir(path) else "dev"])
        if os.path.isdir("/sys"):
            binds.append(["/sys", "/sys", "dir"])
    root = project_root()
    binds += [[str(root / f), f"{PKG_ROOT}/{f}", "file"] for f in RUNNER_FILES]
    return binds, symlinks


def outer_ids(evaluator_pid: int) -> tuple[int, int]:
    """(outer id of the namespace's root, outer id of the candidate's uid 1000)."""
    base = OUTER_ID_BASE + 2 * evaluator_pid
    return base, base + 1


def launch_argv(config_json: str) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    setpriv = shutil.which("setpriv") or "setpriv"
    init = str(Path(__file__).with_name("sandbox_init.py"))
    return [
        setpriv, "--pdeathsig", "KILL", "--",
        unshare, "--user", "--keep-caps", "--pid", "--fork", "--kill-child", "--mount", "--net",
        "--ipc", "--uts", "--cgroup", "--propagation", "private", "--",
        sys.executable, "-I", "-S", "-B", init, config_json,
    ]


def write_id_maps(unshare_pid: int, evaluator_pid: int) -> None:
    """Map inner 0 and 1000 to this evaluation's two unprivileged outer ids."""
    root_id, user_id = outer_ids(evaluator_pid)
    text = f"0 {root_id} 1\n{SANDBOX_UID} {user_id} 1\n"
    Path(f"/proc/{unshare_pid}/uid_map").write_text(text)
    Path(f"/proc/{unshare_pid}/gid_map").write_text(text)


def handshake(channel: socket.socket, unshare_pid: int, evaluator_pid: int) -> None:
    """The init's setup dialogue (see sandbox_init.py); OSError when it fails."""
    channel.settimeout(HANDSHAKE_S)
    try:
        if channel.recv(1) != b"R":
            raise OSError("sandbox init did not start")
        write_id_maps(unshare_pid, evaluator_pid)
        channel.sendall(b"G")
        status = channel.recv(1)
        if status == b"E":
            raise OSError("sandbox setup failed: " + channel.recv(4096).decode(errors="replace"))
        if status != b"S":
            raise OSError("sandbox init ended during setup")
    finally:
        channel.settimeout(None)


_PROBE_CHILD = (
    "import os, socket\n"
    "s = open('/proc/self/status').read()\n"
    "caps = [l.split()[1] for l in s.splitlines() if l.startswith(('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'))]\n"
    "nnp = [l.split()[1] for l in s.splitlines() if l.startswith('NoNewPrivs')]\n"
    "ok = (os.getuid() == 1000 and set(caps) == {'0000000000000000'} and nnp == ['1']\n"
    "      and not os.path.exists('/root/.ssh') and os.listdir('/proc').count('1') == 1\n"
    "      and len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3)\n"
    "try:\n"
    "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    "    ok = False\n"
    "except OSError:\n"
    "    pass\n"
    "open('/tmp/probe', 'w').write('x')\n"
    "os._exit(0 if ok else 3)\n"
)


def _probe() -> IsolationInfo:
    if os.environ.get("JETFLEET_SANDBOX_DISABLE_NAMESPACES") == "1":
        return IsolationInfo("process", False, "namespaces disabled by JETFLEET_SANDBOX_DISABLE_NAMESPACES")
    missing = [b for b in ("unshare", "setpriv") if shutil.which(b) is None]
    if missing:
        return IsolationInfo("process", False, f"util-linux {', '.join(missing)} not found")
    if os.geteuid() != 0:
        return IsolationInfo("process", False,
                             "not root: the uid/gid maps of the sandbox need CAP_SETUID/CAP_SETGID")
    parent, child = socket.socketpair()
    cfg = NamespaceConfig(argv=[sys.executable, "-I", "-S", "-c", _PROBE_CHILD], env={"PATH": "/usr/bin:/bin"},
                          channel_fd=child.fileno(), tmp_mb=4, shm_mb=4, rlimits={}, gpu=False)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(launch_argv(cfg.to_json()), pass_fds=(child.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except OSError as exc:
        return IsolationInfo("process", False, f"cannot start unshare: {exc}")
    child.close()
    try:
        handshake(parent, proc.pid, os.getpid())
        rc = proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc.kill()
        proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        return IsolationInfo("process", False, f"namespace sandbox failed: {exc} {err}".strip())
    finally:
        parent.close()
        if proc.stderr:
            proc.stderr.close()
    if rc != 0:
        return IsolationInfo("process", False, f"namespace sandbox probe exited {rc}: {err[-500:]}")
    ms = (time.monotonic() - t0) * 1000
    return IsolationInfo(
        "namespaces", True, f"user, pid, mount, net, ipc, uts and cgroup namespaces (probe {ms:.0f} ms)",
        ("userns", "pidns", "mountns", "netns", "ipcns", "utsns", "cgroupns", "tmpfs", "rlimits",
         "no_new_privs"),
    )


@functools.cache
def available() -> IsolationInfo:
    """The strongest isolation this host gives kernel candidates (probed once per process).

    Call it at worker start: a worker that must not run candidates without
    full isolation checks `available().full` and refuses to serve otherwise.
    """
    return _probe()


def choose(mode: Mode) -> Level:
    """The level an evaluation runs under; IsolationUnavailable for strict without it."""
    if mode == "process":
        return "process"
    info = available()
    if mode == "strict" and not info.full:
        raise IsolationUnavailable(f"strict sandbox required but unavailable: {info.detail}")
    return info.level
