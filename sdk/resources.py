"""Versioned shared resources for clients: the store handlers read through
`ctx.resources` (bus.resources), on a Client's connection or one of its own.

    from sdk.resources import Resources

    async with await Resources.connect() as resources:
        v = await resources.put("prompt", {"system": "be brief"})     # v.version: 1, 2 ...
        await resources.put("weights", data=Path("model.safetensors"))  # by reference
        latest = await resources.get("prompt")                          # or version=1
        async for r in resources.watch("prompt"): ...                   # each new version
"""

from __future__ import annotations

from typing import Any

from bus.connection import Bus, connect
from bus.resources import (
    InvalidResource,
    Resource,
    ResourceConflict,
    ResourceError,
    ResourceNotFound,
    ResourceStore,
    ResourceVersion,
    ResourceVersionGone,
)
from bus.settings import Settings
from sdk.client import Client

__all__ = ["InvalidResource", "Resource", "ResourceConflict", "ResourceError",
           "ResourceNotFound", "ResourceVersion", "ResourceVersionGone", "Resources"]


class Resources(ResourceStore):
    """put / get / get_to / info / versions / list / watch of
    bus.resources.ResourceStore, on a Client's (or a Bus's) connection."""

    def __init__(self, client: Client | Bus, **options: Any) -> None:
        super().__init__(client.bus if isinstance(client, Client) else client, **options)
        self._owned = False

    @classmethod
    async def connect(cls, url: str | None = None, *, settings: Settings | None = None,
                      connect_timeout: float | None = None, **options: Any) -> Resources:
        """Resources on a connection of their own, closed by close() / `async with`."""
        bus = await connect(settings, url=url, name="jetfleet-resources",
                            connect_timeout=connect_timeout)
        resources = cls(bus, **options)
        resources._owned = True
        return resources

    async def close(self) -> None:
        if self._owned:
            await self.bus.close()

    async def __aenter__(self) -> Resources:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
