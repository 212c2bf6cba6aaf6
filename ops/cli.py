"""The `jetfleet` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bus import codec

DEFAULT_DATA_DIR = ".jetfleet"


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(obj: Any) -> None:
    print(json.dumps(codec.to_builtins(obj), indent=2, sort_keys=True))


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    d = time.time() - ts
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    _console().print(t)


def _client_call(args: argparse.Namespace, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    from sdk import Client

    async def go() -> Any:
        async with await Client.connect(args.nats) as client:
            return await fn(client)

    return asyncio.run(go())


def _parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} {item!r}: expected key=value")
        out[key] = value
    return out


# ---- commands ---------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload) if args.payload else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise SystemExit("--payload must be a JSON object")
    capability = {"type": args.capability, **_parse_kv(args.label, "--label")}
    try:
        resources = {k: int(v) for k, v in _parse_kv(args.resource, "--resource").items()}
    except ValueError:
        raise SystemExit(f"--resource {args.resource}: values are whole numbers, "
                         "e.g. gpus=1") from None

    async def go(client: Any) -> Any:
        job_id = await client.submit(capability, payload, job_id=args.job_id,
                                     priority=args.priority, max_attempts=args.max_attempts,
                                     timeout_s=args.timeout, user=args.user,
                                     resources=resources or None)
        if not args.wait:
            return {"job_id": job_id}
        state = await client.wait(job_id, timeout=args.wait_timeout)
        return state

    try:
        out = _client_call(args, go)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"invalid submission: {exc}") from None
    if args.json or not args.wait:
        _print_json(out)
    else:
        _show_state(out)
    return 0 if not args.wait or out.state == "succeeded" else 1


def _show_state(state: Any) -> None:
    c = _console()
    c.print(f"[bold]{state.job_id}[/bold]  {state.state}  attempt {state.attempt}"
            f"  worker {state.worker_id or '-'}")
    if state.result is not None:
        c.print_json(json.dumps(state.result, default=str))
    if state.error:
        c.print(f"[red]{state.error.code}[/red]: {state.error.message}")
    if state.reason:
        c.print(f"reason: {state.reason}")


def cmd_status(args: argparse.Namespace) -> int:
    async def go(client: Any) -> Any:
        state = await client.status(args.job_id)
        events = [e async for e in client.events(args.job_id, follow=False)] if args.events else []
        return state, events

    state, events = _client_call(args, go)
    if state is None:
        print(f"no job {args.job_id}", file=sys.stderr)
        return 1
    if args.json:
        _print_json({"state": state, "events": events} if args.events else state)
    else:
        _show_state(state)
        for e in events:
            print(json.dumps(codec.to_builtins(e)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _client_call(args, lambda c: c.cancel(args.job_id, reason=args.reason))
    print(f"cancel requested for {args.job_id}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    states = _client_call(args, lambda c: c.list_jobs(limit=args.limit))
    if args.state:
        states = [s for s in states if s.state == args.state]
    if args.json:
        _print_json(states)
        return 0
    _table("jobs", ["job", "capability", "state", "attempt", "worker", "submitted"],
           [[s.job_id, s.capability.get("type", ""), s.state, str(s.attempt), s.worker_id or "-",
             _ago(s.submitted_at)] for s in states])
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    adverts = _client_call(args, lambda c: c.workers())
    if args.json:
        _print_json(adverts)
        return 0
    _table("workers", ["worker", "node", "pid", "capabilities", "devices", "load"],
           [[a.worker_id, a.node, str(a.pid),
             ", ".join(c.get("type", "") for c in a.capabilities),
             ", ".join(d.key + (" (sim)" if d.simulated else "") for d in a.devices) or "-",
             f"{a.load}/{a.capacity}"] for a in adverts])
    return 0


def cmd_leases(args: argparse.Namespace) -> int:
    from bus.leases import LeaseTable

    holders = _client_call(args, lambda c: LeaseTable(c.bus).holders())
    if args.json:
        _print_json(holders)
        return 0
    _table("leases", ["device", "holder", "job", "held for"],
           [[k, v.holder, v.job_id or "-", f"{time.time() - v.acquired_at:.1f}s"]
            for k, v in sorted(holders.items())])
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ops.components import run

    if args.nats:
        os.environ["JETFLEET_NATS_URL"] = args.nats
    return run(args)


def _fleet_from(args: argparse.Namespace, quiet: bool = False) -> Any:
    from ops.launcher import Fleet

    worker_args: list[str] = []
    if getattr(args, "simulate_gpus", 0):
        worker_args += ["--simulate-gpus", str(args.simulate_gpus)]
    return Fleet(Path(args.data_dir), nats_port=args.nats_port, workers=args.workers,
                 worker_args=worker_args, unschedulable_after=args.unschedulable_after,
                 quiet=quiet)


def cmd_up(args: argparse.Namespace) -> int:
    fleet = _fleet_from(args)
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fleet.start()
    os.environ["JETFLEET_NATS_URL"] = fleet.url
    print(f"jetfleet up: nats at {fleet.url}, data in {args.data_dir}, "
          f"{len(fleet.children)} components (logs in {args.data_dir}/logs)", flush=True)
    print(f"  export JETFLEET_NATS_URL={fleet.url}", flush=True)
    try:
        while not stop["now"]:
            fleet.supervise_once()
            time.sleep(0.2)
    finally:
        ended = fleet.stop()
        print("jetfleet stopped: " + ", ".join(f"{k}: {v}" for k, v in ended.items()), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ops.demo import demo

    return demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ops.bench import run_bench

    return run_bench(args)


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetfleet", description="accelerator work on NATS JetStream")
    p.add_argument("--nats", default=os.environ.get("JETFLEET_NATS_URL"),
                   help="NATS URL (default JETFLEET_NATS_URL)")
    sub = p.add_subparsers(dest="command", required=True)

    def fleet_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
        sp.add_argument("--nats-port", type=int, default=0, help="0 picks a free port")
        sp.add_argument("--workers", type=int, default=1, help="workers on this node")
        sp.add_argument("--simulate-gpus", type=int, default=0,
                        help="give each worker N simulated GPUs")
        sp.add_argument("--unschedulable-after", type=float, default=30.0)

    sp = sub.add_parser("up", help="embedded nats-server plus every component")
    fleet_opts(sp)
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("demo", help="start an embedded fleet and run real jobs end to end")
    fleet_opts(sp)
    sp.add_argument("--quick", action="store_true", help="echo and sleep only")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("submit", help="submit a job")
    sp.add_argument("capability", help="capability type, e.g. echo")
    sp.add_argument("--payload", help="JSON object")
    sp.add_argument("--label", action="append", help="capability label key=value")
    sp.add_argument("--resource", action="append", help="gpus=1, gpu_memory_mb=..., cpu_slots=...")
    sp.add_argument("--job-id")
    sp.add_argument("--priority", type=int, default=1)
    sp.add_argument("--max-attempts", type=int, default=3)
    sp.add_argument("--timeout", type=float, default=None, help="per-attempt timeout_s")
    sp.add_argument("--user")
    sp.add_argument("--wait", action="store_true", help="wait for the outcome")
    sp.add_argument("--wait-timeout", type=float, default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", help="a job's latest state")
    sp.add_argument("job_id")
    sp.add_argument("--events", action="store_true", help="also every event so far")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("cancel", help="cancel a job")
    sp.add_argument("job_id")
    sp.add_argument("--reason", default="cancelled by request")
    sp.set_defaults(fn=cmd_cancel)

    sp = sub.add_parser("jobs", help="recent jobs")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--state")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_jobs)

    sp = sub.add_parser("workers", help="live workers and their adverts")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_workers)

    sp = sub.add_parser("leases", help="device leases held now")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_leases)

    from ops.components import add_arguments

    sp = sub.add_parser("run", help="run one component in the foreground")
    add_arguments(sp)
    sp.set_defaults(fn=cmd_run)

    from ops.bench import add_arguments as bench_arguments

    sp = sub.add_parser("bench", help="benchmarks beside their raw baselines")
    bench_arguments(sp)
    sp.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "nats", None):
        os.environ.setdefault("JETFLEET_NATS_URL", args.nats)
    from bus import tracing

    if args.command != "run":  # components set up their own service name
        tracing.setup("jetfleet-cli")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"jetfleet: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
