"""`jetfleet up`: an embedded nats-server and every component as a child.

Children are restarted with backoff when they die. Stopping (Ctrl-C, SIGINT,
SIGTERM) goes in four phases, each with a bounded wait: a cooperative drain
sent to each child's own control endpoint (by its identity, so a second fleet
on the same server is never touched), then SIGINT, SIGTERM and SIGKILL to
whatever is left, and the server last. Children die with the launcher
(PR_SET_PDEATHSIG), so not even a kill -9 of `up` leaves them behind.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.server import EmbeddedCluster, EmbeddedServer, die_with_parent
from ops.fleetsecurity import FleetSecurity

PHASE_WAIT_S = {"drain": 10.0, "SIGINT": 5.0, "SIGTERM": 5.0}
# A child that exits with this was refused by the server (its credentials do not fit).
EXIT_DENIED = 77


class PortInUse(RuntimeError):
    pass


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Refuse a port something already listens on (another fleet's server, say)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PortInUse(
                f"port {port} is already in use (another fleet's nats-server?): to join that "
                f"server use `--nats nats://{host}:{port}`, or pick another --nats-port "
                "(0 picks a free one)") from None


@dataclass
class Child:
    name: str
    component: str
    kind: str
    instance: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    given_up: bool = False

    def start(self) -> None:
        log = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(
            self.argv, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
            stdout=log or None, stderr=subprocess.STDOUT if log else None,
            start_new_session=True, preexec_fn=die_with_parent)
        if log:
            log.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# (component, child name, `jetfleet run <component>` arguments)
ChildSpec = tuple[str, str, list[str]]


class Fleet:
    def __init__(self, data_dir: Path, nats_port: int = 0, workers: int = 1,
                 worker_args: list[str] | None = None, children: list[ChildSpec] | None = None,
                 unschedulable_after: float = 30.0, quiet: bool = False,
                 nats_url: str | None = None, cluster: int = 0,
                 security: FleetSecurity | None = None) -> None:
        self.data_dir = data_dir
        self.fleet_id = f"f{random.randrange(16**6):06x}"
        self.server: EmbeddedServer | EmbeddedCluster | None = None
        self.env: dict[str, str] = {}
        self.replicas = 1
        # --secure and --tls: keys, credentials per role, certificates (ops/fleetsecurity.py).
        self.security = security or FleetSecurity(data_dir)
        self.notes = self.security.notes
        if nats_url is None:
            auth, tls = self.security.server_config(), self.security.tls
            if cluster > 1:
                for i in range(cluster if nats_port else 0):
                    check_port_free(nats_port + i)
                self.server = EmbeddedCluster(data_dir / "nats", size=cluster, port=nats_port,
                                              extra_config=auth, tls=tls)
                # Every stream, bucket and the object store replicated.
                self.replicas = min(3, cluster)
                self.env["JETFLEET_REPLICAS"] = str(self.replicas)
            else:
                if nats_port:
                    check_port_free(nats_port)
                self.server = EmbeddedServer(data_dir / "nats", port=nats_port,
                                             extra_config=auth, tls=tls)
        self.nats_url = nats_url
        if children is None:
            children = [("dispatcher", "dispatcher",
                         ["--unschedulable-after", str(unschedulable_after)])]
            children += [("worker", f"worker-{i}", list(worker_args or []))
                         for i in range(workers)]
            children.append(("evolver", "evolver", []))
        self.specs = children
        self.quiet = quiet
        self.children: list[Child] = []
        self._stopping = False

    @property
    def url(self) -> str:
        if self.server is not None:
            return self.server.url
        assert self.nats_url
        return self.nats_url

    def _child(self, component: str, name: str, args: list[str]) -> Child:
        instance = f"{self.fleet_id}-{name}"
        argv = [sys.executable, "-m", "ops.cli", "run", component, "--instance-id", instance,
                *args]
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        from ops.components import module

        kind = getattr(module(component), "CONTROL_KIND", component)
        argv, secret_env = _secrets_off_the_command_line(argv)
        return Child(name=name, component=component, kind=kind, instance=instance, argv=argv,
                     log_path=logs / f"{name}.log",
                     env={**self.env, "JETFLEET_NATS_URL": self.url,
                          **self.security.env(component), **secret_env})

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.server is not None:
            self.server.start()
        self.children = [self._child(c, n, a) for c, n, a in self.specs]
        sec = self.security
        if sec.keys is not None:
            ids = {kind: [c.instance for c in self.children if c.component == kind]
                   for kind in ("worker", "evolver")}
            sec.issue(ids["worker"], ids["evolver"], self._app_worker_ids())
            sec.apply_topology(self.url, self.replicas)
        for child in self.children:
            child.start()

    def _app_worker_ids(self) -> list[str]:
        """The ids of the workers the node agent may start for its apps
        (`<node>-<app>-<slot>`), so their credential names them."""
        from agents.node.appconfig import load_apps

        out: list[str] = []
        for child in self.children:
            if child.component != "agent" or "--apps" not in child.argv:
                continue
            apps = load_apps(child.argv[child.argv.index("--apps") + 1])
            out += [f"{self.security.node}-{a.name}-{slot}" for a in apps.apps
                    for slot in range(a.max)]
        return out

    def supervise_once(self) -> None:
        """Restart children that died, with exponential backoff (up to 30 s)."""
        nowt = time.monotonic()
        for child in self.children:
            if self._stopping or child.alive() or child.given_up:
                continue
            if child.proc is not None and child.proc.returncode == EXIT_DENIED:
                # Restarting cannot help: its credentials do not fit what it does.
                child.given_up = True
                print(f"jetfleet: {child.name} was refused by the NATS server (permission "
                      f"denied, see {child.log_path}); not restarted", flush=True)
                continue
            if child.next_start == 0.0:
                # Forget old crashes once a child has stayed up for a minute.
                if nowt - child.started_at > 60:
                    child.restarts = 0
                child.restarts += 1
                child.next_start = nowt + min(30.0, 0.5 * 2 ** (child.restarts - 1))
            elif nowt >= child.next_start:
                child.next_start = 0.0
                child.start()

    def stop(self) -> dict[str, int]:
        """Four phases; returns how many children each phase ended."""
        self._stopping = True
        ended: dict[str, int] = {}
        alive = [c for c in self.children if c.alive()]
        ended["drain"] = self._drain(alive)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            alive = [c for c in self.children if c.alive()]
            if not alive:
                break
            for c in alive:
                assert c.proc is not None
                try:
                    os.killpg(c.proc.pid, sig)
                except ProcessLookupError:
                    pass
            wait = PHASE_WAIT_S.get(sig.name, 5.0)
            ended[sig.name] = self._wait(alive, wait)
        if self.server is not None:
            self.server.stop()
        return ended

    def _drain(self, alive: list[Child]) -> int:
        """Ask each child, by its own identity, to drain."""
        if not alive:
            return 0
        try:
            import asyncio

            from bus import topology
            from bus.connection import connect

            async def send() -> None:
                # As admin on a secured fleet (over TLS with --tls).
                bus = await connect(self.security.admin_settings(), url=self.url,
                                    name="jetfleet-up", apply_topology=False,
                                    connect_timeout=2.0)
                try:
                    for c in alive:
                        try:
                            await bus.nc.request(topology.control_subject(
                                c.kind, c.instance, "drain"), b"", timeout=1.0)
                        except Exception:
                            continue  # not answering: the signals that follow stop it
                finally:
                    await bus.nc.close()

            asyncio.run(send())
        except Exception:
            return 0
        return self._wait(alive, PHASE_WAIT_S["drain"])

    @staticmethod
    def _wait(children: list[Child], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        for c in children:
            assert c.proc is not None
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return sum(1 for c in children if not c.alive())


# Options whose value is a secret: handed to the child in its environment instead,
# where the process list does not show it (the child reads the same variable).
_SECRET_OPTIONS = {"--api-token": "JETFLEET_API_TOKEN"}


def _secrets_off_the_command_line(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    out: list[str] = []
    env: dict[str, str] = {}
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in _SECRET_OPTIONS and i + 1 < len(argv):
            env[_SECRET_OPTIONS[arg]] = argv[i + 1]
            skip = True
            continue
        out.append(arg)
    return out, env


def describe_stop(ended: dict[str, int]) -> str:
    """How the stop went, in words a reader understands."""
    total = sum(ended.values())
    drained = ended.get("drain", 0)
    if total == drained:
        return f"all {total} components finished their work and exited"
    forced = ", ".join(f"{n} after {phase}" for phase, n in ended.items()
                       if phase != "drain" and n)
    return (f"{drained} of {total} components finished their work and exited; "
            f"the rest were stopped ({forced})")


def fleet_children(args: Any) -> list[ChildSpec]:
    """Every child `jetfleet up` starts: each component says which, from the options."""
    from ops import components

    out: list[ChildSpec] = []
    for comp in components.COMPONENTS:
        children = getattr(components.module(comp), "up_children", None)
        if children is not None:
            out.extend((comp, name, argv) for name, argv in children(args))
    return out


class SecurityOptionError(ValueError):
    """--secure / --tls options that cannot work together: a one-line reason."""


def fleet_from(args: Any, data_dir: Path) -> Fleet:
    """The fleet `up` and `demo` start for these options (PortInUse when taken,
    SecurityOptionError for --secure/--tls that cannot work)."""
    from bus.credentials import CredentialsError

    secure = bool(getattr(args, "secure", False))
    given = [getattr(args, f"tls_{k}", None) for k in ("cert", "key", "ca")]
    wants_tls = bool(getattr(args, "tls", False)) or any(given)
    if (secure or wants_tls) and args.nats:
        raise SecurityOptionError(
            "--secure and --tls configure the embedded server; to join a secured server "
            "give each component its credentials (`jetfleet creds`) and the TLS CA instead")
    if not (secure or wants_tls):
        return Fleet(data_dir, nats_port=args.nats_port, children=fleet_children(args),
                     nats_url=args.nats, cluster=getattr(args, "cluster", 0))
    from bus.tls import TlsError, TlsFiles, load_or_generate

    tls: TlsFiles | None = None
    try:
        if any(given):
            if not all(given):
                raise SecurityOptionError("--tls-cert, --tls-key and --tls-ca go together")
            tls = TlsFiles(*(Path(str(p)).absolute() for p in given)).check()
        elif wants_tls:
            tls, _ = load_or_generate(data_dir.absolute() / "tls")
        security = FleetSecurity.prepare(data_dir.absolute(), secure=secure, tls=tls)
    except (TlsError, CredentialsError) as exc:
        raise SecurityOptionError(str(exc)) from None
    if tls is not None:
        security.notes.append(f"TLS: export JETFLEET_NATS_TLS_CA={tls.ca}")
    children = fleet_children(args)
    if secure:
        children = [_with_api_tokens(spec, security) for spec in children]
    return Fleet(data_dir, nats_port=args.nats_port, children=children,
                 nats_url=args.nats, cluster=getattr(args, "cluster", 0), security=security)


def _with_api_tokens(spec: ChildSpec, security: FleetSecurity) -> ChildSpec:
    """A secured fleet's query API is never open: a token file when no token was given."""
    component, name, argv = spec
    if component != "query" or "--api-token" in argv or os.environ.get("JETFLEET_API_TOKEN"):
        return spec
    tokens = security.api_tokens()
    return (component, name, [*argv, "--tokens-file", str(tokens)]) if tokens else spec
