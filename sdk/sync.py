"""A blocking facade over the async client, for scripts and notebooks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bus import codec
from schemas.jobs import JobState
from sdk.client import Client

T = TypeVar("T")


class SyncClient:
    """Runs its own event loop in a thread; every method blocks until done."""

    def __init__(self, url: str | None = None, connect_timeout: float | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._call(Client.connect(url,
                                                             connect_timeout=connect_timeout))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def client(self) -> Client:
        return self._client

    def submit(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
               **kw: Any) -> str:
        return self._call(self._client.submit(capability, payload, **kw))

    def wait(self, job_id: str, timeout: float | None = None,
             keep_waiting: bool = False) -> JobState:
        return self._call(self._client.wait(job_id, timeout, keep_waiting=keep_waiting))

    def wait_for_completion(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The final state as a dict, with `status` (its state) and `result`."""
        state = self.wait(job_id, timeout)
        out: dict[str, Any] = codec.to_builtins(state)
        out["status"] = state.state
        out.setdefault("result", None)
        return out

    def run(self, capability: dict[str, str] | str, payload: dict[str, Any] | None = None,
            timeout: float | None = None, **kw: Any) -> Any:
        return self._call(self._client.run(capability, payload, timeout, **kw))

    def status(self, job_id: str) -> dict[str, Any] | None:
        state = self._call(self._client.status(job_id))
        return None if state is None else {**codec.to_builtins(state), "status": state.state}

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> JobState:
        return self._call(self._client.cancel(job_id, reason))

    def close(self) -> None:
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
