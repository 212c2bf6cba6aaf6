"""The object store's meta record, in the JSON every NATS client shares.

An object is its chunks on `$O.<bucket>.C.<nuid>` plus one meta record on
`$O.<bucket>.M.<base64url(name)>`. The field names below are those of
nats.go's `ObjectInfo` (and nats-py's), so `nats object ls/get` read what
jetfleet writes and jetfleet reads what they write. jetfleet adds one key to
`metadata` for an object made with a TTL: when it expires.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from schemas.common import ObjRef

# metadata key holding the expiry of an object made with a TTL (RFC 3339, UTC).
EXPIRES_KEY = "jetfleet-expires"


class ObjectLink(msgspec.Struct, kw_only=True, omit_defaults=True):
    bucket: str
    name: str | None = None


class ObjectMetaOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    link: ObjectLink | None = None
    max_chunk_size: int | None = None


class ObjectMeta(msgspec.Struct, kw_only=True):
    """One object's meta record. Not `omit_defaults`: nats-py reads a missing
    `size` as None and then waits for chunks an empty object does not have."""

    name: str
    bucket: str
    nuid: str
    size: int = 0
    mtime: str = ""
    chunks: int = 0
    digest: str = ""
    deleted: bool = False
    description: str | None = None
    headers: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    options: ObjectMetaOptions | None = None

    @property
    def expires_at(self) -> float | None:
        raw = (self.metadata or {}).get(EXPIRES_KEY)
        if not raw:
            return None
        try:
            return datetime.datetime.fromisoformat(raw).timestamp()
        except ValueError:
            return None

    def expired(self, now: float) -> bool:
        at = self.expires_at
        return at is not None and now >= at

    def ref(self) -> ObjRef:
        return ObjRef(bucket=self.bucket, name=self.name, size=self.size,
                      digest=self.digest or None, expires_at=self.expires_at)


def rfc3339(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with a `Z`, as nats.go writes `mtime`."""
    dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
