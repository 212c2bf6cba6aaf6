"""Calls between capabilities and for clients: objects crossing worker
processes by reference, a chain of three calls, and `jetfleet call` with the
exit status of each ending."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from bus import codec
from sdk.objects import Objects
from tests.conftest import Procs
from tests.helpers import eventually, state_is

# Three capabilities in two worker processes: first (A) -> second (B) -> third (A).
# Each object is larger than a submission may be, so only a reference can carry it.
CHAIN = """\
import hashlib
from typing import Any
import msgspec
from agents.worker import App, JobContext
from bus import codec
from schemas.common import ObjRef

SIZE = 2 * 1024 * 1024

class Ref(msgspec.Struct):
    data: ObjRef
    seen: list[str] = []

a = App("chain-a")
b = App("chain-b")

def step(ctx: JobContext, p: Ref) -> list[str]:
    return [*p.seen, f"{ctx.item.capability['type']}@{ctx.worker_id}"]

@a.capability(type="chain.first")
async def first(ctx: JobContext, p: dict[str, Any]) -> dict[str, Any]:
    blob = bytes(range(256)) * (SIZE // 256)
    ref = await ctx.objects.put(blob, name=f"chain/{ctx.job_id}")
    return await ctx.call("chain.second", {"data": codec.to_builtins(ref),
                                           "seen": [f"chain.first@{ctx.worker_id}"]})

@b.capability(type="chain.second")
async def second(ctx: JobContext, p: Ref) -> dict[str, Any]:
    data = bytes(await ctx.objects.get(p.data))
    ref = await ctx.objects.put(data[::-1], name=f"chain/{ctx.job_id}")
    return await ctx.call("chain.third", {"data": codec.to_builtins(ref), "seen": step(ctx, p)})

@a.capability(type="chain.third")
async def third(ctx: JobContext, p: Ref) -> dict[str, Any]:
    data = bytes(await ctx.objects.get(p.data))
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "seen": step(ctx, p), "ref": codec.to_builtins(p.data)}
"""

# Objects across two processes: one makes, the other reads.
MAKER = """\
from typing import Any
from agents.worker import App, JobContext
from bus import codec

maker = App("maker")
reader = App("reader")

@maker.capability(type="obj.make")
async def make(ctx: JobContext, p: dict[str, Any]) -> dict[str, Any]:
    ref = await ctx.objects.put(p["text"].encode() * p["times"], name=f"made/{ctx.job_id}")
    return {"ref": codec.to_builtins(ref), "worker": ctx.worker_id}

@reader.capability(type="obj.read")
async def read(ctx: JobContext, p: dict[str, Any]) -> dict[str, Any]:
    data = await ctx.objects.get(p["ref"])
    return {"size": len(data), "head": bytes(data[:16]).decode(), "worker": ctx.worker_id}
