"""Child jobs: a handler submits jobs for other capabilities and awaits them.

    result = await ctx.call("embed", {"text": t})               # one child, its result
    ids = [await ctx.children.submit("kernel.profile", p, job_id=...) for p in batch]
    states = await ctx.children.wait_all(ids)                   # final states

A child records its parent (`parent_job_id`, shared trace) and how deep in a
chain of calls it is; a chain deeper than `max_depth` (default 4) fails with
`call_depth_exceeded` instead of looping. Children still outstanding when the
parent is cancelled, or fails for good, are cancelled with it (see
middleware.children); a parent stopped by a timeout or a shutdown leaves them
running, and its next attempt finds them again by their ids. Waiting ends when
the parent is stopped, and a child nobody can run (`unschedulable`) ends the
call with its reason instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from agents.worker.errors import JobError
from bus import topology
from schemas.common import new_id
from schemas.jobs import CancelRequest, JobState, WorkItem

if TYPE_CHECKING:
    from bus.connection import Bus
    from sdk.client import Client

log = logging.getLogger(__name__)

MAX_DEPTH = int(os.environ.get("JETFLEET_MAX_CALL_DEPTH", "4"))


class Children:
    def __init__(self, bus: Bus, client: Client, parent: WorkItem, stopped: asyncio.Event,
                 max_depth: int = MAX_DEPTH) -> None:
        self.bus = bus
        self.client = client
        self.parent = parent
        self.stopped = stopped  # the parent's attempt was stopped: waiting ends
        self.max_depth = max_depth
        self.outstanding: set[str] = set()

    async def submit(self, capability: dict[str, str] | str,
                     payload: dict[str, Any] | None = None, *, job_id: str | None = None,
                     **kw: Any) -> str:
        """Submit a child job; returns its id (idempotent by id across parent attempts)."""
        depth = self.parent.depth + 1
        if depth > self.max_depth:
            raise JobError("call_depth_exceeded",
                           f"a chain of calls reached depth {depth} (limit {self.max_depth}): "
                           "is a capability calling itself?", retryable=False)
        kw.setdefault("timeout_s", self.parent.timeout_s)
        kw.setdefault("user", self.parent.user)
        kw.setdefault("priority", self.parent.priority)
        sub = self.client.submission(capability, payload, job_id=job_id or new_id(),
                                     parent_job_id=self.parent.job_id, **kw)
        sub.depth = depth
        assert sub.job_id is not None
        await self.bus.publish(topology.SUBMIT, sub, msg_id=sub.job_id)
        self.outstanding.add(sub.job_id)
        return sub.job_id

    async def wait_all(self, job_ids: list[str], timeout: float | None = None
                       ) -> dict[str, JobState | None]:
        """Each child's settled state (None: it did not settle within `timeout`).
        Raises JobError('cancelled') when the parent is stopped meanwhile."""
        waits = {jid: asyncio.create_task(self.client.wait(jid, timeout=timeout))
                 for jid in job_ids}
        stop = asyncio.create_task(self.stopped.wait())
        out: dict[str, JobState | None] = {}
        try:
            pending: set[asyncio.Task[Any]] = set(waits.values())
            while pending:
                done, pending = await asyncio.wait(pending | {stop},
                                                   return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    raise JobError("cancelled", "stopped while waiting for child jobs",
                                   retryable=False)
                pending.discard(stop)
            for jid, task in waits.items():
                try:
                    out[jid] = task.result()
                except Exception as exc:  # timed out, or the wait itself failed
                    log.warning("child %s: %s", jid, exc)
                    out[jid] = None
                state = out[jid]
                if state is not None and state.terminal:
                    self.outstanding.discard(jid)
            return out
        finally:
            stop.cancel()
            for task in waits.values():
                task.cancel()

    async def call(self, capability: dict[str, str] | str,
                   payload: dict[str, Any] | None = None, *, timeout: float | None = None,
                   **kw: Any) -> Any:
        """Run a child job and return its result; JobError when it does not succeed."""
        job_id = await self.submit(capability, payload, **kw)
        state = (await self.wait_all([job_id], timeout=timeout))[job_id]
        ctype = capability if isinstance(capability, str) else capability.get("type")
        if state is None:
            await self.cancel([job_id], f"parent {self.parent.job_id} stopped waiting")
            raise JobError("call_timeout", f"{ctype} child {job_id} did not finish in "
                           f"{timeout}s", retryable=False)
        if state.state == "unschedulable":
            await self.cancel([job_id], "nobody can run it")
            raise JobError("child_unschedulable", f"{ctype} child {job_id}: {state.reason}",
                           retryable=False)
        if state.state != "succeeded":
            err = state.error
            detail = f"{err.code}: {err.message}" if err else (state.reason or state.state)
            raise JobError("child_failed", f"{ctype} child {job_id} ended {state.state}: "
                           f"{detail}", retryable=False)
        if state.result_ref is not None:  # a large result, in the object store
            from bus import codec
            from bus.objects import ObjectStore

            return codec.decode(bytes(await ObjectStore(self.bus).get(state.result_ref)), Any)
        return state.result

    async def cancel(self, job_ids: list[str] | None = None, reason: str = "") -> None:
        """Cancel children (default: every one still outstanding)."""
        ids = sorted(self.outstanding if job_ids is None else job_ids)
        reason = reason or f"parent {self.parent.job_id} cancelled"
        # Straight to the dispatcher (not the client's check of the record): a
        # child submitted a moment ago may not be recorded yet, and the
        # dispatcher holds a cancel for an unknown job a little while.
        for jid in ids:
            with contextlib.suppress(Exception):
                await self.bus.publish(topology.CANCEL,
                                           CancelRequest(job_id=jid, reason=reason))
            self.outstanding.discard(jid)
