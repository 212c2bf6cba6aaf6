"""`jetfleet demo`: an embedded fleet, real jobs end to end, and where to look."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.events import event_kind


async def _run_jobs(url: str, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from sdk import Client

    console = Console()
    async with await Client.connect(url) as client:
        for _ in range(100):  # wait for the first worker's advert
            if await client.workers():
                break
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        echo_id = await client.submit("echo", {"hello": "fleet"})
        echo = await client.wait(echo_id, timeout=60)
        console.print(f"[bold]echo[/bold] {echo_id}: {echo.state} on {echo.worker_id} "
                      f"in {time.monotonic() - t0:.2f}s -> {json.dumps(echo.result)}")

        sleep_id = await client.submit("sleep", {"seconds": 2, "steps": 8})
        with Progress(TextColumn("[bold]sleep[/bold] {task.description}"), BarColumn(),
                      TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task(sleep_id, total=1.0)
            async for event in client.events(sleep_id, timeout=60):
                kind = event_kind(event)
                if kind == "progress" and getattr(event, "progress", None) is not None:
                    bar.update(task, completed=event.progress)  # type: ignore[union-attr]
                elif kind in ("succeeded", "failed", "dead", "cancelled"):
                    bar.update(task, completed=1.0, description=f"{sleep_id} {kind}")
        sleep = await client.wait(sleep_id, timeout=10)
        ok = echo.state == "succeeded" and sleep.state == "succeeded"
        if not args.quick:
            ok = await _kernel_demo(client, console) and ok
        console.print()
        console.print("[bold]summary[/bold]")
        for s in await client.list_jobs(limit=20):
            console.print(f"  {s.job_id:40} {s.capability.get('type', ''):14} {s.state:10} "
                          f"attempt {s.attempt} on {s.worker_id or '-'}")
        console.print(f"\nwhere to look: `nats --server {url} sub 'events.jobs.>'`, "
                      f"`nats kv ls jobs`, `jetfleet --nats {url} jobs`")
        return 0 if ok else 1


async def _kernel_demo(client: Any, console: Any) -> bool:
    try:
        from ops.kernel_demo import kernel_demo
    except ImportError:
        console.print("kernel demo skipped: kernel support is not installed "
                      "(pip install -e '.[kernels]')")
        return True
    return bool(await kernel_demo(client, console))


def demo(args: argparse.Namespace) -> int:
    from ops.launcher import Fleet

    data = Path(args.data_dir) if args.data_dir != ".jetfleet" else Path(
        tempfile.mkdtemp(prefix="jetfleet-demo-"))
    worker_args = ["--simulate-gpus", str(args.simulate_gpus)] if args.simulate_gpus else []
    fleet = Fleet(data, nats_port=args.nats_port, workers=max(1, args.workers),
                  worker_args=worker_args, unschedulable_after=args.unschedulable_after)
    fleet.start()
    print(f"embedded fleet: nats at {fleet.url}, data and logs in {data}")
    try:
        return asyncio.run(_run_jobs(fleet.url, args))
    finally:
        ended = fleet.stop()
        print("fleet stopped: " + ", ".join(f"{k}: {v}" for k, v in ended.items()))
