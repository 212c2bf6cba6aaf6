"""`jetfleet run <component>`: every component as its own process on the bus.

Each component is a module here with
    HELP: str                                   one line for `jetfleet run --help`
    add_arguments(parser)                       its options
    async run(bus, args, stopping, control)     serve until `stopping` is set
and, when `jetfleet up` starts it, optionally
    add_up_arguments(parser)                    options `up` and `demo` accept for it
    up_children(args) -> [(name, run-args)]     the children `up` starts for it

Every process gets a control service (`nats micro ls` lists it) addressed by
its own identity, `jetfleet.<kind>.<instance>`: `info` and `drain` (a module
that runs jobs sets CONTROL_KIND = "worker"). A
drain or the first SIGINT/SIGTERM stops taking work and lets in-flight work
finish within a bounded wait; a second signal leaves at once (the bus
redelivers anything unfinished elsewhere). Nothing listens to a broadcast
that every fleet on a shared server would hear.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
from types import ModuleType
from typing import Any

from bus import tracing
from bus.connection import connect
from bus.control import ControlService
from bus.settings import Settings

log = logging.getLogger("jetfleet")

# name -> module under ops.components (the order `up` starts them in).
COMPONENTS: dict[str, str] = {
    "dispatcher": "ops.components.dispatcher",
    "worker": "ops.components.worker",
    "evolver": "ops.components.evolver",
    "query": "ops.components.query",
    "agent": "ops.components.agent",
    "monitor": "ops.components.monitor",
}


def module(name: str) -> ModuleType:
    return importlib.import_module(COMPONENTS[name])


def add_arguments(run: argparse.ArgumentParser, common: list[argparse.ArgumentParser]) -> None:
    sub = run.add_subparsers(dest="component", required=True, metavar="COMPONENT")
    for name in COMPONENTS:
        mod = module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, parents=common)
        p.add_argument("--instance-id", default=os.environ.get("JETFLEET_INSTANCE_ID"),
                       help="this process's identity on the bus (default: generated); "
                            "`jetfleet up` sets it so it can drain exactly its own children")
        mod.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("JETFLEET_LOG", "INFO"),
                        format=f"%(asctime)s {args.component}[%(process)d] %(levelname)s "
                               "%(message)s", stream=sys.stderr)
    tracing.setup(f"jetfleet-{args.component}")
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(args))
    finally:
        tracing.shutdown()


# Young-generation threshold for a component process. CPython's default (700
# allocations) runs a collection every few hundred objects; a component that
# moves thousands of jobs a second allocates that many per job, and its
# collections were measured at about 12% of the whole fleet's CPU per job
# (`jetfleet bench dispatch`, flat out: 846 -> 750 us of CPU per job over all
# processes). Cycles are still collected, just in larger, rarer passes.
GC_GEN0 = 20_000


def tune_gc() -> None:
    """Fewer, larger garbage collections (JETFLEET_GC_GEN0 overrides the
    threshold; 0 keeps CPython's defaults)."""
    raw = os.environ.get("JETFLEET_GC_GEN0", "")
    try:
        gen0 = int(raw) if raw else GC_GEN0
    except ValueError:
        logging.getLogger(__name__).warning(
            "JETFLEET_GC_GEN0=%r is not a whole number; using %d", raw, GC_GEN0)
        gen0 = GC_GEN0
    if gen0 > 0:
        gc.set_threshold(gen0, 50, 100)


def _loop_factory() -> Any:
    """uvloop where it is installed (a faster loop for a process that lives on
    the bus); JETFLEET_UVLOOP=0 keeps the standard one."""
    if os.environ.get("JETFLEET_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _main(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    bus = await connect(settings, url=args.nats, name=f"jetfleet-{args.component}",
                        connect_timeout=args.connect_timeout)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(130)  # second signal: leave now; the bus redelivers what was in flight
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    mod = module(args.component)
    kind = getattr(mod, "CONTROL_KIND", args.component)
    # A process that runs jobs is reached by its worker id.
    instance = (getattr(args, "worker_id", None) if kind == "worker" else None) or args.instance_id
    control = ControlService(bus, args.component, instance, kind=kind, on_drain=stopping.set)
    try:
        await control.start()
        await mod.run(bus, args, stopping, control)
    finally:
        await control.stop()
        await bus.close()
    return 0


def describe(args: Any) -> str:
    return ", ".join(f"{name}: {module(name).HELP}" for name in COMPONENTS)
