"""`jetfleet run <component>`: each component as its own process on the bus.

Stopping: a `control.drain` message (what `jetfleet up` sends first) or the
first SIGINT/SIGTERM stops taking work and lets in-flight work finish within
a bounded wait; a second signal leaves at once (the bus redelivers anything
unfinished elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bus import topology, tracing
from bus.connection import Bus, connect
from bus.settings import Settings

log = logging.getLogger("jetfleet")


COMPONENTS: dict[str, str] = {
    "dispatcher": "routes submissions to work subjects; unschedulable and cancel handling",
    "worker": "runs capabilities (echo, sleep, kernels, your own --app) on leased devices",
    "evolver": "serves kernel.generate, kernel.single and kernel.evolve",
}


def load_app(spec: str) -> Any:
    """'package.module:attr' -> the App object it names."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SystemExit(f"--app {spec!r}: expected 'module:attribute', e.g. myapp:app")
    return getattr(importlib.import_module(module), attr)


def worker_app(args: argparse.Namespace) -> Any:
    from agents.worker import App
    from agents.worker.builtin import builtin

    app = App("worker")
    if not args.no_builtin:
        app.include(builtin)
    if not args.no_kernels:
        try:
            from agents.kernels.capabilities import kernels
        except ImportError as exc:  # torch or triton absent: a plain worker still works
            log.info("kernel capabilities not served: %s", exc)
        else:
            app.include(kernels)
    for spec in args.app or []:
        app.include(load_app(spec))
    if not app.capabilities:
        raise SystemExit("this worker would serve no capability")
    return app


async def _run_dispatcher(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event) -> None:
    from services.dispatcher import Dispatcher

    d = Dispatcher(bus, unschedulable_after_s=args.unschedulable_after)
    task = asyncio.create_task(d.run())
    await stopping.wait()
    d.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


async def _run_worker(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event) -> None:
    from agents.devices import inventory
    from agents.worker.runtime import Worker

    inv = inventory(node=args.node, simulate_gpus=args.simulate_gpus,
                    slots_per_gpu=args.gpu_slots, cpu_slots=args.cpu_slots,
                    use_nvml=not args.no_nvml)
    w = Worker(bus, worker_app(args), inventory=inv, capacity=args.capacity,
               worker_id=args.worker_id)
    await w.serve_until(stopping)


async def _run_evolver(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event) -> None:
    from services.evolver import serve

    await serve(bus, stopping, capacity=args.capacity, worker_id=args.worker_id)


RUNNERS: dict[str, Callable[[Bus, argparse.Namespace, asyncio.Event], Awaitable[None]]] = {
    "dispatcher": _run_dispatcher,
    "worker": _run_worker,
    "evolver": _run_evolver,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("component", choices=sorted(COMPONENTS))
    p.add_argument("--nats", default=None, help="NATS URL (default JETFLEET_NATS_URL)")
    p.add_argument("--unschedulable-after", type=float, default=30.0,
                   help="dispatcher: seconds before a job no worker serves is unschedulable")
    p.add_argument("--capacity", type=int, default=None, help="worker: jobs at once")
    p.add_argument("--simulate-gpus", type=int, default=0,
                   help="worker: this many simulated GPUs (reported as simulated)")
    p.add_argument("--gpu-slots", type=int, default=1, help="worker: slots per GPU")
    p.add_argument("--cpu-slots", type=int, default=0, help="worker: leasable CPU slots")
    p.add_argument("--node", default=None, help="node name (default JETFLEET_NODE or host)")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--app", action="append", help="worker: also serve module:App")
    p.add_argument("--no-builtin", action="store_true", help="worker: without echo/sleep")
    p.add_argument("--no-kernels", action="store_true", help="worker: without kernel.*")
    p.add_argument("--no-nvml", action="store_true", help="worker: ignore real GPUs")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("JETFLEET_LOG", "INFO"),
                        format=f"%(asctime)s {args.component}[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    tracing.setup(f"jetfleet-{args.component}")
    try:
        return asyncio.run(_main(args))
    finally:
        tracing.shutdown()


async def _main(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    bus = await connect(settings, url=args.nats, name=f"jetfleet-{args.component}")
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

    async def on_drain(_msg: Any) -> None:
        stopping.set()

    await bus.nc.subscribe(topology.DRAIN, cb=on_drain)
    try:
        await RUNNERS[args.component](bus, args, stopping)
    finally:
        await bus.close()
    return 0
