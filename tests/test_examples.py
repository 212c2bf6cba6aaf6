"""The examples run as examples/README.md says: a real node agent with the
example's apps.toml starts their workers, and real inputs go through them."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
import wave
from pathlib import Path

from PIL import Image

from bus import codec
from sdk.objects import Objects
from tests.conftest import ROOT
from tests.helpers import eventually, overlaps
from tests.test_on_demand import NodeEvents, agent

EXAMPLES = ROOT / "examples"


async def test_image_chain_thumbnail_describe_report(components, procs, client, bus) -> None:
    sys.path.insert(0, str(EXAMPLES / "images"))
    try:
        from testcard import testcard
    finally:
        sys.path.remove(str(EXAMPLES / "images"))
    await components.dispatcher()
    events = await NodeEvents(bus, "n-images").start()
    agent(procs, "n-images", EXAMPLES / "images" / "apps.toml")
    objects = Objects(bus)
    photo = testcard()
    ref = await objects.put(photo, name="inputs/testcard.jpg")
    out = await client.call("image.thumbnail", {"image": codec.to_builtins(ref)}, timeout=60)

    assert out["source"] == {"width": 1024, "height": 768, "format": "JPEG", "mode": "RGB"}
    thumb = Image.open(io.BytesIO(bytes(await objects.get(out["thumbnail"]))))
    assert thumb.format == "PNG" and thumb.size == (128, 96)
    stats = out["stats"]
    assert (stats["width"], stats["height"]) == (128, 96)
    assert 0.3 < stats["brightness"] < 0.7 and stats["dominant"]
    assert abs(sum(d["share"] for d in stats["dominant"]) - 1.0) < 0.01
    report = bytes(await objects.get(out["report"])).decode()
    assert "1024x768 JPEG" in report and out["description"] in report
    assert out["thumbnail"]["name"] in report
    # Three jobs, each the child of the one before, all on the worker started on demand.
    jobs = {s.capability["type"]: s for s in await client.list_jobs()}
    chain = [jobs["image.thumbnail"], jobs["image.describe"], jobs["image.report"]]
    assert [s.depth for s in chain] == [0, 1, 2]
    assert chain[1].parent_job_id == chain[0].job_id
    assert chain[2].parent_job_id == chain[1].job_id
    assert {s.worker_id for s in chain} == {"n-images-images-0"}
    await eventually(lambda: events.of("app_started"), what="app_started")
    # Not an image: the job fails at once with a reason, not retried.
    bad = await objects.put(b"not a picture", name="inputs/bad.jpg")
    state = await client.wait(await client.submit(
        "image.thumbnail", {"image": codec.to_builtins(bad)}), timeout=30)
    assert state.state == "failed" and state.error and state.error.code == "not_an_image"
    assert state.attempt == 1
    await events.stop()


async def test_trio_gpu_cpu_and_queued_gpu_side_by_side(components, procs, client, bus) -> None:
    await components.dispatcher()
    events = await NodeEvents(bus, "n-trio").start()
    agent(procs, "n-trio", EXAMPLES / "trio" / "apps.toml", "--simulate-gpus", "1")
    # min = 1 for the LLM and the TTS: both warm before any work.
    await eventually(lambda: len(events.of("app_started")) >= 2, timeout=40,
                     what="the LLM and TTS workers")
    warm = {e["app"]: e for e in events.of("app_started")}
    assert set(warm) == {"llm", "tts"} and all("min" in e["reason"] for e in warm.values())
    assert warm["llm"]["hooks_s"]["on_start:train"] >= 0

    llm = await client.submit("llm.generate", {"prompt": "Errors should", "max_chars": 40})
    tts = await client.submit("tts.speak", {"text": "hello fleet"})
    images = [await client.submit("image.generate", {"width": 96, "height": 64, "c_real": -0.7,
                                                     "c_imag": 0.27 + i / 100})
              for i in range(3)]
    states = {j: await client.wait(j, timeout=60) for j in [llm, tts, *images]}
    assert all(s.state == "succeeded" for s in states.values()), \
        [(s.capability, s.state, s.error) for s in states.values()]

    text = states[llm].result
    assert text["text"].startswith("Errors should") and len(text["text"]) == 13 + 40
    assert text["gpu"] == "simulated" and text["computed_on"] == "cpu"
    # 8 GB of a 16 GB GPU split in four: two slots.
    assert len(states[llm].devices) == 2
    assert all(d.startswith("n-trio.gpu0.s") for d in states[llm].devices)

    speech = states[tts].result
    assert states[tts].devices == [] and speech["computed_on"] == "cpu"
    with wave.open(io.BytesIO(bytes(await Objects(bus).get(speech["audio"])))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.getnframes() == int(16000 * 0.09) * len("hello fleet")
    assert 300 < speech["centroid_hz"] < 4000

    # The image generator: started on demand, one slot, one image at a time.
    pics = [states[j] for j in images]
    assert all(len(s.devices) == 1 and s.result["gpu"] == "simulated" for s in pics)
    spans = sorted((s.result["started"], s.result["ended"]) for s in pics)
    assert all(b0 >= a1 for (_a0, a1), (b0, _b1) in itertools.pairwise(spans)), spans
    png = Image.open(io.BytesIO(bytes(await Objects(bus).get(pics[0].result["image"]))))
    assert png.size == (96, 64)
    # The agent says `app_started` once it has read the worker's advert and
    # hook times, which can come after the worker's first jobs are done.
    await eventually(lambda: len(events.of("app_started")) >= 3, timeout=20,
                     what="the image generator's app_started")
    started = {e["app"]: e for e in events.of("app_started")}
    assert "waiting" in started["imagegen"]["reason"]
    # Slots are leased per job: never two jobs on one slot at once.
    used, clashes = overlaps(list(states.values()))
    assert not clashes and set(used) <= {f"n-trio.gpu0.s{i}" for i in range(4)}, clashes
    assert not events.of("app_failed")
    await events.stop()


async def test_anyserve_chat_calls_embed_and_heavy_is_refused_on_a_small_node(
        components, procs, client, bus) -> None:
    await components.dispatcher()
    events = await NodeEvents(bus, "n-any").start()
    agent(procs, "n-any", EXAMPLES / "anyserve" / "apps.toml", "--simulate-gpus", "1")
    out = await client.call({"type": "chat", "model": "faq"},
                            {"message": "how can I submit a job to the fleet?"}, timeout=60)
    assert out["matched"] == "How do I submit a job?" and out["similarity"] > 0.5
    assert out["embedded_by"] == "n-any-embed-0"
    vec = bytes(await Objects(bus).get(out["embedding_ref"]))
    assert vec.startswith(b"\x93NUMPY")
    # Two cold starts: chat on its work, then embed on chat's call.
    await eventually(lambda: len(events.of("app_started")) == 2, what="two starts")
    assert [e["app"] for e in events.of("app_started")] == ["chat", "embed"]
    # heavy needs 2 GPUs per job, the node has 1: said once, never started.
    refused = [e for e in events.of("app_failed") if e["app"] == "heavy"]
    assert len(refused) == 1 and "more than this node has" in refused[0]["error"]
    assert refused[0].get("retry_in_s") is None
    await events.stop()


def test_apps_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETFLEET_LOG": "WARNING",
           "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ops.cli", "demo", "--apps"], env=env,
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "workers serving it now: 0" in text and "the agent started worker" in text
    assert "child of" in text and "# Image report" in text and "app_stopped" in text
    assert "fleet stopped: all" in text
    assert not list(tmp_path.glob("jetfleet-demo-*")), "the demo's folder was left behind"
