"""The dispatcher: validates submissions on `jobs.submit`, records them in KV
`jobs`, routes them to `work.p<priority>.<type>`, and handles `jobs.cancel`.

A job is routed even when no worker serves its capability yet: the WORK
stream holds it until one does. The dispatcher only watches such jobs and
marks them `unschedulable` (with the reason) after a grace period, then
`queued` again once a worker that can serve them appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from bus import codec, kvread, topology, tracing
from bus.adverts import AdvertBook
from bus.connection import Bus
from bus.consumer import ConsumerLoop, DeadLetterReaper, Delivery, Reject, Retry
from bus.jobtable import JobTable, emit, say, unreadable
from schemas import lifecycle as lc
from schemas.common import ErrorInfo, is_valid_id
from schemas.events import Cancelled, Dead, Duplicate, Failed, Queued, Submitted, Unschedulable
from schemas.jobs import (
    CancelRequest,
    JobState,
    JobSubmission,
    Resources,
    StopRequest,
    WorkItem,
    is_valid_capability_type,
)
from services.placement import explain_submission, unschedulable_reason

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    capability: dict[str, str]
    resources: Resources | None
    deadline: float
    priority: int = 1
    marked: bool = False
    requeues: int = 0


class Dispatcher:
    def __init__(self, bus: Bus, unschedulable_after_s: float = 30.0,
                 concurrency: int = 64) -> None:
        self.bus = bus
        self.jobs = JobTable(bus)
        self.book = AdvertBook(bus)
        self.unschedulable_after_s = unschedulable_after_s
        self._watch: dict[str, _Watch] = {}
        s = bus.settings
        self.submits: ConsumerLoop[bytes] = ConsumerLoop(
            bus, topology.JOBS, topology.dispatcher_consumer(s), bytes, self._on_submit,
            concurrency=concurrency)
        self.cancels: ConsumerLoop[bytes] = ConsumerLoop(
            bus, topology.JOBS, topology.dispatcher_consumer(s, cancel=True), bytes,
            self._on_cancel, concurrency=8)
        self.reaper = DeadLetterReaper(bus, on_dead=self._on_dead)

    # ---- submissions -------------------------------------------------------------

    async def _on_submit(self, d: Delivery[bytes]) -> None:
        with tracing.span("dispatch", kind=SpanKind.CONSUMER, headers=d.headers,
                          attributes=tracing.messaging_attrs(d.msg.subject, "process")) as span:
            sub = await self._decode_submission(d)
            span.set_attribute("jetfleet.job_id", sub.job_id or "")
            await self._route(sub, d)

    async def _decode_submission(self, d: Delivery[bytes]) -> JobSubmission:
        try:
            sub = codec.decode(d.msg.data, JobSubmission)
            problem = self._validate(sub, len(d.msg.data))
        except codec.DecodeError as exc:
            detail = explain_submission(d.msg.data)
            reason = f"{exc.reason} ({detail})" if detail else exc.reason
            await self._refuse(d.msg.data, "invalid_submission", reason)
            raise Reject(reason) from None
        if problem is not None:
            code, reason = problem
            await self._refuse(d.msg.data, code, reason, sub.job_id)
            raise Reject(reason, job_id=sub.job_id)
        if sub.job_id is None:
            header_id = d.headers.get("Nats-Msg-Id", "")
            # A redelivered submission without an id must get the same id again.
            sub.job_id = header_id if is_valid_id(header_id) else (
                f"j-{d.stream_seq}-{hashlib.sha256(d.msg.data).hexdigest()[:10]}")
        return sub

    def _validate(self, sub: JobSubmission, size: int) -> tuple[str, str] | None:
        ctype = sub.capability.get("type")
        if not ctype:
            return "invalid_submission", "capability.type is required"
        if not is_valid_capability_type(ctype):
            return "invalid_submission", (
                f"capability.type {ctype!r} must be dot-separated lower-case words "
                "([a-z0-9_-]) so it can name a subject")
        limit = self.bus.settings.max_payload_bytes
        if size > limit:
            return "payload_too_large", (
                f"submission is {size} bytes, over the {limit}-byte limit: put large "
                "inputs in the object store and pass an ObjRef as payload_ref")
        return None

    async def _refuse(self, raw: bytes, code: str, reason: str, job_id: str | None = None) -> None:
        """A submission that can never run: tell its submitter on its event subject
        when an id can be found, so `wait()` returns instead of hanging."""
        if job_id is None:
            with contextlib.suppress(Exception):
                body = json.loads(raw)
                candidate = body.get("job_id") if isinstance(body, dict) else None
                if isinstance(candidate, str) and is_valid_id(candidate):
                    job_id = candidate
        if job_id is None:
            return
        error = ErrorInfo(code=code, message=reason)
        if await self.jobs.create(lc.refused_job(job_id, error)) is None:
            return  # the id belongs to a job that exists: leave it alone
        await emit(self.bus, Failed(job_id=job_id, error=error))

    async def _route(self, sub: JobSubmission, d: Delivery[bytes]) -> None:
        job_id = sub.job_id
        assert job_id is not None
        ctype = sub.capability["type"]
        state = lc.new_job(sub, job_id, submit_seq=d.stream_seq)
        revision = await self.jobs.create(state)
        if revision is None:
            try:
                existing = await self.jobs.get(job_id)
            except codec.DecodeError as exc:
                raise Reject(unreadable(job_id, exc), job_id=job_id) from None
            if existing is None or existing[0].submit_seq != d.stream_seq:
                # Known job (another Nats-Msg-Id, or a resubmission): never run twice.
                known = existing[0].state if existing else "unknown"
                await emit(self.bus, Duplicate(
                    job_id=job_id, event_id=f"{job_id}.dup.{d.stream_seq}",
                    reason=f"job {job_id} already exists in state {known}"))
                return
            # This very submission, redelivered after an earlier delivery died
            # part-way: carry on. Events and the WORK publish are deduplicated.
            state, revision = existing
        subject = topology.work_subject(ctype, sub.priority)
        item = WorkItem(
            job_id=job_id, capability=dict(sub.capability), payload=sub.payload,
            payload_ref=sub.payload_ref, priority=sub.priority, max_attempts=sub.max_attempts,
            timeout_s=sub.timeout_s, user=sub.user, labels=sub.labels, resources=sub.resources,
            submitted_at=state.submitted_at, parent_job_id=sub.parent_job_id, depth=sub.depth,
            # The worker's first compare-and-set starts from these: no read.
            record=state, revision=revision,
        )
        # Events and work item in one round trip: sent in this order on one
        # connection, so `submitted` and `queued` are stored before any worker
        # can see the job and say `running`. The doorbell rings as soon as the
        # work item is stored (with its priority, so workers look only there).
        said = [say(self.bus, Submitted(
                    job_id=job_id, capability=dict(sub.capability), priority=sub.priority,
                    user=sub.user, parent_job_id=sub.parent_job_id)),
                say(self.bus, Queued(job_id=job_id, subject=subject))]
        try:
            await self.bus.publish(subject, item, msg_id=job_id)
            await self.bus.signal(topology.work_doorbell(ctype),
                                  topology.doorbell_body(sub.priority))
        finally:
            await asyncio.gather(*said)
        self._watch[job_id] = _Watch(dict(sub.capability), sub.resources,
                                     time.monotonic() + self.unschedulable_after_s,
                                     priority=sub.priority)
        verdict = unschedulable_reason(sub.capability, sub.resources, await self.book.adverts())
        if verdict is None:
            self._watch.pop(job_id, None)
        elif verdict.lasting:
            # Resources no node could ever hold: say so now rather than after the grace.
            self._watch[job_id].deadline = 0.0

    # ---- schedulability watch ------------------------------------------------------

    async def _watch_loop(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self._watch:
                continue
            try:
                await self._sweep()
            except Exception:
                log.exception("schedulability sweep failed")

    async def _sweep(self) -> None:
        adverts = await self.book.adverts()
        for job_id, w in list(self._watch.items()):
            verdict = unschedulable_reason(w.capability, w.resources, adverts)
            if verdict is None:
                if w.marked:
                    await self._requeue(job_id, w)
                self._watch.pop(job_id, None)
            elif not w.marked and (verdict.lasting or time.monotonic() >= w.deadline):
                w.marked = await self._mark_unschedulable(job_id, verdict.reason)
                if not w.marked:
                    self._watch.pop(job_id, None)  # it ended (or started) meanwhile

    async def _mark_unschedulable(self, job_id: str, reason: str) -> bool:
        if await self.jobs.transition(job_id, lc.mark_unschedulable(reason)) is None:
            return False
        await emit(self.bus, Unschedulable(job_id=job_id, reason=reason))
        return True

    async def _requeue(self, job_id: str, w: _Watch) -> None:
        if await self.jobs.transition(job_id, lc.requeue()) is not None:
            w.requeues += 1
            await emit(self.bus, Queued(job_id=job_id, event_id=f"{job_id}.0.queued.{w.requeues}",
                                        subject=topology.work_subject(w.capability["type"],
                                                                      w.priority)))
            await self.bus.signal(topology.work_doorbell(w.capability["type"]),
                                  topology.doorbell_body(w.priority))

    async def _rebuild_watch(self) -> None:
        """After a restart, pick up jobs an earlier dispatcher was watching."""
        kv = await self.jobs.kv()
        try:
            keys = await kvread.keys(kv)
        except Exception:
            return  # no bucket yet, or the server away: the watch starts empty
        for key in keys:
            try:  # one unreadable record must not hide the others
                got = await self.jobs.get(key)
            except Exception:
                continue
            if got and got[0].state in ("queued", "unschedulable"):
                s = got[0]
                self._watch[key] = _Watch(s.capability, s.resources, time.monotonic()
                                          + self.unschedulable_after_s,
                                          marked=s.state == "unschedulable",
                                          priority=s.priority)

    # ---- cancel ---------------------------------------------------------------------

    async def _on_cancel(self, d: Delivery[bytes]) -> None:
        try:
            req = codec.decode(d.msg.data, CancelRequest)
        except codec.DecodeError as exc:
            raise Reject(exc.reason) from None
        try:
            if (await cancel_job(self.bus, self.jobs, req) is None and d.num_delivered < 4
                    and await self.jobs.get(req.job_id) is None):
                # Not recorded yet: its submission may still be on its way (a
                # parent cancelling a child it just submitted). Hold it a little.
                raise Retry(0.5 * d.num_delivered, f"no job {req.job_id} yet")
        except codec.DecodeError as exc:
            raise Reject(unreadable(req.job_id, exc), job_id=req.job_id) from None

    # ---- dead letters --------------------------------------------------------------

    async def _on_dead(self, stream: str, seq: int, raw: bytes, headers: dict[str, str]) -> None:
        if stream != topology.WORK:
            return
        try:
            item = codec.decode(raw, WorkItem)
        except codec.DecodeError:
            return
        error = ErrorInfo(code="deliveries_exhausted",
                          message="the work message exhausted its deliveries (workers kept dying)")
        got = await self.jobs.transition(item.job_id, lc.kill(error))
        if got is not None:
            await emit(self.bus, Dead(job_id=item.job_id, attempt=got[0].attempt, error=error,
                                      errors=[a.error for a in got[0].attempts if a.error]))

    # ---- life ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.reaper.start()
        await self._rebuild_watch()
        watch = asyncio.create_task(self._watch_loop(), name="watch")
        try:
            await asyncio.gather(self.submits.run(), self.cancels.run())
        finally:
            watch.cancel()
            await self.reaper.stop()

    @property
    def watching(self) -> dict[str, _Watch]:
        """Jobs no live worker serves yet, watched for unschedulable."""
        return self._watch

    def stop(self) -> None:
        self.submits.stop()
        self.cancels.stop()


async def cancel_job(bus: Bus, jobs: JobTable, req: CancelRequest) -> JobState | None:
    """End a job that nobody runs; flag one that runs and ask its worker to stop it."""
    got = await jobs.transition(req.job_id, lc.cancel(req.reason))
    if got is not None:
        state = got[0]
        await emit(bus, Cancelled(job_id=state.job_id, attempt=state.attempt, reason=req.reason))
        return state
    got = await jobs.transition(req.job_id, lc.request_cancel(req.reason))
    if got is None:
        return None  # unknown, already ended, or already being cancelled
    await _stop_running(bus, got[0], req.reason)
    return got[0]


async def _stop_running(bus: Bus, state: JobState, reason: str) -> None:
    """Ask the worker running the job, by its identity, to stop it. A worker
    that is away now finds the flag in the record when it reconnects; one that
    died leaves the job to its next attempt, which sees the flag and cancels."""
    from bus.control import ControlError, request

    if not state.worker_id:
        return
    body = StopRequest(job_id=state.job_id, reason=reason, attempt=state.attempt)
    for attempt in range(3):
        try:
            await request(bus, "worker", state.worker_id, "cancel", body, timeout=2.0)
            return
        except ControlError:
            return  # it answered: not running there any more
        except Exception as exc:  # no responders, timeout: try a little more
            log.info("cancel of %s on %s: %s", state.job_id, state.worker_id,
                     type(exc).__name__)
            await asyncio.sleep(0.2 * (attempt + 1))


async def main(bus: Bus, unschedulable_after_s: float) -> None:
    d = Dispatcher(bus, unschedulable_after_s=unschedulable_after_s)
    await d.run()


