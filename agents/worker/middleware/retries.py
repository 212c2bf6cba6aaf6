"""The retry policy: what a failed or stopped attempt means for the job.

    failed, not retryable               -> failed (final)
    failed, or stopped by its time
    limit, a lost lease or a shutdown    -> retrying after exponential backoff,
                                            or dead once max_attempts are spent
    stopped by a cancel                  -> cancelled
    stopped because a newer attempt
    took the job over                    -> abandoned (the newer one settles it)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agents.worker.middleware import Middleware
from agents.worker.outcome import Abandoned, Cancelled, Dead, Failed, Outcome, Retry, Stopped
from bus.consumer import backoff
from schemas.common import ErrorInfo

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt


class RetryPolicy(Middleware):
    name = "retries"

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s

    async def after_invoke(self, att: Attempt, outcome: Outcome) -> Outcome:
        if isinstance(outcome, Stopped):
            if outcome.reason == "cancelled":
                return Cancelled(outcome.message or "cancelled")
            if outcome.reason == "superseded":
                return Abandoned(outcome.message)
            return self._again(att, ErrorInfo(code=outcome.reason, message=outcome.message))
        if isinstance(outcome, Failed) and outcome.retryable:
            return self._again(att, outcome.error)
        return outcome

    def _again(self, att: Attempt, error: ErrorInfo) -> Outcome:
        if att.number >= att.item.max_attempts:
            return Dead(error)
        return Retry(error, backoff(att.number, self.base_s, self.cap_s))
