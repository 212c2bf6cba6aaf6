"""A fleet of a demo's own: both demos start, use and clean up one the same way."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ops.commands.common import DEFAULT_DATA_DIR, UserError


@contextlib.contextmanager
def demo_fleet(args: argparse.Namespace,
               prepare: Callable[[Path], None] | None = None) -> Iterator[Any]:
    """A fleet of a demo's own: in a temporary folder unless --data-dir says
    otherwise, started, and stopped and cleaned up however the demo ends.
    `prepare(data_dir)` runs before the fleet is made (to write its files)."""
    from ops.launcher import PortInUse, describe_stop, fleet_from

    temporary = args.data_dir == DEFAULT_DATA_DIR and not args.nats
    data = Path(tempfile.mkdtemp(prefix="jetfleet-demo-")) if temporary else Path(args.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(data)
        try:
            fleet = fleet_from(args, data)
        except PortInUse as exc:
            raise UserError(str(exc)) from None
        try:
            fleet.start()
            print(f"embedded fleet: nats at {fleet.url}, logs in {data / 'logs'}", flush=True)
            yield fleet
        finally:
            print(f"fleet stopped: {describe_stop(fleet.stop())}", flush=True)
    finally:
        if temporary:
            shutil.rmtree(data, ignore_errors=True)
