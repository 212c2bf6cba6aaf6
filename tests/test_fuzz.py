"""Hypothesis-made and mutated messages on every subject a component consumes,
sent to a running fleet of real processes (dispatcher, worker, monitor, node
agent, query service):

    jobs.submit, jobs.cancel      random bytes, random JSON, valid submissions
                                  and cancels with fields mutated or added,
                                  byte-level mutations, odd headers
    work.p<n>.echo                the same for work items (what only a
                                  dispatcher should send)
    telemetry.<node>.<kind>       heartbeats, GPU and process metrics and
                                  discovered jobs, garbled or with extreme values
    jetfleet.<kind>.<id>.<ep>     control requests with any body (not `drain`,
                                  which stops a process whatever its body, by design)
    KV jobs, capabilities, leases, nodes, resources, node_states
                                  values written by a misbehaving client

Afterwards: every process is alive and answers its control endpoint, a
canary job succeeds, every stream message was either taken as what it claims
to be or is on DEAD with its reason, and every control request was answered.
The counts are printed (and read by docs/faults.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NoKeysError, NotFoundError

from bus import codec, topology
from bus.control import request
from schemas.common import ID_PATTERN
from schemas.jobs import CancelRequest, JobState, JobSubmission, WorkItem
from schemas.telemetry import Heartbeat
from tests.faults import all_job_events, dead_letters, retrying
from tests.helpers import eventually, state_is

NODE = "fz1"
WORKER = "fzw1"

# ---- what hypothesis makes -----------------------------------------------------------------

json_leaf = (st.none() | st.booleans()
             | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=False, allow_infinity=False)
             | st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                          max_leaves=16)
odd_ids = (st.text(max_size=20) | st.sampled_from(
    ["", ".", "a.b", "a b", ">", "*", "x" * 300, "../etc", "é", "job\u0000x", "-", "_"]))
good_ids = st.from_regex(ID_PATTERN, fullmatch=True).filter(lambda s: 0 < len(s) <= 40)
ctypes = st.sampled_from(["echo", "sleep", "nobody.serves.this", "kernel.verify"]) | st.text(
    max_size=30)
numbers = (st.integers(min_value=-(2**66), max_value=2**66)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
           | st.none())
header_keys = st.sampled_from(["traceparent", "tracestate", "Nats-Msg-Id", "X-Fuzz",
                               "jetfleet-user"]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=16)
# No CR or LF: they would frame the client's own protocol, not the message.
header_values = st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                               blacklist_categories=("Cs",)), max_size=60)
headers = st.none() | st.dictionaries(header_keys, header_values, max_size=3)


def maybe(value: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> Any:
    return st.one_of(value, junk)


submission = st.fixed_dictionaries(
    {"capability": maybe(st.fixed_dictionaries({"type": ctypes}),
                         json_value | st.dictionaries(st.text(max_size=6), numbers)),
     "payload": maybe(st.dictionaries(st.text(max_size=8), json_value, max_size=4), json_value)},
    optional={"job_id": maybe(good_ids, odd_ids | numbers),
              "priority": maybe(st.integers(0, 2), numbers),
              "max_attempts": maybe(st.integers(1, 5), numbers),
              "timeout_s": maybe(st.floats(0.1, 100), numbers),
              "user": maybe(st.text(max_size=20), numbers),
              "labels": maybe(st.dictionaries(st.text(max_size=8), st.text(max_size=8)),
                              json_value),
              "resources": maybe(st.fixed_dictionaries({}, optional={
                  "gpus": st.integers(0, 2), "cpu_slots": numbers}), json_value),
              "parent_job_id": odd_ids, "depth": numbers, "schema": numbers,
              "payload_ref": json_value, "unknown_field": json_value})
cancel = st.fixed_dictionaries(
    {"job_id": maybe(good_ids, odd_ids | numbers)},
    optional={"reason": maybe(st.text(max_size=40), numbers), "user": numbers,
              "schema": numbers, "extra": json_value})
work_item = st.fixed_dictionaries(
    {"job_id": maybe(good_ids, odd_ids | numbers),
     "capability": maybe(st.just({"type": "echo"}), json_value)},
    optional={"payload": json_value, "priority": numbers, "max_attempts": numbers,
              "resources": json_value, "timeout_s": numbers, "depth": numbers,
              "record": json_value, "revision": numbers, "payload_ref": json_value})



@st.composite
def forged_work_item(draw: Any) -> dict[str, Any]:
    """A well-formed work item for a job nobody submitted, carrying a made-up
    record and revision (what the dispatcher's own items carry, so the worker's
    first compare-and-set need not read the record)."""
    job_id = draw(good_ids)
    record = {"job_id": job_id, "state": "queued", "capability": {"type": "echo"},
              "attempt": 0, "max_attempts": 3, "submitted_at": 1.0}
    return {"job_id": job_id, "capability": {"type": "echo"}, "payload": {"forged": True},
            "record": record, "revision": draw(st.sampled_from([0, 1, 7, None]))}


valid_submission = st.fixed_dictionaries(
    {"capability": st.fixed_dictionaries({"type": st.sampled_from(["echo", "nobody.serves"])},
                                         optional={"model": st.text(min_size=1, max_size=8)}),
     "payload": st.dictionaries(st.text(max_size=8), json_value, max_size=3)},
    optional={"job_id": good_ids, "priority": st.integers(0, 2),
              "max_attempts": st.integers(1, 100), "timeout_s": st.floats(0.001, 1e9),
              "user": st.text(max_size=128), "labels": st.dictionaries(
                  st.text(max_size=8), st.text(max_size=8), max_size=3),
              "resources": st.fixed_dictionaries({}, optional={"cpu_slots": st.integers(0, 3)}),
              "depth": st.integers(0, 64)})
heartbeat = st.fixed_dictionaries(
    {"node": maybe(st.just(NODE), st.text(max_size=10) | numbers)},
    optional={"seq": numbers, "started_at": numbers, "interval_s": numbers, "ts": numbers,
              "gpus": numbers, "job_ids": maybe(st.lists(good_ids, max_size=3), json_value),
              "load1": numbers, "hostname": numbers, "extra": json_value})
gpu_metrics = st.fixed_dictionaries(
    {"node": maybe(st.just(NODE), numbers),
     "gpus": maybe(st.lists(st.fixed_dictionaries(
         {"index": numbers}, optional={"gpu_util_pct": numbers, "fb_used_mb": numbers,
                                        "power_w": numbers, "uuid": numbers,
                                        "temperature_c": numbers}), max_size=3), json_value)},
    optional={"processes": json_value, "ts": numbers, "driver": numbers})
procs_metrics = st.fixed_dictionaries(
    {"node": maybe(st.just(NODE), numbers),
     "processes": maybe(st.lists(st.fixed_dictionaries(
         {"pid": numbers}, optional={"cpu_percent": numbers, "rss_mb": numbers,
                                      "job_id": numbers}), max_size=3), json_value)},
    optional={"ts": numbers})
discovered = st.fixed_dictionaries(
    {"node": maybe(st.just(NODE), numbers),
     "jobs": maybe(st.lists(st.fixed_dictionaries(
         {"job_id": maybe(good_ids, numbers), "pid": numbers},
         optional={"origin": st.text(max_size=12)}), max_size=3), json_value)})
stop_request = st.fixed_dictionaries(
    {"job_id": maybe(good_ids, numbers)},
    optional={"kind": maybe(st.sampled_from(["cancelled", "superseded"]), numbers),
              "attempt": numbers, "reason": numbers})


@st.composite
def body(draw: Any, valid: st.SearchStrategy[Any]) -> bytes:
    """Random bytes, random JSON, a mutated valid message, or one garbled byte-wise."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "mutated", "garbled"]))
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=200)))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    raw = json.dumps(draw(valid)).encode()
    if kind == "mutated":
        return raw
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "dup-key"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "cut":
            raw = raw[:i]
        elif op == "flip" and raw:
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        elif op == "insert":
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
        elif raw.startswith(b"{") and len(raw) > 2:
            raw = b'{"job_id": 1, ' + raw[1:]  # a key given twice
    return raw


