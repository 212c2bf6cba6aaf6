"""Attack family: escapes from the candidate's process to the host.

Each candidate is hostile and runs (run_rejected=True, so the sandbox and not
the static checks is what stops it). Every test also checks that nothing of
the sandbox survives it (`sandboxes`), that it left no file or shared memory
on the host (`no_host_traces`), and, where the worker holds a secret, that the
secret appears nowhere in the result.
"""

from __future__ import annotations

import secrets
import socket
import threading
from pathlib import Path

import psutil

from agents.kernels.library import ProblemInfo

from .conftest import HONEST, LAUNCH, SandboxLog, assert_no_secret, hostile, run

RUN = {"run_rejected": True}

SNOOP = r'''
import os


def _snoop():
    me = os.getpid()
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    found, readable, mem_read = [], [], 0
    needle = b"jfsecret" + b"-"
    for pid in pids:
        for name in ("environ", "cmdline"):
            try:
                data = open(f"/proc/{pid}/{name}", "rb").read()
                readable.append(f"{pid}/{name}")
            except OSError:
                continue
            i = data.find(needle)
            if i >= 0:
                found.append(data[i:i + 41])
        if pid == me:
            continue
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            with open(f"/proc/{pid}/mem", "rb", 0) as mem:
                for line in maps:
                    span, perms = line.split()[:2]
                    lo, hi = (int(v, 16) for v in span.split("-"))
                    if "r" not in perms or hi - lo > (64 << 20):
                        continue
                    try:
                        mem.seek(lo)
                        chunk = mem.read(hi - lo)
                    except (OSError, ValueError, OverflowError):
                        continue
                    mem_read += len(chunk)
                    i = chunk.find(needle)
                    if i >= 0:
                        found.append(chunk[i:i + 41])
        except OSError:
            pass
    env = {k: v for k, v in os.environ.items()}
    listing = {}
    for d in ("/", "/root", "/home", "/work", "/work/main", "/tmp", "/opt/jetfleet/agents/kernels"):
        try:
            listing[d] = sorted(os.listdir(d))
        except OSError as exc:
            listing[d] = type(exc).__name__
    repo = []
    for path in ("/work/main/pyproject.toml", "/work/main/agents/kernels/library/softmax/reference.py"):
        try:
            repo.append(open(path).read()[:40])
        except OSError as exc:
            repo.append(type(exc).__name__)
    print("SNOOP", pids, readable, found, env, listing, repo, flush=True)
    raise RuntimeError(f"SNOOP pids={pids} found={found} mem_read={mem_read} "
                       f"env={sorted(env)} listing={listing} repo={repo}")
'''


def test_worker_secrets_processes_home_and_repo_are_out_of_reach(
        softmax: ProblemInfo, sandboxes: SandboxLog, no_host_traces: None, worker_secret: str) -> None:
    src = hostile(softmax, LAUNCH + "        _snoop()\n", header=SNOOP)
    out = run(softmax, src, **RUN)
    assert out.outcome == "runtime_error" and out.isolation == "namespaces"
    err = out.error or ""
    assert "SNOOP pids=[1, 2]" in err  # its own pid namespace: its init and itself
    assert "found=[]" in err
    assert "'/work': 'FileNotFoundError'" in err and "'/home': 'FileNotFoundError'" in err
    assert "'/root': ['.pyenv']" in err or "'/root': 'FileNotFoundError'" in err
    assert "repo=['FileNotFoundError', 'FileNotFoundError']" in err
    # Its /opt/jetfleet holds the candidate-side modules only, never the problem.
    assert "'child.py', 'guards.py', 'wire.py'" in err and "library" not in err
    assert "NATS_TOKEN" not in err and "SNOOP" in out.stdout_tail
    assert_no_secret(out, worker_secret)


WRITER = '''
import os


def _write_everywhere(token):
    wrote, refused = [], []
    for path in ("/x", "/etc/x", "/usr/x", "/opt/jetfleet/x", "/root/x", "/proc/x",
                 "/tmp/jetfleet-escape-" + token, "/dev/shm/jetfleet-escape-" + token,
                 "/tmp/work/x"):
        try:
            with open(path, "w") as fh:
                fh.write("escaped")
            wrote.append(path)
        except OSError as exc:
            refused.append(path)
    raise RuntimeError(f"WROTE {wrote} REFUSED {refused}")
'''


