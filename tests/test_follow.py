"""bus.follow: a stream read in order over a data link, against a real server:
every message once and in order across chunks and across a server restart,
back-pressure that stops asking, and a role without pull rights falling back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from bus import topology
from bus.connection import Bus, connect
from bus.datalink import LinkUnavailable
from bus.follow import Delivered, LinkFollower
from bus.server import EmbeddedServer
from bus.settings import Settings
from tests.helpers import eventually


async def _publish(bus: Bus, first: int, n: int) -> None:
    """Pipelined, in order on one connection, each ack awaited with a timeout (the
    first alone: it may set up the publisher's reply subscription)."""
    def one(i: int) -> Awaitable[object]:
        return bus.publisher.publish(f"events.jobs.j-{i}", b'{"i":%d}' % i,
                                     {"Nats-Msg-Id": f"m-{i}"}, timeout=10.0)

    await one(first)
    await asyncio.gather(*(one(i) for i in range(first + 1, first + n)))


def _follower(bus: Bus, got: list[Delivered], start: int = 1, **kw: object) -> LinkFollower:
    def on_chunk(chunk: list[Delivered]) -> None:
        assert chunk, "an empty chunk was handed over"
        got.extend(chunk)

    return LinkFollower(bus, topology.EVENTS, topology.EVENTS_ALL, on_chunk, start=start,
                    **kw)  # type: ignore[arg-type]


def _check(got: list[Delivered], first_seq: int, n: int) -> None:
    seqs = [d[0] for d in got]
    assert seqs == list(range(first_seq, first_seq + n)), "missing, repeated or out of order"
    for seq, ts, pending, subject, data in got:
        assert subject == f"events.jobs.j-{seq - 1}" and data == b'{"i":%d}' % (seq - 1)
        assert ts > 1.7e9 and pending >= 0


async def test_a_follower_hands_over_every_message_once_in_order(bus: Bus) -> None:
    await _publish(bus, 0, 3000)
    got: list[Delivered] = []
    follower = _follower(bus, got, start=101, batch=256)
    task = asyncio.create_task(follower.run())
    try:
        await eventually(lambda: len(got) >= 2900, timeout=30)
        await _publish(bus, 3000, 500)  # live messages continue the same order
        await eventually(lambda: len(got) >= 3400, timeout=30)
        _check(got, 101, 3400)
        assert follower.rounds == 1 and follower.next == 3501
    finally:
        follower.stop()
        await asyncio.wait_for(task, 10)


async def test_a_follower_goes_on_after_a_server_restart_with_nothing_lost(
        nats_server: EmbeddedServer, settings: Settings) -> None:
    bus = await connect(settings, name="follow")
    try:
        await _publish(bus, 0, 1000)
        got: list[Delivered] = []
        follower = _follower(bus, got, batch=128, heartbeat_s=0.5)
        task = asyncio.create_task(follower.run())
        await eventually(lambda: len(got) >= 1000, timeout=30)
        nats_server.stop()
        await asyncio.sleep(0.5)
        nats_server.start()
        await eventually(lambda: bus.nc.is_connected, timeout=30)
        await _publish(bus, 1000, 1000)
        await eventually(lambda: len(got) >= 2000, timeout=60)
        _check(got, 1, 2000)
        assert follower.rounds >= 2, "the follower never noticed the restart"
        follower.stop()
        await asyncio.wait_for(task, 10)
    finally:
        await bus.close()


async def test_a_paused_follower_stops_asking_and_resumes(bus: Bus) -> None:
    await _publish(bus, 0, 2000)
    got: list[Delivered] = []

    def on_chunk(chunk: list[Delivered]) -> None:
        got.extend(chunk)
        follower.pause()  # as the query service does when its batch is full

    follower = LinkFollower(bus, topology.EVENTS, topology.EVENTS_ALL, on_chunk, start=1,
                            batch=100)
    follower.pause()
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.sleep(1.0)
        assert got == [], "a follower paused from the start asked for messages"
        follower.resume()
        await eventually(lambda: len(got) >= 100, timeout=20)
        # What was asked for before the thread saw the pause still lands; then
        # nothing more, although 2,000 messages wait.
        await asyncio.sleep(1.0)
        held = len(got)
        await asyncio.sleep(1.0)
        assert len(got) == held < 2000, "a paused follower kept asking"
        while len(got) < 2000:
            follower.resume()
            await asyncio.sleep(0.05)
        _check(got, 1, 2000)
    finally:
        follower.stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("role, follows", [("query", True), ("client", False)])
async def test_only_a_role_allowed_to_pull_follows_over_a_link(tmp_path, role: str,
                                                               follows: bool) -> None:
    from bus.credentials import FleetKeys, write_creds
    from bus.security import Grant

    keys = FleetKeys.generate()
    server = EmbeddedServer(tmp_path / "nats", extra_config=keys.server_config()).start()
    try:
        def creds(grant: Grant) -> str:
            return str(write_creds(tmp_path / f"{grant.role}.creds", keys, grant))

        admin = await connect(Settings(nats_creds=creds(Grant("admin"))), url=server.url)
        await _publish(admin, 0, 10)
        await admin.close()
        bus = await connect(Settings(nats_creds=creds(Grant(role)), deny_exit_s=0.0),
                            url=server.url)
        got: list[Delivered] = []
        follower = _follower(bus, got)
        task = asyncio.create_task(follower.run())
        try:
            if follows:
                await eventually(lambda: len(got) >= 10, timeout=20)
                _check(got, 1, 10)
            else:
                with pytest.raises(LinkUnavailable, match="following EVENTS"):
                    await asyncio.wait_for(task, 20)
                assert got == []
        finally:
            follower.stop()
            if not task.done():
                await asyncio.wait_for(task, 10)
            await bus.close()
    finally:
        server.stop()


async def test_a_follower_survives_losing_the_server_that_held_its_consumer(tmp_path) -> None:
    """A 3-server cluster: the server holding the follower's consumer (not the
    one its link is on) is killed. The link stays up, so only the missing
    heartbeats tell; a new round on a new consumer goes on with nothing lost."""
    from bus.server import EmbeddedCluster

    cluster = EmbeddedCluster(tmp_path / "nats", size=3).start()
    try:
        settings = Settings(nats_url=cluster.url, replicas=3)
        bus = await connect(settings, name="follow")
        try:
            await _publish(bus, 0, 200)
            got: list[Delivered] = []
            follower = _follower(bus, got, heartbeat_s=0.5)
            task = asyncio.create_task(follower.run())
            await eventually(lambda: len(got) >= 200, timeout=30)
            infos = await bus.js.consumers_info(topology.EVENTS)
            leaders = {i.cluster.leader for i in infos if i.cluster and i.cluster.leader}
            ours = bus.nc.connected_url.port if bus.nc.connected_url else None
            victims = [s for s in cluster.servers
                       if s.server_name in leaders and s.port != ours]
            if not victims:  # the consumer sits on our own server: kill that one instead
                victims = [s for s in cluster.servers if s.port == ours]
            victims[0].kill()

            # One at a time, each with its own timeout (an ack lost in the
            # fail-over must not hang the test); a retry is deduplicated by its id.
            for i in range(200, 400):
                for _ in range(40):
                    try:
                        await bus.publisher.publish(f"events.jobs.j-{i}", b'{"i":%d}' % i,
                                                    {"Nats-Msg-Id": f"m-{i}"}, timeout=2.0)
                        break
                    except Exception:
                        await asyncio.sleep(0.25)
            await eventually(lambda: len(got) >= 400, timeout=60)
            _check(got, 1, 400)
            assert follower.rounds >= 2
            follower.stop()
            await asyncio.wait_for(task, 10)
        finally:
            await bus.close()
    finally:
        cluster.stop()
