"""The object store `objects`: what a put stores is what a get returns, in any
process and any NATS client; a missing, corrupt, truncated, expired or foreign
object is a clear error naming it, never a hang."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from nats.js.api import StreamInfo

import bus.objects as objects_module
from bus import topology
from bus.connection import connect
from bus.datalink import DataLink
from bus.objects import (
    InvalidRef,
    ObjectChanged,
    ObjectCorrupt,
    ObjectExpired,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    ObjectTruncated,
    WrongBucket,
)
from bus.settings import Settings
from schemas.common import ObjRef
from schemas.objects import EXPIRES_KEY, ObjectMeta, rfc3339
from tests.conftest import ROOT, eventually

CHUNK = 64 * 1024
STREAM = "OBJ_objects"


@pytest.fixture(params=["bus", "link"])
def transfer(request, monkeypatch):
    """Run a test twice: every transfer on the bus's own connection, then every
    one (whatever its size) over a data link; in the second, at least one link
    must really have been opened."""
    opened = []
    real_open = DataLink.open.__func__

    def counting_open(cls, *args, **kw):
        link = real_open(cls, *args, **kw)
        opened.append(link)
        return link

    monkeypatch.setattr(DataLink, "open", classmethod(counting_open))
    monkeypatch.setattr(objects_module, "LINK_MIN_BYTES",
                        0 if request.param == "link" else 1 << 62)
    yield request.param
    if request.param == "link":
        assert opened, "no transfer went over a data link"
    else:
        assert not opened


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def chunk_seqs(bus, store: ObjectStore, ref: ObjRef) -> list[int]:
    """Stream sequences of an object's chunks, in order."""
    meta = await store.info(ref)
    subject = f"$O.objects.C.{meta.nuid}"
    seqs, seq = [], 0
    while True:
        try:
            msg = await bus.js.get_msg(STREAM, seq=seq + 1, subject=subject, next=True)
        except Exception:
            return seqs
        seq = msg.seq
        seqs.append(seq)


async def stream_state(bus) -> StreamInfo:
    return await bus.js.stream_info(STREAM)


@pytest.mark.usefixtures("transfer")
async def test_put_then_get_returns_the_same_bytes_and_nats_py_reads_them_too(bus):
    store = ObjectStore(bus, chunk_size=CHUNK)
    data = blob(16 * CHUNK + 123)
    ref = await store.put(data, name="inputs/a.bin")
    assert ref == ObjRef(bucket="objects", name="inputs/a.bin", size=len(data), digest=sha(data))
    meta = await store.info(ref)
    assert meta.chunks == 17 and meta.size == len(data) and not meta.deleted

    got = await store.get(ref)
    assert got == data and isinstance(got, bytearray)
    # The JSON form of the ref, as it arrives in a payload, and a bare name work alike.
    assert await store.get(msgspec.to_builtins(ref)) == data
    assert await store.get("inputs/a.bin") == data

    # The standard layout: nats-py's own ObjectStore (as the `nats` CLI) reads it ...
    natspy = await bus.js.object_store(topology.OBJECTS)
    theirs = await natspy.get("inputs/a.bin")
    assert theirs.data == data and theirs.info.digest == ref.digest
    # ... and we read what it writes (its 128 KiB chunks, its meta record).
    other = blob(300_001, seed=2)
    await natspy.put("from-nats-py", other)
    assert await store.get("from-nats-py") == other

    empty = await store.put(b"", name="empty")
    assert empty.size == 0 and empty.digest == sha(b"")
    assert await store.get(empty) == b""
    assert (await natspy.get("empty")).data == b""


@pytest.mark.usefixtures("transfer")
async def test_every_kind_of_source_can_be_put(bus, tmp_path):
    store = ObjectStore(bus, chunk_size=CHUNK)
    data = blob(3 * CHUNK + 7, seed=3)
    path = tmp_path / "in.bin"
    path.write_bytes(data)

    async def agen():
        for i in range(0, len(data), 10_000):
            yield data[i:i + 10_000]
            await asyncio.sleep(0)

    f = path.open("rb")
    try:
        refs = [await store.put(path), await store.put(f), await store.put(agen()),
                await store.put([data[:5], data[5:]]), await store.put(memoryview(data))]
    finally:
        f.close()
    for ref in refs:
        assert ref.size == len(data) and ref.digest == sha(data)
        assert await store.get(ref) == data
    assert len({r.name for r in refs}) == len(refs)  # a fresh name each

    with pytest.raises(TypeError, match=r"str\.encode"):
        await store.put("just some text")
    with pytest.raises(FileNotFoundError):
        await store.put(tmp_path / "missing.bin")


