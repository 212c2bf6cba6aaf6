"""Seed 004's `heavy` capability: a job that needs two whole GPUs.

The declaration `gpus=2` reaches the node agent: on a node with fewer GPUs it
reports the app as unusable there (an `app_failed` event that says why) and
never starts it; with two (real or `--simulate-gpus 2`) it starts a worker
whose share is both. The work itself is a numpy matrix product, on the CPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import numpy as np

from agents.worker import App, JobContext

app = App("heavy")


class Heavy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    n: int = 256
    seed: int = 0


@app.capability(type="heavy", gpus=2)
async def heavy(ctx: JobContext, p: Heavy) -> dict[str, Any]:
    n = max(2, min(p.n, 2048))
    rng = np.random.default_rng(p.seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    t0 = time.perf_counter()
    trace = float(np.trace(a @ a.T))
    return {"n": n, "trace": round(trace, 2), "seconds": round(time.perf_counter() - t0, 4),
            "devices": ctx.devices, "computed_on": "cpu",
            "gpu": "simulated" if os.environ.get("JETFLEET_SIMULATED_GPUS") else "real"}
