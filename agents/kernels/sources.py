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
    """The text of an object-store reference {"bucket", "name"}."""
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
        raise SourceError("invalid_payload", f"{what}: expected {{'bucket': ..., 'name': ...}}")
    from bus import topology

    bucket = ref.get("bucket") or topology.OBJECTS
    try:
        from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

        store = await bus.objects() if bucket == topology.OBJECTS else await bus.js.object_store(bucket)
        got = await store.get(ref["name"])
    except (ObjectNotFoundError, NotFoundError, BucketNotFoundError) as exc:
        raise SourceError("invalid_payload",
                          f"{what}: object {bucket}/{ref['name']} not found ({type(exc).__name__})") from exc
    except Exception as exc:  # the store is away: infrastructure, retry
        raise SourceError("object_store_error", f"{what}: {type(exc).__name__}: {exc}",
                          retryable=True) from exc
    data = got.data
    if data is None:
        raise SourceError("invalid_payload", f"{what}: object {bucket}/{ref['name']} is empty")
    try:
        return data.decode() if isinstance(data, bytes | bytearray) else str(data)
    except UnicodeDecodeError as exc:
        raise SourceError("invalid_payload", f"{what}: object is not UTF-8 text") from exc


async def put_source(bus: Any, source: str, prefix: str = "kernel-src") -> dict[str, Any]:
    """Store a source in the object store under its content hash; returns its reference."""
    from bus import topology

    digest = hashlib.sha256(source.encode()).hexdigest()
    name = f"{prefix}/{digest[:32]}"
    store = await bus.objects()
    await store.put(name, source.encode())
    return {"bucket": topology.OBJECTS, "name": name, "size": len(source.encode()),
            "digest": f"sha256:{digest}"}


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
