"""`jetfleet simulate`: a fleet of simulated node agents in one process."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from ops.commands.common import UserError


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "simulate", parents=common, help="many simulated node agents (everything says simulated)",
        description="Simulated node agents in one process: inventories, heartbeats, GPU, "
                    "process and jobs telemetry, discovered jobs through the real lifecycle, "
                    "some nodes going silent and coming back. Everything it publishes says "
                    "simulated. For scale tests of the monitor and the query service.")
    sp.add_argument("--nodes", type=int, default=100, metavar="N", help="nodes (default 100)")
    sp.add_argument("--gpus", type=int, default=8, metavar="G", help="GPUs per node (default 8)")
    sp.add_argument("--interval", type=float, default=1.0, metavar="S",
                    help="seconds between a node's heartbeats (default 1)")
    sp.add_argument("--metrics-every", type=int, default=10, metavar="K",
                    help="GPU/process/jobs telemetry every K heartbeats (default 10)")
    sp.add_argument("--jobs-per-node", type=int, default=2, metavar="J",
                    help="discovered jobs each node starts with (default 2)")
    sp.add_argument("--churn", type=float, default=0.001, metavar="P",
                    help="chance per heartbeat that a node ends a job and starts another "
                         "(default 0.001)")
    sp.add_argument("--flap", type=float, default=None, metavar="R",
                    help="nodes going silent per minute, across the fleet (default: 1%% of "
                         "the nodes; 0: none)")
    sp.add_argument("--silence", type=float, default=45.0, metavar="S",
                    help="how long a node stays silent (default 45: longer than the "
                         "monitor's default --lost-after)")
    sp.add_argument("--prefix", default="sim", help="node names are PREFIX-00000... (default sim)")
    sp.add_argument("--duration", type=float, default=None, metavar="S",
                    help="stop after S seconds (default: until Ctrl-C)")
    sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sp.set_defaults(fn=cmd_simulate)


def check(args: argparse.Namespace) -> None:
    from agents.node.identity import clean_node_id

    if args.nodes < 1 or args.gpus < 0 or args.jobs_per_node < 0:
        raise UserError("--nodes must be at least 1, --gpus and --jobs-per-node 0 or more")
    if args.interval <= 0 or args.silence <= 0 or args.metrics_every < 1:
        raise UserError("--interval and --silence must be more than 0, --metrics-every at least 1")
    if not 0 <= args.churn <= 1 or (args.flap is not None and args.flap < 0):
        raise UserError("--churn is a chance between 0 and 1, --flap 0 or more")
    if clean_node_id(args.prefix) != args.prefix or len(args.prefix) > 40:
        raise UserError(f"--prefix {args.prefix!r}: letters, digits, '-' and '_', at most 40")


def cmd_simulate(args: argparse.Namespace) -> int:
    check(args)
    return asyncio.run(_simulate(args))


async def _simulate(args: argparse.Namespace) -> int:
    from agents.node.fleet import FleetSimulator
    from bus.connection import connect
    from bus.settings import Settings

    bus = await connect(Settings.from_env(), url=args.nats, name="jetfleet-simulate",
                        connect_timeout=args.connect_timeout)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    sim = FleetSimulator(bus, args.nodes, args.gpus, args.interval, prefix=args.prefix,
                         metrics_every=args.metrics_every, jobs_per_node=args.jobs_per_node,
                         job_churn=args.churn, flap_per_min=args.flap, silence_s=args.silence,
                         seed=args.seed)
    try:
        print(f"simulate: {args.nodes} simulated nodes x {args.gpus} GPUs, a heartbeat every "
              f"{args.interval:g}s; setting up inventories and jobs ...", flush=True)
        await sim.setup()
        print(f"simulate: running ({sim.stats.jobs_started} simulated jobs); Ctrl-C stops",
              flush=True)
        task = asyncio.create_task(sim.run(stopping, args.duration))
        last, t0 = 0, time.monotonic()
        while not task.done():
            await asyncio.wait({task}, timeout=10)
            if task.done():
                break
            now = time.monotonic()
            rate = (sim.stats.heartbeats - last) / max(1e-9, now - t0)
            last, t0 = sim.stats.heartbeats, now
            silent = sum(1 for n in sim.nodes if sim.silent(n))
            print(f"simulate: {rate:.0f} heartbeats/s, {silent} nodes silent, jobs "
                  f"+{sim.stats.jobs_started} -{sim.stats.jobs_ended}, "
                  f"{sim.stats.failures} failed publishes", flush=True)
        await task
    finally:
        await bus.close()
    s = sim.stats
    print(f"simulate: done: {s.heartbeats} heartbeats, {s.metrics} metric sets, "
          f"{s.silences} silences, jobs +{s.jobs_started} -{s.jobs_ended}, "
          f"{s.failures} failures")
    return 0
