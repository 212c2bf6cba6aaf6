"""The kernel evolver: `kernel.generate`, `kernel.single` and `kernel.evolve`.

A component of its own (`jetfleet run evolver`): a Worker serving this App.
It never evaluates a kernel itself: every evaluation is a child job
(`kernel.profile`, or `kernel.verify`) submitted through the bus with
`parent_job_id`, so the fleet's kernel workers run them wherever there is room,
under their leases and sandboxes. It needs no torch.

Generators (the result always says which one ran):
  template  a search over the launch parameters (BLOCK*, NUM_WARPS, ... module
            constants) of a seed candidate: the payload's
            `seed_candidate_source`, else the library problem's own candidate.
  llm       the designer/coder prompt loop of agents.kernels.llm, when
            JETFLEET_LLM_BASE_URL and JETFLEET_LLM_MODEL are set. Nothing
            pretends to be an LLM when they are not: `generator: "llm"` then
            fails the job with `llm_not_configured`, and "auto" picks template.

kernel.evolve, round by round:
  round 1   the seed itself (when there is one) and generated candidates;
  round r   for each of `parallel_num` slots (slot i lives on island i % islands)
            a parent is drawn from the island's elites (rank-weighted) and
            mutated (template) or fed back to the designer (llm);
  scoring   correct first, then speed-up (reference_ms / candidate_ms). Under
            Triton's interpreter the timings are usable for ranking but not
            representative: the result says so (`timings_representative`);
  elites    the best `elite_size` correct candidates of each island;
  migration every `migration_interval` rounds each island's best joins the next.
Candidates are distinct programs (deduplicated by agents.kernels.generate.
normalized_hash across the whole job). Child ids are derived from the parent
job id, the round, the slot and the program hash, and generation is seeded by
the job id, so a retried evolve attempt finds its children instead of
submitting them again. Cancelling the evolve job cancels its outstanding
children.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agents.kernels import llm
from agents.kernels.generate import mutate, normalized_hash, template_variants, tunable_values
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
from schemas.jobs import JobState
from schemas.kernels import EvolvePayload, GeneratePayload, SinglePayload
from sdk import Client

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8
# Candidate records keep this much of a child's stdout/stderr/traceback.
TAIL_CHARS = 1000
LIMITS = {"max_rounds": (1, 100), "parallel_num": (1, 64), "islands": (1, 16),
          "elite_size": (1, 64), "migration_interval": (0, 100), "n": (1, 64)}

evolver = App("evolver")


# ---- payloads and sources -------------------------------------------------------------


def _decode(payload: Any, kind: type[msgspec.Struct]) -> Any:
    try:
        p = msgspec.convert(payload, kind)
    except (msgspec.ValidationError, TypeError) as exc:
        raise JobError("invalid_payload", f"{kind.__name__}: {exc}", retryable=False) from exc
    for name, (lo, hi) in LIMITS.items():
        value = getattr(p, name, None)
        if value is not None and not lo <= value <= hi:
            raise JobError("invalid_payload", f"{name} must be in [{lo}, {hi}], not {value}",
                           retryable=False)
    if hasattr(p, "eval_timeout_s") and not 0 < p.eval_timeout_s <= 3600:
        raise JobError("invalid_payload", "eval_timeout_s must be in (0, 3600]", retryable=False)
    return p


def _generator(p: Any) -> str:
    """Which generator runs: 'llm' or 'template'."""
    if p.generator == "llm":
        if not llm.llm_configured():
            raise JobError("llm_not_configured",
                           f"generator 'llm' needs {llm.ENV_BASE_URL} and {llm.ENV_MODEL}",
                           retryable=False)
        return "llm"
    if p.generator == "auto" and llm.llm_configured():
        return "llm"
    return "template"


async def _problem(ctx: JobContext, p: Any) -> Problem:
    try:
        return await resolve_problem(ctx.services["bus"], p)
    except SourceError as exc:
        raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc


def _seed_source(p: Any, problem: Problem) -> str | None:
    if p.seed_candidate_source is not None:
        return str(p.seed_candidate_source)
    return problem.library.candidate_source if problem.library is not None else None


def _need_seed(seed: str | None, generator: str) -> str:
    if seed is None:
        raise JobError("invalid_payload",
                       "the template generator needs a seed: give seed_candidate_source, a "
                       "library problem, or configure an LLM "
                       f"({llm.ENV_BASE_URL}, {llm.ENV_MODEL})", retryable=False)
    return seed


async def _problem_fields(ctx: JobContext, p: Any, problem: Problem) -> dict[str, Any]:
    """How children name the problem: library name, inline source or a reference."""
    if problem.library is not None:
        return {"problem": problem.library.name}
    if p.problem_ref is not None:
        return {"problem_ref": p.problem_ref}
    if len(problem.source.encode()) <= INLINE_SOURCE_LIMIT:
        return {"problem_source": problem.source}
    return {"problem_ref": await put_source(ctx.services["bus"], problem.source, "kernel-problem")}


async def _candidate_fields(ctx: JobContext, source: str) -> dict[str, Any]:
    if len(source.encode()) <= INLINE_SOURCE_LIMIT:
        return {"candidate_source": source}
    return {"candidate_ref": await put_source(ctx.services["bus"], source)}


def _eval_fields(p: Any, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"dsl": p.dsl, "seed": p.seed, "eval_timeout_s": p.eval_timeout_s}
    for name in ("atol", "rtol", "trials") + (("runs", "warmup") if kind == "profile" else ()):
        value = getattr(p, name)
        if value is not None:
            out[name] = value
    return out


def child_id(parent: str, tag: str, source_hash: str) -> str:
    """A child job id stable across attempts of the parent: parent, tag and program."""
    suffix = f"-{tag}-{source_hash[:10]}"
    if len(parent) + len(suffix) > 128:
        parent = parent[: 128 - len(suffix) - 11] + "-" + hashlib.sha256(parent.encode()).hexdigest()[:10]
    return parent + suffix


def _llm_generate(problem_source: str, feedback: list[llm.Feedback]) -> str:
    return llm.generate_candidate(problem_source, feedback)


# ---- child jobs ---------------------------------------------------------------------------


class Children:
    """Submit child evaluation jobs and wait for them, cancellable with the parent."""

    def __init__(self, ctx: JobContext, p: Any) -> None:
        self.ctx = ctx
        self.client = Client(ctx.services["bus"])
        self.capability = {"type": f"kernel.{p.evaluate}", **p.child_labels}
        self.timeout_s = p.child_timeout_s or p.eval_timeout_s * 2 + 60
        self.priority = p.child_priority
        self.outstanding: set[str] = set()

    async def submit(self, job_id: str, payload: dict[str, Any]) -> None:
        await self.client.submit(self.capability, payload, job_id=job_id,
                                 parent_job_id=self.ctx.job_id, timeout_s=self.timeout_s,
                                 priority=self.priority, labels={"parent": self.ctx.job_id})
        self.outstanding.add(job_id)

    async def wait_all(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """Final states (None: gave up waiting); raises JobError('cancelled') when the
        parent is stopped, after cancelling the children when the parent was cancelled."""
        # Long enough for every attempt of a child, plus queueing.
        limit = self.timeout_s * 3 + 300
        waits = {jid: asyncio.create_task(self.client.wait(jid, timeout=limit)) for jid in job_ids}
        stop = asyncio.create_task(self.ctx.cancelled.wait())
        out: dict[str, JobState | None] = {}
        try:
            pending: set[asyncio.Task[Any]] = set(waits.values())
            while pending:
                done, pending = await asyncio.wait(pending | {stop},
                                                   return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    await self.stopped()
                    raise JobError("cancelled", "stopped while children were running",
                                   retryable=False)
                pending.discard(stop)
            for jid, task in waits.items():
                try:
                    out[jid] = task.result()
                except Exception as exc:  # timed out, or the wait itself failed
                    log.warning("child %s: %s", jid, exc)
                    out[jid] = None
                    with contextlib.suppress(Exception):
                        await self.client.cancel(jid, "the evolver stopped waiting for it")
                self.outstanding.discard(jid)
            return out
        finally:
            stop.cancel()
            for task in waits.values():
                task.cancel()

    async def stopped(self) -> None:
        """The parent's attempt is being stopped: when the parent job itself was
        cancelled, cancel every outstanding child (a timeout or a shutdown leaves
        them running: the next attempt picks them up by their ids)."""
        try:
            state = await self.client.status(self.ctx.job_id)
        except Exception:
            state = None
        if state is not None and not state.cancel_requested:
            return
        reason = f"parent {self.ctx.job_id} cancelled"
        await asyncio.gather(*(self.client.cancel(jid, reason) for jid in sorted(self.outstanding)),
                             return_exceptions=True)


# ---- candidates ----------------------------------------------------------------------------


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
        """Correct first, then speed-up."""
        return (1 if self.correct else 0, self.speedup or 0.0)

    def record(self, source_ref: dict[str, Any] | None) -> dict[str, Any]:
        o = self.outcome or {}
        rec: dict[str, Any] = {
            "id": self.id, "job_id": self.job_id, "round": self.round, "index": self.index,
            "island": self.island, "origin": self.origin, "parents": self.parents,
            "parent": self.parents[0] if self.parents else None, "lineage": self.lineage,
            "hash": self.hash, "params": _params(self.source), "state": self.state,
            "outcome": o.get("outcome"), "correct": self.correct, "speedup": self.speedup,
            "score": list(self.score()), "flags": o.get("flags", []),
            "errors": {
                "error": self.error or o.get("error"),
                "max_abs_error": o.get("max_abs_error"),
                "mean_abs_error": o.get("mean_abs_error"),
                "max_rel_error": o.get("max_rel_error"),
                "traceback": _tail(o.get("traceback")),
                "stderr_tail": _tail(o.get("stderr_tail")),
            },
            "timings": o.get("timings"), "interpreted": o.get("interpreted"),
            "device": o.get("device"), "wall_s": o.get("wall_s"),
        }
        if source_ref is not None:
            rec["source_ref"] = source_ref
        else:
            rec["source"] = self.source
        return rec


def _tail(text: Any) -> Any:
    if isinstance(text, str) and len(text) > TAIL_CHARS:
        return "..." + text[-TAIL_CHARS:]
    return text


def _params(source: str) -> dict[str, int]:
    try:
        return tunable_values(source)
    except SyntaxError:
        return {}


def _apply_state(c: Candidate, state: JobState | None) -> None:
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


async def _evaluate(children: Children, ctx: JobContext, p: Any, problem_fields: dict[str, Any],
                    batch: list[Candidate], tag: str) -> None:
    """Submit every candidate of a batch as a child job and wait for them all."""
    kind = p.evaluate
    for c in batch:
        c.job_id = child_id(ctx.job_id, f"{tag}-c{c.index}", c.hash)
        payload = {**problem_fields, **(await _candidate_fields(ctx, c.source)),
                   **_eval_fields(p, kind)}
        await children.submit(c.job_id, payload)
    states = await children.wait_all([c.job_id for c in batch if c.job_id])
    for c in batch:
        _apply_state(c, states.get(c.job_id or ""))


def _feedback(cands: list[Candidate]) -> list[llm.Feedback]:
    return [llm.Feedback(outcome=(c.outcome or {}).get("outcome") or "error", source=c.source,
                         error=c.error or (c.outcome or {}).get("error"),
                         flags=list((c.outcome or {}).get("flags", [])), speedup=c.speedup,
                         max_abs_error=(c.outcome or {}).get("max_abs_error"))
            for c in cands]


async def _llm_sources(problem: Problem, feedbacks: list[list[llm.Feedback]],
                       errors: list[str]) -> list[str | None]:
    async def one(fb: list[llm.Feedback]) -> str | None:
        try:
            return await asyncio.to_thread(_llm_generate, problem.source, fb)
        except llm.LLMError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return None

    return list(await asyncio.gather(*(one(fb) for fb in feedbacks)))


# ---- kernel.generate -----------------------------------------------------------------------


@evolver.capability(type="kernel.generate", dsl="triton")
async def generate(ctx: JobContext) -> dict[str, Any]:
    """`n` distinct candidates for a problem (not evaluated)."""
    p = _decode(ctx.payload, GeneratePayload)
    problem = await _problem(ctx, p)
    gen = _generator(p)
    seed = _seed_source(p, problem)
    errors: list[str] = []
    sources: list[str] = []
    if gen == "template":
        sources = template_variants(_need_seed(seed, gen), p.n, seed=p.seed)
    else:
        seen = {normalized_hash(seed)} if seed else set()
        for _ in range(3):  # a few more tries when the model repeats itself
            want = p.n - len(sources)
            if want <= 0 or ctx.is_cancelled:
                break
            for src in await _llm_sources(problem, [[]] * want, errors):
                if src is not None and normalized_hash(src) not in seen:
                    seen.add(normalized_hash(src))
                    sources.append(src)
        if not sources and errors:
            raise JobError("llm_error", errors[-1])
    return {
        "generator": gen, "problem": problem.label, "requested": p.n,
        "seed_hash": normalized_hash(seed) if seed else None,
        "candidates": [{"source": s, "hash": normalized_hash(s), "params": _params(s)}
                       for s in sources],
        "exhausted": len(sources) < p.n, "errors": errors,
    }


# ---- kernel.single -------------------------------------------------------------------------


@evolver.capability(type="kernel.single", dsl="triton")
async def single(ctx: JobContext) -> dict[str, Any]:
    """Generate (or take) one candidate, then verify and profile it as a child job."""
    p = _decode(ctx.payload, SinglePayload)
    problem = await _problem(ctx, p)
    errors: list[str] = []
    if p.candidate_source is not None or p.candidate_ref is not None:
        try:
            source = await resolve_candidate(ctx.services["bus"], p, problem)
        except SourceError as exc:
            raise JobError(exc.code, exc.message, retryable=exc.retryable) from exc
        gen, origin = "given", "given"
    else:
        gen = _generator(p)
        seed = _seed_source(p, problem)
        if gen == "template":
            seed = _need_seed(seed, gen)
            variants = template_variants(seed, 1, seed=p.seed)
            source, origin = (variants[0], "template") if variants else (seed, "seed")
        else:
            got = (await _llm_sources(problem, [[]], errors))[0]
            if got is None:
                raise JobError("llm_error", errors[-1] if errors else "no candidate")
            source, origin = got, "llm"
    ctx.progress(0.1, f"{origin} candidate for {problem.label}: {p.evaluate} as a child job")
    children = Children(ctx, p)
    c = Candidate(id="c0", round=1, index=0, island=0, source=source,
                  hash=normalized_hash(source), origin=origin)
    await _evaluate(children, ctx, p, await _problem_fields(ctx, p, problem), [c], "single")
    if c.outcome is None:
        # The evaluation itself never ran to an outcome: infrastructure.
        raise JobError("child_failed", c.error or "child evaluation failed")
    return {
        "generator": gen, "problem": problem.label, "job_id": c.job_id,
        "candidate": {"source": source, "hash": c.hash, "origin": origin,
                      "params": _params(source)},
        "outcome": c.outcome, "correct": c.correct, "speedup": c.speedup,
        "timings_representative": _representative([c]), "errors": errors,
    }


def _representative(cands: list[Candidate]) -> bool | None:
    reps = [((c.outcome or {}).get("timings") or {}).get("representative") for c in cands]
    reps = [r for r in reps if r is not None]
    return all(reps) if reps else None


# ---- kernel.evolve -------------------------------------------------------------------------


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
        for k, best in enumerate(bests):
            to = (k + 1) % len(self.islands)
            if best is None or to == k:
                continue
            if all(c.hash != best.hash for c in self.islands[to]):
                self.islands[to] = sorted([*self.islands[to], best], key=lambda c: c.score(),
                                          reverse=True)[: self.elite_size]
                moves.append((best.id, k, to))
        return moves

    def parent(self, island: int, rng: random.Random, fallback: list[Candidate]) -> Candidate | None:
        pool = self.islands[island] or sorted(
            {c.hash: c for elites in self.islands for c in elites}.values(),
            key=lambda c: c.score(), reverse=True) or fallback
        if not pool:
            return None
        weights = [len(pool) - i for i in range(len(pool))]  # rank-weighted
        return rng.choices(pool, weights=weights, k=1)[0]


def _best(cands: list[Candidate]) -> Candidate | None:
    scored = [c for c in cands if c.outcome is not None]
    return max(scored, key=lambda c: c.score()) if scored else None


@evolver.capability(type="kernel.evolve", dsl="triton")
async def evolve(ctx: JobContext) -> dict[str, Any]:
    """Rounds of candidates fanned out as child jobs; elites kept per island and mutated."""
    p = _decode(ctx.payload, EvolvePayload)
    problem = await _problem(ctx, p)
    gen = _generator(p)
    seed_src = _seed_source(p, problem)
    if gen == "template":
        seed_src = _need_seed(seed_src, gen)
    problem_fields = await _problem_fields(ctx, p, problem)
    children = Children(ctx, p)
    pop = Population(p.islands, p.elite_size)
    seen: set[str] = set()
    everyone: list[Candidate] = []
    notes: list[str] = []
    gen_errors: list[str] = []
    migrations: list[dict[str, Any]] = []

    def new(rnd: int, source: str, origin: str, parents: list[Candidate],
            batch: list[Candidate], island: int | None = None) -> bool:
        h = normalized_hash(source)
        if h in seen:
            return False
        seen.add(h)
        index = len(batch)
        lineage = ([*parents[0].lineage, parents[0].id]) if parents else []
        batch.append(Candidate(id=f"r{rnd}c{index}", round=rnd, index=index,
                               island=index % p.islands if island is None else island,
                               source=source, hash=h, origin=origin,
                               parents=[q.id for q in parents], lineage=lineage))
        return True

    ctx.progress(0.0, f"evolving {problem.label}: {p.max_rounds} rounds x {p.parallel_num} "
                      f"({gen} generator)", round=0, generator=gen)
    for rnd in range(1, p.max_rounds + 1):
        if ctx.is_cancelled:
            await children.stopped()
            raise JobError("cancelled", f"stopped before round {rnd}", retryable=False)
        # Seeded by the job id: a retried attempt regenerates the same programs.
        rng = random.Random(f"{ctx.job_id}/{p.seed}/{rnd}")
        batch: list[Candidate] = []
        if rnd == 1:
            seed_cand: list[Candidate] = []
            if seed_src is not None:
                new(rnd, seed_src, "seed", [], batch)
                seed_cand = batch[:1]
            want = p.parallel_num - len(batch)
            if gen == "template" and want > 0:
                for src in template_variants(seed_src or "", want * 4 + 8,
                                             seed=rng.randrange(1 << 30)):
                    if len(batch) >= p.parallel_num:
                        break
                    new(rnd, src, "template", seed_cand, batch)
            elif want > 0:
                for got in await _llm_sources(problem, [[]] * want, gen_errors):
                    if got is not None:
                        new(rnd, got, "llm", [], batch)
        else:
            fallback = sorted([c for c in everyone if c.outcome is not None],
                              key=lambda c: c.score(), reverse=True)[:1]
            if gen == "template":
                for slot in range(p.parallel_num):
                    island = slot % p.islands
                    made = False
                    for _ in range(40):
                        parent = pop.parent(island, rng, fallback)
                        if parent is None:
                            break
                        if new(rnd, mutate(parent.source, rng), "mutation", [parent], batch,
                               island):
                            made = True
                            break
                    if not made and parent is not None:
                        for src in template_variants(parent.source, 64, seed=rng.randrange(1 << 30)):
                            if new(rnd, src, "template", [parent], batch, island):
                                made = True
                                break
                    if not made:
                        notes.append(f"round {rnd} slot {slot}: no new distinct program found")
            else:
                parents_of: list[list[Candidate]] = []
                for slot in range(p.parallel_num):
                    island = slot % p.islands
                    elites = pop.islands[island] or fallback
                    recent = [c for c in everyone if c.island == island][-3:]
                    parents_of.append(list({c.hash: c for c in [*elites[:2], *recent]}.values()))
                sources = await _llm_sources(problem, [_feedback(ps) for ps in parents_of],
                                             gen_errors)
                for slot, (got, ps) in enumerate(zip(sources, parents_of, strict=True)):
                    if got is not None and not new(rnd, got, "llm", ps, batch, slot % p.islands):
                        notes.append(f"round {rnd}: the LLM repeated an earlier program")
        if not batch:
            notes.append(f"round {rnd}: no new candidates; stopping early")
            break
        ctx.progress((rnd - 1) / p.max_rounds,
                     f"round {rnd}/{p.max_rounds}: evaluating {len(batch)} candidates",
                     round=rnd, candidates=len(batch))
        await _evaluate(children, ctx, p, problem_fields, batch, f"r{rnd}")
        everyone.extend(batch)
        pop.update(batch)
        if p.migration_interval and rnd % p.migration_interval == 0 and p.islands > 1 \
                and rnd < p.max_rounds:
            migrations.extend({"round": rnd, "candidate": cid, "from": a, "to": b}
                              for cid, a, b in pop.migrate())
        best = _best(everyone)
        passed = sum(1 for c in batch if c.correct)
        ctx.progress(rnd / p.max_rounds,
                     f"round {rnd}/{p.max_rounds}: {passed}/{len(batch)} pass; best "
                     + (f"{best.id} {best.speedup:.3g}x" if best and best.speedup is not None
                        else (best.id if best else "none")),
                     round=rnd, best=_brief(best), passed=passed, candidates=len(batch))
    if everyone and all(c.outcome is None for c in everyone):
        raise JobError("children_failed",
                       f"no child evaluation produced an outcome: {everyone[0].error}",
                       retryable=False)
    best = _best(everyone)
    records = []
    for c in everyone:
        ref = None
        if len(c.source.encode()) > INLINE_SOURCE_LIMIT:
            ref = await put_source(ctx.services["bus"], c.source)
        records.append(c.record(ref))
    representative = _representative(everyone)
    if representative is False:
        notes.append("timings ran under Triton's interpreter: usable for ranking these "
                     "candidates, not representative of GPU performance")
    return {
        "generator": gen, "problem": problem.label, "evaluate": p.evaluate,
        "rounds": max((c.round for c in everyone), default=0), "max_rounds": p.max_rounds,
        "parallel_num": p.parallel_num, "islands": p.islands, "elite_size": p.elite_size,
        "migration_interval": p.migration_interval, "migrations": migrations,
        "timings_representative": representative,
        "best": None if best is None else {
            **(_brief(best) or {}), "source": best.source, "outcome": best.outcome,
            "lineage": best.lineage, "parents": best.parents, "job_id": best.job_id},
        "candidates": records,
        "elites": [[c.id for c in elites] for elites in pop.islands],
        "notes": notes, "generation_errors": gen_errors,
    }


def _brief(c: Candidate | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"id": c.id, "round": c.round, "island": c.island,
            "outcome": (c.outcome or {}).get("outcome"), "correct": c.correct,
            "speedup": c.speedup}


# ---- the component -------------------------------------------------------------------------


async def serve(bus: Any, stopping: asyncio.Event, *, capacity: int | None = None,
                worker_id: str | None = None, control: Any = None) -> None:
    """`jetfleet run evolver`: a Worker serving this App until `stopping` is set."""
    from agents.devices import node_name
    from agents.worker.runtime import Worker

    w = Worker(bus, evolver, capacity=capacity or DEFAULT_CAPACITY,
               worker_id=worker_id or f"evolver-{node_name()}-{os.getpid()}")
    await w.serve_until(stopping)
