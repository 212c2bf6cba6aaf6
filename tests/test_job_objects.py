"""Large payloads and results travel by reference, and the resources a job read
are recorded with its attempt (real nats-server, real worker)."""

from __future__ import annotations

from agents.worker import App, JobContext
from bus.objects import ObjectStore
from bus.resources import ResourceStore

app = App("big")


@app.capability(type="bigin")
async def bigin(ctx: JobContext, p: dict) -> dict:
    return {"n": len(p["blob"])}


@app.capability(type="bigout")
async def bigout(ctx: JobContext, p: dict) -> dict:
    return {"blob": "y" * p["n"]}


@app.capability(type="wants-big")
async def wants_big(ctx: JobContext, p: dict) -> dict:
    got = await ctx.call("bigout", {"n": p["n"]}, timeout=30)
    return {"len": len(got["blob"])}


@app.capability(type="prompted")
async def prompted(ctx: JobContext, p: dict) -> str:
    res = await ctx.resources.get("prompt")
    return str(res.value)


async def test_a_large_payload_and_result_travel_by_reference(bus, components, client):
    await components.dispatcher()
    await components.worker(app)
    blob = "x" * (3 << 20)  # over the 1 MiB submission limit
    job = await client.submit("bigin", {"blob": blob})
    state = await client.wait(job, timeout=30)
    assert state.state == "succeeded" and state.result == {"n": len(blob)}
    job = await client.submit("bigout", {"n": 2 << 20})
    state = await client.wait(job, timeout=30)
    assert state.state == "succeeded" and state.result is None
    assert state.result_ref is not None and state.result_ref.size > 2 << 20
    assert (await client.result(job)) == {"blob": "y" * (2 << 20)}
    kept = await ObjectStore(bus).get(state.result_ref)
    assert len(kept) == state.result_ref.size
    # A child's large result reaches its parent through ctx.call too.
    state = await client.wait(await client.submit("wants-big", {"n": 1 << 20}), timeout=30)
    assert state.result == {"len": 1 << 20}


async def test_the_resource_versions_a_job_read_are_recorded(bus, components, client):
    await components.dispatcher()
    await components.worker(app)
    store = ResourceStore(bus)
    await store.put("prompt", "be brief")
    v2 = await store.put("prompt", "be briefer")
    state = await client.wait(await client.submit("prompted", {}), timeout=30)
    assert state.result == "be briefer"
    assert state.attempts[-1].resources_read == {"prompt": [v2.version]}
