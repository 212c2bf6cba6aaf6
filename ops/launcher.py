"""`jetfleet up`: an embedded nats-server and every component as a child.

Children are restarted with backoff when they die. Stopping (Ctrl-C, SIGINT,
SIGTERM) goes in four phases, each with a bounded wait: a cooperative drain
on the bus, then SIGINT, SIGTERM and SIGKILL to whatever is left, and the
server last. Children die with the launcher (PR_SET_PDEATHSIG), so not even
a kill -9 of `up` leaves them behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bus import topology
from bus.server import EmbeddedServer, die_with_parent

PHASE_WAIT_S = {"drain": 10.0, "SIGINT": 5.0, "SIGTERM": 5.0}


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

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


class Fleet:
    def __init__(self, data_dir: Path, nats_port: int = 0, workers: int = 1,
                 worker_args: list[str] | None = None, extra: list[tuple[str, list[str]]] | None = None,
                 unschedulable_after: float = 30.0, quiet: bool = False,
                 nats_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.server: EmbeddedServer | None = None
        if nats_url is None:
            self.server = EmbeddedServer(data_dir / "nats", port=nats_port)
        self.nats_url = nats_url
        self.workers = workers
        self.worker_args = worker_args or []
        self.extra = extra or []
        self.unschedulable_after = unschedulable_after
        self.quiet = quiet
        self.children: list[Child] = []
        self._stopping = False

    @property
    def url(self) -> str:
        if self.server is not None:
            return self.server.url
        assert self.nats_url
        return self.nats_url

    def _component(self, name: str, args: list[str]) -> Child:
        argv = [sys.executable, "-m", "ops.cli", "run", *args]
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return Child(name=name, argv=argv, log_path=logs / f"{name}.log",
                     env={"JETFLEET_NATS_URL": self.url})

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.server is not None:
            self.server.start()
        self.children.append(self._component(
            "dispatcher", ["dispatcher", "--unschedulable-after", str(self.unschedulable_after)]))
        for i in range(self.workers):
            self.children.append(self._component(f"worker-{i}", ["worker", *self.worker_args]))
        for name, args in self.extra:
            self.children.append(self._component(name, args))
        # The evolver serves kernel.generate, kernel.single and kernel.evolve.
        if not any(args[:1] == ["evolver"] for _, args in self.extra):
            self.children.append(self._component("evolver", ["evolver"]))
        for child in self.children:
            child.start()

    def supervise_once(self) -> None:
        """Restart children that died, with exponential backoff (up to 30 s)."""
        nowt = time.monotonic()
        for child in self.children:
            if self._stopping or child.alive():
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
        if not alive:
            return 0
        try:
            import asyncio

            import nats

            async def send() -> None:
                nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=1)
                await nc.publish(topology.DRAIN, b"")
                await nc.flush()
                await nc.close()

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
