"""The kernel part of `jetfleet demo`: a real evolve job through the embedded fleet.

Two rounds of two candidates on the library's softmax problem, each candidate a
`kernel.profile` child job on a kernel worker (interpreted on CPU when the host
has no GPU). Shows progress per round, the candidates table, and writes the
best kernel's source to a file.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from schemas.events import event_kind

PROBLEM = "softmax"
ROUNDS, PARALLEL = 2, 2


async def _wait_for_capabilities(client: Any, types: set[str], timeout: float = 90.0) -> set[str]:
    """Adverts come up as the children start (a kernel worker imports nothing heavy,
    but the first start of a fleet can take a few seconds)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = {c.get("type", "") for a in await client.workers() for c in a.capabilities}
        if types <= seen:
            break
        await asyncio.sleep(0.3)
    return types - seen


def _abbrev(name: str) -> str:
    """BLOCK_SIZE -> BS, NUM_WARPS -> NW: launch parameters fit an 80-column table."""
    return "".join(part[:1] for part in name.split("_") if part) or name


def _fmt(x: float | None, spec: str = ".3g", none: str = "-") -> str:
    return none if x is None else format(x, spec)


async def kernel_demo(client: Any, console: Any, out_dir: str | Path | None = None,
                      problem: str = PROBLEM, rounds: int = ROUNDS,
                      parallel: int = PARALLEL, show_source: bool = True) -> bool:
    """Run an evolve job end to end; True when its best candidate passed."""
    from rich import box
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    missing = await _wait_for_capabilities(client, {"kernel.evolve", "kernel.profile"})
    if missing:
        console.print(f"[red]kernel demo: nothing serves {', '.join(sorted(missing))}[/red] "
                      "(are torch and triton installed? pip install -e '.[kernels]')")
        return False
    console.print()
    console.print(f"[bold]kernel.evolve[/bold] {problem}: {rounds} rounds x {parallel} "
                  "candidates, each a kernel.profile child job")
    t0 = time.monotonic()
    job_id = await client.submit("kernel.evolve", {
        "problem": problem, "max_rounds": rounds, "parallel_num": parallel, "islands": 2,
        "eval_timeout_s": 90})
    with Progress(TextColumn("[bold]evolve[/bold] {task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=1.0)
        async for event in client.events(job_id, timeout=300):
            kind = event_kind(event)
            if kind == "progress":
                msg = getattr(event, "message", None) or ""
                frac = getattr(event, "progress", None)
                bar.update(task, completed=frac if frac is not None else None,
                           description=f"{job_id} {msg}")
            elif kind in ("succeeded", "failed", "dead", "cancelled"):
                bar.update(task, completed=1.0, description=f"{job_id} {kind}")
    state = await client.wait(job_id, timeout=30)
    elapsed = time.monotonic() - t0
    if state.state != "succeeded":
        err = state.error
        console.print(f"[red]evolve {state.state}[/red]: "
                      f"{err.code + ': ' + err.message if err else state.reason}")
        return False
    result = state.result
    table = Table(title=f"candidates of {job_id} ({result['generator']} generator)",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col, right in (("id", False), ("rnd", True), ("isl", True), ("parent", False),
                       ("params", False), ("outcome", False), ("speed-up", True),
                       ("ms", True), ("ref ms", True), ("wall s", True)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True,
                         min_width=len(col))
    best_id = (result.get("best") or {}).get("id")
    for c in result["candidates"]:
        t = c.get("timings") or {}
        params = " ".join(f"{_abbrev(k)}={v}" for k, v in (c.get("params") or {}).items())
        style = "bold green" if c["id"] == best_id else None
        table.add_row(c["id"], str(c["round"]), str(c["island"]), c.get("parent") or "-",
                      params, c.get("outcome") or f"({c.get('state')})",
                      _fmt(c.get("speedup"), ".2g"), _fmt(t.get("candidate_ms"), ".3g"),
                      _fmt(t.get("reference_ms"), ".2g"), _fmt(c.get("wall_s"), ".1f"),
                      style=style)
    console.print(table)
    if result.get("timings_representative") is False:
        console.print("[yellow]timings ran under Triton's interpreter on CPU: they rank the "
                      "candidates but say nothing about GPU speed[/yellow]")
    best = result.get("best")
    if not best:
        console.print("[red]no candidate produced an outcome[/red]")
        return False
    if out_dir is not None:
        path = await asyncio.to_thread(_write_best, Path(out_dir), f"best_{problem}_{best['id']}.py",
                                       best["source"])
        console.print(f"best kernel source: {os.fspath(path)}")
    console.print(f"best: {best['id']} (round {best['round']}, island {best['island']}) "
                  f"{best['outcome']['outcome']}, speed-up {_fmt(best.get('speedup'))}x; "
                  f"evolve took {elapsed:.1f}s")
    if show_source:
        from rich.syntax import Syntax

        console.print(Syntax(best["source"], "python", line_numbers=False))
    return bool(best.get("correct"))


def _write_best(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(source)
    return path
