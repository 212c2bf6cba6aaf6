"""What the query tests share: an in-process query service on a real socket,
telemetry published onto the real bus, and table dumps for comparisons."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bus import topology
from bus.connection import Bus, connect
from bus.settings import Settings
from services.query.api import ApiConfig
from services.query.service import QueryService, ServiceConfig
from services.query.writer import Retention

NO_DOWNSAMPLING = Retention(full_resolution_s=10 * 365 * 86400.0, keep_s=0)


@contextlib.asynccontextmanager
async def query_service(settings: Settings, db: Path, *, instance: str = "test",
                        api: ApiConfig | None = None,
                        retention: Retention = NO_DOWNSAMPLING,
                        **kw: Any) -> AsyncIterator[QueryService]:
    bus = await connect(settings, name="query")
    svc = QueryService(bus, ServiceConfig(db=db, instance=instance, port=0,
                                          api=api or ApiConfig(), retention=retention,
                                          kv_interval_s=0.5, max_delay_s=0.1, **kw))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await bus.close()


@contextlib.asynccontextmanager
async def http(svc: QueryService, token: str | None = None
               ) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    assert svc.url
    async with httpx.AsyncClient(base_url=svc.url, headers=headers, timeout=30) as c:
        yield c


async def publish(bus: Bus, node: str, kind: str, message: Any) -> None:
    await bus.publish(topology.telemetry(node, kind), message)


def dump(cur: Any, table: str, exclude: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    cols = [r[0] for r in cur.execute(f"DESCRIBE {table}").fetchall() if r[0] not in exclude]
    quoted = ", ".join(f'"{c}"' for c in cols)
    return sorted((tuple(r) for r in cur.execute(f"SELECT {quoted} FROM {table}").fetchall()),
                  key=repr)
