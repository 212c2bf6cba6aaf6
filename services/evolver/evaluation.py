"""Candidates evaluated as child jobs (`kernel.profile` or `kernel.verify`) on the
fleet's kernel workers, through ctx.children.

Child ids derive from the parent job id, a tag (round and slot) and the
program's hash, so a retried parent attempt finds its children instead of
submitting them again. A child nobody can run (`unschedulable`, e.g. no
worker with the asked labels) fails the parent with the child's reason.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agents.kernels.sources import INLINE_SOURCE_LIMIT, Problem, put_source
from agents.worker.context import JobContext, JobError
from schemas.jobs import JobState
from services.evolver.population import Candidate


def child_id(parent: str, tag: str, source_hash: str) -> str:
    """A child job id stable across attempts of the parent: parent, tag and program."""
    suffix = f"-{tag}-{source_hash[:10]}"
    if len(parent) + len(suffix) > 128:
        parent = (parent[: 128 - len(suffix) - 11] + "-"
                  + hashlib.sha256(parent.encode()).hexdigest()[:10])
    return parent + suffix


async def problem_fields(ctx: JobContext, p: Any, problem: Problem) -> dict[str, Any]:
    """How children name the problem: library name, inline source or a reference."""
    if problem.library is not None:
        return {"problem": problem.library.name}
    if p.problem_ref is not None:
        return {"problem_ref": p.problem_ref}
    if len(problem.source.encode()) <= INLINE_SOURCE_LIMIT:
        return {"problem_source": problem.source}
    return {"problem_ref": await put_source(ctx.bus, problem.source, "kernel-problem")}


async def candidate_fields(ctx: JobContext, source: str) -> dict[str, Any]:
    if len(source.encode()) <= INLINE_SOURCE_LIMIT:
        return {"candidate_source": source}
    return {"candidate_ref": await put_source(ctx.bus, source)}


def eval_fields(p: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dsl": p.dsl, "seed": p.seed, "eval_timeout_s": p.eval_timeout_s}
    names = ("atol", "rtol", "trials") + (("runs", "warmup") if p.evaluate == "profile" else ())
    for name in names:
        value = getattr(p, name)
        if value is not None:
            out[name] = value
    return out


class Evaluations:
    """Submit a batch of candidates as child jobs and fill in their outcomes."""

    def __init__(self, ctx: JobContext, p: Any, problem_fields: dict[str, Any]) -> None:
        self.ctx = ctx
        self.p = p
        self.problem_fields = problem_fields
        self.capability = {"type": f"kernel.{p.evaluate}", **p.child_labels}
        self.timeout_s = p.child_timeout_s or p.eval_timeout_s * 2 + 60

    async def run(self, batch: list[Candidate], tag: str) -> None:
        for c in batch:
            c.job_id = child_id(self.ctx.job_id, f"{tag}-c{c.index}", c.hash)
            payload = {**self.problem_fields, **(await candidate_fields(self.ctx, c.source)),
                       **eval_fields(self.p)}
            await self.ctx.children.submit(self.capability, payload, job_id=c.job_id,
                                           timeout_s=self.timeout_s,
                                           priority=self.p.child_priority,
                                           labels={"parent": self.ctx.job_id})
        # Long enough for every attempt of a child, plus queueing.
        states = await self.ctx.children.wait_all([c.job_id for c in batch if c.job_id],
                                                  timeout=self.timeout_s * 3 + 300)
        stuck = [s for s in states.values() if s is not None and s.state == "unschedulable"]
        if stuck:
            await self.ctx.children.cancel(reason="a sibling can never be scheduled")
            raise JobError("children_unschedulable",
                           f"{len(stuck)} child evaluation(s) cannot be scheduled: "
                           f"{stuck[0].reason}", retryable=False)
        late = [jid for jid, s in states.items() if s is None]
        if late:
            await self.ctx.children.cancel(late, "the evolver stopped waiting for it")
        for c in batch:
            apply_state(c, states.get(c.job_id or ""))


def apply_state(c: Candidate, state: JobState | None) -> None:
    if state is None:
        c.state, c.error = "unknown", "the child job did not finish in time"
        return
    c.state = state.state
    if state.state == "succeeded" and isinstance(state.result, dict):
        c.outcome = state.result
    else:
        err = state.error
        c.error = (f"child job {state.state}: {err.code}: {err.message}" if err
                   else f"child job {state.state}: {state.reason or ''}")
