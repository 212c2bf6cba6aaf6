"""The query service in one process: ingest, KV snapshots, retention, HTTP.

One asyncio loop reads the bus and serves HTTP (uvicorn, on a socket bound
here so port 0 gives a free port whose number we know); DuckDB writes run on
one writer thread, reads on request threads with a cursor each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from bus import topology
from bus.connection import Bus

from . import models as m
from .api import ApiConfig, ApiContext, create_app
from .ingest import Ingest
from .kvpoll import KvPoller
from .metrics import FleetMetrics
from .writer import Projection, Retention

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    db: Path
    instance: str
    host: str = "127.0.0.1"
    port: int = 8080
    api: ApiConfig = field(default_factory=ApiConfig)
    retention: Retention = field(default_factory=Retention)
    retention_every_s: float = 60.0
    kv_interval_s: float = 2.0
    max_rows: int = 20_000
    max_delay_s: float = 0.25
    http: bool = True


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the component owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class QueryService:
    def __init__(self, bus: Bus, config: ServiceConfig) -> None:
        self.bus = bus
        self.config = config
        self.projection = Projection(config.db)
        self.ingest = Ingest(bus, self.projection, instance=config.instance,
                             max_rows=config.max_rows, max_delay_s=config.max_delay_s)
        self.metrics = FleetMetrics(self.projection, self._lag_values, config.instance)
        self.ingest.on_flush = self.metrics.on_flush
        self.poller = KvPoller(bus, self.ingest, config.kv_interval_s)
        self.url: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: _Server | None = None
        self._socket: socket.socket | None = None
        self._rebuild: asyncio.Task[None] | None = None

    # ---- what the API and the control service report ----------------------------------------

    def lag(self) -> list[m.StreamLag]:
        behind = self.ingest.lag_messages()
        return [m.StreamLag(stream=s, applied_seq=st.applied, lag_messages=behind[s])
                for s, st in self.ingest.streams.items()]

    def _lag_values(self) -> dict[str, tuple[int, float]]:
        behind = self.ingest.lag_messages()
        last = self.ingest.stats.lags[-1] if self.ingest.stats.lags else 0.0
        return {s: (behind[s], last) for s in self.ingest.streams}

    def info(self) -> dict[str, Any]:
        return {"api_url": self.url, "db": str(self.config.db),
                "auth": "open" if self.config.api.tokens.open else "token",
                "applied": {s: st.applied for s, st in self.ingest.streams.items()},
                "lag_messages": self.ingest.lag_messages()}

    # ---- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.ingest.start()
        self._tasks.append(asyncio.create_task(self.poller.run(), name="kv-poll"))
        self._tasks.append(asyncio.create_task(self._retention(), name="retention"))
        if self.config.http:
            await self._serve()

    async def _serve(self) -> None:
        ctx = ApiContext(projection=self.projection, bus=self.bus, instance=self.config.instance,
                         lag=self.lag, metrics=self.metrics, rebuild=self.request_rebuild,
                         batches=lambda: self.ingest.stats.batches,
                         max_payload_bytes=self.bus.settings.max_payload_bytes)
        app = create_app(ctx, self.config.api)
        # IPPROTO_TCP spelled out: asyncio turns on TCP_NODELAY for accepted sockets only
        # when the listening socket says so, and without it every keep-alive request
        # waits out a delayed ACK (about 40 ms).
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET,
                             socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}: "
                          f"{exc.strerror or exc}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        port = sock.getsockname()[1]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        self.url = f"http://{host}:{port}"
        cfg = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                             timeout_graceful_shutdown=5)
        self._server = _Server(cfg)
        self._tasks.append(asyncio.create_task(self._server.serve(sockets=[sock]), name="http"))
        for _ in range(200):
            if self._server.started:
                break
            await asyncio.sleep(0.02)
        log.info("query API at %s (%s)", self.url,
                 "open: no token set" if self.config.api.tokens.open else "token required")

    async def request_rebuild(self) -> None:
        """Start a replay in the background (one at a time; asking again while one
        runs joins it), so the request that asked returns at once."""
        if self._rebuild is None or self._rebuild.done():
            self._rebuild = asyncio.create_task(self.ingest.rebuild(), name="rebuild")
            self._tasks.append(self._rebuild)

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(self.config.retention_every_s)
            try:
                folded = await self.ingest.in_writer(self.projection.downsample,
                                                     self.config.retention)
                if folded:
                    log.info("downsampled %d metric rows", folded)
            except Exception:
                log.exception("downsampling failed; will try again")

    async def caught_up(self, timeout: float = 30.0) -> bool:
        """Everything now in the streams (and the KV buckets) is in the projection."""
        await self.poller.poll()
        done = await self.ingest.caught_up(timeout)
        await self.ingest.flush()  # the snapshot rides with whatever batch is open
        return done

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for t in self._tasks:
            if t.get_name() != "http":
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 10)
        self._tasks = []
        await self.ingest.stop()
        self.metrics.shutdown()
        self.projection.close()
        if self._socket is not None:
            self._socket.close()


async def rebuild_file(bus: Bus, db: Path, *, instance: str, timeout: float = 600.0,
                       progress: Any = None) -> dict[str, int]:
    """Rebuild `db` offline: replay both streams (up to where they stand now) into a
    fresh file next to it, then put it in place. Returns the applied sequences."""
    tmp = db.with_name(db.name + ".rebuild")
    projection = await asyncio.to_thread(_fresh, db, tmp)
    ingest = Ingest(bus, projection, instance=instance)
    poller = KvPoller(bus, ingest)
    try:
        await ingest.start()
        await poller.poll()
        targets = {s: int((await bus.js.stream_info(s)).state.last_seq)
                   for s in (topology.EVENTS, topology.TELEMETRY)}
        deadline = time.monotonic() + timeout
        while not all(ingest.streams[s].applied >= t for s, t in targets.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay did not finish within {timeout:g}s")
            if progress is not None:
                progress({s: ingest.streams[s].applied for s in targets}, targets)
            await asyncio.sleep(0.2)
        await ingest.flush()
    finally:
        await ingest.stop()
        applied = {s: st.seq for s, st in projection.positions().items()}
        projection.close()
    await asyncio.to_thread(_put_in_place, tmp, db)
    return applied


def _fresh(db: Path, tmp: Path) -> Projection:
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    # Fail now (not after the replay) when a running service holds the file.
    if db.exists():
        Projection(db).close()
    return Projection(tmp)


def _put_in_place(tmp: Path, db: Path) -> None:
    # A write-ahead log of the old file must not be replayed onto the new one.
    Path(str(db) + ".wal").unlink(missing_ok=True)
    tmp.replace(db)
