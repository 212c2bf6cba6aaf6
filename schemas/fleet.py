"""What workers and nodes say about themselves: adverts, devices, leases, dead letters."""

from __future__ import annotations

from typing import Any, Literal

from schemas.common import SCHEMA_VERSION, Struct
from schemas.jobs import Resources


class DeviceInfo(Struct, kw_only=True):
    """One leasable device or slot of a device."""

    key: str  # the lease key, e.g. "node1.gpu0" or "node1.gpu0.s1"
    kind: Literal["gpu", "cpu"] = "gpu"
    index: int = 0
    name: str = ""
    memory_mb: int = 0
    simulated: bool = False
    uuid: str | None = None


class CapabilityAdvert(Struct, kw_only=True):
    """One live worker: the value of its key in KV `capabilities`."""

    schema: int = SCHEMA_VERSION
    worker_id: str
    node: str
    pid: int
    capabilities: list[dict[str, str]]
    # What every job of a capability needs leased (by capability type), when it
    # declares devices: placement uses it to tell "can never run here".
    needs: dict[str, Resources] = {}
    devices: list[DeviceInfo] = []
    capacity: int = 1
    load: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    version: str = ""
    simulated: bool = False


class LeaseRecord(Struct, kw_only=True):
    """The value of a key in KV `leases`: who holds the device, for which job."""

    schema: int = SCHEMA_VERSION
    device: str
    holder: str  # worker id
    job_id: str | None = None
    node: str | None = None
    acquired_at: float = 0.0
    renewed_at: float = 0.0


class DeadLetter(Struct, kw_only=True):
    """A message that failed to decode or exhausted its deliveries, with why."""

    schema: int = SCHEMA_VERSION
    subject: str
    reason: str
    stream: str | None = None
    stream_seq: int | None = None
    consumer: str | None = None
    deliveries: int | None = None
    raw: str = ""  # utf-8 text when decodable, else base64 (see raw_encoding)
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    headers: dict[str, str] = {}
    job_id: str | None = None
    ts: float = 0.0
    details: dict[str, Any] | None = None


def serves(capabilities: list[dict[str, str]], wanted: dict[str, str]) -> bool:
    """A job's capability matches a worker when one advertised capability has
    every label the job names with the same value (extra labels are fine)."""
    return any(all(cap.get(k) == v for k, v in wanted.items()) for cap in capabilities)
