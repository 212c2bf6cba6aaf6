"""A warm process that forks one trusted evaluator per evaluation.

Importing torch costs a process about 1.6 s of CPU. The candidate's process
pays it (it must be fresh), and the trusted evaluator would pay it again on
every evaluation; instead one server per worker process imports torch and the
evaluator's modules once and forks a fresh evaluator for each evaluation, in
a few milliseconds. The server never runs anything itself, so it stays
single-threaded (safe to fork) and never initialises CUDA (each evaluator
selects its leased devices before it does).

It starts with an allow-listed environment, so neither it nor the evaluators
hold the worker's secrets. It lives as long as its control socket: when the
worker process ends, the server reads EOF and exits, and its evaluators get
SIGKILL (PR_SET_PDEATHSIG), which in turn kills their sandboxes.

Client side: `connect()` returns a socket to a freshly forked evaluator.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading

from agents.kernels import isolation

PR_SET_PDEATHSIG = 1
_ENV_ALLOW = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "CUDA_HOME",
              "CUDA_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_ENV_ALLOW_PREFIXES = ("TRITON_", "JETFLEET_SANDBOX_")
READY = b"ready"
START_TIMEOUT_S = 120.0
_BOOT = "import sys; sys.path.insert(0, {root!r}); from agents.kernels.forkserver import serve; serve({fd})"


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in _ENV_ALLOW or k.startswith(_ENV_ALLOW_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- server side -----------------------------------------------------------------------------


def serve(control_fd: int) -> None:
    """The server's loop: one message with one descriptor per evaluation to fork."""
    control = socket.socket(fileno=control_fd)
    import torch  # noqa: F401  (the point of this process)

    from agents.kernels import trusted

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # evaluators are reaped by the kernel
    me = os.getpid()
    control.sendall(READY)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, 16, 1)
        except OSError:
            break
        if not msg:
            break
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            _evaluator(control, fds[0], me, trusted.serve)
        os.close(fds[0])
    os._exit(0)


def _evaluator(control: socket.socket, fd: int, server: int, run: object) -> None:
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server:
            os._exit(0)
        control.close()
        sock = socket.socket(fileno=fd)
        run(sock)  # type: ignore[operator]
    except BaseException:
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# ---- client side -----------------------------------------------------------------------------


class ForkServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = _BOOT.format(root=str(isolation.project_root()), fd=theirs.fileno())
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", boot], pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=server_env())
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            if ours.recv(16) != READY:
                raise OSError(f"the kernel evaluator server did not start (exit {proc.poll()})")
        except BaseException:
            proc.kill()
            proc.wait()
            ours.close()
            raise
        ours.settimeout(None)
        self._control, self._proc = ours, proc

    def ensure(self) -> None:
        with self._lock:
            if self._control is None or self._proc is None or self._proc.poll() is not None:
                self._close()
                self._start()

    def connect(self) -> socket.socket:
        """A socket to a newly forked trusted evaluator (starts the server when needed)."""
        with self._lock:
            for attempt in range(2):
                if self._control is None or self._proc is None or self._proc.poll() is not None:
                    self._close()
                    self._start()
                assert self._control is not None
                ours, theirs = socket.socketpair()
                try:
                    socket.send_fds(self._control, [b"F"], [theirs.fileno()])
                    return ours
                except OSError:
                    ours.close()
                    self._close()
                    if attempt:
                        raise
                finally:
                    theirs.close()
            raise OSError("unreachable")

    def _close(self) -> None:
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.close()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        self._control = self._proc = None

    def stop(self) -> None:
        with self._lock:
            self._close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


_server = ForkServer()
atexit.register(_server.stop)


def connect() -> socket.socket:
    return _server.connect()


def warm() -> None:
    """Start the server now (worker start), so the first evaluation does not pay for it."""
    _server.ensure()


def server_pid() -> int | None:
    return _server.pid
