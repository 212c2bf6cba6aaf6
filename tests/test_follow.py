"""bus.follow: a stream read in order over a data link, against a real server:
every message once and in order across chunks and across a server restart,
back-pressure that stops asking, and a role without pull rights falling back."""

from __future__ import annotations

import asyncio

import pytest

from bus import topology
from bus.connection import Bus, connect
from bus.datalink import LinkUnavailable
from bus.follow import Delivered, LinkFollower
from bus.server import EmbeddedServer
from bus.settings import Settings
from tests.helpers import eventually


async def _publish(bus: Bus, first: int, n: int) -> None:
    futures = [await bus.js.publish_async(f"events.jobs.j-{i}", b'{"i":%d}' % i,
                                          headers={"Nats-Msg-Id": f"m-{i}"})
               for i in range(first, first + n)]
    await asyncio.gather(*futures)


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
