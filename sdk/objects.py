"""Objects for clients: the object store workers use (bus.objects), on a
Client's connection or one of its own.

    from sdk.objects import Objects

    async with await Objects.connect() as objects:         # JETFLEET_NATS_URL
        ref = await objects.put(Path("inputs.bin"), ttl=3600)
        await fleet.submit("embed", {"image": codec.to_builtins(ref)})
        data = await objects.get(result["output"])         # an ObjRef or its JSON dict

Every method takes `ref` as an ObjRef, its JSON dict as it arrives in a
payload or a result, or a bare object name.
"""

from __future__ import annotations

from typing import Any

from bus.connection import Bus, connect
from bus.objects import (
    InvalidRef,
    ObjectChanged,
    ObjectCorrupt,
    ObjectError,
    ObjectExpired,
    ObjectMeta,
    ObjectNotFound,
    ObjectReader,
    ObjectStore,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    ObjectTruncated,
    WrongBucket,
    as_ref,
)
from bus.settings import Settings
from schemas.common import ObjRef
from sdk.client import Client

__all__ = [
    "InvalidRef", "ObjRef", "ObjectChanged", "ObjectCorrupt", "ObjectError", "ObjectExpired",
    "ObjectMeta", "ObjectNotFound", "ObjectReader", "ObjectStoreUnavailable", "ObjectTooLarge",
    "ObjectTruncated", "Objects", "WrongBucket", "as_ref",
]


class Objects(ObjectStore):
    """put / get / get_to / open / info / delete / list of bus.objects.ObjectStore,
    on a Client's (or a Bus's) connection."""

    def __init__(self, client: Client | Bus, **options: Any) -> None:
        super().__init__(client.bus if isinstance(client, Client) else client, **options)
        self._owned = False

    @classmethod
    async def connect(cls, url: str | None = None, *, settings: Settings | None = None,
                      connect_timeout: float | None = None, **options: Any) -> Objects:
        """Objects on a connection of their own, closed by close() / `async with`."""
        bus = await connect(settings, url=url, name="jetfleet-objects",
                            connect_timeout=connect_timeout)
        objects = cls(bus, **options)
        objects._owned = True
        return objects

    async def close(self) -> None:
        if self._owned:
            await self.bus.close()

    async def __aenter__(self) -> Objects:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
