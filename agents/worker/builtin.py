"""Capabilities every worker can serve: `echo` and `sleep`."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.worker.app import App
from agents.worker.context import JobContext, JobError

builtin = App("builtin")


@builtin.capability(type="echo")
async def echo(ctx: JobContext) -> Any:
    """Returns its payload as the result."""
    return ctx.payload


@builtin.capability(type="sleep")
async def sleep(ctx: JobContext) -> dict[str, Any]:
    """Sleeps `seconds` (default 1), reporting progress `steps` times; cancellable."""
    seconds = ctx.payload.get("seconds", 1.0)
    steps = ctx.payload.get("steps", 10)
    if not isinstance(seconds, int | float) or seconds < 0 or seconds > 86400:
        raise JobError("invalid_payload", "sleep needs 0 <= seconds <= 86400", retryable=False)
    if not isinstance(steps, int) or not 1 <= steps <= 10000:
        raise JobError("invalid_payload", "sleep needs 1 <= steps <= 10000", retryable=False)
    if ctx.payload.get("fail_attempts", 0) >= ctx.attempt:
        # For exercising retries: fail the first N attempts.
        raise JobError("requested_failure", f"failing attempt {ctx.attempt} as asked")
    for i in range(steps):
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), seconds / steps)
        except TimeoutError:
            ctx.progress((i + 1) / steps, f"slept {(i + 1) * seconds / steps:.2f}s")
            continue
        raise JobError("cancelled", "sleep cancelled", retryable=False)
    return {"slept": seconds, "devices": ctx.devices}
