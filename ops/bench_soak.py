"""`jetfleet bench soak`: a long job stream through a whole fleet while its
parts are killed, then counted: nothing lost, nothing done twice, no device
held by two at once.

The fleet is what `jetfleet up` starts (ops.launcher.Fleet): an embedded nats-server with a file store (or
`--soak-cluster 3` routed servers with everything replicated), dispatchers,
workers on simulated GPUs (two nodes, two workers sharing each node's
devices), the monitor, the query service and a node agent per node. Short
TTLs and ack waits (3 s), as the failure tests use, so a dead worker's job
moves on in seconds.

    baseline  --soak-baseline jobs with no faults: jobs/s, the same fleet
    soak      --jobs jobs while, every --soak-kill-every s on average, a
              random worker, dispatcher, monitor, query service or agent is
              killed with -9 and started again half a second later (a member
              that dies unkilled is a crash: restarted, and counted); at a third of the
              way the server is killed and restarted on its store (a cluster:
              one server restarted, and at two thirds another killed -9 and
              left down)

Recovery of a component: until its new process answers on its control
endpoint. Of a server: until every component answers again, and until the
first job submitted after the fault ended. The audit reads KV `jobs` and the
EVENTS stream afresh after the run and replays every write to KV `leases`.
Exit status 0 only when nothing was lost, doubled or held twice and no
component died unkilled. JETFLEET_SOAK_DIR=DIR keeps each run's data and logs
(in a folder of its own under DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bus import topology
from bus.connection import connect
from bus.server import EmbeddedCluster, EmbeddedServer
from bus.settings import Settings
from ops.launcher import Fleet
from ops.soakkit import Chaos, Fault, JobStream, LeaseTap, audit, summarize
from sdk import Client

FAST = {"JETFLEET_LEASE_TTL_S": "3", "JETFLEET_ADVERT_TTL_S": "3",
        "JETFLEET_WORK_ACK_WAIT_S": "3", "JETFLEET_SUBMIT_ACK_WAIT_S": "5"}
NODES = ("soak-n0", "soak-n1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soak-cluster", type=int, default=0, metavar="N",
                   help="soak: N routed servers, everything replicated (default: one server)")
    p.add_argument("--soak-workers", type=int, default=4, metavar="N",
                   help="soak: worker processes, spread over two nodes (default 4)")
    p.add_argument("--soak-dispatchers", type=int, default=2, metavar="N",
                   help="soak: dispatcher processes (default 2)")
    p.add_argument("--soak-kill-every", type=float, default=5.0, metavar="S",
                   help="soak: seconds between kill -9s, on average (default 5; 0: none)")
    p.add_argument("--soak-baseline", type=int, default=None, metavar="N",
                   help="soak: jobs in the fault-free baseline (default a tenth of --jobs)")
    p.add_argument("--soak-gpu-share", type=float, default=0.2, metavar="F",
                   help="soak: share of jobs that lease a simulated GPU (default 0.2)")
    p.add_argument("--soak-no-server-faults", action="store_true",
                   help="soak: no server restart or kill")
    p.add_argument("--soak-seed", type=int, default=1, metavar="N", help="soak: random seed")


def _layout(workers: int, dispatchers: int, data: Path) -> list[tuple[str, str, list[str]]]:
    children: list[tuple[str, str, list[str]]] = []
    children += [("dispatcher", f"dispatcher-{i}", ["--unschedulable-after", "120"])
                 for i in range(dispatchers)]
    # Two workers per node share its GPUs: they contend for the same lease keys.
    children += [("worker", f"worker-{i}", ["--simulate-gpus", "2", "--no-kernels",
                                            "--node", NODES[i % len(NODES)]])
                 for i in range(workers)]
    children += [("monitor", "monitor", ["--lost-after", "15"]),
                 ("query", "query", ["--port", "0", "--db", str(data / "query.duckdb")])]
    children += [("agent", f"agent-{n}", ["--node", n, "--simulate-gpus", "2",
                                          "--heartbeat", "1", "--metrics-interval", "5"])
                 for n in NODES]
    return children


async def _server_fault(fleet: Fleet, chaos: Chaos, kind: str, index: int) -> Fault:
    """Restart (or, `kind` "kill", kill -9 and leave down) one server; measure
    until every component answers on its control endpoint again."""
    server = fleet.server
    assert server is not None
    target: EmbeddedServer = (server.servers[index] if isinstance(server, EmbeddedCluster)
                              else server)
    t0 = time.monotonic()
    fault = Fault(what="server kill -9" if kind == "kill" else "server restart",
                  victim=target.server_name or "server", at_s=time.time() - chaos.started,
                  at=time.time())
    if kind == "kill":
        await asyncio.to_thread(target.kill)
    elif isinstance(server, EmbeddedCluster):
        await asyncio.to_thread(target.stop)  # SIGTERM: a rolling restart
        await asyncio.to_thread(target.start)
    else:
        await asyncio.to_thread(target.kill)  # no shutdown at all, then back on its store
        await asyncio.to_thread(target.start)
    down = round(time.monotonic() - t0, 2)
    back = await chaos.all_answer(timeout=120)
    fault.recovered_s = None if back is None else round(back + down, 2)
    fault.detail = f"down {down:.2f}s"
    chaos.faults.append(fault)
    return fault


async def _run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    n = int(args.jobs)
    baseline_n = int(args.soak_baseline if args.soak_baseline is not None else max(500, n // 10))
    os.environ.update(FAST)
    os.environ.setdefault("JETFLEET_LOG", "WARNING")
    fleet = Fleet(data, children=_layout(args.soak_workers, args.soak_dispatchers, data),
                  cluster=args.soak_cluster if args.soak_cluster > 1 else 0, quiet=True)
    await asyncio.to_thread(fleet.start)
    settings = Settings.from_env({**os.environ, **fleet.env, "JETFLEET_NATS_URL": fleet.url})
    bus = await connect(settings, name="soak", connect_timeout=60)
    client = Client(bus)
    chaos = Chaos(fleet, bus, time.time(), args.soak_kill_every, args.soak_seed)
    supervisor = asyncio.create_task(chaos.supervise())
    tap = LeaseTap(bus)
    out: dict[str, Any] = {"jobs": n, "baseline_jobs": baseline_n,
                           "cluster": args.soak_cluster, "workers": args.soak_workers,
                           "dispatchers": args.soak_dispatchers}
    try:
        ready = await chaos.all_answer(timeout=180)
        if ready is None:
            raise RuntimeError("the fleet did not come up (see its logs in "
                               f"{data / 'logs'})")
        events_from = (await bus.js.stream_info(topology.EVENTS)).state.last_seq
        dead_from = (await bus.js.stream_info(topology.DEAD)).state.last_seq
        await tap.start()
        # Baseline: the same fleet and mix, no faults.
        base = JobStream(client, "base", gpu_share=args.soak_gpu_share, seed=args.soak_seed)
        await base.follow()
        await base.run(baseline_n)
        await base.wait_ended(timeout=max(120.0, baseline_n / 20))
        await base.stop()
        out["baseline_jobs_per_s"] = round(base.jobs_per_s(), 1)
        # The soak.
        chaos.started = time.time()
        stream = JobStream(client, "soak", gpu_share=args.soak_gpu_share, seed=args.soak_seed)
        await stream.follow()
        submitting = asyncio.create_task(stream.run(n))
        stop_kills = asyncio.Event()
        killer = asyncio.create_task(chaos.run(stop_kills)) if args.soak_kill_every > 0 else None
        server_faults: list[tuple[float, str, int]] = []
        if not args.soak_no_server_faults:
            server_faults.append((1 / 3, "restart", 0))
            if args.soak_cluster > 1:
                server_faults.append((2 / 3, "kill", 1))
        for share, kind, index in server_faults:
            while len(stream.ended) < share * n and not (submitting.done() and
                                                         not stream.pending):
                await asyncio.sleep(0.1)
            await _server_fault(fleet, chaos, kind, index)
        await submitting
        ended = await stream.wait_ended(timeout=max(300.0, n / 20))
        stop_kills.set()
        if killer is not None:
            await killer
        await chaos.settle()
        await stream.stop()
        out["all_ended"] = ended
        out["jobs_per_s"] = round(stream.jobs_per_s(), 1)
        out["wall_s"] = round(stream.last_end - stream.first_submit, 1)
        await asyncio.sleep(1.0)  # the tap reads the last releases
        await tap.stop()
        result = await audit(bus, stream.submitted + base.submitted, int(events_from),
                             int(dead_from))
        violations = tap.violations(settings.lease_ttl_s)
        out.update({
            "states": dict(result.states), "lost": len(result.lost),
            "lost_ids": result.lost[:20], "duplicates": len(result.duplicates),
            "duplicate_ids": result.duplicates[:20],
            "lease_writes": tap.writes, "lease_writes_missed": tap.missed,
            "lease_double_holds": len(violations), "lease_violations": violations[:10],
            "lost_attempts": result.events.get("lost", 0),
            "retries": result.events.get("retrying", 0),
            "dead_letters": result.dead_letters,
            "kills": summarize([f for f in chaos.faults if not f.what.startswith("server")]),
            "server_faults": [{**vars(f), "stall_s": stream.stall(f.at)}
                              for f in chaos.faults if f.what.startswith("server")],
            "kill_total": sum(1 for f in chaos.faults if not f.what.startswith("server")),
            "crashes": chaos.crashes,
            "timeline": [{"at_s": round(f.at_s, 2), "what": f.what, "victim": f.victim,
                          "recovered_s": f.recovered_s} for f in chaos.faults],
        })
        return out
    finally:
        supervisor.cancel()
        await tap.stop()
        await bus.close()
        await asyncio.to_thread(fleet.stop)


def main(args: argparse.Namespace) -> int:
    keep = os.environ.get("JETFLEET_SOAK_DIR")
    if keep:
        # A folder of its own per run: a store left by an earlier run would
        # hold its jobs, and the same job ids again would be duplicates.
        data = Path(keep) / time.strftime("run-%Y%m%d-%H%M%S")
        data.mkdir(parents=True)
        out = asyncio.run(_run(args, data))
        out["data_dir"] = str(data)
    else:
        with tempfile.TemporaryDirectory(prefix="jetfleet-soak-") as tmp:
            out = asyncio.run(_run(args, Path(tmp)))
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
    else:
        _print(out)
    ok = (out["all_ended"] and out["lost"] == 0 and out["duplicates"] == 0
          and out["lease_double_holds"] == 0 and not out["crashes"])
    return 0 if ok else 1


def _print(out: dict[str, Any]) -> None:
    where = (f"{out['cluster']} routed servers, R3" if out["cluster"] > 1
             else "one server, file store")
    print(f"soak: {out['jobs']} jobs ({where}; {out['dispatchers']} dispatchers, "
          f"{out['workers']} workers on simulated GPUs, monitor, query, 2 agents)")
    print(f"  jobs/s under faults {out['jobs_per_s']}  vs  baseline without faults "
          f"{out['baseline_jobs_per_s']} ({out['baseline_jobs']} jobs, same fleet, same run)")
    print(f"  wall {out['wall_s']} s; states {out['states']}")
    print(f"  lost {out['lost']} (must be 0)  duplicates {out['duplicates']} (must be 0)  "
          f"lease double-holds {out['lease_double_holds']} (must be 0) over "
          f"{out['lease_writes']} lease writes ({out['lease_writes_missed']} unread)")
    print(f"  attempts lost to kills {out['lost_attempts']}, retries {out['retries']}, "
          f"dead letters {out['dead_letters']}; crashes (died unkilled) "
          f"{len(out['crashes'])} (must be 0) {' '.join(out['crashes'])}")
    head = f"  {'killed (-9)':<14}{'kills':>6}{'recovered':>10}{'min s':>8}{'median s':>10}{'max s':>8}"
    print(head)
    for k in out["kills"]:
        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.2f}"
        print(f"  {k['what']:<14}{k['kills']:>6}{k['recovered']:>10}{fmt(k['min_s']):>8}"
              f"{fmt(k['median_s']):>10}{fmt(k['max_s']):>8}")
    for f in out["server_faults"]:
        back = "-" if f["recovered_s"] is None else f"{f['recovered_s']:.2f}s"
        print(f"  {f['what']} ({f['victim']}) at {f['at_s']:.0f}s: {f['detail']}; every "
              f"component answering after {back}; longest spell with no job ending "
              f"{f['stall_s']:.2f}s")
