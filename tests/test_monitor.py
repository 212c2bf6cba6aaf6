"""The monitor: silence becomes `lost` once and only once, comes back as
`recovered`, and nothing else (a restart, a second monitor, a stalled loop, a
slow subscription, garbage on the bus) raises a false alarm."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

from nats.js.api import DeliverPolicy

from agents.node.fleet import FleetSimulator
from bus import codec, topology
from bus.adverts import put_advert
from bus.jobtable import JobTable
from bus.leases import Lease, LeaseLost, LeaseTable
from schemas import lifecycle as lc
from schemas.fleet import CapabilityAdvert
from schemas.jobs import JobSubmission
from schemas.telemetry import Heartbeat
from services.monitor import Monitor
from services.monitor.liveness import Liveness
from tests.conftest import eventually, job_events
from tests.helpers import stored

LOST_AFTER = 2.0
BEAT = 0.3


# ---- the liveness book on its own ---------------------------------------------------------


def test_liveness_counts_only_the_time_it_listened():
    live = Liveness(lost_after=3.0)
    live.heard("a", Heartbeat(node="a", seq=1), at=100.0, wall=0)
    live.heard("b", Heartbeat(node="b", seq=1), at=101.0, wall=0)
    live.expect("c", at=101.5)  # known alive, not heard since our start
    assert live.overdue(102.9) == []
    assert [n for n, _ in live.overdue(103.2)] == ["a"]
    live.heard("a", Heartbeat(node="a", seq=2), at=103.3, wall=0)  # a speaks: to the back
    assert [n for n, _ in live.overdue(104.6)] == ["b", "c"]
    live.shift(10.0)  # we were stalled for 10 s: nobody is overdue for it
    assert live.overdue(113.9) == []
    live.silence("b")
    assert [n for n, _ in live.overdue(117.0)] == ["c", "a"]
    live.listen("b", at=117.0)
    assert "b" not in [n for n, _ in live.overdue(119.0)]
    h = live.heard("a", Heartbeat(node="a", seq=1, started_at=0), at=118.0, wall=0)
    assert h.seq == 2  # an older heartbeat arriving late does not roll the counter back


# ---- helpers -----------------------------------------------------------------------------------


async def _node_events(bus, node: str = "*") -> list[dict]:
    return [json.loads(m.data) for m in await stored(bus, topology.node_events(node),
                                                      topology.EVENTS, quiet_s=0.3)]


async def _kinds(bus, node: str) -> list[str]:
    return [e["kind"] for e in await _node_events(bus, node)]


async def _has(bus, node: str, kinds: list[str]) -> bool:
    return await _kinds(bus, node) == kinds


async def _running_job(bus, job_id: str, node: str, worker: str, devices: list[str]) -> None:
    table = JobTable(bus)
    sub = JobSubmission(capability={"type": "held.elsewhere"}, job_id=job_id)
    await table.create(lc.new_job(sub, job_id))
    assert await table.transition(job_id, lc.start(1, worker, node, devices)) is not None


async def _live_worker(bus, worker: str, node: str, lease: Lease, stop: asyncio.Event,
                       lost: list[str]) -> None:
    """What a live worker does: renew its advert and its lease under their TTLs,
    until `stop`; a renewal refused (the lease was reclaimed) is noted in `lost`."""
    leases = LeaseTable(bus, node)
    while not stop.is_set():
        await put_advert(bus, CapabilityAdvert(worker_id=worker, node=node, pid=os.getpid(),
                                               capabilities=[{"type": "held.elsewhere"}]))
        if not lost:
            try:
                await leases.renew(lease)
            except LeaseLost as exc:
                lost.append(str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.8)


async def _state(bus, job_id: str) -> dict:
    return json.loads((await (await bus.kv(topology.KV_JOBS)).get(job_id)).value)


async def _simulator(bus, nodes: int, jobs_per_node: int = 0) -> tuple[FleetSimulator, asyncio.Event,
                                                                        asyncio.Task[None]]:
    sim = FleetSimulator(bus, nodes=nodes, gpus=1, interval=BEAT, prefix="mt", metrics_every=1000,
                         jobs_per_node=jobs_per_node, job_churn=0.0, flap_per_min=0)
    await sim.setup()
    stop = asyncio.Event()
    return sim, stop, asyncio.create_task(sim.run(stop))


# ---- lost and recovered ------------------------------------------------------------------------


async def test_a_silent_node_loses_its_jobs_and_leases_then_recovers_them(bus, procs):
    sim, stop, task = await _simulator(bus, nodes=2, jobs_per_node=1)
    node, other = sim.nodes[0], sim.nodes[1]
    [discovered] = list(node.jobs)
    await _running_job(bus, "sub-1", node.name, "w-alive", [f"{node.name}.gpu0"])
    await _running_job(bus, "sub-2", node.name, "w-gone", [])
    await _running_job(bus, "sub-3", other.name, "w-alive", [])
    lease = await LeaseTable(bus, node.name).acquire(f"{node.name}.gpu0", "w-alive", "sub-1")
    assert lease is not None
    advert_stop = asyncio.Event()
    refused: list[str] = []
    advert = asyncio.create_task(_live_worker(bus, "w-alive", node.name, lease, advert_stop,
                                              refused))
    procs.run("monitor", "--lost-after", str(LOST_AFTER), name="monitor")
    try:
        await eventually(lambda: _has(bus, node.name, ["joined"]), timeout=20)
        sim.silence(node, 3 * LOST_AFTER)
        last_beat = node.last_beat
        lost = await eventually(lambda: _event(bus, node.name, "lost"), timeout=15, interval=0.05)
        # Detection within --lost-after plus one heartbeat (and our polling and the bus).
        # (with a second of room for a busy machine; a monitor counting from anything
        # but its last hearing, or waiting a second --lost-after, would miss it)
        assert lost["ts"] - (time.time() - (time.monotonic() - last_beat)) < LOST_AFTER + BEAT + 1.0
        assert sorted(lost["jobs"]) == sorted([discovered, "sub-1", "sub-2"])
        assert lost["leases"] == [f"{node.name}.gpu0"]
        assert (await LeaseTable(bus).holders()) == {}
        # The holder, still alive, learns it at its next renewal.
        await eventually(lambda: refused, timeout=5, what="the reclaimed lease refused")
        for job_id in (discovered, "sub-1", "sub-2"):
            s = await _state(bus, job_id)
            assert s["state"] == "lost" and s["error"]["code"] == "worker_lost"
        assert (await _state(bus, "sub-3"))["state"] == "running"  # another node's job
        await eventually(lambda: _event(bus, node.name, "recovered"), timeout=20)
        recovered = await _event(bus, node.name, "recovered")
        # Still running there: the discovered job (its agent lists it) and the job whose
        # worker is alive; the job whose worker is gone stays lost (it will be retried).
        assert sorted(recovered["jobs"]) == sorted([discovered, "sub-1"])
        assert (await _state(bus, "sub-1"))["state"] == "running"
        assert (await _state(bus, "sub-2"))["state"] == "lost"
        kinds = [e["kind"] for e in await job_events(bus, "sub-1")]
        assert kinds.count("lost") == 1 and kinds.count("resumed") == 1
        assert await _kinds(bus, node.name) == ["joined", "lost", "recovered"]
        assert await _kinds(bus, other.name) == ["joined"]
    finally:
        stop.set()
        advert_stop.set()
        await task
        await advert


async def _event(bus, node: str, kind: str) -> dict | None:
    for e in await _node_events(bus, node):
        if e["kind"] == kind:
            return e
    return None


async def test_restarts_stalls_and_a_second_monitor_raise_no_false_alarm(bus, procs):
    """Two monitors; one is killed and restarted, the other frozen for twice
    --lost-after and thawed: no node that kept speaking is ever lost, and when
    one does go silent, each event is emitted exactly once."""
    sim, stop, task = await _simulator(bus, nodes=5, jobs_per_node=1)
    args = ("monitor", "--lost-after", str(LOST_AFTER))
    first = procs.run(*args, name="monitor-a")
    second = procs.run(*args, name="monitor-b")
    try:
        for n in sim.nodes:
            await eventually(lambda n=n: _has(bus, n.name, ["joined"]), timeout=20)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        procs.run(*args, name="monitor-a-again")
        os.kill(second.pid, signal.SIGSTOP)
        await asyncio.sleep(2 * LOST_AFTER + 1)
        os.kill(second.pid, signal.SIGCONT)
        await asyncio.sleep(LOST_AFTER + 1)
        events = await _node_events(bus)
        assert [e["kind"] for e in events] == ["joined"] * 5, events

        # Garbage on the bus: dead-lettered with its reason, once for both monitors.
        garbage = {"telemetry.mt-x.heartbeat": b"not json",
                   "telemetry.mt-y.heartbeat": b'{"node": 5}',
                   "telemetry.mt-z.heartbeat": codec.encode(Heartbeat(node="mt-00000")),
                   "telemetry.mt-b.heartbeat": b"\xff\xfe\x00binary"}
        for subject, body in garbage.items():
            await bus.nc.publish(subject, body)
        letters = await eventually(lambda: _dead(bus, 4), timeout=10, what="4 dead letters")
        await asyncio.sleep(1)
        letters = await _dead(bus, 0)
        assert sorted(d["subject"] for d in letters) == sorted(garbage)
        assert all(d["reason"] for d in letters)
        assert any("mt-00000" in d["reason"] for d in letters)
        assert next(d for d in letters if d["subject"].startswith("telemetry.mt-b"))[
            "raw_encoding"] == "base64"

        # Now one node really goes silent: one lost, one recovered, whatever the monitors.
        node = sim.nodes[2]
        [job_id] = list(node.jobs)
        sim.silence(node, 2 * LOST_AFTER + 1)
        await eventually(lambda: _event(bus, node.name, "recovered"), timeout=20)
        await asyncio.sleep(1)
        assert await _kinds(bus, node.name) == ["joined", "lost", "recovered"]
        kinds = [e["kind"] for e in await job_events(bus, job_id)]
        assert kinds == ["discovered", "lost", "resumed"]
        for other in sim.nodes:
            if other is not node:
                assert await _kinds(bus, other.name) == ["joined"]
    finally:
        stop.set()
        await task
        if second.poll() is None:
            os.kill(second.pid, signal.SIGCONT)


async def _dead(bus, at_least: int) -> list[dict] | None:
    info = await bus.js.stream_info(topology.DEAD)
    if info.state.messages < at_least:
        return None
    sub = await bus.js.subscribe(topology.dead_subject(topology.TELEMETRY), ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL, stream=topology.DEAD)
    out = []
    try:
        while True:
            try:
                out.append(json.loads((await sub.next_msg(timeout=0.3)).data))
            except TimeoutError:
                break
    finally:
        await sub.unsubscribe()
    return out if len(out) >= at_least else None


async def test_a_heartbeat_stuck_behind_a_slow_subscription_saves_the_node(bus):
    """The monitor's own subscription is behind (we feed it by hand here): before
    declaring a node lost it asks the stream, finds a newer heartbeat, and lets
    the node be; with no newer heartbeat it does declare it lost."""
    m = Monitor(bus, lost_after=1.0, instance="m-test")
    await m.states.start()
    await m.index.start()
    for node in ("slow", "dead"):
        hb = Heartbeat(node=node, seq=1, started_at=1.0)
        await bus.publish(topology.telemetry(node, "heartbeat"), hb)
        m.live.heard(node, hb, at=time.monotonic() - 5, wall=time.time() - 5)
        m._actions[node] = "join"
    await m._join("slow")
    await m._join("dead")
    # The slow node spoke again; its heartbeat reached the server but not us.
    await bus.publish(topology.telemetry("slow", "heartbeat"),
                      Heartbeat(node="slow", seq=2, started_at=1.0))
    overdue = dict(m.live.overdue(time.monotonic()))
    assert set(overdue) == {"slow", "dead"}
    await m._suspect("slow", overdue["slow"])
    await m._suspect("dead", overdue["dead"])
    assert m.counts["pardoned"] == 1 and m.counts["lost"] == 1
    assert [e["kind"] for e in await _node_events(bus, "slow")] == ["joined"]
    assert [e["kind"] for e in await _node_events(bus, "dead")] == ["joined", "lost"]
    await m.states.mirror.stop()
    await m.index.mirror.stop()


async def test_a_job_with_no_progress_past_its_deadline_is_stale(bus, procs):
    sim, stop, task = await _simulator(bus, nodes=1)
    node = sim.nodes[0]
    table = JobTable(bus)
    sub = JobSubmission(capability={"type": "held.elsewhere"}, job_id="slow-1", timeout_s=0.5)
    await table.create(lc.new_job(sub, "slow-1"))
    await table.transition("slow-1", lc.start(1, "w1", node.name, []))
    await _running_job(bus, "quiet-1", node.name, "w1", [])
    procs.run("monitor", "--lost-after", str(LOST_AFTER), "--stale-after", "3", name="monitor")
    try:
        async def stale(job_id):
            s = await _state(bus, job_id)
            return s if s.get("stale") else None

        over = await eventually(lambda: stale("slow-1"), timeout=15)
        assert "time limit" in over["reason"] and over["state"] == "running"
        quiet = await eventually(lambda: stale("quiet-1"), timeout=15)
        assert "no progress" in quiet["reason"]
        assert [e["kind"] for e in await job_events(bus, "quiet-1")].count("stale") == 1
        # Progress clears it.
        await table.transition("quiet-1", lc.note_progress(1, 0.5))
        assert not (await _state(bus, "quiet-1")).get("stale")
    finally:
        stop.set()
        await task


# ---- the KV mirror ----------------------------------------------------------------------


async def _mirror(bus, bucket: str):
    from nats.js.api import KeyValueConfig

    from services.monitor.mirror import KvMirror

    kv = await bus.js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
    seen: dict[str, bytes] = {}
    m = KvMirror(bus, bucket, lambda k, v, seq: seen.__setitem__(k, v),
                 lambda k: seen.pop(k, None))
    return kv, m, seen


async def test_the_kv_mirror_copies_a_busy_bucket_in_order_and_answers_flow_control(bus):
    kv, m, seen = await _mirror(bus, "mirrortest")
    await m.start()
    try:
        assert m.ready.is_set()  # an empty bucket is ready at once
        value = b"x" * 900
        # Enough to make the server ask for flow control more than once.
        await asyncio.gather(*(kv.put(f"k{i}", value + str(i).encode()) for i in range(3000)))
        for i in range(0, 3000, 3):
            await kv.delete(f"k{i}")
        await kv.put("k1", b"changed")
        await kv.purge("k2")
        want = {f"k{i}": value + str(i).encode() for i in range(3000) if i % 3}
        want["k1"] = b"changed"
        del want["k2"]
        await eventually(lambda: seen == want, timeout=30, what="the mirror to match the bucket")
        assert (m.watches, m.gaps) == (1, 0)  # one consumer, never out of order
        assert m.flow_controls > 0  # the server asked, and went on once answered
        late = KvMirrorOf(bus, "mirrortest")
        await late.m.start()
        try:  # a mirror started on a full bucket replays its latest values, then is ready
            await asyncio.wait_for(late.m.ready.wait(), 20)
            assert late.seen == want
        finally:
            await late.m.stop()
    finally:
        await m.stop()


class KvMirrorOf:
    def __init__(self, bus, bucket: str) -> None:
        from services.monitor.mirror import KvMirror

        self.seen: dict[str, bytes] = {}
        self.m = KvMirror(bus, bucket, lambda k, v, seq: self.seen.__setitem__(k, v),
                          lambda k: self.seen.pop(k, None))


async def test_a_kv_mirror_that_finds_itself_out_of_order_watches_afresh_and_misses_nothing(bus):
    kv, m, seen = await _mirror(bus, "mirrorgap")
    await kv.put("a", b"1")
    await m.start()
    try:
        await eventually(lambda: seen == {"a": b"1"}, timeout=10, what="the first value")
        m._cseq += 5  # as if five deliveries had never come
        await kv.put("b", b"2")
        await kv.delete("a")
        await eventually(lambda: seen == {"b": b"2"}, timeout=20,
                         what="the mirror to catch up after watching afresh")
        assert m.gaps == 1 and m.watches == 2
        await kv.put("c", b"3")
        await eventually(lambda: seen == {"b": b"2", "c": b"3"}, timeout=10, what="later values")
        assert m.gaps == 1  # the new watch is in order
    finally:
        await m.stop()


async def test_a_kv_mirror_whose_consumer_vanished_hears_the_silence_and_watches_afresh(bus):
    """What a cluster fail-over does to an R1 consumer while the connection stays up."""
    kv, m, seen = await _mirror(bus, "mirrorlost")
    m.HEARTBEAT_S = 0.5
    await kv.put("a", b"1")
    await m.start()
    try:
        await eventually(lambda: seen == {"a": b"1"}, timeout=10, what="the first value")
        await m.check()
        assert m.watches == 1  # heartbeats arrive: nothing to do
        await asyncio.sleep(1.0)
        await m.check()
        assert m.watches == 1 and m.silences == 0
        await bus.js.delete_consumer("KV_mirrorlost", m.consumer)
        await kv.put("b", b"2")

        async def checked() -> bool:
            await m.check()
            return seen == {"a": b"1", "b": b"2"}

        await eventually(checked, timeout=20, interval=0.2, what="the mirror to watch afresh")
        assert m.silences == 1 and m.watches == 2
    finally:
        await m.stop()
