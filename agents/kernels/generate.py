"""The built-in candidate generator: a search over a candidate's launch parameters.

Tunables are module-level assignments `NAME = <int>` with an UPPERCASE name.
Their allowed values come from a `# tune: 16, 32, 64` comment on the same
line, else from the name:

    NUM_WARPS            1, 2, 4, 8
    NUM_STAGES           1, 2, 3, 4
    GROUP_SIZE*/GROUP_M  1, 2, 4, 8
    BLOCK*               powers of two 16 .. 1024 (plus the current value)

Other UPPERCASE ints are left alone: we cannot know what they mean. A rewrite
touches only the number in the source, so comments and layout survive. Programs
are compared by a hash of their AST, which ignores comments and formatting.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import re
from dataclasses import dataclass

_TUNE_COMMENT = re.compile(r"#\s*tune:\s*([0-9][0-9,\s]*)")
_ENUMERATE_LIMIT = 4096


@dataclass(frozen=True)
class Tunable:
    name: str
    value: int
    choices: tuple[int, ...]
    lineno: int
    col_offset: int
    end_col_offset: int


def _default_choices(name: str, value: int) -> tuple[int, ...] | None:
    if name == "NUM_WARPS":
        base: set[int] = {1, 2, 4, 8}
    elif name == "NUM_STAGES":
        base = {1, 2, 3, 4}
    elif name.startswith("GROUP_SIZE") or name == "GROUP_M":
        base = {1, 2, 4, 8}
    elif name.startswith("BLOCK"):
        base = {1 << k for k in range(4, 11)}
    else:
        return None
    return tuple(sorted(base | {value}))


def find_tunables(source: str) -> list[Tunable]:
    """The rewritable launch constants of a source, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found: list[Tunable] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if not (isinstance(target, ast.Name) and target.id.isupper()):
            continue
        if not (isinstance(value, ast.Constant) and type(value.value) is int):
            continue
        if value.end_lineno != value.lineno or value.end_col_offset is None:
            continue
        line = lines[value.lineno - 1] if value.lineno - 1 < len(lines) else ""
        match = _TUNE_COMMENT.search(line)
        if match:
            listed = [int(tok) for tok in re.split(r"[,\s]+", match.group(1).strip()) if tok]
            choices: tuple[int, ...] | None = tuple(sorted(set(listed) | {value.value}))
        else:
            choices = _default_choices(target.id, value.value)
        if choices and len(choices) > 1:
            found.append(
                Tunable(target.id, value.value, choices, value.lineno, value.col_offset, value.end_col_offset)
            )
    return found


def tunable_values(source: str) -> dict[str, int]:
    """Current values of the tunables (e.g. for a candidates table)."""
    return {t.name: t.value for t in find_tunables(source)}


def apply_values(source: str, values: dict[str, int], tunables: list[Tunable] | None = None) -> str:
    """`source` with the named tunables set to new values; everything else byte-identical."""
    tunables = find_tunables(source) if tunables is None else tunables
    lines = source.splitlines(keepends=True)
    # ast offsets are UTF-8 byte columns; edit right to left so earlier ones hold.
    for t in sorted(tunables, key=lambda t: (t.lineno, t.col_offset), reverse=True):
        if t.name not in values or values[t.name] == t.value:
            continue
        raw = lines[t.lineno - 1].encode()
        raw = raw[: t.col_offset] + str(int(values[t.name])).encode() + raw[t.end_col_offset :]
        lines[t.lineno - 1] = raw.decode()
    return "".join(lines)


def normalized_hash(source: str) -> str:
    """Hash of the program, blind to comments, whitespace and quoting style."""
    try:
        text = ast.dump(ast.parse(source), annotate_fields=False, include_attributes=False)
    except SyntaxError:
        text = source
    return hashlib.sha256(text.encode()).hexdigest()


def template_variants(candidate_source: str, n: int, seed: int = 0) -> list[str]:
    """Up to `n` distinct programs that differ from the seed candidate in launch parameters.

    The seed itself is not included. Fewer than `n` come back when the space of
    values is smaller; none when the source has no tunables.
    """
    if n <= 0:
        return []
    tunables = find_tunables(candidate_source)
    if not tunables:
        return []
    rng = random.Random(seed)
    current = tuple(t.value for t in tunables)
    space = 1
    for t in tunables:
        space *= len(t.choices)
    combos: list[tuple[int, ...]]
    if space <= _ENUMERATE_LIMIT:
        combos = [c for c in itertools.product(*(t.choices for t in tunables)) if c != current]
        rng.shuffle(combos)
    else:
        combos = []
        tried: set[tuple[int, ...]] = {current}
        for _ in range(n * 50):
            combo = tuple(rng.choice(t.choices) for t in tunables)
            if combo not in tried:
                tried.add(combo)
                combos.append(combo)
            if len(combos) >= n:
                break
    seen = {normalized_hash(candidate_source)}
    out: list[str] = []
    for combo in combos:
        src = apply_values(candidate_source, {t.name: v for t, v in zip(tunables, combo, strict=True)}, tunables)
        h = normalized_hash(src)
        if h in seen:
            continue
        seen.add(h)
        out.append(src)
        if len(out) >= n:
            break
    return out


def mutate(parent_source: str, rng: random.Random) -> str:
    """A child of `parent_source` with one or two launch parameters moved.

    Mostly a step to a neighbouring allowed value (local search), sometimes a
    jump to any allowed value. Returns the parent unchanged only when it has no
    tunables; callers dedupe with normalized_hash.
    """
    tunables = find_tunables(parent_source)
    if not tunables:
        return parent_source
    for _ in range(20):
        picked = rng.sample(tunables, k=min(len(tunables), rng.choice((1, 1, 2))))
        values: dict[str, int] = {}
        for t in picked:
            idx = t.choices.index(t.value)
            if rng.random() < 0.3:
                values[t.name] = rng.choice(t.choices)
            else:
                step = rng.choice((-1, 1))
                values[t.name] = t.choices[min(max(idx + step, 0), len(t.choices) - 1)]
        if any(values[t.name] != t.value for t in picked):
            return apply_values(parent_source, values, tunables)
    return parent_source
