"""What a handler sees of its job: payload, devices, progress, cancellation, and
the fleet (the bus, a client, child jobs)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agents.worker.children import Children
from agents.worker.errors import Delegate, JobError
from schemas.jobs import WorkItem

if TYPE_CHECKING:
    from bus.connection import Bus
    from bus.objects import ObjectStore
    from bus.resources import ResourceStore
    from sdk.client import Client

__all__ = ["Delegate", "JobContext", "JobError", "kill_group"]


ProgressFn = Callable[[float | None, str | None, dict[str, Any] | None], None]


@dataclass
class JobContext:
    item: WorkItem
    attempt: int
    worker_id: str
    node: str
    devices: list[str]
    # What the job's processes see: CUDA_VISIBLE_DEVICES of the leased GPUs.
    env: dict[str, str]
    loop: asyncio.AbstractEventLoop
    bus: Bus
    client: Client
    children: Children
    # The object store (put/get/open/get_to/delete; refs as ObjRef or their JSON).
    objects: ObjectStore
    # Versioned shared resources; the versions read are recorded with the attempt.
    resources: ResourceStore
    _progress: ProgressFn
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The same signal for handlers running in a thread.
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    processes: set[asyncio.subprocess.Process] = field(default_factory=set)

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
        """Report progress; callable from the handler's loop or its thread. Cheap:
        events are coalesced and the job record is updated at most once a second."""
        self._progress(fraction, message, data or None)

    async def call(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
                   *, timeout: float | None = None, **kw: Any) -> Any:
        """Run another capability as a child job and return its result (see Children.call)."""
        return await self.children.call(capability, payload, timeout=timeout, **kw)

    def _set_cancelled(self) -> None:
        self.cancel_flag.set()
        if asyncio.get_running_loop() is self.loop:
            self.cancelled.set()
        else:
            self.loop.call_soon_threadsafe(self.cancelled.set)

    async def run_process(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                          cwd: str | None = None,
                          timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Run a child in its own process group that sees only this job's devices
        and carries JETFLEET_JOB_ID (so node agents link it to this job);
        cancelling the job stops the whole group."""
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
