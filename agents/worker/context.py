"""What a handler sees of its job: payload, devices, progress, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.jobs import WorkItem


class JobError(Exception):
    """A handler's own failure with a stable code. `retryable=False` ends the
    job as `failed` at once; otherwise the attempt is retried with backoff."""

    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Delegate(Exception):
    """Raised by a handler that cannot run this job here after all (wrong device
    type, too little memory): the job goes back for another worker, once,
    without using up an attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class JobContext:
    item: WorkItem
    attempt: int
    worker_id: str
    node: str
    devices: list[str]
    env: dict[str, str]
    loop: asyncio.AbstractEventLoop
    _progress: Callable[[float | None, str | None, dict[str, Any] | None], Any]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The same signal for handlers running in a thread.
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    processes: set[asyncio.subprocess.Process] = field(default_factory=set)
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return self.item.job_id

    @property
    def payload(self) -> dict[str, Any]:
        return self.item.payload

    @property
    def is_cancelled(self) -> bool:
        return self.cancel_flag.is_set()

    def progress(self, fraction: float | None = None, message: str | None = None,
                 **data: Any) -> None:
        """Report progress; callable from the handler's loop or its thread."""
        coro = self._progress(fraction, message, data or None)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _set_cancelled(self) -> None:
        self.cancel_flag.set()
        self.cancelled.set()

    async def run_process(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                          cwd: str | None = None, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run a child in its own process group that sees only this job's
        devices; cancelling the job stops the whole group."""
        full_env = {**os.environ, **self.env, **(env or {}), "JETFLEET_JOB_ID": self.job_id}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=full_env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self.processes.add(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            kill_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            self.processes.discard(proc)
        return proc.returncode or 0, out, err

    def signal_processes(self, sig: int) -> None:
        for proc in list(self.processes):
            kill_group(proc.pid, sig)


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
