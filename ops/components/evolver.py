"""The kernel evolver: serves kernel.generate, kernel.single and kernel.evolve."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bus.connection import Bus
from bus.control import ControlService

CONTROL_KIND = "worker"  # runs jobs: reachable by its worker id
HELP = "serves kernel.generate, kernel.single and kernel.evolve (fans out child jobs)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capacity", type=int, default=None, metavar="N",
                   help="generate/single/evolve jobs at once (default 8)")
    p.add_argument("--worker-id", default=None, help="default: its instance id")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    return [("evolver", [])]


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from services.evolver import serve

    await serve(bus, stopping, capacity=args.capacity,
                worker_id=args.worker_id or control.instance, control=control)
