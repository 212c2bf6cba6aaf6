"""Tunables shared by every component, read once from the environment.

Every name is JETFLEET_<FIELD> (upper case), e.g. JETFLEET_LEASE_TTL_S=5.
Bucket TTLs are fixed when a bucket is first created, so every process of
one fleet must agree on them: the launcher passes its environment down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

# One line each, for `jetfleet config init` and error messages.
HELP: dict[str, str] = {
    "nats_url": "NATS server URL(s), comma-separated",
    "nats_creds": "NATS credentials file (.creds) for a secured server",
    "nats_tls_ca": "CA certificate to verify the server's TLS certificate",
    "nats_tls_cert": "client TLS certificate (mutual TLS)",
    "nats_tls_key": "client TLS key (mutual TLS)",
    "deny_exit_s": "a component whose credentials are refused an action within this many "
                   "seconds of connecting exits (status 77) instead of retrying; 0: never",
    "worker_creds": "credentials file a node agent hands to the workers it starts on demand",
    "connect_timeout_s": "a first connect that finds no server fails after this many seconds",
    "lease_ttl_s": "seconds a device lease lives unless renewed (a dead holder's frees then)",
    "advert_ttl_s": "seconds a worker's capability advert lives unless renewed",
    "work_ack_wait_s": "seconds a work message may go unacknowledged before redelivery "
                       "(a dead worker's job restarts within about this)",
    "work_max_deliver": "deliveries of one work message before it is dead-lettered",
    "submit_ack_wait_s": "seconds a submission may go unacknowledged by a dispatcher",
    "duplicate_window_s": "seconds within which a repeated Nats-Msg-Id is dropped",
    "events_max_age_s": "seconds the EVENTS stream keeps events",
    "events_max_bytes": "bytes the EVENTS stream keeps",
    "telemetry_max_age_s": "seconds the TELEMETRY stream keeps samples",
    "telemetry_max_bytes": "bytes the TELEMETRY stream keeps",
    "dead_max_age_s": "seconds the DEAD stream keeps dead letters",
    "jobs_history": "revisions KV jobs keeps per job",
    "max_payload_bytes": "largest submission accepted (bigger inputs go in the object store)",
    "max_object_bytes": "largest object a put accepts",
    "max_result_bytes": "results larger than this go to the object store; the record keeps "
                        "a reference (result_ref)",
    "replicas": "stream, bucket and object store replicas (3 on a three-node cluster)",
}


@dataclass(frozen=True)
class Settings:
    nats_url: str = DEFAULT_NATS_URL
    nats_creds: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # A component refused by the server soon after it connects has credentials that
    # do not fit what it does: it says so and exits rather than retry (bus/security.py).
    deny_exit_s: float = 30.0
    worker_creds: str = ""
    # A first connect that finds no server fails after this long (with a clear line).
    connect_timeout_s: float = 5.0
    # Leases and adverts expire through the bucket TTL when their holder dies.
    lease_ttl_s: float = 10.0
    advert_ttl_s: float = 10.0
    # How long a work message may go without an ack or in-progress before it
    # is redelivered elsewhere; a dead worker's job restarts within about this.
    work_ack_wait_s: float = 10.0
    work_max_deliver: int = 50
    submit_ack_wait_s: float = 30.0
    duplicate_window_s: float = 600.0
    events_max_age_s: float = 7 * 24 * 3600.0
    events_max_bytes: int = 1 << 30
    telemetry_max_age_s: float = 24 * 3600.0
    telemetry_max_bytes: int = 1 << 30
    dead_max_age_s: float = 30 * 24 * 3600.0
    jobs_history: int = 5
    max_payload_bytes: int = 1 << 20
    max_result_bytes: int = 256 << 10
    # The largest object a put accepts (JETFLEET_MAX_OBJECT_BYTES); bigger ones are refused.
    max_object_bytes: int = 4 << 30
    replicas: int = 1

    @staticmethod
    def env_name(field: str) -> str:
        return f"JETFLEET_{field.upper()}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = source.get(f"JETFLEET_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, f.name))
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"JETFLEET_{f.name.upper()}={raw!r}: expected {kind.__name__}") from exc
        return cls(**values)  # type: ignore[arg-type]
