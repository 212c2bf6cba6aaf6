"""The lean protocol paths (bus.wire) against a real nats-server: what they
send is what nats-py would have sent, what they refuse never leaves, and
whenever the connection is not plainly up they hand over to nats-py."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from nats.js import errors as js_errors
from nats.js.api import StreamConfig

from bus import wire as wire_mod
from bus.server import EmbeddedServer
from bus.wire import BadSubject, Wire
from tests.helpers import eventually


async def _raw_nc(server: EmbeddedServer) -> nats.NATS:
    return await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


async def test_a_lean_publish_arrives_as_nats_py_would_send_it(nats_server):
    sender, receiver = await _raw_nc(nats_server), await _raw_nc(nats_server)
    try:
        got: asyncio.Queue = asyncio.Queue()
        await receiver.subscribe("w.>", cb=got.put)
        await receiver.flush()
        w = Wire.of(sender)
        assert w.lean and Wire.of(sender) is w
        await w.publish("w.plain", b"one")
        await w.publish("w.reply", b"two", reply="r.1")
        await w.publish("w.headers", b"three", headers={"Nats-Msg-Id": "m-1", "X-A": "b c"})
        await w.publish("w.empty", b"")
        assert w.lean_publishes == 4
        msgs = [await asyncio.wait_for(got.get(), 5) for _ in range(4)]
        assert [(m.subject, m.data, m.reply) for m in msgs] == [
            ("w.plain", b"one", ""), ("w.reply", b"two", "r.1"),
            ("w.headers", b"three", ""), ("w.empty", b"", "")]
        assert msgs[2].headers == {"Nats-Msg-Id": "m-1", "X-A": "b c"}
    finally:
        await sender.close()
        await receiver.close()


async def test_what_would_inject_protocol_is_refused_and_never_sent(nats_server):
    sender, receiver = await _raw_nc(nats_server), await _raw_nc(nats_server)
    try:
        got: list[bytes] = []

        async def on(msg):
            got.append(msg.data)

        await receiver.subscribe(">", cb=on)
        await receiver.flush()
        w = Wire.of(sender)
        for subject, reply in [("a b", ""), ("a\r\nPUB x 1", ""), ("", ""), ("ok", "r\n1")]:
            with pytest.raises(BadSubject):
                await w.publish(subject, b"x", reply=reply)
        with pytest.raises(ValueError, match="cannot travel"):
            await w.publish("ok", b"x", headers={"Nats-Msg-Id": "a\r\nPUB evil 1"})
        with pytest.raises(ValueError, match="cannot travel"):
            await w.publish("ok", b"x", headers={"Bad:Key": "v"})
        await w.publish("ok", b"after")
        await eventually(lambda: got, timeout=5, what="the good message")
        await asyncio.sleep(0.2)
        assert got == [b"after"]  # nothing refused went out, and the connection is fine
    finally:
        await sender.close()
        await receiver.close()


async def test_a_routed_subscription_gets_raw_messages_and_the_others_stay_as_they_were(
        nats_server):
    nc = await _raw_nc(nats_server)
    try:
        w = Wire.of(nc)
        raw: list[tuple[bytes, bytes, bytes, bytes | None]] = []
        plain: asyncio.Queue = asyncio.Queue()
        routed = await nc.subscribe("raw.*", cb=plain.put)  # its callback must not see them
        w.route(routed._id, lambda s, r, d, h: raw.append((s, r, d, h)))
        await nc.subscribe("plain.*", cb=plain.put)
        await nc.flush()
        await nc.publish("raw.1", b"a", reply="back.1", headers={"K": "v"})
        await nc.publish("raw.2", b"b")
        await nc.publish("plain.1", b"c")
        msg = await asyncio.wait_for(plain.get(), 5)
        await eventually(lambda: len(raw) == 2, timeout=5, what="two raw messages")
        assert msg.subject == "plain.1" and plain.empty()
        assert raw[0][:3] == (b"raw.1", b"back.1", b"a")
        assert wire_mod.parse_header_block(raw[0][3] or b"") == {"K": "v"}
        assert raw[1] == (b"raw.2", b"", b"b", None)
        w.unroute(routed._id)  # back to nats-py's callback
        await nc.publish("raw.3", b"d")
        assert (await asyncio.wait_for(plain.get(), 5)).data == b"d"
    finally:
        await nc.close()


async def test_a_handler_that_raises_does_not_stop_the_reader(nats_server):
    nc = await _raw_nc(nats_server)
    try:
        w = Wire.of(nc)
        seen: list[bytes] = []

        def handler(s, r, d, h):
            seen.append(d)
            if d == b"boom":
                raise RuntimeError("boom")

        await w.subscribe("h.*", handler)
        for body in (b"boom", b"fine"):
            await w.publish("h.x", body)
        await eventually(lambda: seen == [b"boom", b"fine"], timeout=5, what="both messages")
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _server_to_stop(tmp_path, stream: str):
    """A server of the test's own (to stop and start again), a client that
    reconnects for ever, and a stream on `<stream lower-cased>.>`."""
    server = EmbeddedServer(tmp_path / "nats")
    server.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
        yield server, nc, js
    finally:
        await nc.close()
        server.stop()


async def test_publishes_go_the_long_way_while_the_server_is_away_and_arrive_after(tmp_path):
    async with _server_to_stop(tmp_path, "AWAY") as (server, nc, js):
        w = Wire.of(nc)
        await w.publish("away.1", b"before")
        await nc.flush()
        server.stop()
        await eventually(lambda: not nc.is_connected, timeout=10, what="the disconnect")
        lean = w.lean_publishes
        await w.publish("away.2", b"while away")  # nats-py buffers it for the reconnect
        assert w.lean_publishes == lean
        server.start()
        await eventually(lambda: nc.is_connected, timeout=20, what="the reconnect")
        await w.publish("away.3", b"after")
        assert w.lean_publishes == lean + 1
        await nc.flush()

        async def stored() -> list[bytes]:
            return [(await js.get_msg("AWAY", seq)).data or b""
                    for seq in range(1, (await js.stream_info("AWAY")).state.messages + 1)]

        async def all_three() -> bool:
            return len(await stored()) == 3

        await eventually(all_three, timeout=10, what="three messages in the stream")
        assert await stored() == [b"before", b"while away", b"after"]  # in order, none lost
    with pytest.raises(nats.errors.ConnectionClosedError):
        await w.publish("closed.1", b"x")


async def test_the_publisher_reads_acks_and_refusals_on_the_raw_route(bus):
    await bus.js.add_stream(StreamConfig(name="WIRETEST", subjects=["wiretest.>"]))
    pub = bus.publisher
    acks = await asyncio.gather(*(pub.publish(f"wiretest.{i}", b"x") for i in range(50)))
    assert sorted(a.seq for a in acks) == list(range(1, 51))
    assert pub._sub is not None and pub._sub._id in pub.wire._routes
    again = await pub.publish("wiretest.0", b"x", headers={"Nats-Msg-Id": "d-1"})
    dup = await pub.publish("wiretest.0", b"x", headers={"Nats-Msg-Id": "d-1"})
    assert dup.duplicate and dup.seq == again.seq
    with pytest.raises(js_errors.NoStreamResponseError):
        await pub.publish("nostream.here", b"x", timeout=5)
    with pytest.raises(js_errors.KeyWrongLastSequenceError):
        await pub.publish("wiretest.0", b"x",
                          headers={"Nats-Expected-Last-Subject-Sequence": "1"})
    # send: the publish goes out at once, its ack comes as a future
    futures = [pub.send(f"wiretest.s{i}", b"s") for i in range(20)]
    assert [(await f).seq for f in futures] == list(range(again.seq + 1, again.seq + 21))
    waiting = len(pub._waiting)
    with pytest.raises(BadSubject):
        pub.send("wiretest.bad subject", b"x")
    assert len(pub._waiting) == waiting == 0  # nothing left behind for a refused message
    assert not pub.registry


class _OtherReader(nats.NATS):
    """A client whose reader hands messages over differently (a later nats-py)."""

    async def _process_msg(self, sid, subject, reply, data, headers, extra=None):  # type: ignore[override]
        await super()._process_msg(sid, subject, reply, data, headers)


async def test_without_the_lean_path_the_same_calls_go_through_nats_py(nats_server):
    nc = _OtherReader()
    await nc.connect(nats_server.url)
    try:
        w = Wire.of(nc)
        assert not w.lean  # not the reader bus.wire was written against: the long way
        raw: list[tuple[bytes, bytes, bytes, bytes | None]] = []
        await w.subscribe("slow.*", lambda s, r, d, h: raw.append((s, r, d, h)))
        await nc.flush()
        await w.publish("slow.1", b"a", reply="back.1", headers={"K": "v"})
        await w.publish("slow.2", b"b")
        await eventually(lambda: len(raw) == 2, timeout=5, what="two messages")
        assert w.lean_publishes == 0 and not w._routes
        assert raw[0][:3] == (b"slow.1", b"back.1", b"a")
        assert wire_mod.parse_header_block(raw[0][3] or b"") == {"K": "v"}
        assert raw[1] == (b"slow.2", b"", b"b", None)
    finally:
        await nc.close()


# ---- Fetcher (the ConsumerLoop's fetch) ---------------------------------------------------


async def _work_queue(bus, name: str):
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

    await bus.js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"],
                                         retention=RetentionPolicy.WORK_QUEUE))
    await bus.js.add_consumer(name, ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT,
                                                   ack_wait=30))


async def test_fetch_takes_what_is_there_in_order_up_to_its_batch(bus):
    from bus.pull import Fetcher

    await _work_queue(bus, "FQ")
    for i in range(10):
        await bus.js.publish("fq.x", b"%d" % i)
    f = Fetcher(bus.nc, "FQ", "d")
    try:
        first = await f.fetch(4, timeout=2)
        rest = await f.fetch(100, timeout=2)
        assert [m.data for m in first + rest] == [b"%d" % i for i in range(10)]
        assert len(first) == 4
        for m in first + rest:
            await m.ack()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await f.fetch(8, timeout=0.5)  # nothing there: waits its timeout, then says so
        assert loop.time() - t0 >= 0.45
    finally:
        await f.close()


async def test_fetch_waits_for_the_first_message_and_keeps_what_comes_after(bus):
    from bus.pull import Fetcher

    await _work_queue(bus, "FW")
    f = Fetcher(bus.nc, "FW", "d")
    try:
        async def later():
            await asyncio.sleep(0.3)
            await bus.js.publish("fw.x", b"a")
            await asyncio.sleep(0.1)
            await bus.js.publish("fw.x", b"b")

        task = asyncio.ensure_future(later())
        got = await f.fetch(8, timeout=5)
        assert [m.data for m in got] == [b"a"]  # returned at the first, not at the timeout
        await task
        more = await f.fetch(8, timeout=5)  # delivered to the waiting request meanwhile
        assert [m.data for m in more] == [b"b"]
        assert got[0].headers is None and got[0].reply.startswith("$JS.ACK.FW.d.")
        await got[0].ack()
        await more[0].ack()
    finally:
        await f.close()


async def test_fetched_messages_not_taken_go_back_at_close(bus):
    from bus.pull import Fetcher

    await _work_queue(bus, "FC")
    f = Fetcher(bus.nc, "FC", "d")

    async def first_one():
        await asyncio.sleep(0.2)
        await bus.js.publish("fc.x", b"0", headers={"Nats-Msg-Id": "m0"})

    task = asyncio.ensure_future(first_one())
    first = await f.fetch(10, timeout=5)  # leaves its request waiting for nine more
    await task
    assert [m.data for m in first] == [b"0"] and first[0].headers == {"Nats-Msg-Id": "m0"}
    await first[0].ack()
    for i in range(1, 5):
        await bus.js.publish("fc.x", b"%d" % i)
    await eventually(lambda: len(f._buffer) == 4, timeout=5, what="four delivered, not taken")
    await f.close()  # back at once, not after the 30 s ack wait
    g = Fetcher(bus.nc, "FC", "d")
    try:
        again = await g.fetch(10, timeout=5)
        # (a redelivery keeps no order of its own)
        assert sorted(m.data for m in again) == [b"1", b"2", b"3", b"4"]
        assert all(m.metadata.num_delivered == 2 for m in again)
    finally:
        await g.close()


async def test_an_event_sent_while_the_server_is_away_is_acked_after_it_is_back(tmp_path):
    from bus.publisher import Publisher

    async with _server_to_stop(tmp_path, "AWAYPUB") as (server, nc, _js):
        pub = Publisher(nc)
        assert (await pub.publish("awaypub.1", b"first")).seq == 1
        server.stop()
        await eventually(lambda: not nc.is_connected, timeout=10, what="the disconnect")
        future = pub.send("awaypub.2", b"while away", timeout=30)  # nats-py buffers it
        server.start()
        ack = await asyncio.wait_for(future, 30)
        assert ack.seq == 2 and ack.stream == "AWAYPUB"
