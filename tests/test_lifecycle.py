"""The job lifecycle as a state machine: no sequence of transitions reaches an
invalid state or ends a job twice (hypothesis explores the sequences)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from schemas import lifecycle as lc
from schemas.common import ErrorInfo
from schemas.jobs import TERMINAL_STATES, JobState, JobSubmission
from schemas.telemetry import ProcessInfo, ProcessLink

ERR = ErrorInfo(code="boom", message="it broke")
workers = st.sampled_from(["w1", "w2"])
attempts = st.integers(min_value=0, max_value=5)


class Lifecycle(RuleBasedStateMachine):
    """Applies random transitions with random (often wrong) parameters to one job."""

    def __init__(self) -> None:
        super().__init__()
        sub = JobSubmission(capability={"type": "echo"}, max_attempts=3)
        self.s: JobState = lc.new_job(sub, "j1")
        self.endings = 0
        self.history: list[str] = ["new_job"]

    def apply(self, mutation: lc.Mutation) -> None:
        before = self.s
        new = mutation(before)
        name = mutation.transition.name  # type: ignore[attr-defined]
        if new is None:
            return
        assert before.state not in TERMINAL_STATES, f"{name} left terminal {before.state}"
        assert new is not before, "transitions copy; they never change the caller's record"
        if new.state in TERMINAL_STATES:
            self.endings += 1
        self.history.append(f"{name}:{new.state}")
        self.s = new

    @rule(reason=st.text(max_size=5))
    def unschedulable(self, reason: str) -> None:
        self.apply(lc.mark_unschedulable(reason))

    @rule()
    def requeue(self) -> None:
        self.apply(lc.requeue())

    @rule(delta=st.integers(min_value=0, max_value=2), worker=workers)
    def start(self, delta: int, worker: str) -> None:
        self.apply(lc.start(self.s.attempt + delta, worker, "n1", ["n1.gpu0"]))

    @rule(attempt=attempts, worker=workers)
    def undo_start(self, attempt: int, worker: str) -> None:
        self.apply(lc.undo_start(attempt, worker))

    @rule(attempt=attempts, fraction=st.floats(0, 1))
    def progress(self, attempt: int, fraction: float) -> None:
        self.apply(lc.note_progress(attempt, fraction))

    @rule(worker=workers, mine=st.booleans())
    def succeed(self, worker: str, mine: bool) -> None:
        self.apply(lc.succeed(self.s.attempt if mine else self.s.attempt + 1, worker, {"ok": 1}))

    @rule(worker=workers)
    def fail(self, worker: str) -> None:
        self.apply(lc.fail(self.s.attempt, worker, ERR))

    @rule(worker=workers)
    def retry(self, worker: str) -> None:
        self.apply(lc.retry(self.s.attempt, worker, ERR))

    @rule(worker=workers)
    def exhaust(self, worker: str) -> None:
        self.apply(lc.exhaust(self.s.attempt, worker, ERR))

    @rule()
    def kill(self) -> None:
        self.apply(lc.kill(ERR))

    @rule(node=st.sampled_from([None, "n1", "n2"]))
    def lose(self, node: str | None) -> None:
        self.apply(lc.lose(self.s.attempt, "silent", node))

    @rule(node=st.sampled_from(["n1", "n2"]))
    def resume(self, node: str) -> None:
        self.apply(lc.resume(self.s.attempt, node))

    @rule()
    def stale(self) -> None:
        self.apply(lc.mark_stale(self.s.attempt, "no progress"))

    @rule()
    def cancel(self) -> None:
        self.apply(lc.cancel("asked"))

    @rule()
    def request_cancel(self) -> None:
        self.apply(lc.request_cancel("asked"))

    @rule()
    def confirm_cancel(self) -> None:
        self.apply(lc.confirm_cancel(self.s.attempt, "asked"))

    @rule(code=st.one_of(st.none(), st.integers(-9, 2)))
    def end_process(self, code: int | None) -> None:
        self.apply(lc.end_process(code))

    @rule(pid=st.integers(1, 3))
    def link(self, pid: int) -> None:
        self.apply(lc.link_process(ProcessLink(node="n1", pid=pid, create_time=1.0)))

    @invariant()
    def valid(self) -> None:
        s = self.s
        assert s.state in lc.ALL_STATES
        assert self.endings <= 1, self.history
        assert (s.ended_at is not None) == (s.state in TERMINAL_STATES), self.history
        assert 0 <= s.attempt <= s.max_attempts, self.history
        numbers = [a.attempt for a in s.attempts]
        assert numbers == sorted(set(numbers)), self.history
        assert numbers == list(range(1, s.attempt + 1)), (numbers, s.attempt, self.history)
        open_ = [a for a in s.attempts if a.ended_at is None]
        if s.state == "running":
            assert s.worker_id is not None
            assert [a.attempt for a in open_] == [s.attempt], self.history
        else:
            assert open_ == [], (s.state, self.history)
        if s.cancel_requested:
            # Lost, retrying or handed back with the flag: no attempt may start again
            # (start refuses a flagged job); whoever takes the message next confirms.
            assert s.state in ("running", "lost", "retrying", "queued") \
                or s.state in TERMINAL_STATES, self.history
            if s.state in ("retrying", "queued"):
                assert lc.start(s.attempt + 1, "w9", "n1", [])(s) is None, self.history
        assert len({(p.node, p.pid, p.create_time) for p in s.processes}) == len(s.processes)
        if s.state == "ended":
            assert s.origin == "discovered"


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


class DiscoveredLifecycle(Lifecycle):
    """The same rules, starting from a discovered (running) process."""

    def __init__(self) -> None:
        super().__init__()
        self.s = lc.discovered_job("d1", ProcessInfo(pid=42, create_time=1.0), node="n1")
        self.s.worker_id = "agent-n1"

    @precondition(lambda self: True)
    @rule()
    def noop(self) -> None:
        pass


TestDiscoveredLifecycle = DiscoveredLifecycle.TestCase
TestDiscoveredLifecycle.settings = settings(max_examples=150, stateful_step_count=30,
                                            deadline=None)


def test_no_transition_leaves_a_terminal_state() -> None:
    for t in lc.transitions().values():
        assert not (t.sources & TERMINAL_STATES), t


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_every_transition_declines_on_a_terminal_record(terminal: str) -> None:
    s = JobState(job_id="j", state=terminal, ended_at=1.0, attempt=1, worker_id="w1")  # type: ignore[arg-type]
    calls: dict[str, Any] = {
        "mark_unschedulable": ("r",), "requeue": (), "start": (2, "w1", "n", []),
        "undo_start": (1, "w1"), "note_progress": (1, 0.5), "succeed": (1, "w1", 1),
        "fail": (1, "w1", ERR), "retry": (1, "w1", ERR), "exhaust": (1, "w1", ERR),
        "kill": (ERR,), "lose": (1, "r"), "resume": (1, "n"), "mark_stale": (1, "r"),
        "cancel": ("r",), "request_cancel": ("r",), "confirm_cancel": (1, "r"),
        "end_process": (0,), "link_process": (ProcessLink(node="n", pid=1),),
        "note_reads": (1, {"prompt": [3]}),
    }
    assert set(calls) == set(lc.transitions()), "a new transition needs a line here"
    for name, args in calls.items():
        assert lc.transitions()[name](*args)(s) is None, name


def test_start_needs_the_next_attempt_and_no_cancel() -> None:
    s = lc.new_job(JobSubmission(capability={"type": "echo"}, max_attempts=2), "j")
    assert lc.start(2, "w", "n", [])(s) is None  # skipping an attempt
    running = lc.start(1, "w", "n", ["n.gpu0"])(s)
    assert running is not None and running.state == "running" and running.devices == ["n.gpu0"]
    assert s.state == "queued", "the caller's record is untouched"
    flagged = lc.request_cancel("stop")(running)
    assert flagged is not None and flagged.cancel_requested
    retried = lc.retry(1, "w", ERR)(running)
    assert retried is not None and retried.state == "retrying"
    assert lc.retry(2, "w", ERR)(lc.start(2, "w", "n", [])(retried)) is None, \
        "the last attempt cannot retry: it is exhausted instead"


def test_a_lost_attempt_that_finishes_on_its_worker_still_counts() -> None:
    s = lc.start(1, "w", "n", [])(lc.new_job(JobSubmission(capability={"type": "echo"}), "j"))
    lost = lc.lose(1, "node quiet", "n")(s)
    assert lost is not None and lost.state == "lost"
    done = lc.succeed(1, "w", 7)(lost)
    assert done is not None and done.state == "succeeded"
    assert [a.outcome for a in done.attempts] == ["succeeded"]
    assert lc.succeed(1, "other", 7)(lost) is None
