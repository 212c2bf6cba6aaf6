"""Roles: what each kind of process may publish and subscribe to on the bus.

Every role is a NATS user whose permissions are allow lists (anything not
allowed is refused by the server). What a role may do is read from what the
component does, through the JetStream API subjects its client calls use:

    admin       everything (the launcher, `jetfleet` admin verbs)
    dispatcher  consume jobs.submit / jobs.cancel, route work.>, write KV jobs,
                dead-letter, apply the topology (streams, buckets, object store)
    worker      take work only from the `work-p{0,1,2}-<type>` consumers of the
                capabilities it was granted; write its own node's leases and its
                own advert; job events and records; submit child jobs; objects
    evolver     a worker for kernel.generate / kernel.single / kernel.evolve
    agent       its own node's telemetry, node events and KV `nodes` key;
                discovered jobs (events and records); captured code (objects);
                with on-demand apps, watch work and drain the workers it starts
    monitor     heartbeats, node states, lost/stale jobs, reclaim a lost node's leases
    query       read every stream and bucket; publish what the client role may
                (the API's write scope submits and cancels as a client would)
    client      submit, cancel, read events, KV and objects; put objects

What no role but admin may do: delete or purge a stream (other than an object's
own chunks), create consumers on WORK other than its own, write KV `resources`.

Limits worth knowing (the contract's subjects cannot express more): a job's
events and record are writable by every role that runs or watches jobs
(dispatcher, worker, evolver, agent, monitor), since job ids name no node; a
worker may read (not take) queued work of other capabilities by sequence,
which its starvation check needs; a role that reads a stream by consumer
reads all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nats.js.object_store import (
    OBJ_ALL_CHUNKS_PRE_TEMPLATE,
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from bus import topology
from schemas.common import is_valid_id
from schemas.jobs import is_valid_capability_type

ROLES = ("admin", "dispatcher", "worker", "agent", "monitor", "query", "evolver", "client")
# Roles whose processes are components: a refusal soon after they connect means
# their credentials do not fit what they do (see Settings.deny_exit_s).
COMPONENT_ROLES = frozenset({"dispatcher", "worker", "agent", "monitor", "query", "evolver"})
# Roles that declare the topology (streams, buckets, object store) when they connect.
APPLIES_TOPOLOGY = frozenset({"admin", "dispatcher"})
# Roles that run jobs, so they are granted capabilities and worker ids.
RUNS_JOBS = frozenset({"worker", "evolver"})
# What the evolver serves unless told otherwise.
EVOLVER_CAPABILITIES = ("kernel.generate", "kernel.single", "kernel.evolve")

API = "$JS.API"
ACK = "$JS.ACK"
FLOW_CONTROL = "$JS.FC"
SERVICES = "$SRV"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

STREAMS = (topology.JOBS, topology.WORK, topology.EVENTS, topology.TELEMETRY, topology.DEAD)
BUCKETS = (topology.KV_JOBS, topology.KV_CAPABILITIES, topology.KV_LEASES, topology.KV_NODES,
           topology.KV_NODE_STATES, topology.KV_RESOURCES)
OBJECT_STREAM = OBJ_STREAM_TEMPLATE.format(bucket=topology.OBJECTS)


class GrantError(ValueError):
    """A grant that cannot be issued (unknown role, a node that is no subject token...)."""


@dataclass(frozen=True)
class Grant:
    """Who a credential is for: a role, and for node-bound roles the node, the
    capabilities it may take work for (None: every one) and the worker ids it
    speaks for (None: any; a worker's advert and control endpoints are keyed
    by its worker id)."""

    role: str
    node: str | None = None
    capabilities: tuple[str, ...] | None = None
    worker_ids: tuple[str, ...] | None = None

    def check(self) -> Grant:
        if self.role not in ROLES:
            raise GrantError(f"unknown role {self.role!r}: one of {', '.join(ROLES)}")
        if self.role in ("worker", "evolver", "agent") and not self.node:
            raise GrantError(f"{'an' if self.role[0] in 'aeiou' else 'a'} {self.role} credential is bound to one node: give --node NODE")
        if self.node is not None and not _TOKEN.match(self.node):
            raise GrantError(f"node {self.node!r}: letters, digits, _ and - only (one subject "
                             "token)")
        for ctype in self.capabilities or ():
            if not is_valid_capability_type(ctype):
                raise GrantError(f"capability {ctype!r}: dot-separated lower-case words, e.g. "
                                 "echo or kernel.verify")
        for wid in self.worker_ids or ():
            if not is_valid_id(wid):
                raise GrantError(f"worker id {wid!r}: letters, digits, _ and - only")
        if self.capabilities is not None and self.role not in RUNS_JOBS:
            raise GrantError(f"--capability is for the worker and evolver roles, not {self.role}")
        return self

    @property
    def name(self) -> str:
        """The NATS user's name: the role, and the node it is bound to."""
        return f"{self.role}@{self.node}" if self.node else self.role

    def describe(self) -> str:
        parts = [f"role {self.role}"]
        if self.node:
            parts.append(f"node {self.node}")
        if self.role in RUNS_JOBS:
            parts.append("capabilities " + (", ".join(self.capabilities)
                                            if self.capabilities is not None else "all"))
        if self.worker_ids is not None:
            parts.append("worker ids " + (", ".join(self.worker_ids) or "none"))
        return ", ".join(parts)


