"""`jetfleet bench objects`: put, get and get-to-file of 1, 64 and 256 MiB
through bus.objects beside nats-py's own ObjectStore, on an embedded
nats-server started for the run.

jetfleet: ObjectStore with its defaults: from 4 MiB on over a data link
          (bus.datalink: chunks sent from and received into place, hashed
          in a thread beside the socket), smaller objects on the bus's
          connection; put, get (into one buffer, digest checked), get_to
          (into a file).
nats-py:  nats.js.object_store.ObjectStore in its best use: put of the bytes,
          get(writeinto=BytesIO) and get(writeinto=<file>) (its plain get
          concatenates bytes per chunk, quadratic: nats.py #703).

Each operation runs in a child process of its own, so its memory is its own:
`mem` is the growth of the child's RSS during the operation (sampled, and the
kernel's high-water mark) divided by the object's size; a get's includes the
buffer it returns, a put's leaves out the caller's data. Throughput is
decimal MB/s; figures are medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bus.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
RAW_BUCKET = "natspy"
OPS = ("put", "get", "get_to")
GOALS = {"get": 1000.0, "put": 500.0}  # MB/s at 256 MiB on loopback


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1,64,256", metavar="MIB",
                   help="objects: object sizes in MiB, comma-separated (default 1,64,256)")
    p.add_argument("--chunk-kib", type=int, default=0, metavar="K",
                   help="objects: jetfleet chunk size in KiB (default: the store's)")


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [int(s) for s in str(getattr(args, "sizes", "1,64,256")).split(",") if s]
    except ValueError:
        print("jetfleet: --sizes: whole MiB, comma-separated, e.g. 1,64,256", file=sys.stderr)
        return 2
    repeats = max(1, int(getattr(args, "repeats", 3)))
    chunk = int(getattr(args, "chunk_kib", 0) or 0) << 10
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-objects-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(_prepare(server.url))
            rows = []
            for size in sizes:
                for op in OPS:
                    row: dict[str, Any] = {"size_mib": size, "op": op}
                    for impl in ("jetfleet", "nats-py"):
                        runs = [_child(server, impl, op, size, chunk, Path(tmp))
                                for _ in range(repeats)]
                        row[impl] = {
                            "mb_s": statistics.median(r["mb_s"] for r in runs),
                            "mem": statistics.median(r["mem"] for r in runs),
                            "seconds": statistics.median(r["seconds"] for r in runs),
                            "cpu_client": statistics.median(r["cpu_client"] for r in runs),
                            "cpu_server": statistics.median(r["cpu_server"] for r in runs),
                        }
                    row["ratio"] = row["jetfleet"]["mb_s"] / row["nats-py"]["mb_s"]
                    rows.append(row)
                    if not getattr(args, "json", False):
                        print(f"  measured {size} MiB {op}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    result = {"repeats": repeats, "chunk_bytes": chunk or None, "rows": rows,
              "cpus": os.cpu_count()}
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


async def _prepare(url: str) -> None:
    from bus.connection import connect
    from bus.settings import Settings

    bus = await connect(Settings(nats_url=url), name="bench-objects")
    try:
        await bus.js.create_object_store(RAW_BUCKET)
    finally:
        await bus.close()


def _child(server: EmbeddedServer, impl: str, op: str, size: int, chunk: int,
           tmp: Path) -> dict[str, Any]:
    assert server.proc is not None
    spec = json.dumps({"url": server.url, "server_pid": server.proc.pid, "impl": impl,
                       "op": op, "size": size, "chunk": chunk, "tmp": str(tmp)})
    proc = subprocess.run([sys.executable, "-m", "ops.bench_objects", spec],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {op} {size} MiB failed: {proc.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"object store, {result['cpus']} CPUs, loopback, median of {result['repeats']} runs "
          "per figure; mem = RSS growth during the op / object size")
    head = (f"{'size':>8} {'op':<7}{'jetfleet MB/s':>14}{'mem':>7}   "
            f"{'nats-py MB/s':>13}{'mem':>7}{'ratio':>8}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        a, b = r["jetfleet"], r["nats-py"]
        print(f"{r['size_mib']:>4} MiB {r['op']:<7}{a['mb_s']:>14.0f}{a['mem']:>6.2f}x   "
              f"{b['mb_s']:>13.0f}{b['mem']:>6.2f}x{r['ratio']:>7.1f}x")
    print()
    print("CPU seconds per GB moved (client process / nats-server), medians: what the "
          "operation costs, whatever else the machine is doing")
    head = f"{'size':>8} {'op':<7}{'jetfleet':>18}   {'nats-py':>18}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        a, b = r["jetfleet"], r["nats-py"]
        gb = r["size_mib"] * (1 << 20) / 1e9
        print(f"{r['size_mib']:>4} MiB {r['op']:<7}"
              f"{a['cpu_client'] / gb:>9.2f} / {a['cpu_server'] / gb:<6.2f}   "
              f"{b['cpu_client'] / gb:>9.2f} / {b['cpu_server'] / gb:<6.2f}")
    big = [r for r in result["rows"] if r["size_mib"] == max(x["size_mib"]
                                                             for x in result["rows"])]
    for r in big:
        goal = GOALS.get(r["op"])
        if goal:
            got = r["jetfleet"]["mb_s"]
            print(f"goal {r['op']} {r['size_mib']} MiB >= {goal:.0f} MB/s: {got:.0f} MB/s "
                  f"({'met' if got >= goal else 'not met'}); peak "
                  f"{r['jetfleet']['mem']:.2f}x the object (goal < 2x)")


# ---- the child: one operation, timed, its memory watched --------------------------------


def _cpu(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, or of process `pid`."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The highest RSS seen while the operation runs (sampled in a thread,
    plus the kernel's high-water mark when it rose during the operation)."""

    def __init__(self) -> None:
        self.start = _rss()
        self.hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self.peak, _rss(), hwm if hwm > self.hwm0 else 0)
        return max(0, peak - self.start)


