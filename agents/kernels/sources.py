"""Where kernel sources come from: the library, inline text or the object store.

Shared by the kernel capabilities (which need torch) and the evolver (which
does not): nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from agents.kernels.library import ProblemInfo, load_problem

# Sources longer than this travel by reference (object store), not inline.
INLINE_SOURCE_LIMIT = 32 * 1024


class SourceError(Exception):
    """A payload names a source that cannot be had. `retryable` when the store
    itself failed (not the payload)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class Problem:
    label: str  # the library name, or "inline"/"ref:<name>"
    source: str
    library: ProblemInfo | None


async def fetch_ref(bus: Any, ref: dict[str, Any] | None, what: str) -> str:
    """The text of an object-store reference (an ObjRef's JSON: {"bucket", "name",
    ...}), its digest checked. A bad reference fails the payload; a store that
    does not answer is retryable."""
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
        raise SourceError("invalid_payload", f"{what}: expected {{'bucket': ..., 'name': ...}}")
    from bus.objects import ObjectError, ObjectStore

    try:
        data = await ObjectStore(bus).get(ref)
    except ObjectError as exc:
        code = "object_store_error" if exc.retryable else "invalid_payload"
        raise SourceError(code, f"{what}: {exc}", retryable=exc.retryable) from exc
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise SourceError("invalid_payload", f"{what}: object is not UTF-8 text") from exc


async def put_source(bus: Any, source: str, prefix: str = "kernel-src") -> dict[str, Any]:
    """Store a source in the object store under its content hash; returns its
    reference (an ObjRef as JSON)."""
    from bus import codec
    from bus.objectio import digest_text
    from bus.objects import ObjectError, ObjectStore

    body = source.encode()
    h = hashlib.sha256(body)
    name = f"{prefix}/{h.hexdigest()[:32]}"
    store = ObjectStore(bus)
    try:
        # Content-addressed: stored once, not rewritten under a reader.
        ref = (await store.info({"name": name, "digest": digest_text(h)})).ref()
    except ObjectError:
        ref = await store.put(body, name=name)
    out: dict[str, Any] = codec.to_builtins(ref)
    out.setdefault("bucket", ref.bucket)
    return out


async def resolve_problem(bus: Any, p: Any) -> Problem:
    """The problem of a payload with problem / problem_source / problem_ref."""
    given = [x for x in (p.problem, p.problem_source, p.problem_ref) if x is not None]
    if len(given) != 1:
        raise SourceError("invalid_payload",
                          "give exactly one of problem (a library name), problem_source, problem_ref")
    if p.problem is not None:
        try:
            info = load_problem(p.problem)
        except KeyError as exc:
            raise SourceError("invalid_payload", str(exc.args[0])) from exc
        return Problem(label=info.name, source=info.reference_source, library=info)
    if p.problem_source is not None:
        return Problem(label="inline", source=p.problem_source, library=None)
    text = await fetch_ref(bus, p.problem_ref, "problem_ref")
    return Problem(label=f"ref:{p.problem_ref.get('name')}", source=text, library=None)


async def resolve_candidate(bus: Any, p: Any, problem: Problem) -> str:
    """The candidate of a payload: inline, by reference, else the library's own."""
    if p.candidate_source is not None and p.candidate_ref is not None:
        raise SourceError("invalid_payload", "give candidate_source or candidate_ref, not both")
    if p.candidate_source is not None:
        return str(p.candidate_source)
    if p.candidate_ref is not None:
        return await fetch_ref(bus, p.candidate_ref, "candidate_ref")
    if problem.library is not None:
        return problem.library.candidate_source
    raise SourceError("invalid_payload",
                      "no candidate: give candidate_source or candidate_ref (only library "
                      "problems have a default candidate)")
