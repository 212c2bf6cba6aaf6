"""`jetfleet bench <what>`: each benchmark beside a baseline measured in the same run."""

from __future__ import annotations

import argparse

BENCHES = ("dispatch", "leases", "kernels")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=BENCHES)
    p.add_argument("--jobs", type=int, default=2000, help="jobs (dispatch) or operations")
    p.add_argument("--rate", type=float, default=200.0, help="offered rate for the latency run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; medians reported")
    p.add_argument("--json", action="store_true")


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "dispatch":
        from ops.bench_dispatch import main
    elif args.what == "leases":
        from ops.bench_leases import main
    else:
        from ops.bench_kernels import main
    return main(args)
