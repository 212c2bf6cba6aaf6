"""Process 1 of a kernel sandbox: builds its private root, then runs the candidate.

Started by the trusted evaluator as

    setpriv --pdeathsig KILL -- unshare --user --keep-caps --pid --fork --kill-child
        --mount --net --ipc --uts --cgroup --propagation private --
        python -I -S sandbox_init.py <config json>

so this process is the init of fresh user, pid, mount, network, IPC, UTS and
cgroup namespaces. Standard library only (it runs with `-I -S`, before any
site-packages), and no secret ever reaches its arguments or environment.

1. Handshake on the channel: send b"R", wait for b"G" (the trusted side has
   written this user namespace's uid/gid maps: inner 0 and 1000 map to two
   unprivileged outer ids unique to this evaluation; host root is unmapped).
2. Open what is to be bound while the host's paths are still reachable, then
   become the namespace's root (an unprivileged id outside).
3. A tmpfs root holding read-only binds of what the candidate needs (system
   libraries, Python, its own few modules), device nodes, a fresh /proc of
   the new pid namespace; pivot into it and detach the host's tree.
4. Size-limited private tmpfs on /tmp and /dev/shm, the root made read-only,
   per-namespace sysctls that forbid nested user namespaces and cap SysV shm.
5. Fork the candidate's runner: a new empty session keyring, no
   supplementary groups, uid/gid 1000, empty capability sets (bounding
   included), no_new_privs, rlimits; exec it with the channel as its only
   extra descriptor.
6. Reap until the runner exits, then exit with its status (128 + signal when
   it was killed). When this process ends, the kernel kills every process
   left in the pid namespace, whatever its session or parentage.

Setup failures are written to the channel as b"E" + text, then exit 70.
"""

import ctypes
import json
import os
import platform
import signal
import socket
import sys
from typing import Any, NoReturn

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}
_CAPSET = {"x86_64": 126, "aarch64": 91, "arm64": 91}
_KEYCTL = {"x86_64": 250, "aarch64": 219, "arm64": 219}
KEYCTL_JOIN_SESSION_KEYRING = 1
STAGE = "/tmp"  # the host's /tmp, covered by our tmpfs in this mount namespace only
SETUP_FAILED = 70

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount {source} on {target}")


def bind(fd: int, target: str, *, recursive: bool, device: bool) -> None:
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | (MS_REC if recursive else 0))
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_RDONLY | (0 if device else MS_NODEV)
    mount(None, target, None, flags)


def _syscall(table: dict[str, int], *args: object) -> int:
    number = table.get(platform.machine())
    if number is None:
        raise SetupError(f"unsupported machine {platform.machine()}")
    return int(_libc.syscall(number, *args))


def write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def build_root(cfg: dict[str, Any], sources: list[int]) -> None:
    root = STAGE
    mount("jetfleet-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    for target, link in cfg["symlinks"]:
        os.makedirs(os.path.dirname(root + target), exist_ok=True)
        os.symlink(link, root + target)
    for (_src, target, kind), fd in zip(cfg["binds"], sources, strict=True):
        path = root + target
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        bind(fd, path, recursive=kind == "dir", device=kind == "dev")
        os.close(fd)
    for target, text in cfg["files"].items():
        os.makedirs(os.path.dirname(root + target), exist_ok=True)
        write(root + target, text)
    for d in ("proc", "tmp", "dev/shm"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    # Before the pivot: the kernel lets a namespace mount procfs only while a
    # full view of it is already mounted there.
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    _check(_syscall(_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    mount("jetfleet-tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    mount("jetfleet-shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['shm_mb']}m,mode=1777")
    os.makedirs(cfg["cwd"], exist_ok=True)
    os.chown(cfg["cwd"], cfg["uid"], cfg["gid"])
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path, value in cfg["sysctls"].items():
        write(path, value)
    _check(_libc.sethostname(b"jetfleet-sandbox", 16), "sethostname")


def drop_privileges(cfg: dict[str, Any]) -> None:
    """In the runner's child: from namespace root to an unprivileged id, no way back."""
    import resource

    # A new, empty session keyring: the inherited one may hold the host's keys,
    # which its possessors can read.
    if _syscall(_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        raise SetupError(f"new session keyring: {os.strerror(ctypes.get_errno())}")
    for name, value in cfg["rlimits"].items():
        res = getattr(resource, name)
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups([])
    os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    _check(_syscall(_CAPSET, header, data), "clear capabilities")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def run_child(cfg: dict[str, Any], channel_fd: int) -> NoReturn:
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        drop_privileges(cfg)
        os.chdir(cfg["cwd"])
        os.dup2(channel_fd, 3)
        os.closerange(4, 65536)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as exc:  # nothing above may return into the init's code
        os.write(2, f"sandbox: cannot start the runner: {exc}\n".encode())
    os._exit(SETUP_FAILED)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    channel = socket.socket(fileno=cfg["channel_fd"])
    try:
        channel.sendall(b"R")
        if channel.recv(1) != b"G":
            raise SetupError("the trusted side did not map this namespace's ids")
        # Opened while still the host's root (uid unmapped here): the paths may
        # sit under directories only that owner can search, such as /root.
        sources = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _target, _kind in cfg["binds"]]
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        build_root(cfg, sources)
    except BaseException as exc:
        channel.sendall(b"E" + f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(SETUP_FAILED)
    channel.sendall(b"S")
    pid = os.fork()
    if pid == 0:
        run_child(cfg, channel.fileno())
    channel.close()
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if done == pid:
            break
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
