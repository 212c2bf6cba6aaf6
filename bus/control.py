"""Every process's control service: `nats micro` endpoints addressed by identity.

    jetfleet.<kind>.<instance>.info    what the process is and does (JSON)
    jetfleet.<kind>.<instance>.drain   stop taking work, finish what runs, exit
    jetfleet.<kind>.<instance>.<more>  what a component adds (a worker: cancel)

`kind` is `worker` for every process that runs jobs (so a job's worker id is
enough to reach it) and the component's name for the others.

`nats micro ls` lists them as `jetfleet-<component>`. A control request
reaches exactly one process: stopping one fleet never touches another that
shares its server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

from bus import codec, topology
from bus.connection import Bus

log = logging.getLogger(__name__)
VERSION = "0.2.0"

Handler = Callable[[bytes], Awaitable[Any]]


class ControlError(Exception):
    """Answered as a micro error: `code` (HTTP-like) and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def new_instance_id(component: str) -> str:
    from agents.devices import node_name

    return f"{component}-{node_name()}-{os.getpid()}-{random.randrange(16**4):04x}"


class ControlService:
    def __init__(self, bus: Bus, component: str, instance: str | None = None, *,
                 kind: str | None = None,
                 on_drain: Callable[[], None] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.bus = bus
        self.component = component
        self.instance = instance or new_instance_id(component)
        self.kind = kind or component
        self.on_drain = on_drain
        self.info: Callable[[], dict[str, Any]] = info or (lambda: {})
        self._extra: dict[str, Handler] = {}
        self._service: Any = None
        self._group: Any = None

    async def add(self, endpoint: str, handler: Handler) -> None:
        """Add an endpoint (before or after `start()`); the handler gets the request
        body and returns something JSON-encodable, or raises ControlError."""
        self._extra[endpoint] = handler
        if self._group is not None:
            await self._group.add_endpoint(name=endpoint, handler=_wrap(handler))

    async def start(self) -> None:
        from nats import micro

        async def info(req: Any) -> None:
            body = {"component": self.component, "instance": self.instance, "pid": os.getpid(),
                    **self.info()}
            await req.respond(codec.encode(body))

        async def drain(req: Any) -> None:
            await req.respond(b'{"ok": true}')
            if self.on_drain is not None:
                self.on_drain()

        self._service = await micro.add_service(
            self.bus.nc, name=f"jetfleet-{self.component}", version=VERSION,
            description=f"jetfleet {self.component}",
            metadata=self._metadata())
        group = self._group = self._service.add_group(
            name=topology.control_group(self.kind, self.instance))
        await group.add_endpoint(name="info", handler=info)
        await group.add_endpoint(name="drain", handler=drain)
        for name, handler in self._extra.items():
            await group.add_endpoint(name=name, handler=_wrap(handler))

    def _metadata(self) -> dict[str, str]:
        from agents.devices import node_name

        meta = {"instance": self.instance, "component": self.component, "node": node_name()}
        if self.kind == "worker":
            meta["worker_id"] = self.instance  # a job's worker_id reaches it
        return meta

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
            self._service = self._group = None


def _wrap(handler: Handler) -> Callable[[Any], Awaitable[None]]:
    async def serve(req: Any) -> None:
        try:
            out = await handler(req.data)
        except ControlError as exc:
            await req.respond_error(str(exc.code), exc.message)
            return
        except Exception as exc:  # a control call never takes the process down
            log.exception("control endpoint failed")
            await req.respond_error("500", f"{type(exc).__name__}: {exc}")
            return
        await req.respond(codec.encode(out))

    return serve


async def request(bus: Bus, kind: str, instance: str, endpoint: str, body: Any = b"",
                  timeout: float = 2.0) -> Any:
    """Call one process's control endpoint; raises ControlError on its error reply."""
    data = body if isinstance(body, bytes) else codec.encode(body)
    msg = await bus.nc.request(topology.control_subject(kind, instance, endpoint), data,
                               timeout=timeout)
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" in headers:
        raise ControlError(int(headers.get("Nats-Service-Error-Code", "500")),
                           headers.get("Nats-Service-Error", "error"))
    return codec.decode(msg.data, Any) if msg.data else None
