"""The fleet: up, demo, run, workers, leases, bench."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from ops.commands.common import DEFAULT_DATA_DIR, UserError, client_call, print_json, table


def add_fleet_options(sp: argparse.ArgumentParser) -> None:
    """Options of `up` and `demo`: the embedded server, then each component's own."""
    from ops import components

    sp.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                    help=f"where the embedded server keeps its JetStream store and the "
                         f"components their logs (default {DEFAULT_DATA_DIR})")
    sp.add_argument("--nats-port", type=int, default=0, metavar="P",
                    help="client port of the embedded nats-server (default 0: a free port); "
                         "refused when something already listens there")
    sp.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="run N nats-servers as a JetStream cluster on ports P, P+1, ... with "
                         "every stream, bucket and the object store replicated (R3)")
    for name in components.COMPONENTS:
        add = getattr(components.module(name), "add_up_arguments", None)
        if add is not None:
            add(sp)


def add_security_options(sp: argparse.ArgumentParser) -> None:
    """`up --secure` and `--tls` (docs/security.md)."""
    sp.add_argument("--secure", action="store_true",
                    help="NATS users per role: generate the fleet's keys and a credential per "
                         "role in DATA_DIR/creds (0600) and run every component under its role")
    sp.add_argument("--tls", action="store_true",
                    help="clients reach the server over TLS: a CA and a server certificate for "
                         "127.0.0.1/localhost are generated in DATA_DIR/tls unless given below")
    sp.add_argument("--tls-cert", metavar="FILE", help="the server's certificate (PEM)")
    sp.add_argument("--tls-key", metavar="FILE", help="the server's private key (PEM)")
    sp.add_argument("--tls-ca", metavar="FILE",
                    help="the CA that signed it, which clients verify the server with")


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("up", parents=common, help="embedded nats-server plus every component",
                        description="Start an embedded nats-server (or join --nats URL) and "
                                    "every component as a child, until Ctrl-C.")
    add_fleet_options(sp)
    add_security_options(sp)
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("demo", parents=common,
                        help="start an embedded fleet and run real jobs end to end",
                        description="Start an embedded fleet in a temporary folder, run real "
                                    "jobs end to end, say what happened, stop, clean up.")
    add_fleet_options(sp)
    sp.add_argument("--quick", action="store_true", help="echo and sleep only (no kernel job)")
    sp.set_defaults(fn=cmd_demo)

    from ops import components

    sp = sub.add_parser("run", parents=common, help="run one component in the foreground",
                        description="Run one component in the foreground: "
                                    + ", ".join(components.COMPONENTS) + ".")
    components.add_arguments(sp, common)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("workers", parents=common, help="live workers and their adverts",
                        description="Live workers (KV capabilities) and their adverts.")
    sp.set_defaults(fn=cmd_workers)

    sp = sub.add_parser("leases", parents=common, help="device leases held now",
                        description="Device leases held now (KV leases).")
    sp.set_defaults(fn=cmd_leases)

    from ops.bench import add_arguments as bench_arguments

    sp = sub.add_parser("bench", parents=common, help="benchmarks beside their raw baselines",
                        description="Benchmarks, each printing its figures beside a baseline "
                                    "measured in the same run.")
    bench_arguments(sp)
    sp.set_defaults(fn=cmd_bench)


def make_fleet(args: Any, data_dir: Path) -> Any:
    from ops.launcher import PortInUse, SecurityOptionError, fleet_from

    if getattr(args, "workers", 1) < 0:
        raise UserError("--workers must be 0 or more")
    try:
        return fleet_from(args, data_dir)
    except (PortInUse, SecurityOptionError) as exc:
        raise UserError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    import os

    from ops.launcher import describe_stop

    fleet = make_fleet(args, Path(args.data_dir))
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fleet.start()
    os.environ["JETFLEET_NATS_URL"] = fleet.url
    print(f"jetfleet up: nats at {fleet.url}, data in {args.data_dir}, "
          f"{len(fleet.children)} components (logs in {args.data_dir}/logs)", flush=True)
    if any(c.component == "query" for c in fleet.children):
        where = (f"http://127.0.0.1:{args.api_port}" if args.api_port
                 else "a free port: `jetfleet query url` says which")
        print(f"  query API at {where}", flush=True)
    for line in fleet.notes:  # --secure and --tls: where the credentials and the CA are
        print(f"  {line}", flush=True)
    print(f"  export JETFLEET_NATS_URL={fleet.url}", flush=True)
    try:
        while not stop["now"]:
            fleet.supervise_once()
            time.sleep(0.2)
    finally:
        print(f"jetfleet stopped: {describe_stop(fleet.stop())}", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ops.demo import demo

    return demo(args)


def cmd_run(args: argparse.Namespace) -> int:
    from ops import components

    check = getattr(components.module(args.component), "check", None)
    if check is not None:
        check(args)  # fail on bad options before connecting
    return components.run(args)


def cmd_workers(args: argparse.Namespace) -> int:
    adverts = client_call(args, lambda c: c.workers())
    if args.json:
        print_json(adverts)
        return 0
    table("workers", ["worker", "node", "pid", "capabilities", "devices", "load"],
          [[a.worker_id, a.node, str(a.pid),
            ", ".join(c.get("type", "") for c in a.capabilities),
            ", ".join(d.key + (" (sim)" if d.simulated else "") for d in a.devices) or "-",
            f"{a.load}/{a.capacity}"] for a in adverts], keep=("worker",))
    return 0


def cmd_leases(args: argparse.Namespace) -> int:
    from bus.leases import LeaseTable

    holders = client_call(args, lambda c: LeaseTable(c.bus).holders())
    if args.json:
        print_json([{"key": k, **_lease_dict(v)} for k, v in sorted(holders.items())])
        return 0
    table("leases", ["device", "holder", "job", "held for"],
          [[k, v.holder, v.job_id or "-", f"{time.time() - v.acquired_at:.1f}s"]
           for k, v in sorted(holders.items())], keep=("device", "holder", "job"))
    return 0


def _lease_dict(record: Any) -> dict[str, Any]:
    from bus import codec

    out: dict[str, Any] = codec.to_builtins(record)
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from ops.bench import run_bench

    return run_bench(args)
