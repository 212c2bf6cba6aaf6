"""One cancel path: the running attempts of a worker, reachable by job id.

Whoever needs a running job stopped (the dispatcher on a cancel, a worker that
takes over a job whose previous attempt went quiet) asks the worker that runs
it, by the worker's identity, on its control endpoint
`jetfleet.worker.<worker_id>.cancel`: one subscription per worker, a dict
lookup per request, however many jobs run. The KV record keeps the cancel
flag; after a reconnect (when a request may have been missed) the worker
checks its running jobs' records once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from agents.worker.middleware import Middleware
from agents.worker.outcome import Outcome
from bus import codec
from bus.control import ControlError
from bus.jobtable import JobTable
from schemas.jobs import StopRequest

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt

log = logging.getLogger(__name__)


class CancelRegistry(Middleware):
    name = "cancel"

    def __init__(self, jobs: JobTable) -> None:
        self.jobs = jobs
        self.running: dict[str, Attempt] = {}

    async def before_start(self, att: Attempt) -> Outcome | None:
        # Registered before the record says running, so a cancel sent the
        # moment after finds it (a cancel sent before makes the start fail).
        self.running[att.job_id] = att
        return None

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        if self.running.get(att.job_id) is att:
            del self.running[att.job_id]

    async def on_request(self, body: bytes) -> dict[str, Any]:
        """The control endpoint: stop the named job if it runs here."""
        try:
            req = codec.decode(body, StopRequest)
        except codec.DecodeError as exc:
            raise ControlError(400, exc.reason) from None
        att = self.running.get(req.job_id)
        if att is None or (req.attempt is not None and att.number not in (0, req.attempt)):
            raise ControlError(404, f"job {req.job_id} is not running here")
        log.info("stopping job %s (%s): %s", req.job_id, req.kind, req.reason)
        att.stop(req.kind, req.reason)
        return {"ok": True, "job_id": req.job_id, "attempt": att.number}

    async def reconcile(self) -> None:
        """After a reconnect: stop what was cancelled or taken over meanwhile."""
        for job_id, att in list(self.running.items()):
            with contextlib.suppress(Exception):
                got = await self.jobs.get(job_id)
                if got is None or not att.started:
                    continue
                s = got[0]
                if s.cancel_requested:
                    att.stop("cancelled", s.reason or "cancelled")
                elif s.attempt != att.number or s.terminal:
                    att.stop("superseded", f"attempt {s.attempt} took the job over")
            await asyncio.sleep(0)
