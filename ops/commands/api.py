"""Reading from a running query API: find it on the bus, then ask it over HTTP.

`jetfleet jobs`, `nodes` and `workers` call these to read the projection
instead of scanning KV buckets; each returns None when no query API runs
(the caller falls back to the bus). A query service answers `nats micro`
INFO as `jetfleet-query`; its control `info` endpoint says where its API is.
`JETFLEET_API_URL` skips the discovery; `JETFLEET_API_TOKEN` is sent as the
bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from bus import codec, topology
from bus.connection import Bus
from ops.commands.common import UserError
from schemas.fleet import CapabilityAdvert
from schemas.jobs import JobState


@dataclass(frozen=True)
class QueryApi:
    url: str
    instance: str | None = None
    auth: str | None = None  # "open" or "token", as the service says


class ApiError(UserError):
    """The API answered with an error (a JSON problem): one line for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail, code=1)
        self.status = status


async def discover(bus: Bus, timeout: float = 0.5) -> list[QueryApi]:
    """Every query service on this server that says where its API is."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    instances: list[str] = []
    try:
        await bus.nc.publish(topology.service_info("query"), b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                break
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                instance = json.loads(msg.data)["metadata"]["instance"]
                if isinstance(instance, str) and instance not in instances:
                    instances.append(instance)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    from bus.control import request

    found = []
    for instance in instances:
        with contextlib.suppress(Exception):
            info = await request(bus, "query", instance, "info", timeout=1.0)
            if isinstance(info, dict) and isinstance(info.get("api_url"), str):
                found.append(QueryApi(url=info["api_url"], instance=instance,
                                      auth=info.get("auth")))
    return found


async def find_api(bus: Bus | None) -> QueryApi | None:
    """JETFLEET_API_URL, else the first query API found on the bus, else None."""
    url = os.environ.get("JETFLEET_API_URL")
    if url:
        return QueryApi(url=url.rstrip("/"))
    if bus is None:
        return None
    apis = await discover(bus)
    return apis[0] if apis else None


def _token() -> str | None:
    return os.environ.get("JETFLEET_API_TOKEN") or None


async def call(api: QueryApi, method: str, path: str, params: dict[str, Any] | None = None,
               body: Any = None, timeout: float = 30.0) -> Any:
    """One request; a problem answer becomes an ApiError with its detail."""
    import httpx

    headers = {"Accept": "application/json"}
    token = _token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    clean = {k: v for k, v in (params or {}).items() if v is not None}
    async with httpx.AsyncClient(base_url=api.url, timeout=timeout) as client:
        try:
            r = await client.request(method, path, params=clean, headers=headers,
                                     content=None if body is None else codec.encode(body))
        except httpx.HTTPError as exc:
            raise ApiError(0, f"the query API at {api.url} did not answer: {exc}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail") or r.text
        except ValueError:
            detail = r.text
        hint = ""
        if r.status_code == 401:
            hint = " (set JETFLEET_API_TOKEN)"
        raise ApiError(r.status_code, f"query API {r.status_code}: {detail}{hint}")
    return r.json() if r.content else None


async def list_jobs(bus: Bus | None, *, limit: int = 50, state: str | None = None,
                    **filters: Any) -> list[JobState] | None:
    """The newest `limit` jobs (optionally in `state`) from a running query API, as
    JobState records; None when no API runs. `filters` are the API's own
    (origin, capability, node, user, since, until, ...)."""
    api = await find_api(bus)
    if api is None:
        return None
    out: list[JobState] = []
    offset = 0
    while len(out) < limit:
        page = await call(api, "GET", "/api/v1/jobs", {
            "limit": min(1000, limit - len(out)), "offset": offset, "status": state,
            **filters})
        items = page.get("items") or []
        out += [_job_state(item) for item in items]
        offset += len(items)
        if not items or offset >= int(page.get("total", 0)):
            break
    return out


def _job_state(item: dict[str, Any]) -> JobState:
    ctype = item.get("capability_type")
    return JobState(
        job_id=item["job_id"], state=item.get("state") or "submitted",
        origin=item.get("origin") or "submitted",
        capability={"type": ctype} if ctype else {}, priority=item.get("priority") or 1,
        user=item.get("user"), attempt=item.get("attempt") or 0,
        worker_id=item.get("worker_id"), node=item.get("node"),
        devices=list(item.get("devices") or []), submitted_at=item.get("submitted_at") or 0.0,
        started_at=item.get("started_at"), ended_at=item.get("ended_at"),
        reason=item.get("reason"), progress=item.get("progress"),
        stale=bool(item.get("stale")), parent_job_id=item.get("parent_job_id"))


async def list_nodes(bus: Bus | None) -> list[dict[str, Any]] | None:
    api = await find_api(bus)
    if api is None:
        return None
    got = await call(api, "GET", "/api/v1/nodes")
    return list(got.get("items") or [])


async def list_workers(bus: Bus | None, include_gone: bool = False
                       ) -> list[CapabilityAdvert] | None:
    api = await find_api(bus)
    if api is None:
        return None
    got = await call(api, "GET", "/api/v1/workers", {"all": "true" if include_gone else None})
    out = []
    for w in got.get("items") or []:
        out.append(codec.decode(codec.encode({
            "worker_id": w["worker_id"], "node": w.get("node") or "", "pid": w.get("pid") or 0,
            "capabilities": w.get("capabilities") or [], "devices": w.get("devices") or [],
            "capacity": w.get("capacity") or 1, "load": w.get("load") or 0,
            "started_at": w.get("started_at") or 0.0, "updated_at": w.get("updated_at") or 0.0,
            "simulated": bool(w.get("simulated"))}), CapabilityAdvert))
    return out
