"""`jetfleet demo`: an embedded fleet, real jobs end to end, and where to look.
`jetfleet demo --apps`: workers started on demand and calls passing objects
(ops/demo_apps.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from schemas.events import event_kind


async def _run_jobs(url: str, args: argparse.Namespace) -> tuple[bool, list[str]]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from sdk import Client

    console = Console()
    ids: list[str] = []
    async with await Client.connect(url) as client:
        for _ in range(100):  # wait for the first worker's advert
            if await client.workers():
                break
            await asyncio.sleep(0.2)
        t0 = time.monotonic()
        echo_id = await client.submit("echo", {"hello": "fleet"})
        ids.append(echo_id)
        echo = await client.wait(echo_id, timeout=60)
        console.print(f"[bold]echo[/bold] {echo_id}: {echo.state} on {echo.worker_id} "
                      f"in {time.monotonic() - t0:.2f}s -> {json.dumps(echo.result)}",
                      soft_wrap=True)

        sleep_id = await client.submit("sleep", {"seconds": 2, "steps": 8})
        ids.append(sleep_id)
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
        console.print("[bold]what ran[/bold]")
        for s in await client.list_jobs(limit=20):
            console.print(f"  {s.job_id}  {s.capability.get('type', '')}  {s.state}  "
                          f"attempt {s.attempt} on {s.worker_id or '-'}", soft_wrap=True)
        return ok, ids


async def _kernel_demo(client: Any, console: Any) -> bool:
    try:
        from ops.kernel_demo import kernel_demo
    except ImportError:
        console.print("kernel demo skipped: kernel support is not installed "
                      "(pip install -e '.[kernels]')")
        return True
    return bool(await kernel_demo(client, console))


def demo(args: argparse.Namespace) -> int:
    if getattr(args, "apps", None) is not None:
        from ops.demo_apps import apps_demo

        return apps_demo(args)
    from ops.demo_fleet import demo_fleet

    with demo_fleet(args) as fleet:
        ok, _ids = asyncio.run(_run_jobs(fleet.url, args))
    print()
    if ok:
        print("The demo ran every job to success on a fleet of its own, which is now stopped "
              "and cleaned up.")
    else:
        print("The demo finished, but not every job succeeded (see above).")
    print("To look around a fleet that stays up: run `jetfleet up` in one terminal, then in "
          "another `export JETFLEET_NATS_URL=<the URL it prints>` and try `jetfleet submit echo "
          "--payload '{\"a\": 1}' --wait`, `jetfleet jobs`, `jetfleet workers`.")
    return 0 if ok else 1
