"""The monitor: lost/recovered/joined nodes, their jobs and leases, stale jobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from bus.connection import Bus
from bus.control import ControlService
from ops.commands.common import UserError

HELP = "marks silent nodes lost (with their jobs and leases), recovered and joined; stale jobs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lost-after", type=float, default=30.0, metavar="S",
                   help="a node not heard for S seconds is lost (default 30; keep it several "
                        "heartbeats long)")
    p.add_argument("--stale-after", type=float, default=300.0, metavar="S",
                   help="a running job with no progress or heartbeat for S seconds is stale "
                        "(default 300)")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lost-after", type=float, default=30.0, metavar="S",
                   help="monitor: a node not heard for S seconds is lost (default 30)")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    return [("monitor", ["--lost-after", str(args.lost_after)])]


def check(args: argparse.Namespace) -> None:
    if args.lost_after <= 0 or args.stale_after <= 0:
        raise UserError("--lost-after and --stale-after must be more than 0 seconds")


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from services.monitor import Monitor

    m = Monitor(bus, lost_after=args.lost_after, stale_after=args.stale_after,
                instance=control.instance)
    control.info = m.info
    task = asyncio.create_task(m.run())
    stop = asyncio.create_task(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    m.stop()
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 15)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
