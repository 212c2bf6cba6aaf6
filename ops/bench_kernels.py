"""`jetfleet bench kernels`: kernel evaluations per minute through the fleet,
beside the same evaluations run directly in one process, in the same run.

direct, sequential   evaluate() in a loop in this process (each evaluation is
                     still its own sandboxed child process: that is the floor);
direct, parallel     the same with as many threads as the fleet has slots, so
                     the fleet's own overhead shows apart from its parallelism;
fleet                `kernel.verify` jobs submitted to an embedded nats-server
                     with a dispatcher and --workers worker processes
                     (`python -m ops.cli run ...`), counted when they succeed.

Every path runs the same evaluations (library problems in turn) and must see
every one pass. On a host with CUDA it also profiles two larger problems and
puts the profile's device-event medians beside `triton.testing.do_bench` on the
same kernel and inputs.

--jobs is the number of evaluations per run (the shared default of 2000 is
for `bench dispatch`; here anything from 1000 up means the default, 12).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agents.kernels.evaluate import cuda_present, evaluate
from agents.kernels.isolation import available
from agents.kernels.library import load_problem
from ops.benchkit import spawn, stop

PROBLEMS = ("relu", "softmax", "add", "layernorm")
DEFAULT_EVALS = 12
TRIALS = 3


def _evaluations(n: int) -> list[str]:
    return [PROBLEMS[i % len(PROBLEMS)] for i in range(n)]


def _gpu_count() -> int:
    if not cuda_present():
        return 0
    from agents.devices import nvml_gpus

    return len(nvml_gpus())


def _direct(names: list[str], threads: int, devices: list[list[str]]) -> tuple[float, int]:
    """Seconds for the evaluations and how many passed; device set i % len per slot."""

    def one(i_name: tuple[int, str]) -> bool:
        i, name = i_name
        p = load_problem(name)
        devs = devices[i % len(devices)] if devices else []
        out = evaluate("verify", p.reference_source, p.candidate_source, trials=TRIALS,
                       devices=devs, timeout_s=300)
        return out.outcome == "pass"

    t0 = time.perf_counter()
    if threads <= 1:
        ok = sum(one(x) for x in enumerate(names))
    else:
        with ThreadPoolExecutor(threads) as pool:
            ok = sum(pool.map(one, enumerate(names)))
    return time.perf_counter() - t0, ok


async def _fleet_run(url: str, names: list[str]) -> tuple[float, int]:
    from ops.client import Client

    async with await Client.connect(url) as client:
        t0 = time.perf_counter()
        ids = [await client.submit("kernel.verify", {"problem": n, "trials": TRIALS})
               for n in names]
        states = await asyncio.gather(*(client.wait(j, timeout=900) for j in ids))
        elapsed = time.perf_counter() - t0
    ok = sum(1 for s in states if s.state == "succeeded" and (s.result or {}).get("outcome") == "pass")
    return elapsed, ok


async def _wait_workers(url: str, n: int, timeout: float = 120.0) -> None:
    from ops.client import Client

    async with await Client.connect(url) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ads = [a for a in await client.workers()
                   if any(c.get("type") == "kernel.verify" for c in a.capabilities)]
            if len(ads) >= n:
                return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"only some of {n} kernel workers came up (see their logs)")


# ---- GPU: profile timings beside triton.testing.do_bench ----------------------------------

# Larger inputs than the library's (which are sized for the interpreter), so the
# kernels run long enough for timings to mean something.
GPU_CASES = {
    "softmax": ("torch.randn(32, 200)", "torch.randn(4096, 4096)"),
    "add": ("torch.randn(64, 256), torch.randn(64, 256)",
            "torch.randn(4096, 4096), torch.randn(4096, 4096)"),
}

_DO_BENCH = textwrap.dedent("""
    import importlib.util, json, sys, torch, triton
    def load(path, name):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod
    ref, cand = load(sys.argv[1], "ref"), load(sys.argv[2], "cand")
    torch.manual_seed(0)
    init = ref.get_init_inputs()
    rm, cm = ref.Model(*init).cuda(), cand.ModelNew(*init).cuda()
    cm.load_state_dict(rm.state_dict(), strict=False)
    x = [t.cuda() if isinstance(t, torch.Tensor) else t for t in ref.get_inputs()]
    with torch.no_grad():
        c = triton.testing.do_bench(lambda: cm(*x), warmup=25, rep=200, return_mode="median")
        r = triton.testing.do_bench(lambda: rm(*x), warmup=25, rep=200, return_mode="median")
    print(json.dumps({"candidate_ms": c, "reference_ms": r}))
