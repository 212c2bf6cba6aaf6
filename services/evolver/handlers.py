"""The evolver's capabilities: `kernel.generate`, `kernel.single`, `kernel.evolve`.

It never evaluates a kernel itself: every evaluation is a child job on the
fleet's kernel workers (services.evolver.evaluation), under their leases and
sandboxes, so it needs no torch.

kernel.evolve, round by round:
  round 1   the seed itself (when there is one) and fresh candidates;
  round r   each of `parallel_num` slots (slot i lives on island i % islands)
            gets an offspring of its island's elites (services.evolver.generators);
  scoring   correct first, then speed-up; under Triton's interpreter timings
            rank candidates but are not representative (the result says so);
  elites    the best `elite_size` correct candidates of each island;
  migration every `migration_interval` rounds each island's best joins the next.
Generation is seeded by the job id, so a retried attempt regenerates the same
programs and finds its children by their ids. Cancelling the evolve job
cancels its outstanding children (the worker's child-jobs middleware).
"""

from __future__ import annotations

import random
from typing import Any

from agents.kernels.generate import normalized_hash
from agents.kernels.sources import (
    INLINE_SOURCE_LIMIT,
    Problem,
    SourceError,
    put_source,
    resolve_candidate,
    resolve_problem,
)
from agents.worker.app import App
from agents.worker.context import JobContext, JobError
from schemas.kernels import EvolvePayload, GeneratePayload, SinglePayload
from services.evolver.evaluation import Evaluations, problem_fields
from services.evolver.generators import choose
from services.evolver.population import Candidate, Population, best, params, representative

evolver = App("evolver")


async def _problem(ctx: JobContext, p: Any) -> Problem:
    try:
        return await resolve_problem(ctx.bus, p)
    except SourceError as exc:
        raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc


def _seed_source(p: Any, problem: Problem) -> str | None:
    if p.seed_candidate_source is not None:
        return str(p.seed_candidate_source)
    return problem.library.candidate_source if problem.library is not None else None


@evolver.capability(type="kernel.generate", dsl="triton")
async def generate(ctx: JobContext, p: GeneratePayload) -> dict[str, Any]:
    """`n` distinct candidates for a problem (not evaluated)."""
    problem = await _problem(ctx, p)
    gen = choose(p)
    seed = _seed_source(p, problem)
    errors: list[str] = []
    seen = {normalized_hash(seed)} if seed else set()
    sources = await gen.fresh(problem, seed, p.n, random.Random(f"{ctx.job_id}/{p.seed}"),
                              seen, errors)
    if not sources and errors:
        raise JobError("llm_error", errors[-1])
    return {
        "generator": gen.name, "problem": problem.label, "requested": p.n,
        "seed_hash": normalized_hash(seed) if seed else None,
        "candidates": [{"source": s, "hash": normalized_hash(s), "params": params(s)}
                       for s in sources],
        "exhausted": len(sources) < p.n, "errors": errors,
    }


@evolver.capability(type="kernel.single", dsl="triton")
async def single(ctx: JobContext, p: SinglePayload) -> dict[str, Any]:
    """Generate (or take) one candidate, then verify and profile it as a child job."""
    problem = await _problem(ctx, p)
    errors: list[str] = []
    if p.candidate_source is not None or p.candidate_ref is not None:
        try:
            source = await resolve_candidate(ctx.bus, p, problem)
        except SourceError as exc:
            raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc
        generator, origin = "given", "given"
    else:
        gen = choose(p)
        seed = _seed_source(p, problem)
        got = await gen.fresh(problem, seed, 1, random.Random(f"{ctx.job_id}/{p.seed}"),
                              set(), errors)
        if got:
            source, origin = got[0], gen.name
        elif gen.name == "template" and seed is not None:
            source, origin = seed, "seed"
        else:
            raise JobError("llm_error", errors[-1] if errors else "no candidate")
        generator = gen.name
    ctx.progress(0.1, f"{origin} candidate for {problem.label}: {p.evaluate} as a child job")
    c = Candidate(id="c0", round=1, index=0, island=0, source=source,
                  hash=normalized_hash(source), origin=origin)
    await Evaluations(ctx, p, await problem_fields(ctx, p, problem)).run([c], "single")
    if c.outcome is None:
        # The evaluation itself never ran to an outcome: infrastructure.
        raise JobError("child_failed", c.error or "child evaluation failed")
    return {
        "generator": generator, "problem": problem.label, "job_id": c.job_id,
        "candidate": {"source": source, "hash": c.hash, "origin": origin,
                      "params": params(source)},
        "outcome": c.outcome, "correct": c.correct, "speedup": c.speedup,
        "timings_representative": representative([c]), "errors": errors,
    }