@dataclass
class Permissions:
    """NATS subject permissions: allow lists, with deny carving exceptions out of them."""

    pub_allow: list[str] = field(default_factory=list)
    pub_deny: list[str] = field(default_factory=list)
    sub_allow: list[str] = field(default_factory=list)
    sub_deny: list[str] = field(default_factory=list)

    def publish(self, *subjects: str) -> Permissions:
        for s in subjects:
            if s not in self.pub_allow:
                self.pub_allow.append(s)
        return self

    def subscribe(self, *subjects: str) -> Permissions:
        for s in subjects:
            if s not in self.sub_allow:
                self.sub_allow.append(s)
        return self

    # ---- JetStream, by what a client library does -------------------------------------

    def read_stream(self, stream: str) -> Permissions:
        """Info, ordered/ephemeral consumers (and their flow control), message gets."""
        return self.publish(_api("STREAM.INFO", stream), _api("STREAM.MSG.GET", stream),
                            _api("DIRECT.GET", stream), _api("DIRECT.GET", stream, ">"),
                            _api("CONSUMER.CREATE", stream), _api("CONSUMER.CREATE", stream, ">"),
                            _api("CONSUMER.INFO", stream, "*"), f"{FLOW_CONTROL}.{stream}.>")

    def follow_stream(self, stream: str) -> Permissions:
        """Read a stream and pull from ephemeral consumers of it (bus.follow). Only
        for streams whose consumers are all readers: on WORK or JOBS this would let
        the role take other consumers' messages."""
        assert stream not in (topology.WORK, topology.JOBS), stream
        return self.read_stream(stream).publish(_api("CONSUMER.MSG.NEXT", stream, "*"))

    def read_kv(self, bucket: str, live: str | None = None) -> Permissions:
        """Get, keys, watch, history; `live` also subscribes to writes of those keys
        as they happen (core NATS on the bucket's own subjects)."""
        self.read_stream(f"KV_{bucket}")
        if live is not None:
            self.subscribe(topology.kv_subject(bucket, live))
        return self

    def write_kv(self, bucket: str, keys: str = ">") -> Permissions:
        """Put, create, update and delete of `keys` (a key, `*` or `>`)."""
        return self.read_kv(bucket).publish(topology.kv_subject(bucket, keys))

    def read_objects(self) -> Permissions:
        return self.read_stream(OBJECT_STREAM)

    def write_objects(self) -> Permissions:
        """Chunks and metadata, and purging a replaced or deleted object's chunks."""
        return self.read_objects().publish(
            OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=topology.OBJECTS),
            OBJ_ALL_META_PRE_TEMPLATE.format(bucket=topology.OBJECTS),
            _api("STREAM.PURGE", OBJECT_STREAM))

    def consume(self, stream: str, consumer: str, filter_subject: str | None = None
                ) -> Permissions:
        """A durable pull consumer: declare it, pull from it, acknowledge its messages.

        With `filter_subject` it may only be declared by the create form that names
        its filter in the subject, which the server checks against the config: a
        worker cannot re-point its consumer at another capability's work."""
        if filter_subject is None:
            self.publish(_api("CONSUMER.DURABLE.CREATE", stream, consumer),
                         _api("CONSUMER.CREATE", stream, consumer))
        else:
            self.publish(_api("CONSUMER.CREATE", stream, consumer, filter_subject))
        return self.publish(_api("STREAM.INFO", stream),
                            _api("CONSUMER.INFO", stream, consumer),
                            _api("CONSUMER.MSG.NEXT", stream, consumer),
                            f"{ACK}.{stream}.{consumer}.>")

    def control_service(self, kind: str, instance: str = "*") -> Permissions:
        """A `nats micro` control service of `kind` (bus/control.py): its endpoints and
        the discovery subjects; replies go out through allow_responses."""
        return self.subscribe(topology.control_subject(kind, instance, ">"),
                              f"{SERVICES}.PING", f"{SERVICES}.PING.>", f"{SERVICES}.INFO",
                              f"{SERVICES}.INFO.>", f"{SERVICES}.STATS", f"{SERVICES}.STATS.>")

    def control_request(self, kind: str, instance: str, endpoint: str) -> Permissions:
        return self.publish(topology.control_subject(kind, instance, endpoint))

    def discover_services(self) -> Permissions:
        """`nats micro ls/info/stats` and finding a service by name."""
        return self.publish(f"{SERVICES}.PING", f"{SERVICES}.PING.>", f"{SERVICES}.INFO",
                            f"{SERVICES}.INFO.>", f"{SERVICES}.STATS", f"{SERVICES}.STATS.>")

    def as_claims(self) -> dict[str, dict[str, list[str]]]:
        pub: dict[str, list[str]] = {"allow": sorted(self.pub_allow)}
        sub: dict[str, list[str]] = {"allow": sorted(self.sub_allow)}
        if self.pub_deny:
            pub["deny"] = sorted(self.pub_deny)
        if self.sub_deny:
            sub["deny"] = sorted(self.sub_deny)
        return {"pub": pub, "sub": sub}


