"""One attempt at a job: its state while it runs, how it is stopped, and the
invocation of the handler (the core every middleware wraps)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agents.worker.app import CapabilitySpec, InvalidPayload
from agents.worker.context import Delegate, JobContext, JobError
from agents.worker.outcome import Delegated, Failed, Outcome, Stopped, StopReason, Succeeded
from bus.consumer import Delivery
from bus.leases import Lease
from schemas.common import ErrorInfo
from schemas.jobs import JobState, Resources, WorkItem

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    delivery: Delivery[WorkItem]
    spec: CapabilitySpec | None
    resources: Resources
    number: int = 0
    state: JobState | None = None  # the record as admitted
    ctx: JobContext | None = None
    leases: list[Lease] = field(default_factory=list)
    started: bool = False  # the record says running with this attempt
    task: asyncio.Task[Any] | None = None
    stop_reason: StopReason | None = None
    stop_message: str = ""
    finished: bool = False  # the handler ended: guards stop on their own
    t0: float = field(default_factory=time.monotonic)
    cancel_grace_s: float = 2.0
    # Set by middleware: things to await before the outcome is announced
    # (the `running` event, coalesced progress), so events stay in order.
    pending: list[asyncio.Future[Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    # Where ctx.progress() reports go (set by the progress middleware once running).
    on_progress: Callable[[float | None, str | None, dict[str, Any] | None], None] | None = None
    _escalation: asyncio.Task[None] | None = None

    @property
    def item(self) -> WorkItem:
        return self.delivery.data

    @property
    def job_id(self) -> str:
        return self.delivery.data.job_id

    @property
    def devices(self) -> list[str]:
        return [lease.device for lease in self.leases]

    def release(self) -> None:
        """Forget the context once the attempt is over. The context reports
        progress through this attempt, so the two refer to each other; without
        this every job would leave a reference cycle for the garbage collector."""
        self.ctx = None
        self.on_progress = None

    def report_progress(self, fraction: float | None, message: str | None,
                        data: dict[str, Any] | None) -> None:
        if self.on_progress is not None:
            self.on_progress(fraction, message, data)

    def stop(self, reason: StopReason, message: str) -> None:
        """Stop the handler: cooperatively first (ctx.cancelled), then SIGTERM and
        SIGKILL of its processes, then cancel its task. A lost lease allows no
        grace: the device may already be someone else's. The first reason wins."""
        if self.stop_reason is not None or self.finished:
            return
        self.stop_reason, self.stop_message = reason, message
        if self.ctx is not None:
            self.ctx._set_cancelled()
        if self.task is not None:
            self._escalation = asyncio.get_running_loop().create_task(self._escalate())

    async def _escalate(self) -> None:
        task = self.task
        assert task is not None
        if self.stop_reason == "lease_lost":
            steps: tuple[tuple[int | None, float], ...] = ((signal.SIGKILL, 0.5),)
        else:
            g = self.cancel_grace_s
            steps = ((None, g), (signal.SIGTERM, g), (signal.SIGKILL, g))
        for sig, grace in steps:
            if sig is not None and self.ctx is not None:
                self.ctx.signal_processes(sig)
            done, _ = await asyncio.wait({task}, timeout=grace)
            if done:
                return
        task.cancel()  # a thread cannot be killed: its result is discarded

    async def invoke(self) -> Outcome:
        """Run the handler; what it returned or raised, or how it was stopped."""
        spec, ctx = self.spec, self.ctx
        assert spec is not None and ctx is not None
        if self.stop_reason is not None:
            return Stopped(self.stop_reason, self.stop_message)
        raw = self.item.payload
        if self.item.payload_ref is not None:
            loaded = await self._payload_from_store()
            if isinstance(loaded, Failed):
                return loaded
            raw = loaded
        try:
            payload = spec.decode_payload(raw)
        except InvalidPayload as exc:
            return Failed(ErrorInfo(code="invalid_payload", message=str(exc)), retryable=False)
        coro = (spec.call(ctx, payload) if spec.is_async
                else asyncio.to_thread(spec.call, ctx, payload))
        self.task = asyncio.ensure_future(coro)
        if self.stop_reason is not None and self._escalation is None:
            self._escalation = asyncio.get_running_loop().create_task(self._escalate())
        error: ErrorInfo | None = None
        outcome: Outcome | None = None
        try:
            result = await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                self.task.cancel()
                raise  # the worker itself is being cancelled, not the job
            # The handler's task was cancelled: by the stop's last step, or by itself.
            error = ErrorInfo(code=self.stop_reason or "cancelled",
                              message=self.stop_message or "the handler was cancelled")
            outcome = Failed(error, retryable=True)
        except Delegate as exc:
            outcome = Delegated(exc.reason)
        except JobError as exc:
            error = ErrorInfo(code=exc.code, message=exc.message)
            outcome = Failed(error, retryable=exc.retryable)
        except Exception as exc:
            error = ErrorInfo(code=type(exc).__name__, message=str(exc)[:2000])
            outcome = Failed(error, retryable=True)
        else:
            outcome = self._succeeded(result)
        finally:
            self.finished = True
        if self.stop_reason is not None:
            # Stopped from outside: the stop decides (a result made after a
            # timeout, a cancel or without a lease is not kept).
            return Stopped(self.stop_reason, self.stop_message, error)
        assert outcome is not None
        return outcome

    async def _payload_from_store(self) -> dict[str, Any] | Failed:
        """A payload passed by reference (`payload_ref`): a JSON object in the store."""
        from bus.objects import ObjectError, ObjectStoreUnavailable

        assert self.ctx is not None and self.item.payload_ref is not None
        try:
            data = await self.ctx.objects.get(self.item.payload_ref)
        except ObjectStoreUnavailable as exc:
            return Failed(ErrorInfo(code="object_store_error", message=str(exc)), retryable=True)
        except ObjectError as exc:
            return Failed(ErrorInfo(code="invalid_payload", message=f"payload_ref: {exc}"),
                          retryable=False)
        try:
            value = msgspec.json.decode(bytes(data))
        except msgspec.DecodeError as exc:
            return Failed(ErrorInfo(code="invalid_payload",
                                    message=f"payload_ref is not JSON: {exc}"), retryable=False)
        if not isinstance(value, dict):
            return Failed(ErrorInfo(code="invalid_payload",
                                    message="payload_ref must hold a JSON object"),
                          retryable=False)
        return value

    def _succeeded(self, result: Any) -> Outcome:
        try:
            value = msgspec.to_builtins(result)
        except (TypeError, msgspec.EncodeError) as exc:
            return Failed(ErrorInfo(code="invalid_result",
                                    message=f"the handler's result cannot be encoded: {exc}"),
                          retryable=False)
        return Succeeded(value, time.monotonic() - self.t0)
