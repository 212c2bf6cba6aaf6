"""The node agent: inventory, heartbeats, GPU and process metrics, discovered jobs."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from bus.connection import Bus
from bus.control import ControlService
from ops.commands.common import UserError, parse_kv

HELP = "node agent: inventory, heartbeats, GPU/process metrics, jobs nobody submitted"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", default=None,
                   help="node id (default $JETFLEET_NODE, else the host name; the name "
                        "this node's workers use)")
    p.add_argument("--heartbeat", type=float, default=5.0, metavar="S",
                   help="seconds between heartbeats (default 5)")
    p.add_argument("--metrics-interval", type=float, default=10.0, metavar="S",
                   help="seconds between GPU/process samples (default 10)")
    p.add_argument("--simulate-gpus", type=int, default=0, metavar="N",
                   help="report N simulated GPUs (every record says simulated)")
    p.add_argument("--no-nvml", action="store_true", help="ignore real GPUs (NVML)")
    p.add_argument("--job-pattern", action="append", default=[], metavar="REGEX",
                   help="a command line matching REGEX is a job (repeatable; added to the "
                        "defaults: python train*.py, torchrun, deepspeed, accelerate launch, "
                        "python -m torch.distributed.*)")
    p.add_argument("--no-default-patterns", action="store_true",
                   help="only --job-pattern and GPU-holding processes are jobs")
    p.add_argument("--env-allow", action="append", default=[], metavar="GLOB",
                   help="also capture environment variables matching GLOB (secret-looking "
                        "values are still redacted)")
    p.add_argument("--inline-kb", type=int, default=64, metavar="KB",
                   help="scripts and configs up to KB travel in the job record; larger ones "
                        "go to the object store (default 64)")
    p.add_argument("--max-capture-mb", type=float, default=4.0, metavar="MB",
                   help="scripts and configs are cut at MB (default 4)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="a label on the node's inventory (repeatable)")
    p.add_argument("--apps", metavar="FILE", default=None,
                   help="start workers on demand for the apps in FILE (TOML, one [[app]] "
                        "table each; see docs/apps.md)")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat", type=float, default=5.0, metavar="S",
                   help="node agent: seconds between heartbeats (default 5)")
    p.add_argument("--metrics-interval", type=float, default=10.0, metavar="S",
                   help="node agent: seconds between GPU/process samples (default 10)")
    p.add_argument("--apps", metavar="FILE", nargs="?", const="", default=None,
                   help="node agent: start workers on demand for the apps in FILE (TOML; see "
                        "docs/apps.md); `jetfleet demo --apps` alone runs the apps demo")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    argv = ["--heartbeat", str(args.heartbeat), "--metrics-interval", str(args.metrics_interval)]
    if getattr(args, "simulate_gpus", 0):
        argv += ["--simulate-gpus", str(args.simulate_gpus)]
    apps = getattr(args, "apps", None)
    if apps is not None:
        if not apps:
            raise UserError("--apps needs the apps file: --apps apps.toml (see docs/apps.md)")
        apps_file(apps)  # a mistake in it is one line here, not a crashing child
        argv += ["--apps", os.path.abspath(apps)]
    return [("agent", argv)]


def apps_file(path: str) -> Any:
    from agents.node.appconfig import ConfigError, load_apps

    try:
        return load_apps(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def config(args: argparse.Namespace) -> Any:
    from agents.node import AgentConfig
    from agents.node.capture import CaptureLimits
    from agents.node.identity import node_id
    from agents.node.patterns import JobPatterns, PatternError
    from agents.node.redact import DEFAULT_ENV_ALLOW

    if args.heartbeat <= 0 or args.metrics_interval <= 0:
        raise UserError("--heartbeat and --metrics-interval must be more than 0 seconds")
    if args.simulate_gpus < 0:
        raise UserError("--simulate-gpus must be 0 or more")
    if args.inline_kb < 1 or args.max_capture_mb <= 0:
        raise UserError("--inline-kb must be at least 1 and --max-capture-mb more than 0")
    try:
        patterns = JobPatterns.build(args.job_pattern, defaults=not args.no_default_patterns)
    except PatternError as exc:
        raise UserError(str(exc)) from None
    limits = CaptureLimits(inline_bytes=args.inline_kb * 1024,
                           object_bytes=int(args.max_capture_mb * 1024 * 1024),
                           env_allow=DEFAULT_ENV_ALLOW + tuple(args.env_allow))
    return AgentConfig(node=node_id(args.node), heartbeat_s=args.heartbeat,
                       metrics_interval_s=args.metrics_interval,
                       simulate_gpus=args.simulate_gpus, use_nvml=not args.no_nvml,
                       patterns=patterns, limits=limits,
                       labels=parse_kv(args.label, "--label"))


def check(args: argparse.Namespace) -> None:
    """Fail before connecting when the options cannot work."""
    config(args)
    if args.apps is not None:
        apps_file(args.apps)


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from agents.node import NodeAgent

    cfg = config(args)
    agent = NodeAgent(bus, cfg)
    control.info = agent.info
    if args.apps is None:
        await agent.run(stopping)
        return
    from agents.node.apps import AppSupervisor

    apps = AppSupervisor(bus, cfg.node, apps_file(args.apps), simulate_gpus=cfg.simulate_gpus,
                         use_nvml=cfg.use_nvml, nats_url=args.nats)
    control.info = lambda: {**agent.info(), **apps.info()}
    await asyncio.gather(agent.run(stopping), apps.run(stopping))
