"""The per-attempt time limit (`timeout_s`): a timer, not a task."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agents.worker.middleware import Middleware
from agents.worker.outcome import Outcome

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt


class TimeLimit(Middleware):
    name = "timelimit"

    async def after_start(self, att: Attempt) -> None:
        limit = att.item.timeout_s
        if limit:
            att.notes["deadline"] = asyncio.get_running_loop().call_later(
                limit, att.stop, "timeout", f"attempt exceeded timeout_s={limit:g}")

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        handle = att.notes.pop("deadline", None)
        if handle is not None:
            handle.cancel()
