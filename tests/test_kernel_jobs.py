"""Kernel jobs through the real dispatcher and workers, on a real nats-server.

Every evaluation is real: a sandboxed child process running Triton's
interpreter on CPU tensors (or a GPU where the host has one). The evolver's
child jobs travel through the bus like any submission.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from agents.kernels.capabilities import BACKEND, kernels
from agents.kernels.generate import normalized_hash
from agents.kernels.library import load_problem
from agents.kernels.sources import put_source
from schemas.kernels import KernelOutcome
from services.evolver import child_id, evolver
from tests.conftest import eventually, job_events

SOFTMAX = load_problem("softmax")
WRONG = SOFTMAX.candidate_source.replace("/ row_sum, mask=mask)", "/ (row_sum * 1.01), mask=mask)")
_START = SOFTMAX.candidate_source.index("    def forward(")
_SIG_END = SOFTMAX.candidate_source.index("\n", _START) + 1
LAUNCH = (
    "        x2 = x.contiguous().view(-1, x.shape[-1])\n"
    "        out = torch.empty_like(x2)\n"
    "        _softmax_kernel[(x2.shape[0],)](x2, out, x2.shape[1], x2.stride(0), BLOCK=BLOCK_SIZE)\n"
)
HANG = SOFTMAX.candidate_source[:_SIG_END] + LAUNCH + "        while True:\n            pass\n"


async def _kernel_fleet(components, capacity: int = 2, with_evolver: bool = False):
    await components.dispatcher()
    kw = {}
    if BACKEND == "cuda":  # kernel jobs lease a GPU there: give the worker its devices
        from agents.devices import inventory

        kw["inventory"] = inventory()
    await components.worker(kernels, capacity=capacity, **kw)
    if with_evolver:
        await components.worker(evolver, capacity=4)


async def _children(client, parent: str):
    return [s for s in await client.list_jobs(limit=1000) if s.parent_job_id == parent]


async def test_verify_outcomes_are_results(bus, components, client):
    await _kernel_fleet(components, capacity=3)
    ref = await put_source(bus, SOFTMAX.candidate_source)
    ok = await client.submit("kernel.verify", {"problem": "softmax", "trials": 2})
    wrong = await client.submit({"type": "kernel.verify", "dsl": "triton"},
                                {"problem": "softmax", "candidate_source": WRONG, "trials": 2})
    by_ref = await client.submit("kernel.profile", {
        "problem_source": SOFTMAX.reference_source, "candidate_ref": ref})
    typo = await client.submit("kernel.verify", {"problem": "softmax", "trails": 2})
    unknown = await client.submit("kernel.verify", {"problem": "no_such_problem"})
    missing = await client.submit("kernel.verify", {"problem": "softmax",
                                                    "candidate_ref": {"name": "nope"}})
    states = {j: await client.wait(j, timeout=120) for j in (ok, wrong, by_ref, typo, unknown, missing)}

    good = KernelOutcome(**{k: v for k, v in states[ok].result.items()
                            if k in KernelOutcome.__struct_fields__})
    assert states[ok].state == "succeeded" and good.outcome == "pass" and good.correct
    assert good.trials == 2 and states[ok].result["problem"] == "softmax"
    # A wrong kernel is a result, not a job failure.
    assert states[wrong].state == "succeeded"
    assert states[wrong].result["outcome"] == "mismatch" and not states[wrong].result["correct"]
    assert "value_mismatch" in states[wrong].result["flags"]
    # Inline problem + candidate from the object store; profile re-checks and times.
    prof = states[by_ref].result
    assert states[by_ref].state == "succeeded" and prof["outcome"] == "pass"
    assert prof["timings"]["speedup"] is not None and prof["kind"] == "profile"
    assert prof["candidate_hash"] == normalized_hash(SOFTMAX.candidate_source)
    if prof["interpreted"]:
        assert prof["timings"]["representative"] is False
    # Unusable payloads fail at once, without retries.
    for j in (typo, unknown, missing):
        s = states[j]
        assert s.state == "failed" and s.error.code == "invalid_payload", (j, s)
        assert s.attempt == 1
    assert "trails" in states[typo].error.message


async def test_worker_survives_hanging_candidate(components, client):
    await _kernel_fleet(components, capacity=1)
    hang = await client.submit("kernel.verify", {"problem": "softmax", "candidate_source": HANG,
                                                 "eval_timeout_s": 6})
    after = await client.submit("kernel.verify", {"problem": "softmax", "trials": 1})
    s = await client.wait(hang, timeout=90)
    assert s.state == "succeeded" and s.result["outcome"] == "timeout", s
    s2 = await client.wait(after, timeout=90)
    assert s2.state == "succeeded" and s2.result["outcome"] == "pass"
    assert s2.worker_id == s.worker_id  # the same (only) worker took the next job


async def test_single_job(components, client):
    await _kernel_fleet(components, with_evolver=True)
    job = await client.submit("kernel.single", {"problem": "relu"})
    s = await client.wait(job, timeout=120)
    assert s.state == "succeeded", s
    r = s.result
    assert r["generator"] == "template" and r["candidate"]["origin"] in ("template", "seed")
    assert r["outcome"]["outcome"] == "pass" and r["correct"] and r["outcome"]["kind"] == "profile"
    kids = await _children(client, job)
    assert [k.job_id for k in kids] == [r["job_id"]]
    assert kids[0].capability["type"] == "kernel.profile" and kids[0].state == "succeeded"


async def test_evolve_two_rounds_with_lineage(bus, components, client):
    await _kernel_fleet(components, capacity=2, with_evolver=True)
    job = await client.submit("kernel.evolve", {"problem": "softmax", "max_rounds": 2,
                                                "parallel_num": 2, "islands": 2})
    s = await client.wait(job, timeout=200)
    assert s.state == "succeeded", s
    r = s.result
    cands = r["candidates"]
    assert r["generator"] == "template" and r["rounds"] == 2 and len(cands) == 4
    assert r["best"]["correct"] and r["best"]["outcome"]["outcome"] == "pass"
    assert normalized_hash(r["best"]["source"]) in {c["hash"] for c in cands}
    # Distinct programs, each with its round, island, lineage, outcome and timings.
    assert len({normalized_hash(c["source"]) for c in cands}) == 4
    assert sorted(c["round"] for c in cands) == [1, 1, 2, 2]
    ids = {c["id"] for c in cands}
    for c in cands:
        assert c["outcome"] in ("pass", "mismatch", "compile_error", "runtime_error", "timeout",
                                "crashed", "rejected"), c
        assert c["island"] in (0, 1) and c["job_id"] and "errors" in c
        assert set(c["lineage"]) <= ids and set(c["parents"]) <= ids
        if c["round"] == 2:
            assert c["parents"] and c["origin"] in ("mutation", "template")
            parent = next(x for x in cands if x["id"] == c["parents"][0])
            assert parent["round"] == 1 and c["lineage"][-1] == parent["id"]
        if c["outcome"] == "pass":
            assert c["timings"]["candidate_ms"] > 0
    assert any(c["origin"] == "seed" for c in cands)
    # Every candidate was one child job of this evolve, and nothing else was submitted.
    kids = await _children(client, job)
    assert sorted(k.job_id for k in kids) == sorted(c["job_id"] for c in cands)
    assert all(k.state == "succeeded" for k in kids)
    # Progress per round, with the best so far.
    progress = [e for e in await job_events(bus, job) if e["kind"] == "progress"]
    rounds = [e["data"]["round"] for e in progress if e.get("data") and "best" in e["data"]]
    assert rounds == [1, 2]


async def test_cancel_evolve_cancels_children(components, client):
    await _kernel_fleet(components, capacity=2, with_evolver=True)
    job = await client.submit("kernel.evolve", {
        "problem": "softmax", "seed_candidate_source": HANG, "max_rounds": 2,
        "parallel_num": 2, "eval_timeout_s": 120})

    async def running_children():
        kids = await _children(client, job)
        # Both submitted, at least one evaluating (one GPU runs one at a time).
        return len(kids) == 2 and any(k.state == "running" for k in kids) and kids

    kids = await eventually(running_children, timeout=60, what="children running")
    await client.cancel(job, "enough")
    s = await client.wait(job, timeout=30)
    assert s.state == "cancelled"
    for k in kids:
        ks = await client.wait(k.job_id, timeout=30)
        assert ks.state == "cancelled", ks


def test_child_ids_are_stable_and_valid():
    h = normalized_hash(SOFTMAX.candidate_source)
    a = child_id("j-abc", "r1-c0", h)
    assert a == child_id("j-abc", "r1-c0", h) and a != child_id("j-abc", "r1-c1", h)
    long = child_id("j" * 128, "r10-c63", h)
    assert len(long) <= 128 and long != child_id("j" * 127 + "k", "r10-c63", h)


@pytest.fixture(autouse=True)
def _no_llm(monkeypatch):
    # These tests exercise the built-in generator; an LLM in the environment must not change them.
    monkeypatch.delenv("JETFLEET_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("JETFLEET_LLM_MODEL", raising=False)


async def test_generate_distinct_candidates(components, client):
    await _kernel_fleet(components, with_evolver=True)
    r = await client.run("kernel.generate", {"problem": "matmul", "n": 5}, timeout=30)
    assert r["generator"] == "template" and len(r["candidates"]) == 5
    assert len({c["hash"] for c in r["candidates"]}) == 5
    assert r["seed_hash"] not in {c["hash"] for c in r["candidates"]}
    bad = await client.submit("kernel.generate", {"problem": "matmul", "generator": "llm"})
    s = await client.wait(bad, timeout=30)
    assert s.state == "failed" and s.error.code == "llm_not_configured"
    await asyncio.sleep(0)


class _FakeLLM:
    """An OpenAI-compatible endpoint on localhost: the designer gets a plan, the
    coder gets the softmax candidate with a different block size each time."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        blocks = iter([16, 32, 64, 256, 512, 1024] * 4)
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                system = body["messages"][0]["content"]
                if "designer" in system:
                    text = "1. one program per row\n2. loop over column blocks"
                else:
                    src = SOFTMAX.candidate_source.replace(
                        "BLOCK_SIZE = 128", f"BLOCK_SIZE = {next(blocks)}")
                    text = f"Here it is:\n```python\n{src}```\n"
                reply = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