def test_writes_land_only_in_the_private_tmpfs(
        softmax: ProblemInfo, sandboxes: SandboxLog, no_host_traces: None) -> None:
    token = secrets.token_hex(8)
    src = hostile(softmax, LAUNCH + f"        _write_everywhere({token!r})\n", header=WRITER)
    out = run(softmax, src, **RUN)
    assert out.outcome == "runtime_error"
    wrote = (out.error or "").split("WROTE ")[1].split(" REFUSED")[0]
    assert wrote == str([f"/tmp/jetfleet-escape-{token}", f"/dev/shm/jetfleet-escape-{token}", "/tmp/work/x"])
    # Its /tmp and /dev/shm were its own: the host's are untouched.
    assert not Path(f"/tmp/jetfleet-escape-{token}").exists()
    assert not Path(f"/dev/shm/jetfleet-escape-{token}").exists()


NETWORK = '''
import socket


def _reach(port, unix_path):
    tried = {}
    for name, family, addr in (("loopback", socket.AF_INET, ("127.0.0.1", port)),
                               ("internet", socket.AF_INET, ("1.1.1.1", 53)),
                               ("unix", socket.AF_UNIX, unix_path)):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(addr)
            tried[name] = "connected"
        except OSError as exc:
            tried[name] = type(exc).__name__
        finally:
            s.close()
    raise RuntimeError(f"NET {tried} IFACES {[n for _, n in socket.if_nameindex()]}")
'''