def _api(*parts: str) -> str:
    return ".".join((API, *parts))


def inbox_prefix(user: str) -> str:
    """Each user's replies arrive under its own inbox prefix, which only it may
    subscribe to: nobody reads another's replies (pulled work, KV reads)."""
    return f"_INBOX.{user}"


def permissions(grant: Grant, user: str) -> Permissions:
    """The subject permissions of `grant`'s user (public key `user`)."""
    grant.check()
    p = Permissions()
    if grant.role == "admin":
        return p.publish(">").subscribe(">")
    # Every role: its own replies, stream lookups, and reading what the fleet says.
    p.subscribe(f"{inbox_prefix(user)}.>")
    p.publish(_api("INFO"), _api("STREAM.NAMES"), *(_api("STREAM.INFO", s) for s in STREAMS))
    p.read_stream(topology.EVENTS)
    for bucket in (topology.KV_JOBS, topology.KV_CAPABILITIES, topology.KV_NODES,
                   topology.KV_NODE_STATES, topology.KV_LEASES, topology.KV_RESOURCES):
        p.read_kv(bucket)
    p.read_objects()
    p.discover_services()
    p.control_request("*", "*", "info")
    _ROLE_RULES[grant.role](p, grant)
    return p


def _client(p: Permissions, grant: Grant) -> None:
    p.publish(topology.SUBMIT, topology.CANCEL)
    p.read_stream(topology.TELEMETRY).read_stream(topology.DEAD)
    p.write_objects()  # payloads too large for a message travel as objects


def _dispatcher(p: Permissions, grant: Grant) -> None:
    _apply_topology(p)
    p.control_service("dispatcher")
    for cancel in (False, True):
        name = topology.CANCEL_CONSUMER if cancel else topology.DISPATCHER_CONSUMER
        p.consume(topology.JOBS, name)
    p.publish(topology.WORK_ALL, topology.JOB_EVENTS_ALL, topology.DEAD_ALL,
              f"{topology.DOORBELL_PREFIX}>")
    p.write_kv(topology.KV_JOBS)
    p.publish(_api("CONSUMER.INFO", topology.WORK, "*"))
    # The dead-letter reaper: advisories, the exhausted message, then its removal.
    p.subscribe(topology.MAX_DELIVERIES_ADVISORY)
    for stream in (topology.JOBS, topology.WORK):
        p.publish(_api("STREAM.MSG.GET", stream), _api("STREAM.MSG.DELETE", stream))
    p.control_request("worker", "*", "cancel")