async def test_an_object_passes_between_two_processes(fleet_env):
    """One process puts through the SDK and prints the ref; another gets it by
    that ref (as JSON, as it would arrive in a payload) and checks its digest."""
    writer = (
        "import asyncio, hashlib, json, random\n"
        "from bus import codec\n"
        "from sdk.objects import Objects\n"
        "async def main():\n"
        "    data = random.Random(7).randbytes(3_000_000)\n"
        "    async with await Objects.connect() as objects:\n"
        "        ref = await objects.put(data, name='handoff/x')\n"
        "    print(json.dumps({'ref': codec.to_builtins(ref),\n"
        "                      'sha': hashlib.sha256(data).hexdigest()}))\n"
        "asyncio.run(main())\n")
    reader = (
        "import asyncio, hashlib, json, sys\n"
        "from sdk.objects import Objects\n"
        "async def main():\n"
        "    ref = json.loads(sys.argv[1])\n"
        "    async with await Objects.connect() as objects:\n"
        "        data = await objects.get(ref)\n"
        "    print(hashlib.sha256(data).hexdigest(), len(data))\n"
        "asyncio.run(main())\n")
    wrote = await _python(writer, env=fleet_env)
    out = json.loads(wrote)
    assert out["ref"]["digest"].startswith("SHA-256=")
    read = await _python(reader, json.dumps(out["ref"]), env=fleet_env)
    assert read.split() == [out["sha"], "3000000"]


