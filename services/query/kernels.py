"""Kernel outcomes and candidates, read out of `succeeded` results.

kernel.verify / kernel.profile results are a KernelOutcome (schemas/kernels.py);
kernel.evolve results list every candidate; kernel.single names one. Results
are lenient on the wire, so a result that does not have the expected shape is
left out here (it is still in the job's record), never an error.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from schemas.kernels import KernelOutcome

EVAL_TYPES = frozenset({"kernel.verify", "kernel.profile"})
SEARCH_TYPES = frozenset({"kernel.evolve", "kernel.single"})


def outcome_row(job: dict[str, Any], ts: float) -> tuple[Any, ...] | None:
    try:
        o = msgspec.convert(job["result"], KernelOutcome)
    except (msgspec.ValidationError, TypeError):
        return None
    t = o.timings
    return (job["job_id"], o.kind, job["capability_type"], job["parent_job_id"], job["node"],
            ts, o.outcome, o.correct, t.speedup if t else None, t.candidate_ms if t else None,
            t.reference_ms if t else None, t.representative if t else None, o.interpreted,
            o.device, list(o.flags), o.max_abs_error, o.wall_s)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def candidate_rows(job: dict[str, Any], ts: float) -> list[tuple[Any, ...]]:
    result = job["result"]
    if not isinstance(result, dict):
        return []
    if job["capability_type"] == "kernel.single":
        cand = result.get("candidate")
        if not isinstance(cand, dict):
            return []
        items = [{**cand, "id": "c0", "round": 1, "island": 0, "job_id": result.get("job_id"),
                  "outcome": result.get("outcome"), "correct": result.get("correct"),
                  "speedup": result.get("speedup")}]
    else:
        raw = result.get("candidates")
        items = [c for c in raw if isinstance(c, dict)] if isinstance(raw, list) else []
    rows = []
    for c in items:
        cid = _str(c.get("id"))
        if cid is None:
            continue
        outcome = c.get("outcome")
        timings = (outcome.get("timings") if isinstance(outcome, dict) else None) \
            or c.get("timings")
        timings = timings if isinstance(timings, dict) else {}
        if isinstance(outcome, dict):
            outcome = outcome.get("outcome")
        params = c.get("params")
        rows.append((job["job_id"], cid, _str(c.get("job_id")), _int(c.get("round")),
                     _int(c.get("island")), _str(c.get("origin")), _str(c.get("parent")),
                     _str(c.get("hash")), _str(outcome), bool(c.get("correct")),
                     _num(c.get("speedup")), _num(timings.get("candidate_ms")),
                     _num(timings.get("reference_ms")),
                     None if params is None else json.dumps(params), _str(c.get("source")), ts))
    return rows