""")


def _gpu_timings(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, (old, new) in GPU_CASES.items():
        p = load_problem(name)
        ref = p.reference_source.replace(old, new)
        assert ref != p.reference_source, f"{name}: input shape to scale not found"
        out = evaluate("profile", ref, p.candidate_source, devices=["0"], trials=1, timeout_s=300)
        row: dict[str, Any] = {"problem": name, "shape": new, "outcome": out.outcome}
        if out.timings is not None:
            row.update(profile_candidate_ms=out.timings.candidate_ms,
                       profile_reference_ms=out.timings.reference_ms,
                       method=out.timings.method)
        (tmp / f"{name}_ref.py").write_text(ref)
        (tmp / f"{name}_cand.py").write_text(p.candidate_source)
        proc = subprocess.run([sys.executable, "-c", _DO_BENCH, str(tmp / f"{name}_ref.py"),
                               str(tmp / f"{name}_cand.py")], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
        if proc.returncode == 0:
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(do_bench_candidate_ms=got["candidate_ms"],
                       do_bench_reference_ms=got["reference_ms"])
        else:
            row["do_bench_error"] = proc.stderr[-500:]
        rows.append(row)
    return rows


# ---- the benchmark -------------------------------------------------------------------------


def _measure(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    from bus.server import EmbeddedServer

    gpus = _gpu_count()
    workers = max(1, args.workers)
    if gpus:
        slots = gpus  # one evaluation per GPU at a time (kernel jobs lease a whole GPU)
        per_worker = None
        devices = [[str(i)] for i in range(gpus)]
    else:
        slots = max(1, os.cpu_count() or 1)
        per_worker = max(1, slots // workers)
        slots = per_worker * workers
        devices = []
    names = _evaluations(n)
    res: dict[str, Any] = {
        "evaluations": n, "problems": list(PROBLEMS), "trials": TRIALS, "repeats": args.repeats,
        "device": f"{gpus} GPU(s)" if gpus else f"cpu, triton interpreter, {os.cpu_count()} cores",
        "slots": slots, "workers": workers,
        # What the candidates ran under (docs/sandbox.md): the cost being measured.
        "isolation": available().level,
    }
    # Warm-up: the first evaluation on a host fills Triton's and Python's caches.
    _direct(names[:1], 1, devices)
    runs: dict[str, list[tuple[float, int]]] = {"direct_sequential": [], "direct_parallel": [],
                                                 "fleet": []}
    with EmbeddedServer(tmp / "nats") as server:
        env = {**os.environ, "JETFLEET_NATS_URL": server.url, "JETFLEET_LOG": "WARNING"}
        py = sys.executable
        procs = [spawn([py, "-m", "ops.cli", "run", "dispatcher"], env, tmp / "dispatcher.log")]
        for i in range(workers):
            cap = ["--capacity", str(per_worker)] if per_worker else []
            procs.append(spawn([py, "-m", "ops.cli", "run", "worker", "--no-builtin", *cap,
                                 "--worker-id", f"bench-kernels-{i}"], env, tmp / f"worker{i}.log"))
        try:
            asyncio.run(_wait_workers(server.url, workers))
            asyncio.run(_fleet_run(server.url, names[:workers]))  # warm-up
            for _ in range(args.repeats):
                runs["direct_sequential"].append(_direct(names, 1, devices))
                runs["direct_parallel"].append(_direct(names, slots, devices))
                runs["fleet"].append(asyncio.run(_fleet_run(server.url, names)))
        finally:
            stop(procs)
    for key, values in runs.items():
        secs = statistics.median(v[0] for v in values)
        res[key] = {"evals_per_min": 60.0 * n / secs, "s_per_eval": secs / n,
                    "passed": min(v[1] for v in values), "runs_s": [round(v[0], 2) for v in values]}
    res["ratio_fleet_vs_sequential"] = res["fleet"]["evals_per_min"] / res["direct_sequential"]["evals_per_min"]
    res["ratio_fleet_vs_parallel"] = res["fleet"]["evals_per_min"] / res["direct_parallel"]["evals_per_min"]
    if gpus:
        res["gpu_timings"] = _gpu_timings(tmp)
    return res


def main(args: argparse.Namespace) -> int:
    n = args.jobs if 0 < args.jobs < 1000 else DEFAULT_EVALS
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-kernels-") as d:
        res = _measure(args, n, Path(d))
    all_pass = all(res[k]["passed"] == n for k in ("direct_sequential", "direct_parallel", "fleet"))
    if args.json:
        print(json.dumps({**res, "all_pass": all_pass}, indent=2))
        return 0 if all_pass else 1
    print(f"kernel benchmark: {n} kernel.verify evaluations ({TRIALS} trials; problems "
          f"{', '.join(PROBLEMS)} in turn) on {res['device']}, isolation {res['isolation']}; "
          f"median of {args.repeats} run(s)")
    print(f"{'path':<34}{'evals/min':>10}{'s/eval':>9}{'passed':>9}")
    labels = {
        "direct_sequential": "direct, sequential (1 process)",
        "direct_parallel": f"direct, {res['slots']} threads (1 process)",
        "fleet": f"fleet, {res['workers']} worker(s), {res['slots']} slot(s)",
    }
    for key, label in labels.items():
        r = res[key]
        print(f"{label:<34}{r['evals_per_min']:>10.1f}{r['s_per_eval']:>9.2f}"
              f"{r['passed']:>6}/{n}")
    print(f"ratio fleet/direct sequential: {res['ratio_fleet_vs_sequential']:.2f}x; "
          f"fleet/direct at the same concurrency: {res['ratio_fleet_vs_parallel']:.2f}x")
    for row in res.get("gpu_timings", []):
        if "do_bench_candidate_ms" in row and "profile_candidate_ms" in row:
            dc = row["profile_candidate_ms"] / row["do_bench_candidate_ms"] - 1
            dr = row["profile_reference_ms"] / row["do_bench_reference_ms"] - 1
            print(f"gpu {row['problem']} {row['shape']}: profile cand {row['profile_candidate_ms']:.4f} ms "
                  f"vs do_bench {row['do_bench_candidate_ms']:.4f} ms ({dc:+.1%}); ref "
                  f"{row['profile_reference_ms']:.4f} vs {row['do_bench_reference_ms']:.4f} ms "
                  f"({dr:+.1%})")
        else:
            print(f"gpu {row['problem']}: {row}")
    if not res.get("gpu_timings"):
        print("no CUDA here: profile timings beside triton.testing.do_bench need a GPU")
    return 0 if all_pass else 1
