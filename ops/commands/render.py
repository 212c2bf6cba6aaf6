"""Showing a job's state to a person: short results whole, long ones summarised."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ops.commands.common import print_json

LONG_RESULT = 1500  # characters of JSON above which a result is summarised


def show_state(state: Any, *, as_json: bool) -> None:
    if as_json:
        print_json(state)
        return
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{state.job_id}[/bold]  {state.state}  attempt {state.attempt}"
            f"  worker {state.worker_id or '-'}", soft_wrap=True)
    if state.error:
        c.print(f"[red]{state.error.code}[/red]: {state.error.message}", soft_wrap=True)
    if state.reason and state.reason != (state.error.message if state.error else None):
        c.print(f"reason: {state.reason}", soft_wrap=True)
    result = state.result
    if result is None:
        return
    text = json.dumps(result, default=str)
    if state.capability.get("type") == "kernel.evolve" and isinstance(result, dict):
        show_evolve(state.job_id, result, c)
    elif len(text) <= LONG_RESULT:
        c.print_json(text)
    else:
        show_summary(result, c)
    if len(text) > LONG_RESULT:
        c.print(f"(the whole result: jetfleet status {state.job_id} --json)", soft_wrap=True)


def show_summary(result: Any, c: Any) -> None:
    if not isinstance(result, dict):
        c.print(f"result: {type(result).__name__} of {len(json.dumps(result, default=str))} "
                "characters")
        return
    for key, value in result.items():
        brief = json.dumps(value, default=str)
        if len(brief) > 80:
            kind = (f"{len(value)} items" if isinstance(value, list | dict)
                    else f"{len(brief)} characters")
            brief = f"<{type(value).__name__}, {kind}>"
        c.print(f"  {key}: {brief}", soft_wrap=True)


def show_evolve(job_id: str, result: dict[str, Any], c: Any) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"candidates ({result.get('generator')} generator)", box=box.SIMPLE_HEAD)
    for col in ("id", "round", "island", "parent", "outcome", "speed-up", "ms"):
        t.add_column(col, no_wrap=True)
    best = result.get("best") or {}
    for cand in result.get("candidates", []):
        timings = cand.get("timings") or {}
        speedup = cand.get("speedup")
        ms = timings.get("candidate_ms")
        t.add_row(cand.get("id", "?"), str(cand.get("round")), str(cand.get("island")),
                  cand.get("parent") or "-", cand.get("outcome") or f"({cand.get('state')})",
                  "-" if speedup is None else f"{speedup:.3g}x",
                  "-" if ms is None else f"{ms:.3g}",
                  style="bold green" if cand.get("id") == best.get("id") else None)
    c.print(t)
    if best.get("source"):
        folder = Path(tempfile.gettempdir()) / "jetfleet-kernels"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job_id}-best.py"
        path.write_text(best["source"])
        speed = best.get("speedup")
        c.print(f"best: {best.get('id')} {best.get('outcome')}"
                + (f", speed-up {speed:.3g}x" if isinstance(speed, int | float) else "")
                + f"; source in {os.fspath(path)}", soft_wrap=True)
    if result.get("timings_representative") is False:
        c.print("timings ran under Triton's interpreter: they rank candidates, they do not "
                "measure GPU speed", soft_wrap=True)
