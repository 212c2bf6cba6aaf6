"""`jetfleet nodes`: every node with its state, GPUs, last heartbeat and running jobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from ops.commands.common import ago, client_call, print_json, table


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("nodes", parents=common, help="nodes: state, GPUs, running jobs",
                        description="Every node the fleet knows: its state as the monitors "
                                    "decided (alive, lost; unknown without a monitor), its "
                                    "GPUs, its last heartbeat and the jobs running on it.")
    sp.add_argument("--state", choices=("alive", "lost", "unknown"),
                    help="only nodes in this state")
    sp.set_defaults(fn=cmd_nodes)


async def gather_nodes(client: Any) -> list[dict[str, Any]]:
    from bus import codec, kvread, topology
    from schemas.telemetry import Heartbeat, NodeInventory, NodeStatus
    from services.monitor.jobindex import JobView

    bus = client.bus
    inventories: dict[str, NodeInventory] = {}
    for key, raw in (await kvread.latest(await bus.kv(topology.KV_NODES))).items():
        with contextlib.suppress(codec.DecodeError):
            inventories[key] = codec.decode(raw, NodeInventory)
    states: dict[str, NodeStatus] = {}
    for key, raw in (await kvread.latest(await bus.kv(topology.KV_NODE_STATES))).items():
        with contextlib.suppress(codec.DecodeError):
            states[key] = codec.decode(raw, NodeStatus)
    running: dict[str, list[str]] = {}
    for raw in (await kvread.latest(await bus.kv(topology.KV_JOBS))).values():
        with contextlib.suppress(codec.DecodeError):
            view = codec.decode(raw, JobView)
            if view.state in ("running", "lost") and view.node:
                running.setdefault(view.node, []).append(view.job_id)
    names = sorted(set(inventories) | set(states))
    sem = asyncio.Semaphore(64)

    async def last_heartbeat(node: str) -> Heartbeat | None:
        async with sem:
            try:
                raw = await bus.js.get_last_msg(topology.TELEMETRY,
                                                topology.telemetry(node, topology.HEARTBEAT))
                return codec.decode(raw.data or b"", Heartbeat)
            except Exception:
                return None

    beats = await asyncio.gather(*(last_heartbeat(n) for n in names))
    out: list[dict[str, Any]] = []
    for node, hb in zip(names, beats, strict=True):
        inv, st = inventories.get(node), states.get(node)
        out.append({
            "node": node,
            "state": st.state if st else "unknown",
            "since": st.since if st else None,
            "hostname": (inv.hostname if inv else None) or (st.hostname if st else None),
            "gpu_backend": inv.gpu_backend if inv else None,
            "gpus": [codec.to_builtins(g) for g in inv.gpus] if inv else [],
            "simulated": bool((inv and inv.simulated) or (st and st.simulated)),
            "last_heartbeat": hb.ts if hb else None,
            "load1": hb.load1 if hb else None,
            "backlog": hb.backlog if hb else None,
            "jobs": sorted(running.get(node, [])),
            "agent_pid": inv.agent_pid if inv else None,
            "machine_id": inv.machine_id if inv else None,
        })
    return out


def _gpus(row: dict[str, Any]) -> str:
    gpus = [g for g in row["gpus"] if g.get("mig_parent") is None]
    if not gpus:
        return "-" if row["gpu_backend"] in (None, "absent") else str(row["gpu_backend"])
    if any(g.get("simulated") for g in gpus):
        return f"{len(gpus)} simulated"
    names = sorted({str(g.get("name") or "?").removeprefix("NVIDIA ") for g in gpus})
    return f"{len(gpus)} x {', '.join(names)}"


def _jobs(ids: list[str]) -> str:
    if not ids:
        return "0"
    return f"{len(ids)}: {ids[0]}" + (" ..." if len(ids) > 1 else "")


def cmd_nodes(args: argparse.Namespace) -> int:
    rows = client_call(args, gather_nodes)
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no nodes yet: start a node agent (`jetfleet run agent`, or `jetfleet up`)")
        return 0
    table("nodes", ["node", "state", "since", "host", "GPUs", "heartbeat", "jobs"],
          [[r["node"], r["state"], ago(r["since"]), r["hostname"] or "-", _gpus(r),
            ago(r["last_heartbeat"]), _jobs(r["jobs"])]
           for r in rows], keep=("node",))
    lost = sum(1 for r in rows if r["state"] == "lost")
    print(f"{len(rows)} nodes, {lost} lost, as of {time.strftime('%H:%M:%S')}")
    return 0