"""


def _worker(procs: Procs, folder: Path, spec: str, worker_id: str) -> None:
    procs.run("worker", "--app", spec, "--no-builtin", "--no-kernels", "--worker-id", worker_id,
              env={"PYTHONPATH": f"{folder}:{procs.env['PYTHONPATH']}"}, name=worker_id)


async def _serving(client: Any, *worker_ids: str) -> bool:
    live = {a.worker_id for a in await client.workers()}
    return all(w in live for w in worker_ids)


async def test_objects_cross_two_worker_processes(components, procs, client,
                                                  tmp_path: Path) -> None:
    (tmp_path / "makers.py").write_text(MAKER)
    await components.dispatcher()
    _worker(procs, tmp_path, "makers:maker", "w-maker")
    _worker(procs, tmp_path, "makers:reader", "w-reader")
    await eventually(lambda: _serving(client, "w-maker", "w-reader"), timeout=30,
                     what="both workers")
    made = await client.call("obj.make", {"text": "jetfleet ", "times": 100_000}, timeout=30)
    assert made["worker"] == "w-maker" and made["ref"]["size"] == 900_000
    read = await client.call("obj.read", {"ref": made["ref"]}, timeout=30)
    assert read == {"size": 900_000, "head": "jetfleet jetflee", "worker": "w-reader"}
    # The reader checks the digest: a ref that names other content is refused.
    forged = {**made["ref"], "digest": "SHA-256=" + "A" * 43 + "="}
    job = await client.submit("obj.read", {"ref": forged}, max_attempts=1)
    state = await client.wait(job, timeout=30)
    assert state.state in ("failed", "dead"), state
    assert state.error is not None and "digest" in state.error.message, state.error


async def test_a_chain_of_three_capabilities_passes_objects_by_reference(
        components, procs, client, bus, tmp_path: Path) -> None:
    (tmp_path / "chain3.py").write_text(CHAIN)
    await components.dispatcher()
    _worker(procs, tmp_path, "chain3:a", "w-a")
    _worker(procs, tmp_path, "chain3:b", "w-b")
    await eventually(lambda: _serving(client, "w-a", "w-b"), timeout=30, what="both workers")
    job = await client.submit("chain.first", {})
    state = await client.wait(job, timeout=60)
    assert state.state == "succeeded", state.error
    out = state.result
    size = 2 * 1024 * 1024
    blob = (bytes(range(256)) * (size // 256))[::-1]
    assert out["size"] == size and out["sha256"] == hashlib.sha256(blob).hexdigest()
    # Each hop ran where its capability lives, across both processes.
    assert out["seen"] == ["chain.first@w-a", "chain.second@w-b", "chain.third@w-a"]
    # The children are linked to their parents, one level deeper each.
    jobs = {s.capability["type"]: s for s in await client.list_jobs()}
    first, second, third = jobs["chain.first"], jobs["chain.second"], jobs["chain.third"]
    assert (first.depth, second.depth, third.depth) == (0, 1, 2)
    assert second.parent_job_id == first.job_id and third.parent_job_id == second.job_id
    # What the last hop read is the object the second one stored, read back the same.
    data = await Objects(bus).get(out["ref"])
    assert hashlib.sha256(bytes(data)).hexdigest() == out["sha256"]


# ---- jetfleet call ------------------------------------------------------------------------


async def _cli(procs: Procs, *args: str, timeout: float = 60) -> Any:
    return await asyncio.to_thread(procs.cli, "call", *args, timeout=timeout)


def _one_line(out: Any) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


async def test_jetfleet_call_exit_statuses(components, procs, client, bus) -> None:
    await components.dispatcher(unschedulable_after_s=1.0)
    await components.worker()  # echo and sleep, in this process
    ok = await _cli(procs, "echo", "--payload", '{"hello": "call"}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"hello": "call"} and ok.stdout.count("\n") == 1
    whole = await _cli(procs, "echo", "--payload", '{"a": 1}', "--json")
    assert whole.returncode == 0 and json.loads(whole.stdout)["state"] == "succeeded"

    failed = await _cli(procs, "sleep", "--payload", '{"seconds": 0, "fail_attempts": 5}',
                        "--max-attempts", "1")
    assert failed.returncode == 1
    assert "requested_failure" in _one_line(failed)

    nobody = await _cli(procs, "nobody.home", "--payload", "{}")
    assert nobody.returncode == 3
    line = _one_line(nobody)
    assert "unschedulable" in line and "no live worker advertises" in line
    job_id = line.split(" job ")[1].split()[0]
    await eventually(lambda: state_is(client, job_id, "cancelled"), timeout=10,
                     what="the unschedulable call cancelled")

    slow = await _cli(procs, "sleep", "--payload", '{"seconds": 30}', "--timeout", "1")
    assert slow.returncode == 4
    line = _one_line(slow)
    slow_id = line.split(" job ")[1].split()[0]
    assert "did not finish within 1s" in line and f"jetfleet status {slow_id}" in line
    assert (await client.status(slow_id)).state in ("queued", "running")  # type: ignore[union-attr]
    await client.cancel(slow_id)

    bad = await _cli(procs, "echo", "--payload", "[1, 2]")
    assert bad.returncode == 2 and "JSON object" in _one_line(bad)
    bad = await _cli(procs, "Not A Type")
    assert bad.returncode == 2 and "capability type" in _one_line(bad)
    del bus


async def test_client_call_is_run(components, client) -> None:
    await components.dispatcher()
    await components.worker()
    assert await client.call("echo", {"x": [1, 2]}, timeout=20) == {"x": [1, 2]}
    assert codec.to_builtins(await client.run("echo", {"y": 1}, timeout=20)) == {"y": 1}
