"""Candidates and their population: pure data and selection, no bus.

Scoring: correct first, then speed-up (reference_ms / candidate_ms). Islands
keep their `elite_size` best correct candidates; every `migration_interval`
rounds each island's best joins the next (a ring). Parents are drawn
rank-weighted from their island's elites, else from every elite, else the
best candidate so far.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from agents.kernels.generate import tunable_values

# Candidate records keep this much of a child's stdout/stderr/traceback.
TAIL_CHARS = 1000


@dataclass
class Candidate:
    id: str
    round: int
    index: int
    island: int
    source: str
    hash: str
    origin: str  # seed | template | mutation | llm | given
    parents: list[str] = field(default_factory=list)
    lineage: list[str] = field(default_factory=list)
    job_id: str | None = None
    state: str | None = None
    outcome: dict[str, Any] | None = None
    error: str | None = None

    @property
    def correct(self) -> bool:
        return bool(self.outcome and self.outcome.get("correct"))

    @property
    def speedup(self) -> float | None:
        timings = (self.outcome or {}).get("timings") or {}
        value = timings.get("speedup")
        return float(value) if isinstance(value, int | float) else None

    def score(self) -> tuple[int, float]:
        return (1 if self.correct else 0, self.speedup or 0.0)

    def record(self, source_ref: dict[str, Any] | None) -> dict[str, Any]:
        o = self.outcome or {}
        rec: dict[str, Any] = {
            "id": self.id, "job_id": self.job_id, "round": self.round, "index": self.index,
            "island": self.island, "origin": self.origin, "parents": self.parents,
            "parent": self.parents[0] if self.parents else None, "lineage": self.lineage,
            "hash": self.hash, "params": params(self.source), "state": self.state,
            "outcome": o.get("outcome"), "correct": self.correct, "speedup": self.speedup,
            "score": list(self.score()), "flags": o.get("flags", []),
            "errors": {
                "error": self.error or o.get("error"),
                "max_abs_error": o.get("max_abs_error"),
                "mean_abs_error": o.get("mean_abs_error"),
                "max_rel_error": o.get("max_rel_error"),
                "traceback": tail(o.get("traceback")),
                "stderr_tail": tail(o.get("stderr_tail")),
            },
            "timings": o.get("timings"), "interpreted": o.get("interpreted"),
            "device": o.get("device"), "wall_s": o.get("wall_s"),
        }
        if source_ref is not None:
            rec["source_ref"] = source_ref
        else:
            rec["source"] = self.source
        return rec

    def brief(self) -> dict[str, Any]:
        return {"id": self.id, "round": self.round, "island": self.island,
                "outcome": (self.outcome or {}).get("outcome"), "correct": self.correct,
                "speedup": self.speedup}


def tail(text: Any) -> Any:
    if isinstance(text, str) and len(text) > TAIL_CHARS:
        return "..." + text[-TAIL_CHARS:]
    return text


def params(source: str) -> dict[str, int]:
    try:
        return tunable_values(source)
    except SyntaxError:
        return {}


def best(cands: list[Candidate]) -> Candidate | None:
    scored = [c for c in cands if c.outcome is not None]
    return max(scored, key=lambda c: c.score()) if scored else None


def representative(cands: list[Candidate]) -> bool | None:
    """Whether the timings measure real kernels (False under Triton's interpreter)."""
    reps = [((c.outcome or {}).get("timings") or {}).get("representative") for c in cands]
    known = [r for r in reps if r is not None]
    return all(known) if known else None


class Population:
    """Islands of elites, parent choice and migration."""

    def __init__(self, islands: int, elite_size: int) -> None:
        self.islands = [list[Candidate]() for _ in range(islands)]
        self.elite_size = elite_size

    def update(self, batch: list[Candidate]) -> None:
        for k, elites in enumerate(self.islands):
            pool = {c.hash: c for c in elites}
            for c in batch:
                if c.island == k and c.correct:
                    pool.setdefault(c.hash, c)
            self.islands[k] = sorted(pool.values(), key=lambda c: c.score(), reverse=True)[
                : self.elite_size]

    def migrate(self) -> list[tuple[str, int, int]]:
        """Each island's best joins the next island (ring); returns (id, from, to)."""
        moves = []
        bests = [elites[0] if elites else None for elites in self.islands]
        for k, b in enumerate(bests):
            to = (k + 1) % len(self.islands)
            if b is None or to == k:
                continue
            if all(c.hash != b.hash for c in self.islands[to]):
                self.islands[to] = sorted([*self.islands[to], b], key=lambda c: c.score(),
                                          reverse=True)[: self.elite_size]
                moves.append((b.id, k, to))
        return moves

    def parent(self, island: int, rng: random.Random,
               fallback: list[Candidate]) -> Candidate | None:
        pool = self.islands[island] or sorted(
            {c.hash: c for elites in self.islands for c in elites}.values(),
            key=lambda c: c.score(), reverse=True) or fallback
        if not pool:
            return None
        weights = [len(pool) - i for i in range(len(pool))]  # rank-weighted
        return rng.choices(pool, weights=weights, k=1)[0]