@evolver.capability(type="kernel.evolve", dsl="triton")
async def evolve(ctx: JobContext, p: EvolvePayload) -> dict[str, Any]:
    """Rounds of candidates fanned out as child jobs; elites kept per island and mutated."""
    problem = await _problem(ctx, p)
    gen = choose(p)
    seed_src = _seed_source(p, problem)
    evaluations = Evaluations(ctx, p, await problem_fields(ctx, p, problem))
    pop = Population(p.islands, p.elite_size)
    seen: set[str] = set()
    everyone: list[Candidate] = []
    notes: list[str] = []
    errors: list[str] = []
    migrations: list[dict[str, Any]] = []

    def add(batch: list[Candidate], rnd: int, source: str, origin: str,
            parents: list[Candidate], island: int | None = None) -> None:
        index = len(batch)
        lineage = [*parents[0].lineage, parents[0].id] if parents else []
        batch.append(Candidate(id=f"r{rnd}c{index}", round=rnd, index=index,
                               island=index % p.islands if island is None else island,
                               source=source, hash=normalized_hash(source), origin=origin,
                               parents=[q.id for q in parents], lineage=lineage))

    ctx.progress(0.0, f"evolving {problem.label}: {p.max_rounds} rounds x {p.parallel_num} "
                      f"({gen.name} generator)", round=0, generator=gen.name)
    for rnd in range(1, p.max_rounds + 1):
        if ctx.is_cancelled:
            raise JobError("cancelled", f"stopped before round {rnd}", retryable=False)
        # Seeded by the job id: a retried attempt regenerates the same programs.
        rng = random.Random(f"{ctx.job_id}/{p.seed}/{rnd}")
        batch: list[Candidate] = []
        if rnd == 1:
            seed_cand: list[Candidate] = []
            if seed_src is not None:
                seen.add(normalized_hash(seed_src))
                add(batch, rnd, seed_src, "seed", [])
                seed_cand = batch[:1]
            want = p.parallel_num - len(batch)
            if want > 0:
                for src in await gen.fresh(problem, seed_src, want, rng, seen, errors):
                    add(batch, rnd, src, gen.name, seed_cand if gen.name == "template" else [])
        else:
            for o in await gen.offspring(problem, pop, everyone, p.parallel_num, rng, seen,
                                         errors, notes, rnd):
                add(batch, rnd, o.source, o.origin, o.parents, o.island)
        if not batch:
            notes.append(f"round {rnd}: no new candidates; stopping early")
            break
        ctx.progress((rnd - 1) / p.max_rounds,
                     f"round {rnd}/{p.max_rounds}: evaluating {len(batch)} candidates",
                     round=rnd, candidates=len(batch))
        await evaluations.run(batch, f"r{rnd}")
        everyone.extend(batch)
        pop.update(batch)
        if (p.migration_interval and rnd % p.migration_interval == 0 and p.islands > 1
                and rnd < p.max_rounds):
            migrations.extend({"round": rnd, "candidate": cid, "from": a, "to": b}
                              for cid, a, b in pop.migrate())
        top = best(everyone)
        passed = sum(1 for c in batch if c.correct)
        ctx.progress(rnd / p.max_rounds,
                     f"round {rnd}/{p.max_rounds}: {passed}/{len(batch)} pass; best "
                     + (f"{top.id} {top.speedup:.3g}x" if top and top.speedup is not None
                        else (top.id if top else "none")),
                     round=rnd, best=top.brief() if top else None, passed=passed,
                     candidates=len(batch))
    if everyone and all(c.outcome is None for c in everyone):
        raise JobError("children_failed",
                       f"no child evaluation produced an outcome: {everyone[0].error}",
                       retryable=False)
    return await _evolve_result(ctx, p, gen.name, problem, everyone, pop, notes, errors,
                                migrations)


async def _evolve_result(ctx: JobContext, p: EvolvePayload, generator: str, problem: Problem,
                         everyone: list[Candidate], pop: Population, notes: list[str],
                         errors: list[str], migrations: list[dict[str, Any]]) -> dict[str, Any]:
    top = best(everyone)
    records = []
    for c in everyone:
        ref = None
        if len(c.source.encode()) > INLINE_SOURCE_LIMIT:
            ref = await put_source(ctx.bus, c.source)
        records.append(c.record(ref))
    rep = representative(everyone)
    if rep is False:
        notes.append("timings ran under Triton's interpreter: usable for ranking these "
                     "candidates, not representative of GPU performance")
    return {
        "generator": generator, "problem": problem.label, "evaluate": p.evaluate,
        "rounds": max((c.round for c in everyone), default=0), "max_rounds": p.max_rounds,
        "parallel_num": p.parallel_num, "islands": p.islands, "elite_size": p.elite_size,
        "migration_interval": p.migration_interval, "migrations": migrations,
        "timings_representative": rep,
        "best": None if top is None else {
            **top.brief(), "source": top.source, "outcome": top.outcome,
            "lineage": top.lineage, "parents": top.parents, "job_id": top.job_id},
        "candidates": records,
        "elites": [[c.id for c in elites] for elites in pop.islands],
        "notes": notes, "generation_errors": errors,
    }
