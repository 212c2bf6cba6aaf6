"""What a node agent learns about an app it may start workers for.

The agent never imports an app itself (an app may take seconds to import, or
fail to): a child process loads it and prints one `AppDeclaration` as JSON on
its standard output (agents.node.appprobe), which the agent reads here.
"""

from __future__ import annotations

import msgspec

from schemas.common import SCHEMA_VERSION, Struct
from schemas.jobs import Resources


class CapabilityDeclaration(Struct, kw_only=True):
    """One `@app.capability(...)` as declared: what it serves and leases per job."""

    type: str
    labels: dict[str, str] = {}
    resources: Resources = msgspec.field(default_factory=Resources)
    concurrency: int | None = None


class AppDeclaration(Struct, kw_only=True):
    schema: int = SCHEMA_VERSION
    app: str  # the spec it was loaded from, MODULE:ATTR
    name: str = ""
    capabilities: list[CapabilityDeclaration] = []
    start_hooks: int = 0
    stop_hooks: int = 0
    import_s: float = 0.0
