"""`jetfleet bench <what>`: each benchmark beside a baseline measured in the same run.

A benchmark is a module with `main(args) -> int` (and optionally
`add_arguments(parser)` for options of its own); add it to BENCHES.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "dispatch": "ops.bench_dispatch",
    "leases": "ops.bench_leases",
    "kernels": "ops.bench_kernels",
    "query": "ops.bench_query",
    "objects": "ops.bench_objects",
    "agent": "ops.bench_agent",
    "monitor": "ops.bench_monitor",
    "coldstart": "ops.bench_coldstart",
    "soak": "ops.bench_soak",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("--jobs", type=int, default=2000, metavar="N",
                   help="jobs (dispatch) or operations (default 2000)")
    p.add_argument("--rate", type=float, default=200.0, metavar="R",
                   help="offered jobs/s for the latency run (default 200)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="runs per figure; medians reported (default 3)")
    for name in BENCHES:
        mod = importlib.import_module(BENCHES[name])
        extra = getattr(mod, "add_arguments", None)
        if extra is not None:
            extra(p)


def run_bench(args: argparse.Namespace) -> int:
    main = importlib.import_module(BENCHES[args.what]).main
    return int(main(args))
