"""The asynchronous client: what a script, a service or the CLI uses to talk to a fleet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from bus import codec, kvread, topology
from bus.adverts import list_adverts
from bus.connection import Bus, connect
from bus.consumer import Follower
from bus.jobtable import JobTable
from bus.settings import Settings
from schemas.common import ObjRef, is_valid_id, new_id
from schemas.events import TERMINAL_KINDS, JobEvent, decode_event, event_kind
from schemas.fleet import CapabilityAdvert
from schemas.jobs import (
    CancelRequest,
    JobState,
    JobSubmission,
    Resources,
    is_valid_capability_type,
)

# States a job does not leave by itself: `wait` returns on them (unschedulable
# unless asked to keep waiting for a worker that may yet appear).
SETTLED_KINDS = TERMINAL_KINDS | {"unschedulable"}


class JobFailed(RuntimeError):
    """The job ended in a state other than `succeeded`."""

    def __init__(self, state: JobState) -> None:
        err = state.error
        detail = f"{err.code}: {err.message}" if err else (state.reason or "")
        super().__init__(f"job {state.job_id} ended {state.state}: {detail}")
        self.state = state


class JobUnschedulable(JobFailed):
    """No live worker can run the job (its reason says why); it may run later."""


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


def check_job_id(job_id: str) -> str:
    if not is_valid_id(job_id):
        raise ValueError(f"{job_id!r} is not a job id (letters, digits, '_' and '-', "
                         "at most 128)")
    return job_id


class Client:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.jobs = JobTable(bus)

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None,
                      name: str = "jetfleet-client",
                      connect_timeout: float | None = None) -> Client:
        return cls(await connect(settings, url=url, name=name, connect_timeout=connect_timeout))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.bus.close()

    # ---- submit ----------------------------------------------------------------------------

    def submission(
        self,
        capability: dict[str, str] | str,
        payload: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        priority: int = 1,
        max_attempts: int = 3,
        timeout_s: float | None = None,
        user: str | None = None,
        labels: dict[str, str] | None = None,
        resources: Resources | dict[str, int] | None = None,
        parent_job_id: str | None = None,
        payload_ref: ObjRef | dict[str, Any] | None = None,
    ) -> JobSubmission:
        """A validated submission: a bad call fails here, at the caller, not on the bus."""
        cap = {"type": capability} if isinstance(capability, str) else dict(capability)
        if not is_valid_capability_type(cap.get("type", "")):
            raise ValueError(f"capability type {cap.get('type')!r}: dot-separated lower-case "
                             "words, e.g. kernel.verify")
        res = Resources(**resources) if isinstance(resources, dict) else resources
        sub = JobSubmission(capability=cap, payload=payload or {}, job_id=job_id or new_id(),
                            priority=priority, max_attempts=max_attempts, timeout_s=timeout_s,
                            user=user, labels=labels or {}, resources=res,
                            parent_job_id=parent_job_id,
                            payload_ref=(ObjRef(**payload_ref) if isinstance(payload_ref, dict)
                                         else payload_ref))
        try:
            return codec.decode(codec.encode(sub), JobSubmission)
        except codec.DecodeError as exc:
            raise ValueError(exc.reason) from None

    async def submit(self, capability: dict[str, str] | str,
                     payload: dict[str, Any] | None = None, **kw: Any) -> str:
        """Publish a submission; idempotent by job id (the id is the Nats-Msg-Id).
        A payload too large for a message goes to the object store and travels
        as `payload_ref` (it expires after a day)."""
        sub = self.submission(capability, payload, **kw)
        if sub.payload and len(codec.encode(sub)) > self.bus.settings.max_payload_bytes:
            from bus.objects import ObjectStore

            sub.payload_ref = await ObjectStore(self.bus).put(
                codec.encode(sub.payload), name=f"payloads/{sub.job_id}", ttl=24 * 3600)
            sub.payload = {}
        assert sub.job_id is not None
        await self.bus.publish(topology.SUBMIT, sub, msg_id=sub.job_id)
        return sub.job_id

    # ---- follow ----------------------------------------------------------------------------

    async def status(self, job_id: str) -> JobState | None:
        got = await self.jobs.get(check_job_id(job_id))
        return got[0] if got else None

    async def events(self, job_id: str, *, follow: bool = True, timeout: float | None = None,
                     until: frozenset[str] | set[str] = TERMINAL_KINDS
                     ) -> AsyncIterator[JobEvent]:
        """Every event of the job from the first; with `follow`, until one of `until`.
        A server restart or a cluster fail-over meanwhile delays events, never
        drops them (the follower re-subscribes after the last event read)."""
        follower = Follower(self.bus, topology.job_events(check_job_id(job_id)))
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                left = 1.0 if deadline is None else deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} did not settle within {timeout:g}s")
                try:
                    msg = await follower.next(timeout=min(left, 1.0))
                except TimeoutError:
                    if not follow:
                        return
                    continue
                try:
                    event = decode_event(msg.data)
                except Exception:
                    continue  # a foreign message on our subject is not an event
                yield event
                if follow and event_kind(event) in until:
                    return
        finally:
            await follower.close()

    async def wait(self, job_id: str, timeout: float | None = None, *,
                   keep_waiting: bool = False) -> JobState:
        """Wait until the job settles and return its state: a terminal state, or
        `unschedulable` (with its reason) unless `keep_waiting` is set.
        Raises JobNotFound when no such job is known once the wait is over."""
        until = TERMINAL_KINDS if keep_waiting else SETTLED_KINDS
        state = await self.status(job_id)
        if state is None or not self._settled(state, keep_waiting):
            async for _ in self.events(job_id, timeout=timeout, until=until):
                pass
        # The event may precede the KV write by a hair on another connection.
        for _ in range(100):
            state = await self.status(job_id)
            if state is not None and self._settled(state, keep_waiting):
                return state
            await asyncio.sleep(0.02)
        if state is None:
            raise JobNotFound(job_id)
        return state  # requeued meanwhile: report what it is now

    @staticmethod
    def _settled(state: JobState, keep_waiting: bool) -> bool:
        return state.terminal or (not keep_waiting and state.state == "unschedulable")

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        """The result of a succeeded job; JobFailed / JobUnschedulable otherwise."""
        state = await self.wait(job_id, timeout)
        if state.state == "unschedulable":
            raise JobUnschedulable(state)
        if state.state != "succeeded":
            raise JobFailed(state)
        if state.result_ref is not None:  # a large result, in the object store
            from bus.objects import ObjectStore

            return codec.decode(bytes(await ObjectStore(self.bus).get(state.result_ref)), Any)
        return state.result

    async def run(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
                  timeout: float | None = None, **kw: Any) -> Any:
        return await self.result(await self.submit(capability, payload, **kw), timeout)

    async def call(self, capability: dict[str, str] | str,
                   payload: dict[str, Any] | None = None, timeout: float | None = None,
                   **kw: Any) -> Any:
        """Request/response, like a handler's `ctx.call`: the same as `run`."""
        return await self.run(capability, payload, timeout, **kw)

    # ---- cancel ----------------------------------------------------------------------------

    async def cancel(self, job_id: str, reason: str = "cancelled by request",
                     user: str | None = None) -> JobState:
        """Ask for the job to stop; returns its state as it was when asked.
        Raises JobNotFound for an unknown job; a job that already ended is
        returned as it is, and nothing is sent."""
        state = await self.status(job_id)
        if state is None:
            raise JobNotFound(job_id)
        if not state.terminal:
            req = CancelRequest(job_id=job_id, reason=reason, user=user)
            await self.bus.publish(topology.CANCEL, req)
        return state

    # ---- fleet -----------------------------------------------------------------------------

    async def list_jobs(self, limit: int = 100) -> list[JobState]:
        kv = await self.jobs.kv()
        keys = await kvread.keys(kv)
        states = []
        for key in keys:
            got = await self.jobs.get(key)
            if got:
                states.append(got[0])
        states.sort(key=lambda s: s.submitted_at, reverse=True)
        return states[:limit]

    async def workers(self) -> list[CapabilityAdvert]:
        return sorted(await list_adverts(self.bus), key=lambda a: a.worker_id)
