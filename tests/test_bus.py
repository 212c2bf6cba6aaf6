"""The substrate on its own: server version gate, topology, dead letters by advisory."""

from __future__ import annotations

import asyncio
import json

import pytest

from bus import codec, topology
from bus.connection import connect
from bus.server import ServerError, check_version, parse_version
from bus.settings import Settings
from schemas.jobs import JobState
from tests.helpers import eventually, state_is


def test_old_servers_are_refused_with_a_clear_message():
    assert parse_version("nats-server: v2.15.1") == (2, 15, 1)
    assert parse_version("2.11.0-beta.2") == (2, 11, 0)
    check_version((2, 11, 0))
    with pytest.raises(ServerError, match=r"2\.10\.22.*needs 2\.11\.0 or newer"):
        check_version((2, 10, 22))


def test_settings_from_env_reject_bad_values():
    assert Settings.from_env({"JETFLEET_LEASE_TTL_S": "4"}).lease_ttl_s == 4.0
    with pytest.raises(ValueError, match="JETFLEET_LEASE_TTL_S"):
        Settings.from_env({"JETFLEET_LEASE_TTL_S": "soon"})


async def test_topology_applies_idempotently_from_many_components_at_once(settings):
    import asyncio

    buses = await asyncio.gather(*(connect(settings, name=f"c{i}") for i in range(4)))
    try:
        await asyncio.gather(*(topology.apply(b.js, settings) for b in buses))
        names = {s.config.name for s in await buses[0].js.streams_info()}
        assert {topology.JOBS, topology.WORK, topology.EVENTS, topology.TELEMETRY,
                topology.DEAD} <= names
        for bucket in (topology.KV_JOBS, topology.KV_CAPABILITIES, topology.KV_LEASES,
                       topology.KV_NODES, topology.KV_RESOURCES):
            await buses[0].js.key_value(bucket)
        await buses[0].js.object_store(topology.OBJECTS)
    finally:
        for b in buses:
            await b.close()


async def test_a_message_that_exhausts_its_deliveries_is_dead_lettered(bus, components, client):
    """A worker that dies on every delivery never gets to count attempts: the
    server's MAX_DELIVERIES advisory moves the message to DEAD and the job ends dead."""
    from dataclasses import replace

    await components.dispatcher()
    job_id = await client.submit("poison", {"x": 1})
    await eventually(lambda: state_is(client, job_id, "queued"))
    cfg = topology.work_consumer_config(replace(bus.settings, work_max_deliver=2,
                                                work_ack_wait_s=1.0), "poison", 1)
    await topology.ensure_consumer(bus.js, topology.WORK, cfg)
    sub = await bus.js.pull_subscribe_bind(durable=cfg.durable_name, stream=topology.WORK)
    for _ in range(2):  # two deliveries, each "crashing" before any ack
        msgs = await sub.fetch(1, timeout=5)
        assert json.loads(msgs[0].data)["job_id"] == job_id
        await msgs[0].nak()
    # The server settles an exhausted message when a worker next asks for work.
    with pytest.raises(TimeoutError):
        await sub.fetch(1, timeout=1)
    dead_sub = await bus.js.subscribe(topology.DEAD_ALL, ordered_consumer=True)
    letter = json.loads((await dead_sub.next_msg(timeout=15)).data)
    await dead_sub.unsubscribe()
    assert "max deliveries exhausted" in letter["reason"]
    assert letter["stream"] == topology.WORK and letter["deliveries"] == 2
    assert json.loads(letter["raw"])["job_id"] == job_id
    state = await eventually(lambda: state_is(client, job_id, "dead"))
    assert state.error.code == "deliveries_exhausted"
    info = await bus.js.stream_info(topology.WORK)
    assert info.state.messages == 0  # removed from WORK once recorded on DEAD


def test_job_state_round_trips_through_the_codec():
    s = JobState(job_id="a", state="queued", capability={"type": "echo"})
    assert codec.decode(codec.encode(s), JobState) == s


async def test_bucket_keys_and_history_answer_empty_only_when_empty(bus):
    """kvread: the keys of a bucket, their latest values and a key's history,
    empty exactly when there
    is nothing (an empty bucket, keys all deleted, a key never written), never a
    NoKeysError; many readers at once while writers write all see every key."""
    from nats.js.api import KeyValueConfig

    from bus import kvread

    kv = await bus.js.create_key_value(KeyValueConfig(bucket="kvread-test", history=5))
    assert await kvread.keys(kv) == []
    assert await kvread.history(kv, "nothing") == []
    for i in range(3):
        await kv.put("a", str(i).encode())
    await kv.put("b", b"x")
    assert sorted(await kvread.keys(kv)) == ["a", "b"]
    assert [e.value for e in await kvread.history(kv, "a")] == [b"0", b"1", b"2"]
    seen = await asyncio.gather(*(kvread.keys(kv) for _ in range(20)),
                                *(kv.put(f"k{i}", b"v") for i in range(20)))
    for got in seen[:20]:
        assert {"a", "b"} <= set(got)
    assert len(await kvread.keys(kv)) == 22
    latest = await kvread.latest(kv)
    assert latest["a"] == b"2" and latest["b"] == b"x" and len(latest) == 22
    assert len(await kvread.latest(kv, deadline_s=5.0)) == 22
    for key in await kvread.keys(kv):
        await kv.delete(key)
    assert await kvread.keys(kv) == []  # only tombstones left: empty, after a check
    assert await kvread.latest(kv) == {}


def test_ack_position_reads_both_forms_of_the_ack_subject():
    from bus.topology import ack_position

    old = "$JS.ACK.EVENTS.q1.1.42.40.1764193000123456789.7"
    assert ack_position(old) == (42, 1764193000.1234567, 7)
    new = "$JS.ACK.hub.ACCHASH.EVENTS.q1.1.42.40.1764193000123456789.7.token"
    assert ack_position(new) == (42, 1764193000.1234567, 7)
    assert ack_position("_INBOX.abc.1") is None
    assert ack_position(None) is None


def test_a_delivery_reads_its_count_and_sequence_as_nats_py_would():
    from nats.aio.msg import Msg

    from bus.consumer import Delivery

    for reply in ("$JS.ACK.WORK.work-p1-echo.3.1234.99.1764193000123456789.5",
                  "$JS.ACK.hub.ACCHASH.WORK.work-p1-echo.3.1234.99.1764193000123456789.5.tok"):
        msg = Msg(_client=None, reply=reply)  # type: ignore[arg-type]
        d = Delivery(msg=msg, data=b"", stream="WORK", consumer="work-p1-echo")
        assert (d.num_delivered, d.stream_seq) == (3, 1234)
        assert (d.num_delivered, d.stream_seq) == (msg.metadata.num_delivered,
                                                   msg.metadata.sequence.stream)


def test_the_embedded_server_gets_half_the_cpus_unless_gomaxprocs_is_set(tmp_path, monkeypatch):
    import os

    from bus.server import EmbeddedServer

    def environ(server: EmbeddedServer) -> dict[str, str]:
        assert server.proc is not None
        raw = open(f"/proc/{server.proc.pid}/environ", "rb").read().split(b"\0")
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

    monkeypatch.delenv("GOMAXPROCS", raising=False)
    with EmbeddedServer(tmp_path / "a") as server:
        want = max(1, len(os.sched_getaffinity(0)) // 2)
        assert environ(server)["GOMAXPROCS"] == str(want)
    monkeypatch.setenv("GOMAXPROCS", "3")
    with EmbeddedServer(tmp_path / "b") as server:
        assert environ(server)["GOMAXPROCS"] == "3"
