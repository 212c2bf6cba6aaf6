"""`jetfleet demo --apps`: a worker started on demand, and calls passing an
object between capabilities.

An embedded fleet whose node agent is given the image chain of examples/
(image.thumbnail -> image.describe -> image.report) with min = 0: nothing
serves it until the demo calls it. The demo puts a picture in the object
store, calls image.thumbnail with its ObjRef, shows the agent starting the
worker, the three linked jobs and the report they wrote, waits for the idle
rule to stop the worker, then stops the fleet and removes what it made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ops.commands.common import UserError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
IDLE_STOP_S = 3.0


def _apps_toml(folder: Path) -> Path:
    path = folder / "demo-apps.toml"
    path.write_text(f'[[app]]\napp = "chain:app"\nname = "images"\ncwd = "{EXAMPLES}"\n'
                    f"min = 0\nmax = 1\nidle_stop_s = {IDLE_STOP_S}\n")
    return path


async def _node_events(client: Any, node: str, out: list[dict[str, Any]]) -> Any:
    from nats.js.api import DeliverPolicy

    from bus import topology

    async def on(msg: Any) -> None:
        out.append(json.loads(msg.data))

    return await client.bus.js.subscribe(topology.node_events(node), cb=on,
                                         ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)


async def _when(events: list[dict[str, Any]], kind: str, within: float) -> list[dict[str, Any]]:
    """The node events of `kind` heard so far, waiting up to `within` s for the first."""
    deadline = time.monotonic() + within
    while not any(e["kind"] == kind for e in events) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return [e for e in events if e["kind"] == kind]


async def _agent_ready(client: Any, instance: str, timeout: float = 60.0) -> dict[str, Any]:
    """The agent's control info once it knows what the app serves."""
    from bus import control

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await control.request(client.bus, "agent", instance, "info", timeout=1.0)
        except Exception:
            info = {}
        apps = info.get("apps") or []
        if apps and apps[0].get("state") in ("ready", "unusable", "failed"):
            return dict(info)
        await asyncio.sleep(0.2)
    raise UserError(f"the node agent did not load the demo's app within {timeout:g}s")


async def _run(url: str, agent_instance: str) -> bool:
    from rich.console import Console

    from bus import codec
    from sdk import Client
    from sdk.objects import Objects

    sys.path.insert(0, str(EXAMPLES))
    from testcard import testcard

    c = Console()
    events: list[dict[str, Any]] = []
    async with await Client.connect(url) as client:
        info = await _agent_ready(client, agent_instance)
        node, app = info["node"], info["apps"][0]
        if app["state"] != "ready":
            c.print(f"[red]the agent cannot use the demo's app[/red] ({app['state']}): "
                    f"{app.get('problem') or 'see the agent log'}", soft_wrap=True)
            return False
        sub = await _node_events(client, node, events)
        serving = [a.worker_id for a in await client.workers()
                   if any(cap.get("type", "").startswith("image.") for cap in a.capabilities)]
        c.print(f"[bold]1.[/bold] node agent {node} may start [bold]{app['name']}[/bold] "
                f"({', '.join(app['capabilities'])}) on demand; workers serving it now: "
                f"{len(serving)}", soft_wrap=True)

        objects = Objects(client)
        ref = await objects.put(testcard(), name="demo/testcard.jpg", ttl=3600)
        c.print(f"[bold]2.[/bold] a 1024x768 JPEG in the object store: {ref.name} "
                f"({ref.size} bytes, {ref.digest})", soft_wrap=True)

        t0 = time.time()
        job = await client.submit("image.thumbnail", {"image": codec.to_builtins(ref)})
        c.print(f"[bold]3.[/bold] call image.thumbnail {job} with the picture's ObjRef ...",
                soft_wrap=True)
        state = await client.wait(job, timeout=120)
        took = time.time() - t0
        if state.state != "succeeded":
            c.print(f"[red]{job} ended {state.state}[/red]: {state.error or state.reason}")
            return False
        out = state.result
        # The node's events come on a stream of their own: give them a moment.
        for e in (await _when(events, "app_started", within=10.0))[:1]:
            c.print(f"   the agent started worker {e['worker_id']} (pid {e['pid']}) because "
                    f"{e['reason']}; it was ready {e['start_s']:.2f}s after its spawn",
                    soft_wrap=True)
        c.print(f"   answered in {took:.2f}s, cold start included: {out['description']}",
                soft_wrap=True)

        c.print("[bold]4.[/bold] three jobs, each calling the next with ObjRefs:")
        jobs = {s.capability.get("type"): s for s in await client.list_jobs(limit=20)}
        for ctype in ("image.thumbnail", "image.describe", "image.report"):
            s = jobs.get(ctype)
            if s is not None:
                parent = f" child of {s.parent_job_id}" if s.parent_job_id else ""
                c.print(f"   {s.job_id}  {ctype:16s} {s.state} on {s.worker_id}{parent}",
                        soft_wrap=True)
        report = bytes(await objects.get(out["report"])).decode()
        c.print(f"[bold]5.[/bold] the report ({out['report']['name']}):")
        for line in report.strip().splitlines():
            c.print(f"   {line}", soft_wrap=True)

        c.print(f"[bold]6.[/bold] idle for {IDLE_STOP_S:g}s, the worker is stopped ...")
        stopped = await _when(events, "app_stopped", within=IDLE_STOP_S + 30)
        if stopped:
            c.print(f"   app_stopped: {stopped[0]['worker_id']} ({stopped[0]['reason']})",
                    soft_wrap=True)
        else:
            c.print("   [red]the worker was not stopped in time[/red]")
        c.print(f"   every start and stop is on events.nodes.{node} "
                f"(`nats sub 'events.nodes.>'`)", soft_wrap=True)
        await sub.unsubscribe()
        for name in ("demo/testcard.jpg", out["thumbnail"]["name"], out["report"]["name"]):
            await objects.delete(name)
        return bool(stopped) and not [e for e in events if e["kind"] == "app_failed"]


def apps_demo(args: argparse.Namespace) -> int:
    from ops.demo_fleet import demo_fleet

    if args.apps:
        raise UserError("jetfleet demo --apps takes no file: it runs its own image chain "
                        "(for your apps: jetfleet up --apps FILE)")
    if not (EXAMPLES / "chain.py").exists():
        raise UserError(f"the apps demo needs the examples of a source checkout "
                        f"({EXAMPLES} is missing)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserError("the apps demo's image chain needs Pillow: pip install pillow") from None
    def prepare(data: Path) -> None:
        args.apps = str(_apps_toml(data))
        args.workers = 0  # only what the agent starts serves the chain

    with demo_fleet(args, prepare) as fleet:
        agent = next(c for c in fleet.children if c.component == "agent")
        ok = asyncio.run(_run(fleet.url, agent.instance))
    print()
    print("The apps demo started a worker on demand, ran a chain of three calls passing "
          "objects by reference, and saw the worker stopped when idle." if ok else
          "The apps demo finished, but not everything went as it should (see above).")
    print("Your own apps: see docs/apps.md (`jetfleet up --apps apps.toml`, "
          "`jetfleet call TYPE --payload JSON`).")
    return 0 if ok else 1
