"""A worker: serves capabilities (echo, sleep, kernels, your own --app) on leased devices."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from typing import Any

from bus.connection import Bus
from bus.control import ControlService
from ops.commands.common import UserError

CONTROL_KIND = "worker"  # runs jobs: reachable by its worker id
HELP = "runs capabilities (echo, sleep, kernels, your own --app) on leased devices"
log = logging.getLogger("jetfleet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app", action="append", metavar="MODULE:ATTR",
                   help="also serve the App named MODULE:ATTR, imported from the current "
                        "folder first (repeatable)")
    p.add_argument("--capacity", type=int, default=None, metavar="N",
                   help="jobs at once (default: enough for its devices and cheap CPU work)")
    p.add_argument("--simulate-gpus", type=int, default=0, metavar="N",
                   help="N simulated GPUs (every advert and device says simulated)")
    p.add_argument("--gpu-slots", type=int, default=1, metavar="K",
                   help="split each GPU into K leasable slots (default 1)")
    p.add_argument("--cpu-slots", type=int, default=0, metavar="C",
                   help="C leasable CPU slots (default 0)")
    p.add_argument("--node", default=None, help="node name (default $JETFLEET_NODE or host)")
    p.add_argument("--worker-id", default=None,
                   help="this worker's id (default: its instance id)")
    p.add_argument("--no-builtin", action="store_true", help="do not serve echo and sleep")
    p.add_argument("--no-kernels", action="store_true", help="do not serve kernel.verify/profile")
    p.add_argument("--no-nvml", action="store_true", help="ignore real GPUs (NVML)")
    p.add_argument("--sandbox", choices=("best", "strict"),
                   default=os.environ.get("JETFLEET_SANDBOX", "best"),
                   help="kernel candidates: best = the strongest isolation this host has "
                        "(named in each result); strict = refuse to start without full "
                        "isolation (user, pid, mount, net and IPC namespaces)")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="workers on this node (default 1)")
    p.add_argument("--simulate-gpus", type=int, default=0, metavar="N",
                   help="give each worker N simulated GPUs")
    p.add_argument("--app", action="append", metavar="MODULE:ATTR",
                   help="every worker also serves this App (repeatable)")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    extra: list[str] = []
    if args.simulate_gpus:
        extra += ["--simulate-gpus", str(args.simulate_gpus)]
    for spec in args.app or []:
        extra += ["--app", spec]
    return [(f"worker-{i}", extra) for i in range(args.workers)]


def load_app(spec: str) -> Any:
    """'package.module:attr' -> the App it names, importing from the current folder
    first (as uvicorn and celery do); a bad spec is a UserError, not a traceback."""
    from agents.worker import App

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--app {spec!r}: expected MODULE:ATTR, e.g. myapp:app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UserError(f"--app {spec}: no module named {exc.name!r} (looked in "
                            f"{os.getcwd()} and the Python path)") from None
        raise UserError(f"--app {spec}: importing {module_name} failed: {exc}") from None
    except Exception as exc:
        raise UserError(f"--app {spec}: importing {module_name} failed: "
                        f"{type(exc).__name__}: {exc}") from None
    app = getattr(mod, attr, None)
    if app is None:
        raise UserError(f"--app {spec}: module {module_name} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise UserError(f"--app {spec}: {attr} is a {type(app).__name__}, not an "
                        "agents.worker.App")
    return app


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
        try:
            app.include(load_app(spec))
        except ValueError as exc:
            raise UserError(f"--app {spec}: {exc}") from None
    if not app.capabilities:
        raise UserError("this worker would serve no capability")
    return app


def check(args: argparse.Namespace) -> None:
    """Fail before connecting when the options cannot work."""
    app = worker_app(args)
    os.environ["JETFLEET_SANDBOX"] = args.sandbox
    if args.sandbox == "strict" and any(t.startswith("kernel.") for t in app.capabilities):
        from agents.kernels.isolation import available

        info = available()
        if not info.full:
            raise UserError(f"--sandbox strict: this host cannot fully isolate kernel "
                            f"candidates ({info.detail}); run with --sandbox best, or fix "
                            "the host")


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from agents.devices import inventory
    from agents.worker.runtime import Worker

    inv = inventory(node=args.node, simulate_gpus=args.simulate_gpus,
                    slots_per_gpu=args.gpu_slots, cpu_slots=args.cpu_slots,
                    use_nvml=not args.no_nvml)
    w = Worker(bus, worker_app(args), inventory=inv, capacity=args.capacity,
               worker_id=args.worker_id or control.instance, control=control)
    await w.serve_until(stopping)
