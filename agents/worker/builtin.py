"""Capabilities every worker can serve: `echo` and `sleep`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

from agents.worker.app import App
from agents.worker.context import JobContext, JobError

builtin = App("builtin")


@builtin.capability(type="echo")
async def echo(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Returns its payload (any JSON object) as the result."""
    return payload


class SleepPayload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`sleep`: wait `seconds`, reporting progress `steps` times; cancellable."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 1.0
    steps: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    # For exercising retries: fail the first N attempts.
    fail_attempts: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0


@builtin.capability(type="sleep")
async def sleep(ctx: JobContext, p: SleepPayload) -> dict[str, Any]:
    if p.fail_attempts >= ctx.attempt:
        raise JobError("requested_failure", f"failing attempt {ctx.attempt} as asked")
    for i in range(p.steps):
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), p.seconds / p.steps)
        except TimeoutError:
            ctx.progress((i + 1) / p.steps, f"slept {(i + 1) * p.seconds / p.steps:.2f}s")
            continue
        raise JobError("cancelled", "sleep cancelled", retryable=False)
    return {"slept": p.seconds, "devices": ctx.devices}
