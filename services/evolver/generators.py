"""Where candidates come from: one interface, two generators.

    template  a search over the launch parameters of a seed candidate (its
              BLOCK* / NUM_WARPS constants, launch-site constexprs, num_warps /
              num_stages, autotune configs: agents.kernels.generate)
    llm       the designer/coder prompt loop of agents.kernels.llm, when
              JETFLEET_LLM_BASE_URL and JETFLEET_LLM_MODEL are set. Nothing
              pretends to be an LLM when they are not: `generator: "llm"` then
              fails the job with `llm_not_configured`, and "auto" picks template.

A generator makes fresh candidates (`fresh`) and, in later rounds of an
evolve, offspring of the population (`offspring`); candidates are distinct
programs by normalized hash across a whole job (`seen`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Protocol

from agents.kernels import llm
from agents.kernels.generate import mutate, normalized_hash, template_variants
from agents.kernels.sources import Problem
from agents.worker.context import JobError
from services.evolver.population import Candidate, Population


@dataclass
class Offspring:
    source: str
    origin: str
    parents: list[Candidate]
    island: int


class Generator(Protocol):
    name: str

    async def fresh(self, problem: Problem, seed: str | None, n: int, rng: random.Random,
                    seen: set[str], errors: list[str]) -> list[str]: ...

    async def offspring(self, problem: Problem, pop: Population, everyone: list[Candidate],
                        slots: int, rng: random.Random, seen: set[str], errors: list[str],
                        notes: list[str], rnd: int) -> list[Offspring]: ...


def need_seed(seed: str | None) -> str:
    if seed is None:
        raise JobError("invalid_payload",
                       "the template generator needs a seed: give seed_candidate_source, a "
                       "library problem, or configure an LLM "
                       f"({llm.ENV_BASE_URL}, {llm.ENV_MODEL})", retryable=False)
    return seed


def _fallback(everyone: list[Candidate]) -> list[Candidate]:
    return sorted([c for c in everyone if c.outcome is not None],
                  key=lambda c: c.score(), reverse=True)[:1]


class TemplateGenerator:
    name = "template"

    async def fresh(self, problem: Problem, seed: str | None, n: int, rng: random.Random,
                    seen: set[str], errors: list[str]) -> list[str]:
        out: list[str] = []
        for src in template_variants(need_seed(seed), n * 4 + 8, seed=rng.randrange(1 << 30)):
            if len(out) >= n:
                break
            h = normalized_hash(src)
            if h not in seen:
                seen.add(h)
                out.append(src)
        return out

    async def offspring(self, problem: Problem, pop: Population, everyone: list[Candidate],
                        slots: int, rng: random.Random, seen: set[str], errors: list[str],
                        notes: list[str], rnd: int) -> list[Offspring]:
        out: list[Offspring] = []
        fallback = _fallback(everyone)
        for slot in range(slots):
            island = slot % len(pop.islands)
            made = self._one(pop, island, rng, seen, fallback)
            if made is None:
                notes.append(f"round {rnd} slot {slot}: no new distinct program found")
            else:
                out.append(made)
        return out

    def _one(self, pop: Population, island: int, rng: random.Random, seen: set[str],
             fallback: list[Candidate]) -> Offspring | None:
        parent: Candidate | None = None
        for _ in range(40):
            parent = pop.parent(island, rng, fallback)
            if parent is None:
                return None
            src = mutate(parent.source, rng)
            h = normalized_hash(src)
            if h not in seen:
                seen.add(h)
                return Offspring(src, "mutation", [parent], island)
        if parent is None:
            return None
        for src in template_variants(parent.source, 64, seed=rng.randrange(1 << 30)):
            h = normalized_hash(src)
            if h not in seen:
                seen.add(h)
                return Offspring(src, "template", [parent], island)
        return None


class LLMGenerator:
    name = "llm"

    async def _ask(self, problem: Problem, feedbacks: list[list[llm.Feedback]],
                   errors: list[str]) -> list[str | None]:
        async def one(fb: list[llm.Feedback]) -> str | None:
            try:
                return await asyncio.to_thread(llm.generate_candidate, problem.source, fb)
            except llm.LLMError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

        return list(await asyncio.gather(*(one(fb) for fb in feedbacks)))

    async def fresh(self, problem: Problem, seed: str | None, n: int, rng: random.Random,
                    seen: set[str], errors: list[str]) -> list[str]:
        out: list[str] = []
        for _ in range(3):  # a few more tries when the model repeats itself
            want = n - len(out)
            if want <= 0:
                break
            for src in await self._ask(problem, [[]] * want, errors):
                if src is not None and normalized_hash(src) not in seen:
                    seen.add(normalized_hash(src))
                    out.append(src)
        return out

    async def offspring(self, problem: Problem, pop: Population, everyone: list[Candidate],
                        slots: int, rng: random.Random, seen: set[str], errors: list[str],
                        notes: list[str], rnd: int) -> list[Offspring]:
        fallback = _fallback(everyone)
        parents_of: list[list[Candidate]] = []
        for slot in range(slots):
            island = slot % len(pop.islands)
            elites = pop.islands[island] or fallback
            recent = [c for c in everyone if c.island == island][-3:]
            parents_of.append(list({c.hash: c for c in [*elites[:2], *recent]}.values()))
        sources = await self._ask(problem, [feedback(ps) for ps in parents_of], errors)
        out: list[Offspring] = []
        for slot, (src, ps) in enumerate(zip(sources, parents_of, strict=True)):
            if src is None:
                continue
            h = normalized_hash(src)
            if h in seen:
                notes.append(f"round {rnd}: the LLM repeated an earlier program")
                continue
            seen.add(h)
            out.append(Offspring(src, "llm", ps, slot % len(pop.islands)))
        return out


def feedback(cands: list[Candidate]) -> list[llm.Feedback]:
    return [llm.Feedback(outcome=(c.outcome or {}).get("outcome") or "error", source=c.source,
                         error=c.error or (c.outcome or {}).get("error"),
                         flags=list((c.outcome or {}).get("flags", [])), speedup=c.speedup,
                         max_abs_error=(c.outcome or {}).get("max_abs_error"))
            for c in cands]


def choose(p: Any) -> Generator:
    """The generator a payload asks for ('auto': the LLM when configured)."""
    if p.generator == "llm":
        if not llm.llm_configured():
            raise JobError("llm_not_configured",
                           f"generator 'llm' needs {llm.ENV_BASE_URL} and {llm.ENV_MODEL}",
                           retryable=False)
        return LLMGenerator()
    if p.generator == "auto" and llm.llm_configured():
        return LLMGenerator()
    return TemplateGenerator()
