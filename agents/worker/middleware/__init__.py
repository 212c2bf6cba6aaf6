"""Cross-cutting behaviour of an attempt as small pieces with named hooks around
one core (agents.worker.pipeline), in the spirit of dramatiq's middleware and
Temporal's interceptors. Each piece is one module; the worker composes them in
one place (`default_middleware`). Hooks run in list order, the ones that end
an attempt in reverse:

    around(att)                 an async context around the whole delivery (tracing)
    before_start(att)           before the record says running: may end the
                                attempt early by returning an Outcome (leases: Busy)
    after_start(att)            the record says running: arm guards (deadline,
                                renewal, cancel registration is already live)
    after_invoke(att, outcome)  the handler ended: may turn the outcome into
                                another (the retry policy)
    after_attempt(att, outcome) always, once the outcome is settled: disarm, release
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt
    from agents.worker.outcome import Outcome


class Middleware:
    name = "middleware"

    @contextlib.asynccontextmanager
    async def around(self, att: Attempt) -> AsyncIterator[None]:
        yield

    async def before_start(self, att: Attempt) -> Outcome | None:
        return None

    async def after_start(self, att: Attempt) -> None:
        return None

    async def after_invoke(self, att: Attempt, outcome: Outcome) -> Outcome:
        return outcome

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        return None
