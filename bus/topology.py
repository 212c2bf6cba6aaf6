"""The one declared topology: every stream, consumer, bucket and subject name.

No subject string is spelled anywhere else in jetfleet. `apply()` is
idempotent and safe when several components start at once: identical configs
are accepted by the server as no-ops, and nothing is ever deleted here.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError
from nats.js.object_store import (
    OBJ_ALL_CHUNKS_PRE_TEMPLATE,
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from bus.settings import Settings

log = logging.getLogger(__name__)

# ---- streams -------------------------------------------------------------
JOBS = "JOBS"
WORK = "WORK"
EVENTS = "EVENTS"
TELEMETRY = "TELEMETRY"
DEAD = "DEAD"

# ---- KV buckets and object store ------------------------------------------
KV_JOBS = "jobs"
KV_CAPABILITIES = "capabilities"
KV_LEASES = "leases"
KV_NODES = "nodes"
KV_NODE_STATES = "node_states"
KV_RESOURCES = "resources"
OBJECTS = "objects"

# ---- subjects --------------------------------------------------------------
SUBMIT = "jobs.submit"
CANCEL = "jobs.cancel"
JOBS_ALL = "jobs.>"
WORK_ALL = "work.>"
EVENTS_ALL = "events.>"
JOB_EVENTS_ALL = "events.jobs.>"
TELEMETRY_ALL = "telemetry.>"
DEAD_ALL = "dead.>"
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"

DISPATCHER_CONSUMER = "dispatcher"
CANCEL_CONSUMER = "dispatcher-cancel"
PRIORITIES = (0, 1, 2)


def work_subject(capability_type: str, priority: int) -> str:
    return f"work.p{priority}.{capability_type}"


def parse_work_subject(subject: str) -> tuple[str, int] | None:
    """(capability type, priority) of a `work.p<priority>.<type>` subject, else None."""
    parts = subject.split(".", 2)
    if (len(parts) != 3 or parts[0] != "work" or len(parts[1]) != 2 or parts[1][0] != "p"
            or not parts[1][1].isdigit()):
        return None
    prio = int(parts[1][1])
    return (parts[2], prio) if prio in PRIORITIES else None


def ack_position(reply: str | None) -> tuple[int, float, int] | None:
    """(stream sequence, stream time in s, messages pending) of a JetStream
    delivery, read from its ack subject: `$JS.ACK.<stream>.<consumer>.<delivered>.
    <sseq>.<cseq>.<ns>.<pending>`, or the newer form with domain and account
    hash. None for anything else. By hand, because it runs per message:
    nats-py's metadata builds dataclasses and a datetime each time."""
    tokens = (reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7]) / 1e9, int(tokens[8])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[9]) / 1e9, int(tokens[10])
    return None


def work_consumer(capability_type: str, priority: int) -> str:
    # Consumer names may not contain dots.
    return f"work-p{priority}-{capability_type.replace('.', '_')}"


DOORBELL_PREFIX = "signal.work."


def work_doorbell(capability_type: str) -> str:
    """Core-NATS nudge sent after routing, so idle workers fetch at once."""
    return f"{DOORBELL_PREFIX}{capability_type}"


def doorbell_type(subject: str) -> str:
    """The capability type a doorbell subject rings for."""
    return subject.removeprefix(DOORBELL_PREFIX)


def doorbell_body(priority: int) -> bytes:
    """A doorbell's body: the priority that has new work."""
    return str(priority).encode()


def doorbell_priority(body: bytes) -> int | None:
    """The priority a doorbell names; None (look at every priority) when it names none."""
    try:
        prio = int(body)
    except ValueError:
        return None
    return prio if prio in PRIORITIES else None


def kv_subject(bucket: str, key: str = "") -> str:
    """The subject a KV bucket's own stream stores `key` on (`$KV.<bucket>.<key>`)."""
    return f"$KV.{bucket}.{key}"


def job_events(job_id: str) -> str:
    return f"events.jobs.{job_id}"


def node_events(node: str) -> str:
    return f"events.nodes.{node}"


def worker_events(worker_id: str) -> str:
    return f"events.workers.{worker_id}"


def telemetry(node: str, kind: str) -> str:
    return f"telemetry.{node}.{kind}"


# Telemetry kinds: telemetry.<node>.<kind>.
HEARTBEAT = "heartbeat"
GPU = "gpu"
PROCS = "procs"
DISCOVERED = "jobs"
NODE_EVENTS_ALL = "events.nodes.>"


def telemetry_all(kind: str) -> str:
    """Every node's telemetry of one kind, e.g. `telemetry.*.heartbeat`."""
    return f"telemetry.*.{kind}"


def telemetry_node(subject: str) -> str:
    """The node token of a `telemetry.<node>.<kind>` subject ('' if not one)."""
    parts = subject.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "telemetry" else ""


