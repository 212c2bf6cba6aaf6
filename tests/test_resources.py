"""Versioned shared resources (KV `resources`): every put is the next version,
a reader gets the latest or a pinned one, a watcher sees each new version,
large values live in the object store by reference."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path

import pytest

from bus.objects import ObjectNotFound, ObjectStore
from bus.resources import (
    InvalidResource,
    ResourceNotFound,
    ResourceStore,
    ResourceVersionGone,
)
from tests.conftest import eventually


async def test_each_put_is_the_next_version_and_a_version_can_be_pinned(bus):
    res = ResourceStore(bus)
    v1 = await res.put("prompt/system", {"text": "be brief"}, description="first")
    v2 = await res.put("prompt/system", {"text": "be very brief"})
    assert (v1.version, v2.version) == (1, 2)
    assert v1.ref is None and v1.kind == "json" and v1.description == "first"

    latest = await res.get("prompt/system")
    assert latest.version == 2 and latest.value == {"text": "be very brief"}
    pinned = await res.get("prompt/system", version=1)
    assert pinned.version == 1 and pinned.value == {"text": "be brief"}
    assert [r.version for r in await res.versions("prompt/system")] == [1, 2]
    # The instance remembers what it read, for the job record.
    assert res.reads == {"prompt/system": [2, 1]}

    await res.put("temperature", 0.2)
    assert [(r.name, r.version) for r in await res.list()] == [
        ("prompt/system", 2), ("temperature", 1)]
    assert (await res.get("temperature")).value == 0.2

    with pytest.raises(ResourceNotFound, match=r"prompt/system has no version 3 \(the latest is 2\)"):
        await res.get("prompt/system", version=3)
    with pytest.raises(ResourceNotFound, match="no resource 'missing'"):
        await res.get("missing")
    with pytest.raises(InvalidResource, match="resource name"):
        await res.put("bad name", 1)
    with pytest.raises(InvalidResource, match="resource name"):
        await res.get(".hidden")
    with pytest.raises(InvalidResource, match="not both"):
        await res.put("x", 1, data=b"2")
    with pytest.raises(InvalidResource, match="not JSON"):
        await res.put("x", {"when": object()})


async def test_writers_racing_never_make_the_same_version(settings, bus):
    from bus.connection import connect

    others = [await connect(settings, name=f"w{i}") for i in range(3)]
    try:
        stores = [ResourceStore(b) for b in [bus, *others]]
        made = await asyncio.gather(*(s.put("counter", i) for i, s in
                                      enumerate(stores * 3)))
    finally:
        for b in others:
            await b.close()
    assert sorted(r.version for r in made) == list(range(1, 13))
    kept = await ResourceStore(bus).versions("counter")
    assert [r.version for r in kept] == list(range(1, 13))


async def test_large_values_travel_by_reference(bus, tmp_path):
    res = ResourceStore(bus, inline_limit=1000)
    big = {"rows": [random.Random(1).random() for _ in range(500)]}
    rec = await res.put("table", big)
    assert rec.ref is not None and rec.kind == "json" and rec.value is None
    assert rec.ref.name.startswith("resources/table/")
    # The object is in the store, digest and all; the record holds only its ref.
    objects = ObjectStore(bus)
    assert json.loads(bytes(await objects.get(rec.ref))) == big
    assert (await res.get("table")).value == big

    weights = random.Random(2).randbytes(300_000)
    path = tmp_path / "w.bin"
    path.write_bytes(weights)
    w = await res.put("weights", data=path)
    assert w.kind == "bytes" and w.ref is not None and w.size == len(weights)
    got = await res.get("weights")
    assert got.value == weights
    out = tmp_path / "copy.bin"
    await res.get_to("weights", out)
    assert out.read_bytes() == weights
    small = await res.put("tiny", data=b"\x00\x01 small bytes")
    assert small.ref is None and (await res.get("tiny")).value == b"\x00\x01 small bytes"


async def test_versions_beyond_the_history_are_gone_and_their_objects_deleted(bus):
    res = ResourceStore(bus, inline_limit=10)
    kv = await bus.kv("resources")
    keep = (await kv.status()).history
    first = await res.put("rolling", "x" * 100)
    assert first.ref is not None
    for i in range(keep):
        await res.put("rolling", f"{i:0>100}")
    kept = await res.versions("rolling")
    assert [r.version for r in kept] == list(range(2, keep + 2))
    with pytest.raises(ResourceVersionGone, match="rolling version 1 is no longer kept"):
        await res.get("rolling", version=1)
    # The object of the version that fell out of the history is deleted with it.
    with pytest.raises(ObjectNotFound):
        await ObjectStore(bus).get(first.ref)
    assert (await res.get("rolling", version=2)).value == f"{0:0>100}"


async def test_watch_yields_each_new_version_in_order(bus):
    res = ResourceStore(bus, poll_s=0.5)
    await res.put("model", {"path": "v1"})
    seen: list[tuple[int, object]] = []

    async def follow() -> None:
        async for r in res.watch("model"):
            seen.append((r.version, r.value))
            if r.version == 4:
                return

    task = asyncio.create_task(follow())
    await eventually(lambda: seen, what="the current version")
    assert seen == [(1, {"path": "v1"})]
    writer = ResourceStore(bus)
    await writer.put("model", {"path": "v2"})
    await eventually(lambda: len(seen) == 2, what="version 2")
    # Two puts in a row: both are yielded, in order, none skipped.
    await writer.put("model", {"path": "v3"})
    await writer.put("model", {"path": "v4"})
    await asyncio.wait_for(task, 10)
    assert [v for v, _ in seen] == [1, 2, 3, 4]
    assert seen[-1] == (4, {"path": "v4"})
    assert res.reads == {"model": [1, 2, 3, 4]}

    # A watcher that starts after the current version waits for the next.
    later: list[int] = []

    async def follow_new() -> None:
        async for r in res.watch("model", current=False):
            later.append(r.version)
            return

    task = asyncio.create_task(follow_new())
    await asyncio.sleep(0.3)
    assert later == []
    await writer.put("model", {"path": "v5"})
    await asyncio.wait_for(task, 10)
    assert later == [5]


async def test_a_watch_outlives_a_server_restart(settings, nats_server):
    """KV watchers can go silent after a server restart (nats.py #510); this
    one reconnects with its connection and catches up by polling the bucket."""
    from bus.connection import connect

    watching = await connect(settings, name="watcher")
    try:
        res = ResourceStore(watching, poll_s=0.5)
        await res.put("cfg", 1)
        gen = res.watch("cfg")
        assert (await gen.__anext__()).version == 1
        nats_server.stop()
        nats_server.start()
        writer = await connect(settings, name="writer")
        try:
            await ResourceStore(writer).put("cfg", 2)
        finally:
            await writer.close()
        got = await asyncio.wait_for(gen.__anext__(), 30)
        assert (got.version, got.value) == (2, 2)
        await gen.aclose()
    finally:
        with contextlib.suppress(Exception):
            await watching.close()


def test_the_resources_cli_end_to_end(procs, tmp_path: Path):
    put = procs.cli("resources", "put", "prompt", "--value", '{"system": "be brief"}')
    assert put.returncode == 0, put.stderr
    assert "prompt version 1 (json" in put.stdout and "inline" in put.stdout
    assert procs.cli("resources", "put", "prompt", "--value", '"v2"').returncode == 0
    blob = tmp_path / "weights.bin"
    data = random.Random(3).randbytes(200_000)
    blob.write_bytes(data)
    put = procs.cli("resources", "--json", "put", "weights", str(blob))
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["ref"]["name"].startswith("resources/weights/")

    got = procs.cli("resources", "get", "prompt")
    assert got.returncode == 0 and json.loads(got.stdout) == "v2"
    got = procs.cli("resources", "get", "prompt", "--version", "1")
    assert got.returncode == 0 and json.loads(got.stdout) == {"system": "be brief"}
    out = tmp_path / "out.bin"
    got = procs.cli("resources", "get", "weights", "-o", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == data

    ls = procs.cli("resources", "--json", "ls")
    assert ls.returncode == 0, ls.stderr
    assert [(r["name"], r["version"], r["kind"]) for r in json.loads(ls.stdout)] == [
        ("prompt", 2, "json"), ("weights", 1, "bytes")]
    versions = procs.cli("resources", "--json", "ls", "prompt")
    assert [r["version"] for r in json.loads(versions.stdout)] == [1, 2]

    for argv, message in [
        (("resources", "get", "nope"), "jetfleet: no resource 'nope'"),
        (("resources", "get", "prompt", "--version", "9"),
         "jetfleet: resource prompt has no version 9"),
        (("resources", "get", "weights"), "jetfleet: resource weights version 1 is binary"),
        (("resources", "put", "x", "--value", "{nope"), "jetfleet: --value is not valid JSON"),
        (("resources", "put", "x"), "jetfleet: give FILE or --value"),
        (("resources", "put", "bad name", "--value", "1"), "jetfleet: resource name"),
        (("resources", "put", "x", str(tmp_path / "missing")), "jetfleet: "),
    ]:
        res = procs.cli(*argv)
        assert res.returncode != 0, argv
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (argv, res.stderr)
