"""Versioned shared resources: one record per version in KV `resources`.

The key is the resource's name and each put is a new numbered version of it
(1, 2, 3 ...), so `nats kv get resources <name>` shows the latest and
`nats kv history resources <name>` the versions the bucket keeps. A small
value travels inline (`value` for JSON, `data` for bytes, base64 in JSON);
a large one lives in the object store and the record holds its `ref`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.common import SCHEMA_VERSION, ObjRef, Struct

# A resource name is a KV key: letters, digits and - _ = / . (no leading,
# trailing or doubled dot).
RESOURCE_NAME_PATTERN = r"^[A-Za-z0-9_=/-]+(\.[A-Za-z0-9_=/-]+)*$"
ResourceName = Annotated[str, msgspec.Meta(pattern=RESOURCE_NAME_PATTERN, max_length=256)]

ResourceKind = Literal["json", "bytes"]


class ResourceVersion(Struct, kw_only=True):
    """One version of a shared resource."""

    schema: int = SCHEMA_VERSION
    name: ResourceName
    version: Annotated[int, msgspec.Meta(ge=1)]
    kind: ResourceKind = "json"
    value: Any = None
    data: bytes | None = None
    ref: ObjRef | None = None
    # Bytes of the value: the JSON text for kind json, the data for kind bytes.
    size: int = 0
    created_at: float
    created_by: str | None = None
    description: str | None = None
