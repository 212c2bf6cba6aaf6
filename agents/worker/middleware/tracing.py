"""One span per delivery, parented on the trace that came with the work item,
with the messaging semantic conventions; errors mark it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from agents.worker.middleware import Middleware
from agents.worker.outcome import Dead, Failed, Outcome, Retry
from bus import tracing

if TYPE_CHECKING:
    from agents.worker.attempt import Attempt


class Tracing(Middleware):
    name = "tracing"

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    @contextlib.asynccontextmanager
    async def around(self, att: Attempt) -> AsyncIterator[None]:
        d = att.delivery
        attrs = {**tracing.messaging_attrs(d.msg.subject, "process", att.job_id),
                 "jetfleet.job_id": att.job_id, "jetfleet.worker_id": self.worker_id}
        with tracing.span(f"run {att.item.capability.get('type')}", kind=SpanKind.CONSUMER,
                          headers=d.headers, attributes=attrs):
            yield

    async def after_start(self, att: Attempt) -> None:
        trace.get_current_span().set_attribute("jetfleet.attempt", att.number)

    async def after_attempt(self, att: Attempt, outcome: Outcome | None) -> None:
        if isinstance(outcome, Failed | Retry | Dead):
            trace.get_current_span().set_status(Status(StatusCode.ERROR, outcome.error.message))
