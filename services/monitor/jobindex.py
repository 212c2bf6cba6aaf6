"""Which jobs run (or were lost) on which node, mirrored from KV `jobs`.

The monitor needs, when a node goes silent, every running job on it, of
both origins; when it comes back, the jobs lost with it; and for staleness,
each running job's last sign of life. It keeps a light view of open jobs
only (running or lost), built by replaying the bucket at start (so a
restarted monitor knows everything at once) and kept current by its changes.
"""

from __future__ import annotations

import logging

import msgspec

from bus import codec, topology
from bus.connection import Bus
from services.monitor.mirror import KvMirror

log = logging.getLogger(__name__)
TRACKED = frozenset({"running", "lost"})


class JobView(msgspec.Struct, kw_only=True):
    """The fields of a JobState the monitor reads (the rest is skipped by the decoder)."""

    job_id: str
    state: str
    origin: str = "submitted"
    attempt: int = 0
    worker_id: str | None = None
    node: str | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    timeout_s: float | None = None
    stale: bool = False


class JobIndex:
    def __init__(self, bus: Bus) -> None:
        self.jobs: dict[str, JobView] = {}
        self.by_node: dict[str, set[str]] = {}
        self.mirror = KvMirror(bus, topology.KV_JOBS, self._put, self._delete)

    async def start(self) -> None:
        await self.mirror.start()

    def _put(self, key: str, data: bytes, revision: int) -> None:
        # Values arrive in stream order, and a replay after a reconnect starts
        # from each key's latest: the last one applied is the newest.
        try:
            view = codec.decode(data, JobView)
        except codec.DecodeError as exc:
            log.warning("KV jobs %s: not a job record (%s)", key, exc.reason)
            return
        self._drop(key)
        if view.state in TRACKED and view.node:
            self.jobs[key] = view
            self.by_node.setdefault(view.node, set()).add(key)

    def _delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        old = self.jobs.pop(key, None)
        if old is not None and old.node:
            ids = self.by_node.get(old.node)
            if ids is not None:
                ids.discard(key)
                if not ids:
                    del self.by_node[old.node]

    def on_node(self, node: str, state: str) -> list[JobView]:
        return [self.jobs[j] for j in sorted(self.by_node.get(node, ())) if self.jobs[j].state == state]

    def running(self) -> list[JobView]:
        return [j for j in self.jobs.values() if j.state == "running"]
