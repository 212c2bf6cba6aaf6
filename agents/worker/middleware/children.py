"""Child jobs go with their parent: cancelled when it is cancelled or fails for good."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agents.worker.middleware import Middleware
from agents.worker.outcome import Cancelled, Dead, Failed, Outcome

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt


class ChildJobs(Middleware):
    name = "children"

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        if att.ctx is None or not att.ctx.children.outstanding:
            return
        if isinstance(outcome, Cancelled):
            await att.ctx.children.cancel(reason=f"parent {att.job_id} cancelled")
        elif isinstance(outcome, Failed | Dead):
            await att.ctx.children.cancel(reason=f"parent {att.job_id} failed")
