"""A capability for the fault tests that keeps its own record of when it ran.

`hold` leases one GPU and holds it for `seconds`; every run appends `start`
and `end` lines (job, attempt, worker, device, wall time) to a file of its own
in $JETFLEET_FAULT_DIR, written by the handler itself, so a worker cut off
from the bus still leaves a true account of when it stopped using the device.
Served with `jetfleet run worker --app tests.faultapp:app`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from agents.worker import App
from agents.worker.context import JobContext, JobError

app = App("faults")


class HoldPayload(msgspec.Struct, kw_only=True):
    seconds: float = 1.0


def _note(ctx: JobContext, what: str) -> None:
    folder = os.environ.get("JETFLEET_FAULT_DIR")
    if not folder:
        return
    line = (f"{what} {ctx.job_id} {ctx.attempt} {ctx.worker_id} {','.join(ctx.devices)} "
            f"{time.time():.6f}\n")
    path = Path(folder) / f"{ctx.worker_id}.log"
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


@app.capability(type="hold", gpus=1)
async def hold(ctx: JobContext, p: HoldPayload) -> dict[str, Any]:
    _note(ctx, "start")
    try:
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), p.seconds)
        except TimeoutError:
            return {"held": p.seconds, "devices": ctx.devices}
        raise JobError("stopped", "hold stopped from outside")
    finally:
        _note(ctx, "end")


def runs(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every run recorded in `folder`: start and end (None if it never ended)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in Path(folder).glob("*.log"):
        for line in path.read_text().splitlines():
            what, job, attempt, worker, devices, ts = line.split(" ")
            run = out.setdefault((job, attempt, worker), {
                "job_id": job, "attempt": int(attempt), "worker_id": worker,
                "devices": devices.split(",") if devices else [], "start": None, "end": None})
            run[what] = float(ts)
    return sorted(out.values(), key=lambda r: r["start"] or 0.0)