def code_object(node: str, digest: str) -> str:
    """Object-store name of a captured script or config too large to travel inline."""
    return f"captured/{node}/{digest}"


def dead_subject(stream: str) -> str:
    return f"dead.{stream.lower()}"


def service_info(component: str) -> str:
    """`nats micro` INFO subject of every running instance of a component: how a
    client finds, say, a running query API without knowing its instance."""
    return f"$SRV.INFO.jetfleet-{component}"


def control_group(kind: str, instance: str) -> str:
    """The `nats micro` endpoint group of one process, addressed by its identity:
    `jetfleet.<kind>.<instance>.<endpoint>`. Every process that runs jobs (a
    worker, the evolver) is of kind `worker` and its instance id is its worker
    id, so whoever knows a job's worker can reach it."""
    return f"jetfleet.{kind}.{instance}"


def control_subject(kind: str, instance: str, endpoint: str) -> str:
    return f"{control_group(kind, instance)}.{endpoint}"


# ---- configuration -----------------------------------------------------------


def stream_configs(s: Settings) -> list[js_api.StreamConfig]:
    file = js_api.StorageType.FILE
    return [
        js_api.StreamConfig(
            name=JOBS,
            description="job submissions and cancel requests (work queue)",
            subjects=[JOBS_ALL],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=file,
            duplicate_window=s.duplicate_window_s,
            num_replicas=s.replicas,
        ),
        js_api.StreamConfig(
            name=WORK,
            description="routed work per capability type and priority (work queue)",
            subjects=[WORK_ALL],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            storage=file,
            duplicate_window=s.duplicate_window_s,
            num_replicas=s.replicas,
        ),
        js_api.StreamConfig(
            name=EVENTS,
            description="job, worker, lease and node lifecycle: the source of truth",
            subjects=[EVENTS_ALL],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=file,
            max_age=s.events_max_age_s,
            max_bytes=s.events_max_bytes,
            duplicate_window=s.duplicate_window_s,
            num_replicas=s.replicas,
        ),
        js_api.StreamConfig(
            name=TELEMETRY,
            description="heartbeats, GPU and process metrics, discovered jobs",
            subjects=[TELEMETRY_ALL],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=file,
            max_age=s.telemetry_max_age_s,
            max_bytes=s.telemetry_max_bytes,
            discard=js_api.DiscardPolicy.OLD,
            num_replicas=s.replicas,
        ),
        js_api.StreamConfig(
            name=DEAD,
            description="messages that failed to decode or exhausted their deliveries",
            subjects=[DEAD_ALL],
            retention=js_api.RetentionPolicy.LIMITS,
            storage=file,
            max_age=s.dead_max_age_s,
            max_bytes=256 << 20,
            num_replicas=s.replicas,
        ),
    ]


def kv_configs(s: Settings) -> list[js_api.KeyValueConfig]:
    file = js_api.StorageType.FILE
    return [
        js_api.KeyValueConfig(
            bucket=KV_JOBS, description="latest state per job", history=s.jobs_history,
            storage=file, replicas=s.replicas,
        ),
        js_api.KeyValueConfig(
            bucket=KV_CAPABILITIES, description="one advert per live worker",
            ttl=s.advert_ttl_s, storage=file, replicas=s.replicas,
        ),
        js_api.KeyValueConfig(
            bucket=KV_LEASES, description="one key per device or slot, held by one worker",
            ttl=s.lease_ttl_s, history=8, storage=file, replicas=s.replicas,
        ),
        js_api.KeyValueConfig(
            bucket=KV_NODES, description="static node inventory", storage=file,
            replicas=s.replicas,
        ),
        js_api.KeyValueConfig(
            bucket=KV_NODE_STATES, description="alive or lost, as the monitors decided",
            history=4, storage=file, replicas=s.replicas,
        ),
        js_api.KeyValueConfig(
            bucket=KV_RESOURCES, description="versioned shared resources", history=16,
            storage=file, replicas=s.replicas,
        ),
    ]


def object_store_config(s: Settings) -> js_api.StreamConfig:
    """The stream behind object store `objects`: what nats-py's
    create_object_store declares (so every NATS client reads it), plus
    per-message TTLs, which objects put with a TTL expire by."""
    return js_api.StreamConfig(
        name=OBJ_STREAM_TEMPLATE.format(bucket=OBJECTS),
        description="kernel packages, inputs, results",
        subjects=[OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=OBJECTS),
                  OBJ_ALL_META_PRE_TEMPLATE.format(bucket=OBJECTS)],
        max_age=0, max_bytes=-1, max_consumers=0, storage=js_api.StorageType.FILE,
        num_replicas=s.replicas, discard=js_api.DiscardPolicy.NEW,
        allow_rollup_hdrs=True, allow_direct=True, allow_msg_ttl=True,
    )


