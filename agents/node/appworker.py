"""One worker process a node agent started for an app: spawn, watch, stop.

The worker is `jetfleet run worker --app ... --no-builtin --no-kernels --node
<node> --worker-id <stable id>` in its own session (a Ctrl-C meant for the
agent does not reach it; the agent stops it in order) that dies with the
agent (PR_SET_PDEATHSIG). Its output goes on to the agent's stderr, and the
last lines are kept so a crash can be reported with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.server import die_with_parent

log = logging.getLogger(__name__)
TAIL_LINES = 40
# The folder that holds bus/, agents/, ops/: a worker started from another
# folder (the app's cwd) still imports jetfleet from here.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class AppWorker:
    slot: int
    worker_id: str
    reason: str  # why it was started, for its AppStarted event
    proc: asyncio.subprocess.Process | None = None
    spawned_at: float = 0.0  # monotonic
    spawned_wall: float = 0.0
    ready_at: float | None = None  # monotonic, when its advert appeared
    busy_at: float = 0.0  # monotonic, the last time it was seen running something
    completed: int = 0
    stopping: bool = False
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    _reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    async def spawn(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        full_env = {**os.environ, **env}
        path = full_env.get("PYTHONPATH", "")
        if SOURCE_ROOT not in path.split(os.pathsep):
            full_env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, path) if p)
        self.spawned_at, self.spawned_wall = time.monotonic(), time.time()
        self.proc = await asyncio.create_subprocess_exec(
            *argv, cwd=str(cwd), env=full_env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
        self._reader = asyncio.get_running_loop().create_task(self._read_output())

    async def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                line = await self.proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # one over-long line: skip it, keep reading
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{text}\n")

    async def wait(self) -> int:
        assert self.proc is not None
        rc = await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
        return rc

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, drain: Any, grace_s: float) -> str:
        """Cooperative drain (`drain` asks its control endpoint), then SIGTERM,
        then SIGKILL; returns how it ended."""
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return "already exited"
        try:
            await drain()
        except Exception as exc:  # not answering: the signals below stop it
            log.info("worker %s did not take the drain (%s)", self.worker_id,
                     type(exc).__name__)
        for how, sig, wait_s in (("drained", None, grace_s), ("SIGTERM", signal.SIGTERM, 5.0),
                                 ("SIGKILL", signal.SIGKILL, 5.0)):
            if sig is not None:
                self.signal(sig)
            try:
                await asyncio.wait_for(self.wait(), wait_s)
                return how
            except TimeoutError:
                continue
        return "did not exit"

    def output(self, lines: int = 12) -> list[str]:
        return list(self.tail)[-lines:]