async def _python(code: str, *args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.usefixtures("transfer")
async def test_a_corrupted_chunk_is_detected_and_named(bus, tmp_path):
    store = ObjectStore(bus, chunk_size=CHUNK)
    data = blob(4 * CHUNK, seed=4)
    ref = await store.put(data, name="model/weights")
    seqs = await chunk_seqs(bus, store, ref)
    assert len(seqs) == 4
    # Replace the last chunk on the server by one with a flipped byte (same size).
    meta = await store.info(ref)
    last = bytearray(data[3 * CHUNK:])
    last[100] ^= 0xFF
    await bus.js.delete_msg(STREAM, seqs[-1])
    await bus.js.publish(f"$O.objects.C.{meta.nuid}", bytes(last))

    with pytest.raises(ObjectCorrupt, match=r"objects/model/weights: digest mismatch") as err:
        await store.get(ref)
    assert not isinstance(err.value, ObjectTruncated)
    # get_to leaves nothing behind, the streaming reader raises at its end.
    (tmp_path / "out").mkdir()
    with pytest.raises(ObjectCorrupt):
        await store.get_to(ref, tmp_path / "out" / "weights.bin")
    assert list((tmp_path / "out").iterdir()) == []
    seen = 0
    with pytest.raises(ObjectCorrupt):
        async with store.open(ref) as reader:
            async for chunk in reader:
                seen += len(chunk)
    assert seen == len(data)  # every chunk came; the digest check at the end refused them
    # nats-py agrees that it is corrupt.
    from nats.js.errors import DigestMismatchError

    with pytest.raises(DigestMismatchError):
        await (await bus.js.object_store(topology.OBJECTS)).get("model/weights")


@pytest.mark.usefixtures("transfer")
async def test_a_truncated_object_is_an_error_within_bounded_time(bus):
    store = ObjectStore(bus, chunk_size=CHUNK, settle_s=0.5)
    data = blob(5 * CHUNK, seed=5)
    middle = await store.put(data, name="cut/middle")
    await bus.js.delete_msg(STREAM, (await chunk_seqs(bus, store, middle))[2])
    tail = await store.put(data, name="cut/tail")
    await bus.js.delete_msg(STREAM, (await chunk_seqs(bus, store, tail))[-1])
    gone = await store.put(data, name="cut/all")
    meta = await store.info(gone)
    await bus.js.purge_stream(STREAM, subject=f"$O.objects.C.{meta.nuid}")

    t0 = time.monotonic()
    # A missing middle chunk: the rest still add up to less than its size ...
    with pytest.raises(ObjectTruncated, match=r"cut/middle: only 4 of 5 chunks"):
        await store.get(middle)
    with pytest.raises(ObjectTruncated, match=r"cut/tail: only 4 of 5 chunks"):
        await store.get(tail)
    with pytest.raises(ObjectTruncated, match=r"cut/all: only 0 of 5 chunks"):
        await store.get(gone)
    with pytest.raises(ObjectTruncated):
        async with store.open(middle) as reader:
            await reader.read()
    assert time.monotonic() - t0 < 15


async def test_wrong_and_missing_refs_are_refused_with_their_name(bus):
    store = ObjectStore(bus)
    ref = await store.put(b"version one", name="cfg/current")
    with pytest.raises(ObjectNotFound, match=r"objects/no/such: not found"):
        await store.get("no/such")
    with pytest.raises(ObjectNotFound):
        await store.get({"bucket": "objects", "name": "no/such", "size": 3})
    with pytest.raises(InvalidRef, match="not an object reference"):
        await store.get({"nam": "cfg/current"})
    with pytest.raises(InvalidRef, match="not an object reference"):
        await store.get({"name": 5})
    with pytest.raises(InvalidRef, match="names are"):
        await store.get("has spaces")
    with pytest.raises(InvalidRef):
        await store.get(42)  # type: ignore[arg-type]
    with pytest.raises(WrongBucket, match=r"other/cfg/current: this store serves bucket "
                                          r"'objects', not 'other'"):
        await store.get(ObjRef(bucket="other", name="cfg/current"))
    with pytest.raises(WrongBucket):
        await store.get_to({"bucket": "secrets", "name": "x"}, "/tmp/never-written")
    # A ref is for the content it was made for: once the name holds other
    # content, the old ref is refused rather than answered with the new bytes.
    await store.put(b"version two", name="cfg/current")
    with pytest.raises(ObjectChanged, match="was replaced since the ref was made"):
        await store.get(ref)
    assert await store.get("cfg/current") == b"version two"
    await store.delete("cfg/current")
    with pytest.raises(ObjectNotFound, match="deleted"):
        await store.get("cfg/current")
    with pytest.raises(ObjectNotFound):
        await store.delete("cfg/current")


@pytest.mark.usefixtures("transfer")
async def test_puts_beyond_the_configured_limit_are_refused_and_leave_nothing(bus):
    store = ObjectStore(bus, chunk_size=CHUNK, max_object_bytes=100_000)
    before = (await stream_state(bus)).state.messages
    with pytest.raises(ObjectTooLarge, match=r"objects/huge: 100001 bytes is more than the "
                                             r"limit of 100000"):
        await store.put(b"x" * 100_001, name="huge")

    async def endless():
        while True:
            yield b"y" * 30_000
            await asyncio.sleep(0)

    with pytest.raises(ObjectTooLarge, match=r"objects/endless: more than the limit"):
        await store.put(endless(), name="endless")
    # The chunks the stream put before it went over are purged again.
    await eventually(lambda: _messages_are(bus, before), what="chunks purged")
    with pytest.raises(ObjectNotFound):
        await store.get("endless")
    assert (await store.put(b"z" * 100_000, name="just-fits")).size == 100_000
    # The default comes from the settings (JETFLEET_MAX_OBJECT_BYTES).
    limited = Settings.from_env({"JETFLEET_MAX_OBJECT_BYTES": "10"})
    assert limited.max_object_bytes == 10
    bus.settings, saved = limited, bus.settings
    try:
        with pytest.raises(ObjectTooLarge):
            await ObjectStore(bus).put(b"eleven bytes")
    finally:
        bus.settings = saved


async def _messages_are(bus, n: int) -> bool:
    return (await stream_state(bus)).state.messages == n


@pytest.mark.usefixtures("transfer")
async def test_objects_with_a_ttl_disappear_after_it(bus):
    store = ObjectStore(bus, chunk_size=CHUNK, ttl_grace_s=1)
    keep = await store.put(b"stays", name="keep")
    before = (await stream_state(bus)).state.messages
    ref = await store.put(blob(3 * CHUNK, seed=6), name="tmp/scratch", ttl=1.5)
    assert ref.expires_at is not None and 1 < ref.expires_at - time.time() <= 2.5
    assert [m.name for m in await store.list()] == ["keep", "tmp/scratch"]
    assert len(await store.get(ref)) == 3 * CHUNK

    await asyncio.sleep(ref.expires_at - time.time() + 0.05)
    # Past its expiry: refused and unlisted at once, whatever the server has done yet.
    with pytest.raises(ObjectNotFound, match="tmp/scratch"):
        await store.get(ref)
    assert [m.name for m in await store.list()] == ["keep"]
    # The server drops its meta record and chunks by their per-message TTL.
    await eventually(lambda: _messages_are(bus, before), timeout=15, what="TTL expiry")
    with pytest.raises(ObjectNotFound, match="tmp/scratch: not found"):
        await store.get(ref)
    assert await store.get(keep) == b"stays"
    with pytest.raises(ValueError, match="ttl must be a positive"):
        await store.put(b"x", ttl=0)


async def test_a_record_past_its_expiry_is_refused_before_the_server_drops_it(bus):
    store = ObjectStore(bus)
    ref = await store.put(b"old news", name="stale")
    meta = await store.info(ref)
    meta.metadata = {EXPIRES_KEY: rfc3339(time.time() - 1)}
    name = base64.urlsafe_b64encode(b"stale").decode()
    await bus.js.publish(f"$O.objects.M.{name}", msgspec.json.encode(meta),
                         headers={"Nats-Rollup": "sub"})
    with pytest.raises(ObjectExpired, match="objects/stale: expired"):
        await store.get(ref)
    assert "stale" not in [m.name for m in await store.list()]


async def test_the_streaming_reader_yields_the_object_in_order(bus):
    store = ObjectStore(bus, chunk_size=CHUNK)
    data = blob(6 * CHUNK + 999, seed=8)
    ref = await store.put(data, name="stream/me")
    chunks = []
    async with store.open(ref) as reader:
        assert reader.meta is not None and reader.meta.size == len(data)
        async for chunk in reader:
            chunks.append(chunk)
    assert [len(c) for c in chunks] == [CHUNK] * 6 + [999]
    assert b"".join(chunks) == data
    async with store.open(ref.name) as reader:
        head = await reader.read(10)
        middle = await reader.read(CHUNK + 5)
        rest = await reader.read()
        assert await reader.read() == b""
    assert head + middle + rest == data and len(middle) == CHUNK + 5
    # A reader never started holds nothing; an unknown name fails on first use.
    with pytest.raises(ObjectNotFound):
        async with store.open("stream/none"):
            pass


@pytest.mark.usefixtures("transfer")
async def test_get_to_writes_the_file_and_list_and_delete_agree(bus, tmp_path):
    store = ObjectStore(bus, chunk_size=CHUNK)
    data = blob(2 * CHUNK + 1, seed=9)
    ref = await store.put(data, name="out/file")
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "out.bin"
    assert await store.get_to(ref, target) == ref
    assert target.read_bytes() == data and list(target.parent.iterdir()) == [target]
    with pytest.raises(FileNotFoundError):
        await store.get_to(ref, tmp_path / "no" / "dir.bin")
    listed = await store.list()
    assert [m.ref() for m in listed] == [ref]
    await store.delete(ref)
    assert await store.list() == []
    meta = await _raw_meta(bus, "out/file")
    assert meta.deleted  # the standard delete marker, as nats-py and nats.go write it
    assert await chunk_seqs_of(bus, meta.nuid) == 0


async def _raw_meta(bus, name: str) -> ObjectMeta:
    subject = "$O.objects.M." + base64.urlsafe_b64encode(name.encode()).decode()
    msg = await bus.js.get_last_msg(STREAM, subject)
    return msgspec.json.decode(msg.data, type=ObjectMeta)


async def chunk_seqs_of(bus, nuid: str) -> int:
    info = await bus.js.stream_info(STREAM, subjects_filter=f"$O.objects.C.{nuid}")
    return sum((info.state.subjects or {}).values())


@pytest.mark.usefixtures("transfer")
async def test_many_transfers_at_once_on_one_connection(bus):
    store = ObjectStore(bus, chunk_size=CHUNK, window=4)
    datas = [blob(CHUNK * (i + 1) + i, seed=20 + i) for i in range(6)]
    refs = await asyncio.gather(*(store.put(d, name=f"many/{i}") for i, d in enumerate(datas)))
    got = await asyncio.gather(*(store.get(r) for r in refs))
    assert got == datas


@pytest.mark.usefixtures("transfer")
async def test_puts_of_one_name_racing_leave_only_the_winners_chunks(bus):
    """Each put replaces the record it read (compare-and-set) and purges exactly
    the chunks it replaced: no orphan chunks, whoever wins."""
    stores = [ObjectStore(bus, chunk_size=CHUNK) for _ in range(5)]
    datas = [blob(3 * CHUNK + 1 + i, seed=40 + i) for i in range(5)]  # 4 chunks each
    before = (await stream_state(bus)).state.messages
    refs = await asyncio.gather(*(s.put(d, name="contested")
                                  for s, d in zip(stores, datas, strict=True)))
    meta = await stores[0].info("contested")
    winner = [r for r in refs if r.digest == meta.digest]
    assert len(winner) == 1
    assert await stores[0].get("contested") == datas[refs.index(winner[0])]
    # One meta record and the winner's four chunks are all that is left.
    await eventually(lambda: _messages_are(bus, before + 1 + 4), what="losers purged")
    assert await chunk_seqs_of(bus, meta.nuid) == 4


async def test_a_server_that_goes_away_is_an_error_not_a_hang(settings, nats_server):
    bus = await connect(settings, name="doomed")
    try:
        store = ObjectStore(bus, stall_s=2)
        ref = await store.put(b"data", name="soon/gone")
        nats_server.kill()
        t0 = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            await store.get(ref)
        with pytest.raises(ObjectStoreUnavailable):
            await store.put(b"more")
        assert time.monotonic() - t0 < 30
    finally:
        with contextlib.suppress(Exception):
            await bus.nc.close()


async def test_a_large_object_moves_over_a_data_link_that_nats_py_agrees_with(bus, tmp_path):
    """An object of LINK_MIN_BYTES or more goes over a data link of its own by
    default (put, get and get_to), in the standard layout: nats-py reads what
    it put, and jetfleet reads what nats-py put."""
    store = ObjectStore(bus)
    data = blob(objects_module.LINK_MIN_BYTES + 3 * 1024 + 7, seed=50)
    ref = await store.put(data, name="big/one")
    assert ref.digest == sha(data) and ref.size == len(data)
    assert await store.get(ref) == data
    await store.get_to(ref, tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == data
    assert store.links_used == 3 and store.link_unavailable is None
    natspy = await bus.js.object_store(topology.OBJECTS)
    assert (await natspy.get("big/one")).data == data
    other = blob(len(data) - 1, seed=51)
    await natspy.put("big/two", other)
    assert await store.get("big/two") == other
    assert store.links_used == 4
    # Small objects stay on the bus's connection; links can be turned off.
    await store.get(await store.put(b"small", name="big/small"))
    off = ObjectStore(bus, data_links=False)
    assert await off.get(ref) == data
    assert store.links_used == 4 and off.links_used == 0


async def test_a_server_frozen_mid_transfer_is_an_error_on_the_link_and_cancel_ends_it(
        bus, nats_server):
    """SIGSTOP the server once a get's data link is open (64 MiB: far more than
    can move before the signal lands): the get fails with
    ObjectStoreUnavailable after stall_s, not later and not never; a cancelled
    transfer closes its link, so its thread ends at once."""
    import signal
    import threading

    ref = await ObjectStore(bus).put(blob(64 << 20, seed=52), name="frozen/one")
    store = ObjectStore(bus, stall_s=1.5, link_min_bytes=0)

    async def frozen_while(run):
        task = asyncio.ensure_future(run())
        while store.links_used == 0 and not task.done():
            await asyncio.sleep(0)
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        return task

    try:
        t0 = time.monotonic()
        task = await frozen_while(lambda: store.get(ref))
        with pytest.raises(ObjectStoreUnavailable, match=r"frozen/one: no data from the "
                                                         r"server for 1.5s"):
            await task
        assert 1.4 < time.monotonic() - t0 < 10
        assert store.links_used == 1 and store.link_unavailable is None
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)

    store.links_used = 0
    try:
        task = await frozen_while(lambda: store.get(ref))
        await asyncio.sleep(0.2)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 1.0  # not the 1.5 s stall
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    await eventually(lambda: _no_link_threads(threading), what="link thread ended")
    # The server and the bus are fine afterwards.
    assert await store.get(ref) == blob(64 << 20, seed=52)


async def test_where_no_data_link_can_be_opened_the_bus_connection_carries_it(tmp_path):
    """A server that takes one connection only (max_connections: 1) refuses the
    link; the transfer goes over the bus's own connection instead, and the
    store says why."""
    from bus.server import EmbeddedServer

    with EmbeddedServer(tmp_path / "nats", extra_config="max_connections: 1") as server:
        bus = await connect(Settings(), url=server.url)
        try:
            store = ObjectStore(bus, link_min_bytes=0)
            data = blob(3 * CHUNK, seed=53)
            assert await store.get(await store.put(data, name="one/conn")) == data
            assert store.links_used == 0
            assert "maximum connections" in (store.link_unavailable or "")
        finally:
            await bus.close()


async def _no_link_threads(threading) -> bool:
    return not any(t.name.startswith("jetfleet-data") for t in threading.enumerate())


def test_the_objects_cli_end_to_end(procs, tmp_path: Path):
    src = tmp_path / "in.bin"
    data = os.urandom(2_500_000)
    src.write_bytes(data)
    put = procs.cli("objects", "put", str(src), "--name", "cli/in.bin", "--ttl", "600")
    assert put.returncode == 0, put.stderr
    ref = json.loads(put.stdout)
    assert ref["bucket"] == "objects" and ref["name"] == "cli/in.bin"
    assert ref["size"] == len(data) and ref["digest"] == sha(data) and ref["expires_at"]

    listed = procs.cli("objects", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(o["name"], o["size"]) for o in json.loads(listed.stdout)] == [
        ("cli/in.bin", len(data))]
    shown = procs.cli("objects", "ls")
    assert "cli/in.bin" in shown.stdout and "2.4 MiB" in shown.stdout

    out = tmp_path / "out.bin"
    got = procs.cli("objects", "get", "cli/in.bin", "-o", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == data
    # The printed ref itself (JSON) is accepted where a name is; - is stdout.
    note = tmp_path / "note.txt"
    note.write_text("hello objects\n" * 1000)
    note_ref = procs.cli("objects", "put", str(note))
    assert note_ref.returncode == 0, note_ref.stderr
    again = procs.cli("objects", "get", note_ref.stdout, "-o", "-")
    assert again.returncode == 0 and again.stdout == note.read_text()
    procs.cli("objects", "rm", json.loads(note_ref.stdout)["name"])

    assert procs.cli("objects", "rm", "cli/in.bin").returncode == 0
    for argv, message in [
        (("objects", "get", "cli/in.bin", "-o", str(tmp_path / "x")),
         "jetfleet: object objects/cli/in.bin: not found (it was deleted)"),
        (("objects", "rm", "never/was"), "jetfleet: object objects/never/was: not found"),
        (("objects", "put", str(tmp_path / "missing")), "jetfleet: "),
        (("objects", "put", str(src), "--ttl", "0"), "jetfleet: --ttl 0: give a positive"),
        (("objects", "get", '{"bucket": "other", "name": "x"}', "-o", str(tmp_path / "y")),
         "jetfleet: object other/x: this store serves bucket 'objects', not 'other'"),
        (("objects", "put", str(src), "--name", "bad name"), "jetfleet: object 'bad name'"),
    ]:
        res = procs.cli(*argv)
        assert res.returncode != 0, argv
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (argv, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