def draw_many(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """`n` examples of `strategy`, made by hypothesis (generation only: the
    checks come after all of them are sent, against the whole fleet)."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out[:n]


# ---- sending and counting ------------------------------------------------------------------


@dataclass
class Tally:
    tried: Counter[str] = field(default_factory=Counter)
    refused_by_client: Counter[str] = field(default_factory=Counter)  # never left the client
    deduplicated: Counter[str] = field(default_factory=Counter)  # a Nats-Msg-Id seen before
    seqs: dict[str, dict[int, bytes]] = field(default_factory=dict)  # family -> seq -> body
    telemetry: list[tuple[str, bytes]] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)


async def publish(bus: Any, tally: Tally, family: str, subject: str, data: bytes,
                  hdrs: dict[str, str] | None) -> None:
    tally.tried[family] += 1
    try:
        ack = await bus.js.publish(subject, data, headers=hdrs or None, timeout=5)
    except (nats.errors.Error, ValueError, TypeError, UnicodeError):
        tally.refused_by_client[family] += 1
        return
    if ack.duplicate:
        tally.deduplicated[family] += 1
        return
    tally.seqs.setdefault(family, {})[int(ack.seq)] = data


async def send_all(bus: Any, n: int, members: dict[tuple[str, str], Any]) -> Tally:
    tally = Tally()
    rng = random.Random(13)
    plan: list[tuple[str, Any]] = []
    plan += [("submit", x) for x in draw_many(st.tuples(body(submission), headers), n)]
    plan += [("submit", (json.dumps(x).encode(), None))
             for x in draw_many(valid_submission, n // 4)]
    plan += [("cancel", x) for x in draw_many(st.tuples(body(cancel), headers), n // 3)]
    plan += [("work", x) for x in draw_many(st.tuples(body(work_item), headers), n // 2)]
    plan += [("work", (json.dumps(x).encode(), None))
             for x in draw_many(forged_work_item(), n // 8)]
    plan += [("heartbeat", x) for x in draw_many(body(heartbeat), n // 3)]
    for kind, strategy in (("gpu", gpu_metrics), ("procs", procs_metrics),
                           ("jobs", discovered)):
        plan += [(kind, x) for x in draw_many(body(strategy), n // 6)]
    plan += [("control", x) for x in draw_many(st.tuples(body(stop_request), headers), n // 3)]
    plan += [("kv", x) for x in draw_many(st.tuples(body(json_value), good_ids), n // 3)]
    rng.shuffle(plan)
    endpoints = [(k, i, ep) for (k, i) in members for ep in ("info", "cancel")
                 if ep == "info" or k == "worker"]
    buckets = [topology.KV_JOBS, topology.KV_CAPABILITIES, topology.KV_LEASES,
               topology.KV_NODES, topology.KV_RESOURCES, topology.KV_NODE_STATES]
    for i, (family, item) in enumerate(plan):
        if family == "submit":
            await publish(bus, tally, family, topology.SUBMIT, *item)
        elif family == "cancel":
            await publish(bus, tally, family, topology.CANCEL, *item)
        elif family == "work":
            prio = rng.choice(topology.PRIORITIES)
            await publish(bus, tally, family, topology.work_subject("echo", prio), *item)
            await bus.signal(topology.work_doorbell("echo"))
        elif family in ("heartbeat", "gpu", "procs", "jobs"):
            subject = topology.telemetry(NODE, family)
            tally.tried[family] += 1
            await bus.js.publish(subject, item, timeout=5)
            tally.telemetry.append((subject, item))
            if family == "heartbeat":
                # The monitor dead-letters at most 50 malformed heartbeats a
                # second (a flood is counted, not stored): stay under that.
                await asyncio.sleep(0.03)
        elif family == "control":
            kind, instance, ep = rng.choice(endpoints)
            tally.tried[family] += 1
            try:
                msg = await bus.nc.request(topology.control_subject(kind, instance, ep), item[0],
                                           headers=item[1] or None, timeout=5)
            except (nats.errors.Error, ValueError, TypeError, UnicodeError) as exc:
                tally.replies[f"no reply: {type(exc).__name__}"] += 1
            else:
                code = (msg.headers or {}).get("Nats-Service-Error-Code")
                tally.replies[f"error {code}" if code else "ok"] += 1
        elif family == "kv":
            value, key = item
            bucket = buckets[i % len(buckets)]
            tally.tried[family] += 1
            try:
                kv = await bus.kv(bucket)
                # Now and then over a key a component reads: its own advert, a
                # device it leases, its node. (Over a job's record: see
                # test_an_unreadable_job_record_is_dead_lettered_at_once.)
                key = rng.choice([f"kv-{key}", f"kv-{key}", WORKER, f"{NODE}.gpu0", NODE])
                await kv.put(key, value)
            except (nats.errors.Error, ValueError) as exc:
                tally.refused_by_client[family] += 1
                del exc
        if i % 25 == 0:
            await asyncio.sleep(0.05)  # let the fleet breathe: this is fuzzing, not load
    return tally


# ---- checking what became of each ----------------------------------------------------------


def _raw(letter: dict[str, Any]) -> bytes:
    raw = letter.get("raw") or ""
    return base64.b64decode(raw) if letter.get("raw_encoding") == "base64" else raw.encode()


async def job_records(bus: Any) -> list[JobState]:
    kv = await bus.kv(topology.KV_JOBS)
    out = []
    try:
        keys = await kv.keys()
    except NoKeysError:
        return out
    for k in keys:
        with contextlib.suppress(Exception):
            entry = await kv.get(k)
            if entry.value:
                out.append(codec.decode(entry.value, JobState))
    return out


def decodes(data: bytes, type_: Any) -> bool:
    try:
        codec.decode(data, type_)
    except codec.DecodeError:
        return False
    return True


async def _answers(bus: Any, kind: str, instance: str) -> bool:
    try:
        return bool(await request(bus, kind, instance, "info", timeout=2.0))
    except Exception:
        return False


async def fuzz_fleet(bus: Any, client: Any, procs: Any, tmp_path: Path, n: int) -> dict[str, Any]:
    members = {
        ("dispatcher", "fzd"): ("dispatcher", "--instance-id", "fzd"),
        ("worker", WORKER): ("worker", "--worker-id", WORKER, "--node", NODE,
                             "--simulate-gpus", "1", "--no-kernels"),
        ("monitor", "fzm"): ("monitor", "--instance-id", "fzm", "--lost-after", "30"),
        ("agent", "fza"): ("agent", "--instance-id", "fza", "--node", NODE,
                           "--simulate-gpus", "1", "--heartbeat", "1", "--metrics-interval", "2"),
        ("query", "fzq"): ("query", "--instance-id", "fzq", "--port", "0",
                           "--db", str(tmp_path / "q.duckdb")),
    }
    children = {key: procs.run(*argv, name=key[1]) for key, argv in members.items()}
    for kind, instance in members:
        await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=90,
                         what=f"{instance} up")
    tally = await send_all(bus, n, members)

    # Every submission and cancel taken off JOBS (work-queue: taken = settled).
    async def jobs_empty() -> bool:
        return (await bus.js.stream_info(topology.JOBS)).state.messages == 0

    await eventually(jobs_empty, timeout=120, interval=0.5, what="JOBS drained")
    await asyncio.sleep(2.0)  # the last dead letters are published
    dead = await dead_letters(bus)
    dead_jobs = {d["stream_seq"]: d for d in dead if d["stream"] == topology.JOBS}
    dead_work = {d["stream_seq"]: d for d in dead if d["stream"] == topology.WORK}
    dead_telemetry = {(d["subject"], _raw(d)) for d in dead if d["stream"] == topology.TELEMETRY}
    assert all(d["reason"] for d in dead), [d for d in dead if not d["reason"]]

    # A submission is a job (recorded with its stream sequence), a duplicate of
    # one, or dead with its reason; a cancel is dead or was a well-formed request.
    records = await job_records(bus)
    by_seq = {s.submit_seq: s for s in records if s.submit_seq}
    dup_seqs: set[int] = set()
    events = await all_job_events(bus)
    for e in events:
        if e["kind"] == "duplicate":
            dup_seqs.add(int(e["event_id"].rsplit(".", 1)[-1]))
    unaccounted = []
    accepted = 0
    for seq, data in tally.seqs.get("submit", {}).items():
        if seq in by_seq:
            accepted += 1
        elif seq not in dead_jobs and seq not in dup_seqs:
            unaccounted.append(("submit", seq, data[:120]))
    for seq, data in tally.seqs.get("cancel", {}).items():
        if seq not in dead_jobs and not decodes(data, CancelRequest):
            unaccounted.append(("cancel", seq, data[:120]))

    # A work item is dead with its reason, or names a recorded job: then it is
    # one more delivery of that job, which the job's record settles (it runs
    # at most once; see the duplicate check below). Either way it leaves WORK.
    async def work_settled() -> bool:
        for seq in tally.seqs.get("work", {}):
            with contextlib.suppress(NotFoundError):
                await bus.js.get_msg(topology.WORK, seq)
                return False
        return True

    with contextlib.suppress(AssertionError):
        await eventually(work_settled, timeout=60, interval=1.0, what="work items settled")
    dead = await dead_letters(bus)
    dead_work = {d["stream_seq"]: d for d in dead if d["stream"] == topology.WORK}
    known = {s.job_id for s in await job_records(bus)}
    delivered = 0
    for seq, data in tally.seqs.get("work", {}).items():
        if seq in dead_work:
            continue
        try:
            named = codec.decode(data, WorkItem).job_id
        except codec.DecodeError:
            named = None
        if named in known:
            delivered += 1
        else:
            unaccounted.append(("work", seq, data[:120]))
    # Whatever came in, no job has two results.
    succeeded = Counter(e["job_id"] for e in await all_job_events(bus)
                        if e["kind"] == "succeeded")
    doubled = [j for j, c in succeeded.items() if c > 1]

    # A heartbeat is the node's (it decodes and names the node of its subject)
    # or dead with its reason.
    for subject, data in tally.telemetry:
        if not subject.endswith(".heartbeat"):
            continue
        ok = decodes(data, Heartbeat) and codec.decode(data, Heartbeat).node == NODE
        if not ok and (subject, data) not in dead_telemetry:
            unaccounted.append(("heartbeat", 0, data[:120]))

    # Nothing crashed, everything still answers, and a canary job runs.
    dead_procs = [key for key, p in children.items() if p.poll() is not None]
    assert dead_procs == [], f"processes died: {dead_procs} (logs in {procs.logdir})"
    for kind, instance in members:
        await eventually(lambda k=kind, i=instance: _answers(bus, k, i), timeout=30,
                         what=f"{instance} answering after the fuzz")
    canary = await retrying(lambda: client.submit("echo", {"canary": True}, job_id="canary"))
    state = await client.wait(canary, timeout=60)
    assert state.state == "succeeded" and state.result == {"canary": True}
    assert unaccounted == [], unaccounted[:20]
    assert doubled == [], doubled
    stream_families = ("submit", "cancel", "work")
    return {
        "tried": dict(tally.tried), "total_tried": sum(tally.tried.values()),
        "refused_by_client": dict(tally.refused_by_client),
        "deduplicated": dict(tally.deduplicated),
        "stored": {f: len(tally.seqs.get(f, {})) for f in stream_families},
        "accepted_as_jobs": accepted, "work_items_for_known_jobs": delivered,
        "dead_lettered": {"jobs": len(dead_jobs), "work": len(dead_work),
                          "telemetry": len(dead_telemetry)},
        "control_replies": dict(tally.replies),
    }


async def test_fuzzed_messages_crash_nothing_and_each_bad_one_is_dead(bus, client, procs,
                                                                       tmp_path: Path) -> None:
    out = await fuzz_fleet(bus, client, procs, tmp_path, n=80)
    print("fuzz:", json.dumps(out))
    assert out["total_tried"] >= 250
    assert out["dead_lettered"]["jobs"] > 0 and out["dead_lettered"]["work"] > 0


@pytest.mark.soak
async def test_fuzz_soak(bus, client, procs, tmp_path: Path) -> None:
    out = await fuzz_fleet(bus, client, procs, tmp_path, n=1500)
    print("fuzz soak:", json.dumps(out))
    assert out["total_tried"] >= 4000


async def test_a_forged_work_item_makes_no_job(bus, components, client) -> None:
    """A work item carries the dispatcher's record and revision so the worker's
    first compare-and-set needs no read. One that did not come from a dispatcher
    (no record of its job in KV) is dead with its reason whatever revision it
    claims: with revision 0 the compare-and-set meant "create", and a job nobody
    submitted was recorded and run."""
    await components.dispatcher()
    await components.worker()
    forged = {}
    for rev in (0, 1, 7, None):
        job_id = f"forged-{rev}"
        record = {"job_id": job_id, "state": "queued", "capability": {"type": "echo"},
                  "attempt": 0, "max_attempts": 3, "submitted_at": 1.0}
        item = {"job_id": job_id, "capability": {"type": "echo"}, "payload": {"forged": True},
                "record": record, "revision": rev}
        ack = await bus.js.publish(topology.work_subject("echo", 1), json.dumps(item).encode())
        forged[int(ack.seq)] = job_id
    await bus.signal(topology.work_doorbell("echo"))

    async def all_dead() -> list[dict[str, Any]] | None:
        letters = [d for d in await dead_letters(bus) if d["stream"] == topology.WORK]
        return letters if {d["stream_seq"] for d in letters} >= set(forged) else None

    letters = await eventually(all_dead, timeout=30, what="every forged item dead")
    assert {d["job_id"] for d in letters} == set(forged.values())
    assert all("no record of job" in d["reason"] for d in letters)
    for job_id in forged.values():
        assert await client.status(job_id) is None


# ---- records a misbehaving client garbled --------------------------------------------------


async def test_an_unreadable_job_record_is_dead_lettered_at_once(bus, components, client) -> None:
    """A client writes something that is not a job record under a job's key in
    KV jobs: the job's work item, a cancel of it and a resubmission of it are
    each dead at once with that reason, not retried until their deliveries run
    out (50 for a work item) as if the next read could be better."""
    await components.dispatcher()
    job = await client.submit("echo", {}, job_id="garbled-1")  # no worker yet
    await eventually(lambda: state_is(client, job, "queued"), what="queued")
    await (await bus.kv(topology.KV_JOBS)).put(job, b"null")
    await bus.publish(topology.CANCEL, CancelRequest(job_id=job))
    await bus.publish(topology.SUBMIT, JobSubmission(capability={"type": "echo"}, job_id=job),
                      msg_id=f"{job}-again")
    await components.worker()

    async def three_dead() -> list[dict[str, Any]] | None:
        letters = [d for d in await dead_letters(bus) if d.get("job_id") == job]
        return letters if len(letters) >= 3 else None

    letters = await eventually(three_dead, timeout=15, what="work item, cancel and "
                                                            "resubmission dead")
    assert sorted(d["stream"] for d in letters) == [topology.JOBS, topology.JOBS, topology.WORK]
    assert all("cannot be read" in d["reason"] for d in letters), [d["reason"] for d in letters]
    assert all(d.get("deliveries") in (None, 1) for d in letters)


async def test_a_restarted_dispatcher_reads_past_an_unreadable_record(bus, components,
                                                                       client) -> None:
    """After a restart the dispatcher picks up the jobs it was watching (for
    unschedulable) from KV jobs: one garbled record must not hide the rest."""
    await (await bus.kv(topology.KV_JOBS)).put("aaa-garbled", b"[1, 2]")
    first = await components.dispatcher(unschedulable_after_s=600)
    job = await client.submit("nobody.serves", {}, job_id="zzz-waiting")
    await eventually(lambda: state_is(client, job, "queued"), what="queued")
    first.stop()
    await asyncio.sleep(1.5)
    await components.dispatcher(unschedulable_after_s=0.5)
    state = await eventually(lambda: state_is(client, job, "unschedulable"), timeout=20,
                             what="the new dispatcher to mark it unschedulable")
    assert "nobody.serves" in (state.reason or "")


# ---- bytes that are not UTF-8, headers that are not ASCII ----------------------------------


async def test_a_body_that_is_not_utf8_is_dead_at_once(bus, components) -> None:
    """A string in a message that is not UTF-8 is bad input like any other: dead
    on its first delivery with the reason (it raised UnicodeDecodeError past
    the decoder, so every consumer retried it until its deliveries ran out)."""
    await components.dispatcher()
    await components.worker()
    seqs = {
        int((await bus.js.publish(topology.SUBMIT, b'{"capability": {"type": "echo"}, '
                                  b'"payload": {"x": "\xff\xfe"}}')).seq): topology.JOBS,
        int((await bus.js.publish(topology.CANCEL, b'{"job_id": "\xe9t\xe9"}',
                                  headers={"X-Odd": "\u00e9"})).seq): topology.JOBS,
        int((await bus.js.publish(topology.work_subject("echo", 1),
                                  b'{"job_id": "\xff", "capability": {"type": "echo"}}')).seq):
            topology.WORK,
    }
    await bus.signal(topology.work_doorbell("echo"))

    async def all_dead() -> list[dict[str, Any]] | None:
        letters = [d for d in await dead_letters(bus)
                   if (d["stream_seq"], d["stream"]) in seqs.items()]
        return letters if len(letters) == len(seqs) else None

    letters = await eventually(all_dead, timeout=10, what="all three dead")
    assert all("UTF-8" in d["reason"] for d in letters), [d["reason"] for d in letters]
    assert all(d.get("deliveries") in (None, 1) for d in letters)
    assert all(d["raw_encoding"] == "base64" for d in letters)


async def test_a_message_with_non_ascii_headers_that_ran_out_of_deliveries_is_dead(
        bus, components) -> None:
    """The dispatcher's reaper moves a message whose deliveries ran out to DEAD.
    Read back from its stream, a header value that is not ASCII came as an
    email.header.Header: the dead letter could not be encoded, and the message
    stayed in its stream for ever, on DEAD never."""
    await components.dispatcher()  # runs the dead-letter reaper
    await bus.js.add_stream(StreamConfig(name="FUZZREAP", subjects=["fuzzreap.>"],
                                         retention=RetentionPolicy.WORK_QUEUE))
    await bus.js.add_consumer("FUZZREAP", ConsumerConfig(
        durable_name="once", ack_policy=AckPolicy.EXPLICIT, max_deliver=1, ack_wait=0.5))
    seq = int((await bus.js.publish("fuzzreap.x", b'{"n": 1}',
                                    headers={"X-Odd": "\u00d7\u00da", "X-Plain": "ok"})).seq)
    sub = await bus.js.pull_subscribe_bind(durable="once", stream="FUZZREAP")
    assert len(await sub.fetch(1, timeout=5)) == 1  # taken and never acked

    async def dead() -> dict[str, Any] | None:
        return next((d for d in await dead_letters(bus)
                     if d["stream"] == "FUZZREAP" and d["stream_seq"] == seq), None)

    letter = await eventually(dead, timeout=15, what="the dead letter")
    assert "max deliveries" in letter["reason"]
    assert letter["headers"]["X-Plain"] == "ok" and "X-Odd" in letter["headers"]
    await eventually(lambda: _stream_empty(bus, "FUZZREAP"), timeout=5,
                     what="the message gone from its stream")


async def _stream_empty(bus: Any, stream: str) -> bool:
    return (await bus.js.stream_info(stream)).state.messages == 0