def dispatcher_consumer(s: Settings, cancel: bool = False) -> js_api.ConsumerConfig:
    """Submissions and cancels have their own consumers (filters must not overlap)."""
    return js_api.ConsumerConfig(
        durable_name=CANCEL_CONSUMER if cancel else DISPATCHER_CONSUMER,
        filter_subject=CANCEL if cancel else SUBMIT,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_wait=s.submit_ack_wait_s,
        max_deliver=5,
        max_ack_pending=10_000,
    )


def work_consumer_config(s: Settings, capability_type: str, priority: int) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        durable_name=work_consumer(capability_type, priority),
        # Named too, so it is declared by the create form that carries its filter in
        # the subject, which the server checks: see bus/security.py.
        name=work_consumer(capability_type, priority),
        filter_subject=work_subject(capability_type, priority),
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_wait=s.work_ack_wait_s,
        # Workers count attempts themselves (job max_attempts); this only
        # catches poison messages that kill every worker before it can count.
        max_deliver=s.work_max_deliver,
        max_ack_pending=100_000,
        # Orphaned consumers (a capability nobody serves any more) go away;
        # their messages stay in the stream until a consumer takes them.
        inactive_threshold=7 * 24 * 3600.0,
    )


async def _ensure_stream(js: JetStreamContext, cfg: js_api.StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except BadRequestError as exc:
        # 10058: exists with a different configuration. Update in place; never
        # delete (that would drop durable consumers and their state).
        if exc.err_code != 10058:
            raise
        # A process with default settings (a CLI client) must never shrink a
        # replicated stream: the replicas in place stay.
        info = await js.stream_info(cfg.name or "")
        cfg.num_replicas = max(cfg.num_replicas or 1, info.config.num_replicas or 1)
        log.info("updating stream %s to the declared configuration", cfg.name)
        await js.update_stream(cfg)


async def apply(js: JetStreamContext, s: Settings, wait_s: float = 60.0) -> None:
    """Declare everything; a JetStream cluster still electing its leader answers
    "unavailable" for a few seconds after it starts, so that is waited out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            await _apply(js, s)
            return
        except (ServiceUnavailableError, nats.errors.TimeoutError, TimeoutError) as exc:
            if loop.time() >= deadline:
                raise
            log.info("JetStream not ready yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(0.5)
        except APIError as exc:
            if exc.err_code not in _NOT_READY or loop.time() >= deadline:
                raise
            log.info("JetStream not ready yet (%s); retrying", exc.description)
            await asyncio.sleep(0.5)


# JetStream not (yet) available / no suitable peers while a cluster forms.
_NOT_READY = (10008, 10005, 10074, 10023)


async def _apply(js: JetStreamContext, s: Settings) -> None:
    for cfg in stream_configs(s):
        await _ensure_stream(js, cfg)
    for kv in kv_configs(s):
        try:
            await js.create_key_value(kv)
        except BadRequestError as exc:
            if exc.err_code != 10058:
                raise
            await _check_bucket(js, kv)
    objects = object_store_config(s)
    try:
        await js.add_stream(objects)
    except BadRequestError as exc:
        if exc.err_code != 10058:
            raise
        try:
            await js.update_stream(objects)
        except BadRequestError as upd:
            # A store made elsewhere that cannot take this config is kept as it
            # is; a put with a TTL then fails there with a clear error.
            log.warning("object store %s kept as is: %s", OBJECTS, upd.description)
    await ensure_consumer(js, JOBS, dispatcher_consumer(s))
    await ensure_consumer(js, JOBS, dispatcher_consumer(s, cancel=True))


async def _check_bucket(js: JetStreamContext, kv: js_api.KeyValueConfig) -> None:
    """A bucket made with other settings is kept as it is (TTLs are fixed at
    creation); say so when what differs matters here (TTL, history), not for
    replicas, which a client with default settings does not know."""
    info = await js.stream_info(f"KV_{kv.bucket}")
    ttl = float(info.config.max_age or 0.0)
    history = int(info.config.max_msgs_per_subject or 1)
    want_ttl = float(kv.ttl or 0.0)
    if abs(ttl - want_ttl) > 1e-3 or history != kv.history:
        log.warning("KV bucket %s exists with ttl %gs and history %d (this process wants %gs "
                    "and %d); kept as is", kv.bucket, ttl, history, want_ttl, kv.history)


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: js_api.ConsumerConfig) -> None:
    try:
        await js.add_consumer(stream, cfg)
    except BadRequestError as exc:
        # 10148 / 10013: exists with another config (e.g. a changed ack wait):
        # the running fleet's durable keeps its position; log and go on.
        if exc.err_code in (10148, 10013, 10105):
            log.warning("consumer %s on %s differs from the declared config: %s",
                        cfg.durable_name, stream, exc.description)
        else:
            raise
