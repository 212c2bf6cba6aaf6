"""`jetfleet bench agent`: CPU time of one node-agent sampling cycle on a host
with hundreds of processes, beside a bare psutil scan of the same processes.

The benchmark starts --agent-procs processes itself (`sleep`s, plus
--agent-jobs real `python train_bench_N.py --lr ...` processes that match the
default job patterns), then measures, single-threaded, in CPU seconds
(`time.process_time`):

baseline  what a skilled engineer writes by hand: `psutil.process_iter` with
          `cmdline` and `create_time` over every process, the default job
          patterns on each command line, then for each match `oneshot()`
          CPU percent, memory, threads, status and open files (Process
          objects cached by process_iter, so cpu_percent has its two samples)
jetfleet  the agent's cycle: Scanner.scan (pid listing, new pids only,
          tracked jobs measured) plus encoding the procs and jobs telemetry

The first cycle (every process new, each job's code and config captured) is
reported apart from steady cycles (medians of --agent-cycles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ops.benchkit import percentile

GOAL_MS = 50.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent-procs", type=int, default=500, metavar="N",
                   help="agent: processes to start on the host (default 500)")
    p.add_argument("--agent-jobs", type=int, default=20, metavar="N",
                   help="agent: of which real train_*.py jobs (default 20)")
    p.add_argument("--agent-cycles", type=int, default=40, metavar="N",
                   help="agent: steady cycles measured (default 40)")


def _start(n: int, jobs: int, folder: Path) -> list[subprocess.Popen[bytes]]:
    script = folder / "train_bench.py"
    script.write_text("import time\nimport json\nlr = 0.01\ntime.sleep(600)\n")
    (folder / "cfg.yaml").write_text("lr: 0.01\nlayers: 24\n")
    procs = []
    for i in range(jobs):
        procs.append(subprocess.Popen(
            [sys.executable, str(folder / "train_bench.py"), "--lr", "0.01", "--batch-size",
             str(32 + i), "--config", "cfg.yaml"], cwd=folder, stdin=subprocess.DEVNULL,
            start_new_session=True))
    for _ in range(max(0, n - jobs)):
        procs.append(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                                      start_new_session=True))
    return procs


def _baseline_cycle(patterns: object, cache: dict[int, psutil.Process]) -> set[int]:
    matches = patterns.matches  # type: ignore[attr-defined]
    found: set[int] = set()
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmd = p.info.get("cmdline")
        if not cmd or not matches(cmd):
            continue
        try:
            with p.oneshot():
                p.cpu_percent(None)
                p.memory_info()
                p.num_threads()
                p.status()
                p.ppid()
                p.name()
            p.num_fds()
        except psutil.Error:
            continue
        cache[p.pid] = p
        found.add(p.pid)
    return found


def _measure(fn: object, cycles: int) -> tuple[float, list[float]]:
    t = time.process_time()
    fn()  # type: ignore[operator]
    first = time.process_time() - t
    steady = []
    for _ in range(cycles):
        time.sleep(0.02)
        t = time.process_time()
        fn()  # type: ignore[operator]
        steady.append(time.process_time() - t)
    return first, steady


def main(args: argparse.Namespace) -> int:
    from agents.node.patterns import JobPatterns
    from agents.node.scanner import Scanner
    from bus import codec
    from schemas.telemetry import DiscoveredJobs, ProcessMetrics

    patterns = JobPatterns.build()
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-agent-") as tmp:
        procs = _start(args.agent_procs, args.agent_jobs, Path(tmp))
        try:
            time.sleep(2.0)  # every process has exec'd and settled
            host = len(psutil.pids())
            cache: dict[int, psutil.Process] = {}
            base_found: set[int] = set()

            def baseline() -> None:
                base_found.clear()
                base_found.update(_baseline_cycle(patterns, cache))

            scanner = Scanner("bench", patterns)
            agent_found: set[int] = set()

            def agent() -> None:
                result = scanner.scan()
                codec.encode(ProcessMetrics(node="bench", processes=result.samples))
                codec.encode(DiscoveredJobs(node="bench", jobs=result.refs))
                agent_found.clear()
                agent_found.update(r.pid for r in result.refs)

            rows: list[tuple[str, float, list[float], int]] = []
            for name, fn, found in (("bare psutil scan", baseline, base_found),
                                    ("jetfleet agent cycle", agent, agent_found)):
                first, steady = _measure(fn, args.agent_cycles)
                rows.append((name, first, steady, len(found)))
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
    print(f"agent sampling cycle, CPU time, {host} processes on the host "
          f"({args.agent_procs} started, {args.agent_jobs} of them train_*.py jobs), "
          f"{os.cpu_count()} cores\n")
    print("| path | jobs found | first cycle ms | steady p50 ms | steady p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, first, steady, jobs in rows:
        print(f"| {name} | {jobs} | {first * 1e3:.2f} | {statistics.median(steady) * 1e3:.2f} "
              f"| {percentile(steady, 0.99) * 1e3:.2f} |")
    base, mine = statistics.median(rows[0][2]), statistics.median(rows[1][2])
    print(f"\nsteady cycle: jetfleet {mine * 1e3:.2f} ms vs bare scan {base * 1e3:.2f} ms "
          f"({base / mine if mine else float('inf'):.1f}x less CPU); goal < {GOAL_MS:g} ms: "
          f"{'met' if mine * 1e3 < GOAL_MS and rows[1][1] * 1e3 < GOAL_MS else 'NOT met'} "
          f"(first cycle {rows[1][1] * 1e3:.1f} ms, capturing {rows[1][3]} jobs' code and config)")
    if rows[0][3] != rows[1][3]:
        print(f"warning: the bare scan found {rows[0][3]} jobs, the agent {rows[1][3]}")
    return 0
