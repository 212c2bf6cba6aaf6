"""Which processes are jobs: regular expressions over the command line.

The defaults cover the ways training is usually started: `python ... train*.py`,
`torchrun`, `deepspeed`, `accelerate launch` and `python -m torch.distributed.*`.
A process holding a GPU is a job whatever its command line says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_PATTERNS: tuple[str, ...] = (
    r"(^|/)python[0-9.]*\s(.*\s)?(\S*/)?train[^/\s]*\.py(\s|$)",
    r"(^|/)torchrun(\s|$)",
    r"(^|/)deepspeed(\s|$)",
    r"(^|/)accelerate\s+launch(\s|$)",
    r"(^|/)python[0-9.]*\s(.*\s)?-m\s*torch\.distributed\.(run|launch)(\s|$)",
)

# Only the head of a giant command line is matched (patterns name the launcher
# and the script, which come first).
MATCH_HEAD = 4096


class PatternError(ValueError):
    """A --job-pattern that is not a valid regular expression."""


@dataclass
class JobPatterns:
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    _compiled: list[re.Pattern[str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        compiled: list[re.Pattern[str]] = []
        for p in self.patterns:
            try:
                compiled.append(re.compile(p))
            except re.error as exc:
                raise PatternError(f"job pattern {p!r}: {exc}") from None
        self._compiled = compiled

    @classmethod
    def build(cls, extra: list[str] | None = None, defaults: bool = True) -> JobPatterns:
        return cls((DEFAULT_PATTERNS if defaults else ()) + tuple(extra or ()))

    def matches(self, cmdline: list[str]) -> bool:
        if not cmdline or not self._compiled:
            return False
        text = " ".join(cmdline)[:MATCH_HEAD]
        return any(p.search(text) for p in self._compiled)
