"""Evolving a kernel whose launch parameters are literals at the launch site.

The issue's acceptance test: `k[(triton.cdiv(n, 1024),)](a, b, out, n, BLOCK=1024,
num_warps=4)` has no module constant to tune, yet a 2-round x 2 evolve through a
fleet of real processes (dispatcher, kernel worker, evolver) must yield at least
three distinct programs that pass. Only the public contract is read: the job's
result and its `candidates` (hash, outcome, correct).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from agents.kernels.generate import normalized_hash
from tests.kernels.test_generate import ADD_LAUNCH


async def test_evolve_launch_literal_candidate_yields_distinct_passing_programs(procs, client):
    # A generous unschedulable window: the worker and evolver import torch before advertising.
    procs.run("dispatcher", "--unschedulable-after", "120")
    procs.run("worker")
    procs.run("evolver")
    job = await client.submit("kernel.evolve", {
        "problem": "add", "seed_candidate_source": ADD_LAUNCH,
        "max_rounds": 2, "parallel_num": 2, "generator": "template"})
    state = await client.wait(job, timeout=400)
    assert state.state == "succeeded", state
    cands = state.result["candidates"]
    assert len(cands) == 4, cands  # nothing ran dry: 2 rounds x 2 distinct programs
    hashes = [c["hash"] for c in cands]
    assert len(set(hashes)) == len(hashes)
    assert normalized_hash(ADD_LAUNCH) in hashes  # the seed, then programs derived from it
    passing = {c["hash"] for c in cands if c["correct"] and c["outcome"] == "pass"}
    assert len(passing) >= 3, [(c["id"], c["outcome"], c.get("errors")) for c in cands]