async def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    import io

    import nats

    size = spec["size"] << 20
    name = f"bench/{spec['size']}"
    path = Path(spec["tmp"]) / f"{spec['impl']}-{spec['size']}.bin"
    if spec["impl"] == "jetfleet":
        from bus.connection import connect
        from bus.settings import Settings

        bus = await connect(Settings(nats_url=spec["url"]), name="bench", apply_topology=False)
        nc = bus.nc
    else:
        nc = await nats.connect(spec["url"])
    js = nc.jetstream(timeout=60)
    data = os.urandom(size) if spec["op"] == "put" else b""
    try:
        if spec["impl"] == "jetfleet":
            from bus.objects import ObjectStore

            store = ObjectStore(bus, **({"chunk_size": spec["chunk"]} if spec["chunk"] else {}))
            peak = _Peak()
            cpu0, srv0 = _cpu(), _cpu(spec["server_pid"])
            t0 = time.perf_counter()
            if spec["op"] == "put":
                await store.put(data, name=name)
            elif spec["op"] == "get":
                got = await store.get(name)
                assert len(got) == size
            else:
                await store.get_to(name, path)
        else:
            obs = await js.object_store(RAW_BUCKET)
            peak = _Peak()
            cpu0, srv0 = _cpu(), _cpu(spec["server_pid"])
            t0 = time.perf_counter()
            if spec["op"] == "put":
                await obs.put(name, data)
            elif spec["op"] == "get":
                sink = io.BytesIO()
                await obs.get(name, writeinto=sink)
                assert sink.getbuffer().nbytes == size
            else:
                with open(path, "wb") as f:  # noqa: ASYNC230 - the baseline's own use
                    await obs.get(name, writeinto=f)
        seconds = time.perf_counter() - t0
        cpu_client, cpu_server = _cpu() - cpu0, _cpu(spec["server_pid"]) - srv0
        grew = peak.growth()
        if spec["op"] == "get_to":
            assert path.stat().st_size == size
            path.unlink()
    finally:
        await nc.close()
    return {"seconds": seconds, "mb_s": size / seconds / 1e6, "mem": grew / size,
            "cpu_client": cpu_client, "cpu_server": cpu_server}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_run_child(json.loads(sys.argv[1])))))
