"""The client SDK: submit, follow, wait, cancel (async), plus a synchronous
facade with the field names of the kernel-generation client people know.

    async with await Client.connect() as fleet:
        job_id = await fleet.submit({"type": "echo"}, {"a": 1})
        state = await fleet.wait(job_id, timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from nats.js.api import DeliverPolicy
from nats.js.errors import NoKeysError

from bus import codec, topology
from bus.adverts import list_adverts
from bus.connection import Bus, connect
from bus.jobtable import JobTable
from bus.settings import Settings
from schemas.common import new_id
from schemas.events import TERMINAL_KINDS, JobEvent, decode_event, event_kind
from schemas.fleet import CapabilityAdvert
from schemas.jobs import (
    CancelRequest,
    JobState,
    JobSubmission,
    Resources,
    is_valid_capability_type,
)

T = TypeVar("T")


class JobFailed(RuntimeError):
    def __init__(self, state: JobState) -> None:
        err = state.error
        detail = f"{err.code}: {err.message}" if err else (state.reason or "")
        super().__init__(f"job {state.job_id} ended {state.state}: {detail}")
        self.state = state


class Client:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.jobs = JobTable(bus)

    @classmethod
    async def connect(cls, url: str | None = None, settings: Settings | None = None,
                      name: str = "jetfleet-client") -> Client:
        return cls(await connect(settings, url=url, name=name))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.bus.close()

    async def submit(
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
    ) -> str:
        """Publish a submission; idempotent by job id (the id is the Nats-Msg-Id)."""
        cap = {"type": capability} if isinstance(capability, str) else dict(capability)
        if not is_valid_capability_type(cap.get("type", "")):
            raise ValueError(f"capability type {cap.get('type')!r}: dot-separated lower-case "
                             "words, e.g. kernel.verify")
        res = Resources(**resources) if isinstance(resources, dict) else resources
        sub = JobSubmission(capability=cap, payload=payload or {}, job_id=job_id or new_id(),
                            priority=priority, max_attempts=max_attempts, timeout_s=timeout_s,
                            user=user, labels=labels or {}, resources=res,
                            parent_job_id=parent_job_id)
        # Validate here too, so a bad call fails at the caller, not on the bus.
        codec.decode(codec.encode(sub), JobSubmission)
        await self.bus.publish(topology.SUBMIT, sub, msg_id=sub.job_id)
        assert sub.job_id is not None
        return sub.job_id

    async def status(self, job_id: str) -> JobState | None:
        got = await self.jobs.get(job_id)
        return got[0] if got else None

    async def events(self, job_id: str, *, follow: bool = True,
                     timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """Every event of the job from the first; with `follow`, until a terminal one."""
        sub = await self.bus.js.subscribe(topology.job_events(job_id), ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.ALL)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                left = 1.0 if deadline is None else deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"no terminal event for job {job_id} in {timeout}s")
                try:
                    msg = await sub.next_msg(timeout=min(left, 1.0))
                except TimeoutError:
                    if not follow:
                        return
                    continue
                try:
                    event = decode_event(msg.data)
                except Exception:
                    continue  # a foreign message on our subject is not an event
                yield event
                if follow and event_kind(event) in TERMINAL_KINDS:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Wait until the job ends; returns its final state (any terminal state)."""
        state = await self.status(job_id)
        if state is None or not state.terminal:
            async for _ in self.events(job_id, timeout=timeout):
                pass
        # The event may precede the KV write by a hair on another connection.
        for _ in range(100):
            state = await self.status(job_id)
            if state is not None and state.terminal:
                return state
            await asyncio.sleep(0.02)
        raise TimeoutError(f"job {job_id} has a terminal event but no terminal state")

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        state = await self.wait(job_id, timeout)
        if state.state != "succeeded":
            raise JobFailed(state)
        return state.result

    async def run(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
                  timeout: float | None = None, **kw: Any) -> Any:
        return await self.result(await self.submit(capability, payload, **kw), timeout)

    async def cancel(self, job_id: str, reason: str = "cancelled by request",
                     user: str | None = None) -> None:
        req = CancelRequest(job_id=job_id, reason=reason, user=user)
        await self.bus.publish(topology.CANCEL, req)

    async def list_jobs(self, limit: int = 100) -> list[JobState]:
        kv = await self.jobs.kv()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        states = []
        for key in keys:
            got = await self.jobs.get(key)
            if got:
                states.append(got[0])
        states.sort(key=lambda s: s.submitted_at, reverse=True)
        return states[:limit]

    async def workers(self) -> list[CapabilityAdvert]:
        return sorted(await list_adverts(self.bus), key=lambda a: a.worker_id)


class SyncClient:
    """Blocking facade for scripts; runs its own event loop in a thread.

    `submit_job` takes the kernel-generation client's fields (op_name,
    task_desc, job_type, backend, arch, dsl, framework, workflow, ...).
    """

    def __init__(self, url: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: Client = self._call(Client.connect(url))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
               **kw: Any) -> str:
        return self._call(self._client.submit(capability, payload, **kw))

    def submit_job(self, op_name: str, task_desc: str = "", job_type: str = "single",
                   backend: str | None = None, arch: str | None = None, dsl: str = "triton",
                   framework: str = "torch", workflow: str | None = None, **payload: Any) -> str:
        """`job_type` single/evolve/generate/verify/profile -> capability kernel.<job_type>.

        backend and arch select the devices that evaluate: labels of the job
        itself for verify/profile, of its child evaluations otherwise (the
        evolver that generates candidates runs anywhere).
        """
        labels = {k: v for k, v in (("backend", backend), ("arch", arch)) if v}
        user = payload.pop("user", None)
        body: dict[str, Any] = {"problem": op_name, "dsl": dsl.split("_")[0], **payload}
        capability = {"type": f"kernel.{job_type}"}
        if job_type in ("verify", "profile"):
            capability.update(labels)
        else:
            body["framework"] = framework
            if task_desc:
                body["task_desc"] = task_desc
            if workflow:
                body["workflow"] = workflow
            if labels and job_type in ("single", "evolve"):
                body["child_labels"] = labels
        return self.submit(capability, body, user=user)

    def wait_for_completion(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        state = self._call(self._client.wait(job_id, timeout))
        out: dict[str, Any] = codec.to_builtins(state)
        out["status"] = state.state
        return out

    def status(self, job_id: str) -> dict[str, Any] | None:
        state = self._call(self._client.status(job_id))
        return None if state is None else {**codec.to_builtins(state), "status": state.state}

    def cancel(self, job_id: str) -> None:
        self._call(self._client.cancel(job_id))

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
