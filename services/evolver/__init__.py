"""The kernel evolver: `kernel.generate`, `kernel.single` and `kernel.evolve` as a
component of its own (`jetfleet run evolver`): a Worker serving this App.

    population.py   candidates, scoring, islands, elites, migration (pure)
    generators.py   where candidates come from: template search or an LLM
    evaluation.py   candidates evaluated as child jobs on kernel workers
    handlers.py     the three capabilities, thin
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from services.evolver.evaluation import child_id
from services.evolver.handlers import evolver

DEFAULT_CAPACITY = 8

__all__ = ["DEFAULT_CAPACITY", "child_id", "evolver", "serve"]


async def serve(bus: Any, stopping: asyncio.Event, *, capacity: int | None = None,
                worker_id: str | None = None, control: Any = None) -> None:
    """`jetfleet run evolver`: a Worker serving this App until `stopping` is set."""
    from agents.devices import node_name
    from agents.worker.runtime import Worker

    w = Worker(bus, evolver, capacity=capacity or DEFAULT_CAPACITY,
               cheap_capacity=capacity or DEFAULT_CAPACITY,
               worker_id=worker_id or f"evolver-{node_name()}-{os.getpid()}", control=control)
    await w.serve_until(stopping)
