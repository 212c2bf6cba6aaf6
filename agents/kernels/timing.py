"""The trusted clock's check of the times a candidate's process reports.

For each timed run the trusted evaluator starts its clock before it sends the
run's freshly made inputs and stops it when the whole output has arrived. On
the CPU it also reads, from the kernel's per-thread accounting
(/proc/<pid>/task/<tid>/schedstat), the CPU time every process of the sandbox
used in that window: unlike the wall clock it does not grow when a loaded
host makes either side wait, and the candidate cannot edit it. The trusted
measure is the wall time, or on the CPU the smaller of wall and CPU time.
The candidate's process measures its forward inside that window (device
events on a GPU, perf_counter on the CPU), so an honest figure satisfies

    claimed <= wall                       (it is measured inside the window)
    claimed >= trusted * (1 - REL) - ABS - bytes / BANDWIDTH_FLOOR

where the second line allows for the transfer of inputs and outputs, the L2
flush, synchronisation and Python overhead. A figure below that floor means
the candidate's clock was lied to or replaced, or work was moved out of the
measured region (a lazy output, work done while receiving the inputs); a
figure above the window is impossible. Either is a `timing_mismatch`, which
rejects the candidate.

The resolution is the allowance: a lie smaller than ABS plus the transfer
term per run cannot be told from overhead. The wall-clock median is reported
beside the candidate's own (`candidate_wall_ms`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

REL = 0.35
ABS_MS = {"cpu": 2.0, "cuda": 0.5}
# Bytes per millisecond the slowest honest path moves (0.5 GB/s).
BANDWIDTH_FLOOR = 0.5e9 / 1e3
# Clock granularity and event-vs-host skew allowed above the window.
OVER_MS = 0.05
OVER_REL = 0.01


@dataclass(frozen=True)
class TimedRun:
    claimed_ms: float
    wall_ms: float
    nbytes: int
    # CPU time of the whole sandbox in the window (CPU evaluations only).
    cpu_ms: float | None = None

    @property
    def trusted_ms(self) -> float:
        return self.wall_ms if self.cpu_ms is None else min(self.wall_ms, self.cpu_ms)


def floor_ms(run: TimedRun, device: str) -> float:
    """The least an honest process can report for this run."""
    return run.trusted_ms * (1.0 - REL) - ABS_MS.get(device, 2.0) - run.nbytes / BANDWIDTH_FLOOR


def disagreement(runs: list[TimedRun], device: str) -> str | None:
    """Why the candidate's timings cannot be true, or None when they agree with the clock."""
    for i, r in enumerate(runs):
        if not r.claimed_ms == r.claimed_ms or r.claimed_ms < 0 or r.claimed_ms == float("inf"):
            return f"timed run {i}: the candidate reported {r.claimed_ms!r} ms"
        if r.claimed_ms > r.wall_ms * (1 + OVER_REL) + OVER_MS:
            return (f"timed run {i}: the candidate reported {r.claimed_ms:.3f} ms, more than the "
                    f"{r.wall_ms:.3f} ms the trusted clock saw around it")
    if not runs:
        return None
    claimed = statistics.median(r.claimed_ms for r in runs)
    floor = statistics.median(floor_ms(r, device) for r in runs)
    if claimed < floor:
        seen = statistics.median(r.trusted_ms for r in runs)
        return (f"the candidate reported a median of {claimed:.3f} ms per run; the trusted clock "
                f"saw {seen:.3f} ms, so no less than {floor:.3f} ms can be true")
    return None
