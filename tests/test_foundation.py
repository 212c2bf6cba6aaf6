"""The walking skeleton: raw JSON in, events and KV state out, on a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

from agents.worker import App, JobContext
from bus import codec, kvread, topology
from bus.codec import DecodeError
from schemas.jobs import JobState, JobSubmission
from tests.helpers import eventually, job_events, state_is


async def test_raw_json_echo_end_to_end(bus, components):
    await components.dispatcher()
    await components.worker()
    # A plain core-NATS publish, as `nats pub` does: the JOBS stream captures it.
    await bus.nc.publish(topology.SUBMIT,
                         b'{"job_id": "j1", "capability": {"type": "echo"}, "payload": {"a": 1}}',
                         headers={"Nats-Msg-Id": "j1"})
    kv = await bus.kv(topology.KV_JOBS)

    async def done():
        try:
            return codec.decode((await kv.get("j1")).value, JobState).state == "succeeded"
        except Exception:
            return False

    await eventually(done, what="j1 succeeded")
    events = await job_events(bus, "j1")
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["submitted", "queued"]
    succeeded = [e for e in events if e["kind"] == "succeeded"]
    assert len(succeeded) == 1
    assert succeeded[0]["result"] == {"a": 1}
    running = next(e for e in events if e["kind"] == "running")
    # All events of the attempt carry its number and the advertised worker id.
    assert succeeded[0]["attempt"] == running["attempt"] == 1
    adverts = await kvread.keys(await bus.kv(topology.KV_CAPABILITIES))
    assert succeeded[0]["worker_id"] in adverts
    for e in events:
        assert {"kind", "job_id", "ts"} <= e.keys() and e["job_id"] == "j1"


async def test_least_message_and_jetstream_publish(bus, components, client):
    await components.dispatcher()
    await components.worker()
    ack = await bus.js.publish(topology.SUBMIT, b'{"capability": {"type": "echo"}}')
    job_id = await eventually(lambda: _first_job(client), what="a generated job id")
    state = await client.wait(job_id, timeout=20)
    assert state.state == "succeeded" and state.result == {}
    assert ack.stream == topology.JOBS


async def _first_job(client):
    jobs = await client.list_jobs()
    return jobs[0].job_id if jobs else None


async def test_sdk_round_trip_and_progress(components, client):
    await components.dispatcher()
    await components.worker()
    assert await client.run("echo", {"x": [1, 2]}, timeout=20) == {"x": [1, 2]}
    job_id = await client.submit("sleep", {"seconds": 0.5, "steps": 5})
    kinds = [type(e).__struct_config__.tag async for e in client.events(job_id, timeout=20)]
    assert kinds.count("progress") == 5 and kinds[-1] == "succeeded"
    state = await client.status(job_id)
    assert state.progress == 1.0 and state.attempts[0].outcome == "succeeded"


@pytest.mark.parametrize("same_msg_id", [True, False])
async def test_same_job_id_runs_once(bus, components, client, same_msg_id):
    await components.dispatcher()
    await components.worker()
    body = b'{"job_id": "dup1", "capability": {"type": "echo"}, "payload": {"n": 1}}'
    await bus.js.publish(topology.SUBMIT, body, headers={"Nats-Msg-Id": "dup1"})
    await client.wait("dup1", timeout=20)
    # Again, after it finished: same id in the body, same or another Nats-Msg-Id.
    await bus.js.publish(topology.SUBMIT, body,
                         headers={"Nats-Msg-Id": "dup1" if same_msg_id else "other-id"})
    await bus.js.publish(topology.SUBMIT, body)
    await asyncio.sleep(1.5)
    kinds = [e["kind"] for e in await job_events(bus, "dup1")]
    assert kinds.count("succeeded") == 1 and kinds.count("running") == 1
    # Each copy that reached the dispatcher was recorded as a duplicate (one with
    # the same Nats-Msg-Id is dropped by the stream itself, before it).
    assert kinds.count("duplicate") == (1 if same_msg_id else 2), kinds


async def test_malformed_input_is_dead_lettered_and_the_next_job_runs(bus, components, client):
    await components.dispatcher(unschedulable_after_s=0.5)
    await components.worker()
    bad = [
        (b"\xff\xfenot json", "not valid JSON"),
        (b'{"capability": "echo"}', "invalid message"),
        (b'{"job_id": "neg", "capability": {"type": "echo"}, "priority": -1}', "priority"),
        (b'{"job_id": "typo", "capability": {"type": "echo"}, "priorty": 1}', "priorty"),
        (b'{"job_id": "bad.id", "capability": {"type": "echo"}}', "job_id"),
        (b'{"capability": {"type": "Not A Type"}}', "capability.type"),
    ]
    for raw, _ in bad:
        await bus.js.publish(topology.SUBMIT, raw)
    big = json.dumps({"job_id": "big", "capability": {"type": "echo"},
                      "payload": {"blob": "x" * (bus.settings.max_payload_bytes + 10)}}).encode()
    await bus.js.publish(topology.SUBMIT, big)
    await bus.js.publish(topology.SUBMIT,
                         b'{"job_id": "nobody", "capability": {"type": "no.such.thing"}}')
    ok = await client.submit("echo", {"still": "works"})
    assert (await client.wait(ok, timeout=20)).result == {"still": "works"}

    letters = await _dead_letters(bus, expect=len(bad) + 1)
    reasons = [letter["reason"] for letter in letters]
    for _, fragment in bad:
        assert any(fragment in r for r in reasons), (fragment, reasons)
    assert any("payload_ref" in r for r in reasons)
    assert all(letter["raw"] for letter in letters)  # the raw bytes are kept
    # Where the job id could be read, its submitter hears why on its subject.
    neg = await client.wait("neg", timeout=10)
    assert neg.state == "failed" and neg.error.code == "invalid_submission"
    big_state = await client.wait("big", timeout=10)
    assert big_state.error.code == "payload_too_large"
    nobody = await eventually(lambda: state_is(client, "nobody", "unschedulable"))
    assert "no.such.thing" in nobody.reason


async def _dead_letters(bus, expect):
    sub = await bus.js.subscribe(topology.DEAD_ALL, ordered_consumer=True)
    out = []
    try:
        while len(out) < expect:
            msg = await sub.next_msg(timeout=10)
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def test_unschedulable_then_scheduled_when_a_worker_appears(bus, components, client):
    await components.dispatcher(unschedulable_after_s=0.5)
    await components.worker()  # echo and sleep only
    job_id = await client.submit({"type": "translate", "lang": "fr"}, {"text": "hello"})
    state = await eventually(lambda: state_is(client, job_id, "unschedulable"))
    assert "translate" in state.reason

    app = App()

    @app.capability(type="translate", lang="fr")
    async def translate(ctx: JobContext) -> dict:
        return {"text": "bonjour"}

    await components.worker(app)
    state = await client.wait(job_id, timeout=20, keep_waiting=True)
    assert state.state == "succeeded" and state.result == {"text": "bonjour"}
    kinds = [e["kind"] for e in await job_events(bus, job_id)]
    # Queued again by the dispatcher's sweep, or taken first by the new worker.
    assert kinds.index("unschedulable") < kinds.index("running") < kinds.index("succeeded")


async def test_cancel_a_running_sleep(bus, components, client):
    await components.dispatcher()
    await components.worker()
    job_id = await client.submit("sleep", {"seconds": 30, "steps": 30})
    await eventually(lambda: state_is(client, job_id, "running"))
    await client.cancel(job_id, reason="changed my mind")
    state = await client.wait(job_id, timeout=15)
    assert state.state == "cancelled" and state.reason == "changed my mind"
    kinds = [e["kind"] for e in await job_events(bus, job_id)]
    assert kinds.count("cancelled") == 1 and "succeeded" not in kinds


async def test_cancel_before_it_runs(bus, components, client):
    await components.dispatcher()
    job_id = await client.submit("sleep", {"seconds": 30})
    await eventually(lambda: state_is(client, job_id, "queued"))
    await client.cancel(job_id)
    state = await client.wait(job_id, timeout=10)
    assert state.state == "cancelled"
    await components.worker()  # the queued message is dropped, not run
    await asyncio.sleep(1.5)
    kinds = [e["kind"] for e in await job_events(bus, job_id)]
    assert "running" not in kinds


def test_submission_schema_is_strict():
    with pytest.raises(DecodeError, match="priority"):
        codec.decode(b'{"capability": {"type": "echo"}, "priority": 7}', JobSubmission)
    sub = codec.decode(b'{"capability": {"type": "echo"}}', JobSubmission)
    assert sub.priority == 1 and sub.max_attempts == 3 and sub.job_id is None