async def test_llm_generator_when_configured(components, client, monkeypatch):
    fake = _FakeLLM()
    monkeypatch.setenv("JETFLEET_LLM_BASE_URL", fake.url)
    monkeypatch.setenv("JETFLEET_LLM_MODEL", "fake-coder")
    try:
        await _kernel_fleet(components, with_evolver=True)
        r = await client.run("kernel.generate", {"problem": "softmax", "n": 3}, timeout=60)
        assert r["generator"] == "llm" and len({c["hash"] for c in r["candidates"]}) == 3
        s = await client.run("kernel.single", {"problem": "softmax"}, timeout=120)
        assert s["generator"] == "llm" and s["candidate"]["origin"] == "llm"
        assert s["outcome"]["outcome"] == "pass"
        # Designer then coder, with the model named, for every candidate.
        assert len(fake.requests) == 2 * 4
        assert {q["model"] for q in fake.requests} == {"fake-coder"}
    finally:
        fake.close()


def test_sync_client_submits_a_seed_style_single_job(nats_server, procs):
    """The blocking client with the kernel-generation client's field names."""
    from agents.kernels.sdk import KernelClient as SyncClient

    procs.run("dispatcher")
    procs.run("worker", "--capacity", "2")
    procs.run("evolver")
    fleet = SyncClient(nats_server.url)
    try:
        job_id = fleet.submit_job(op_name="relu", task_desc="relu of a tensor",
                                  job_type="single", backend="cpu", dsl="triton_cuda",
                                  framework="torch")
        status = fleet.wait_for_completion(job_id, timeout=120)
    finally:
        fleet.close()
    assert status["status"] == "succeeded", status
    assert status["result"]["outcome"]["outcome"] == "pass"
