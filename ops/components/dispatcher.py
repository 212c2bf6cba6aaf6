"""The dispatcher: validates submissions, records and routes them, handles cancels."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from bus.connection import Bus
from bus.control import ControlService

HELP = "routes submissions to work subjects; unschedulable and cancel handling"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unschedulable-after", type=float, default=30.0, metavar="S",
                   help="seconds before a job no live worker serves is marked unschedulable "
                        "(default 30)")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unschedulable-after", type=float, default=30.0, metavar="S",
                   help="dispatcher: seconds before a job no live worker serves is marked "
                        "unschedulable (default 30)")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    return [("dispatcher", ["--unschedulable-after", str(args.unschedulable_after)])]


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from services.dispatcher import Dispatcher

    d = Dispatcher(bus, unschedulable_after_s=args.unschedulable_after)
    control.info = lambda: {"watching": len(d.watching)}
    task = asyncio.create_task(d.run())
    await stopping.wait()
    d.stop()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 10)
