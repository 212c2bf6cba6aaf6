"""Pieces shared by several messages: ids, timestamps, errors, object references."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1

# Job and worker ids become subject tokens and KV keys, so they are restricted
# to characters valid in both (no dots, no wildcards, no spaces).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def new_id(prefix: str = "j") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


def now() -> float:
    """Wall-clock seconds since the epoch: what every `ts` field carries."""
    return time.time()


class Struct(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every message: keyword-only, snake_case, omits defaults on the wire."""


class ErrorInfo(Struct, kw_only=True):
    """Why something failed: a stable machine-readable code and a human message."""

    code: str
    message: str
    attempt: int | None = None
    details: dict[str, object] | None = None


class ObjRef(Struct, kw_only=True):
    """A large object in the JetStream object store, passed by reference.

    `digest` is `SHA-256=<base64url>` (the object store's own format); a reader
    refuses an object whose digest no longer matches (it was replaced). An
    object put with a TTL carries `expires_at` (epoch seconds)."""

    bucket: str = "objects"
    name: str
    size: int = 0
    digest: str | None = None
    expires_at: float | None = None