def _apply_topology(p: Permissions) -> None:
    for stream in (*STREAMS, *(f"KV_{b}" for b in BUCKETS), OBJECT_STREAM):
        p.publish(_api("STREAM.CREATE", stream), _api("STREAM.UPDATE", stream),
                  _api("STREAM.INFO", stream))
    for cancel in (False, True):
        name = topology.CANCEL_CONSUMER if cancel else topology.DISPATCHER_CONSUMER
        p.publish(_api("CONSUMER.CREATE", topology.JOBS, name),
                  _api("CONSUMER.CREATE", topology.JOBS, name, ">"),
                  _api("CONSUMER.DURABLE.CREATE", topology.JOBS, name))


def _runs_jobs(p: Permissions, grant: Grant, kind: str) -> None:
    """A worker or the evolver: its capabilities' work, its node's leases, its advert."""
    assert grant.node
    types = grant.capabilities
    if types is None:
        # Every capability: any work consumer, any doorbell.
        p.consume(topology.WORK, "*", ">")
        p.subscribe(f"{topology.DOORBELL_PREFIX}>").publish(f"{topology.DOORBELL_PREFIX}>")
    else:
        for ctype in types:
            for prio in topology.PRIORITIES:
                p.consume(topology.WORK, topology.work_consumer(ctype, prio),
                          topology.work_subject(ctype, prio))
            p.subscribe(topology.work_doorbell(ctype)).publish(topology.work_doorbell(ctype))
    # The starvation check reads the oldest waiting message's time (not its ack).
    p.publish(_api("STREAM.MSG.GET", topology.WORK))
    ids = grant.worker_ids
    for key in (ids if ids is not None else ("*",)):
        p.write_kv(topology.KV_CAPABILITIES, key)
        p.control_service(kind, key)
    p.write_kv(topology.KV_LEASES, f"{grant.node}.>")
    p.read_kv(topology.KV_LEASES, live=f"{grant.node}.>")
    p.read_kv(topology.KV_RESOURCES, live=">")
    p.write_kv(topology.KV_JOBS)
    p.publish(topology.JOB_EVENTS_ALL, topology.dead_subject(topology.WORK))
    p.publish(topology.SUBMIT, topology.CANCEL)  # child jobs (ctx.call)
    p.write_objects()


def _worker(p: Permissions, grant: Grant) -> None:
    _runs_jobs(p, grant, "worker")


def _evolver(p: Permissions, grant: Grant) -> None:
    _runs_jobs(p, grant, "worker")  # it runs jobs: reached by its worker id


def _agent(p: Permissions, grant: Grant) -> None:
    assert grant.node
    node = grant.node
    p.control_service("agent")
    p.publish(topology.telemetry(node, ">"), topology.node_events(node))
    p.write_kv(topology.KV_NODES, node)
    p.read_stream(topology.TELEMETRY)  # its own last report, after a restart
    # Jobs nobody submitted: their events and records; a submitted job's process linked.
    p.write_kv(topology.KV_JOBS)
    p.publish(topology.JOB_EVENTS_ALL)
    p.write_objects()  # captured scripts too large to travel inline
    # Workers on demand: the waiting work (not the messages) and the workers it starts.
    p.subscribe(f"{topology.DOORBELL_PREFIX}>")
    p.publish(_api("STREAM.INFO", topology.WORK), _api("CONSUMER.INFO", topology.WORK, "*"))
    for wid in grant.worker_ids or ():
        p.control_request("worker", wid, "drain")


def _monitor(p: Permissions, grant: Grant) -> None:
    p.control_service("monitor")
    p.subscribe(topology.telemetry_all(topology.HEARTBEAT))
    p.read_stream(topology.TELEMETRY)
    p.publish(topology.NODE_EVENTS_ALL, topology.JOB_EVENTS_ALL,
              topology.dead_subject(topology.TELEMETRY))
    p.write_kv(topology.KV_NODE_STATES)
    p.write_kv(topology.KV_JOBS)
    p.write_kv(topology.KV_LEASES)  # a lost node's leases are freed


def _query(p: Permissions, grant: Grant) -> None:
    p.control_service("query")
    p.follow_stream(topology.EVENTS).follow_stream(topology.TELEMETRY)
    p.read_stream(topology.DEAD)
    # The API's write scope publishes what the client role may (services/query/auth.py).
    p.publish(topology.SUBMIT, topology.CANCEL)


_ROLE_RULES = {
    "dispatcher": _dispatcher, "worker": _worker, "evolver": _evolver, "agent": _agent,
    "monitor": _monitor, "query": _query, "client": _client,
}