def test_no_network_no_host_sockets(softmax: ProblemInfo, sandboxes: SandboxLog, tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = str(tmp_path / "worker.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen()
    accepted: list[str] = []

    def watch(s: socket.socket, name: str) -> None:
        s.settimeout(30)
        try:
            s.accept()
            accepted.append(name)
        except OSError:
            pass

    threads = [threading.Thread(target=watch, args=(s, n), daemon=True) for s, n in ((tcp, "tcp"), (unix, "unix"))]
    for t in threads:
        t.start()
    try:
        port = tcp.getsockname()[1]
        src = hostile(softmax, LAUNCH + f"        _reach({port}, {unix_path!r})\n", header=NETWORK)
        out = run(softmax, src, **RUN)
    finally:
        tcp.close()
        unix.close()
    assert out.outcome == "runtime_error"
    err = out.error or ""
    assert "'loopback': 'connected'" not in err and "'internet': 'connected'" not in err
    assert "'unix': 'FileNotFoundError'" in err  # the host's /tmp is not its /tmp
    assert "IFACES ['lo']" in err
    assert accepted == []


DAEMON = '''
import os
import sys


def _daemonise(token):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve(sys.executable, [sys.executable, "-c",
                      f"import time; x = bytearray(274 << 20); time.sleep(600)  # {token}"], {})
        os._exit(0)
    os.wait()
'''


def test_daemons_die_with_the_evaluation(softmax: ProblemInfo, sandboxes: SandboxLog, no_host_traces: None) -> None:
    token = "jfdaemon-" + secrets.token_hex(6)
    init = f"        _daemonise({token!r})\n"
    out = run(softmax, hostile(softmax, HONEST, header=DAEMON, init=init), **RUN)
    # It computed correctly; the static checks' findings still reject it.
    assert out.outcome == "rejected" and out.correct is False and "value_mismatch" not in out.flags
    assert len(sandboxes.started) == 1
    alive = [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    assert alive == []


SLEEPERS = '''
import os
import time


def _sleepers(n):
    for _ in range(n):
        if os.fork() == 0:
            os.setsid()
            time.sleep(300)
            os._exit(0)
    time.sleep(60)
'''


def test_too_many_sleepers_are_killed(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    src = hostile(softmax, LAUNCH + "        _sleepers(40)\n        return out\n", header=SLEEPERS)
    out = run(softmax, src, max_procs=32, **RUN)
    assert out.outcome == "crashed" and "too_many_processes" in out.flags, (out.error, out.flags)
    assert "processes > limit 32" in (out.error or "")


FILLER = '''
import os


def _fill(directory, total_mb):
    written = 0
    chunk = b"x" * (1 << 20)
    for i in range(total_mb // 100):
        try:
            with open(f"{directory}/fill-{i}", "wb") as fh:
                for _ in range(100):
                    fh.write(chunk)
                    written += len(chunk)
        except OSError:
            break
    return written


def _fill_both():
    shm = _fill("/dev/shm", 1200)
    tmp = _fill("/tmp", 1100)
    raise RuntimeError(f"FILLED shm={shm} tmp={tmp}")
'''


def test_tmpfs_is_capped_and_gone_afterwards(softmax: ProblemInfo, sandboxes: SandboxLog, no_host_traces: None) -> None:
    src = hostile(softmax, LAUNCH + "        _fill_both()\n", header=FILLER)
    out = run(softmax, src, memory_mb=2048, **RUN)
    assert out.outcome == "runtime_error", (out.error, out.flags)
    shm = int((out.error or "").split("shm=")[1].split()[0])
    tmp = int((out.error or "").split("tmp=")[1].split()[0])
    # 2048 MB in all: /dev/shm gets 128 MB, /tmp 256 MB (their memory counts against the limit).
    assert 0 < shm <= 128 << 20 and 0 < tmp <= 256 << 20


MEMFD = '''
import os


def _memfd_hog():
    fds = []
    chunk = b"x" * (1 << 20)
    for i in range(8):
        fd = os.memfd_create(f"hog{i}")
        for _ in range(250):
            os.write(fd, chunk)
        fds.append(fd)
    raise RuntimeError("kept 2 GB in memfds")
'''


def test_memory_held_in_memfds_counts(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Unmapped shared memory is in no process's RSS and in no mount: the watchdog
    # counts it from the descriptors.
    src = hostile(softmax, LAUNCH + "        _memfd_hog()\n", header=MEMFD)
    out = run(softmax, src, memory_mb=1024, **RUN)
    assert out.outcome == "runtime_error" and "out_of_memory" in out.flags, (out.error, out.flags)
    assert "memory limit exceeded" in (out.error or "") and out.signal == 9


PRIVILEGES = '''
import ctypes
import os


def _privileges():
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                  if ":\\t" in line)
    libc = ctypes.CDLL(None, use_errno=True)
    nested = libc.unshare(0x10000000)  # CLONE_NEWUSER
    try:
        os.setuid(0)
        setuid = "ok"
    except OSError as exc:
        setuid = type(exc).__name__
    raise RuntimeError("PRIV uid={} caps={} bnd={} amb={} nnp={} nested={} setuid={}".format(
        os.getuid(), status["CapEff"].strip(), status["CapBnd"].strip(), status["CapAmb"].strip(),
        status["NoNewPrivs"].strip(), nested, setuid))
'''


def test_no_root_no_capabilities_no_nested_namespaces(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    out = run(softmax, hostile(softmax, LAUNCH + "        _privileges()\n", header=PRIVILEGES), **RUN)
    assert out.outcome == "runtime_error"
    assert ("PRIV uid=1000 caps=0000000000000000 bnd=0000000000000000 amb=0000000000000000 "
            "nnp=1 nested=-1 setuid=PermissionError") in (out.error or "")


STATIC = '''
import os

open("/tmp/jetfleet-static-{token}", "w").write("ran")
'''


def test_statically_rejected_candidates_do_not_run(softmax: ProblemInfo, sandboxes: SandboxLog) -> None:
    # Under the process level (no private /tmp) running it would leave a file on the host.
    token = secrets.token_hex(6)
    marker = Path(f"/tmp/jetfleet-static-{token}")
    src = hostile(softmax, HONEST, header=STATIC.format(token=token))
    out = run(softmax, src, isolation="process")
    assert out.outcome == "rejected" and out.isolation == "none" and out.wall_s == 0.0
    assert "unsafe_import" in out.flags and not marker.exists() and sandboxes.started == []
    try:
        ran = run(softmax, src, isolation="process", run_rejected=True)
        assert ran.outcome == "rejected" and marker.exists()  # asked to run: it did
    finally:
        marker.unlink(missing_ok=True)
