"""A job's projected record, folded from its events in stream order.

Pure: the same events in the same order give the same record, whatever the
batch boundaries were, so a projection rebuilt by replay equals the one built
incrementally. Times are the events' own `ts`, never the clock of this process.

The record follows the lifecycle (schemas/lifecycle.py) as seen from outside:
an event never moves a job out of a terminal state, and a late `queued` never
takes back a `running` that another process reported first.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import events as ev
from schemas.jobs import TERMINAL_STATES

Row = dict[str, Any]

# States a scheduling event (submitted, queued, unschedulable) may overwrite.
_SCHEDULABLE = frozenset({None, "submitted", "queued", "unschedulable", "retrying"})


def new_job(job_id: str) -> Row:
    return {
        "job_id": job_id, "origin": "submitted", "state": None, "capability_type": None,
        "capability": {}, "priority": 1, "user": None, "parent_job_id": None, "attempt": 0,
        "worker_id": None, "node": None, "devices": [], "submitted_at": None,
        "updated_at": None, "started_at": None, "ended_at": None, "duration_s": None,
        "result": None, "error_code": None, "error_message": None, "reason": None,
        "stale": False, "cancel_requested": False, "progress": None, "exit_code": None,
        "process": None, "processes": [], "events": 0, "first_seq": None, "last_seq": None,
    }


def gpu_count(devices: list[str], origin: str) -> int:
    """Distinct GPUs among an attempt's devices: lease keys (`n.gpu0`, `n.gpu0.s1`,
    `n.cpu0`) for submitted jobs, GPU UUIDs or indices for discovered ones. A
    slot counts as its whole GPU: the key does not say how many slots there are."""
    if origin == "discovered":
        return len(set(devices))
    gpus = set()
    for d in devices:
        parts = d.split(".")
        for i, part in enumerate(parts):
            if part.startswith("gpu") and part[3:].isdigit():
                gpus.add(".".join(parts[: i + 1]))
                break
    return len(gpus)


def _attempt(row: Row, number: int, ts: float, worker_id: str | None, node: str | None,
             devices: list[str]) -> Row:
    return {"job_id": row["job_id"], "attempt": number, "worker_id": worker_id, "node": node,
            "devices": list(devices), "gpus": gpu_count(devices, row["origin"]),
            "started_at": ts, "ended_at": None, "outcome": None, "error_code": None,
            "error_message": None, "user": row["user"],
            "capability_type": row["capability_type"]}


def _close(attempts: dict[int, Row], number: int, ts: float, outcome: str,
           error: Any = None, *, reopen_lost: bool = True) -> int | None:
    a = attempts.get(number)
    if a is None:
        return None
    if a["ended_at"] is not None and not (reopen_lost and a["outcome"] == "lost"):
        return None
    a["ended_at"], a["outcome"] = ts, outcome
    if error is not None:
        a["error_code"], a["error_message"] = error.code, error.message
    return number


def _error(row: Row, error: Any) -> None:
    if error is None:
        row["error_code"] = row["error_message"] = None
    else:
        row["error_code"], row["error_message"] = error.code, error.message


def _end(row: Row, state: str, ts: float) -> None:
    row["state"], row["ended_at"] = state, ts
    if row["duration_s"] is None and row["started_at"] is not None:
        row["duration_s"] = max(0.0, ts - row["started_at"])


def apply(row: Row, attempts: dict[int, Row], event: ev.JobEvent, seq: int) -> int | None:
    """Fold one event (stream sequence `seq`) into the job's row and attempts;
    returns the number of the attempt it changed, if it changed one."""
    row["events"] += 1
    row["last_seq"] = seq
    if row["first_seq"] is None:
        row["first_seq"] = seq
    ts = event.ts
    row["updated_at"] = ts if row["updated_at"] is None else max(row["updated_at"], ts)
    terminal = row["state"] in TERMINAL_STATES

    if isinstance(event, ev.Linked):
        link = msgspec.to_builtins(event.process)
        key = (link["node"], link["pid"], link.get("create_time", 0.0))
        if all((p["node"], p["pid"], p.get("create_time", 0.0)) != key
               for p in row["processes"]):
            row["processes"] = [*row["processes"], link]
        return None
    if isinstance(event, ev.Submitted):
        row["capability"] = dict(event.capability)
        row["capability_type"] = event.capability.get("type")
        row["priority"], row["user"] = event.priority, event.user
        row["parent_job_id"] = event.parent_job_id
        row["submitted_at"] = ts
        if row["state"] is None:
            row["state"] = "submitted"
        return None
    if isinstance(event, ev.Discovered):
        return _discovered(row, attempts, event)
    if isinstance(event, ev.Duplicate) or terminal:
        return None  # recorded as an event; the record stays as it is

    if isinstance(event, ev.Queued | ev.Unschedulable):
        if row["state"] in _SCHEDULABLE:
            row["state"] = "queued" if isinstance(event, ev.Queued) else "unschedulable"
            row["reason"] = event.reason if isinstance(event, ev.Unschedulable) else None
        if row["submitted_at"] is None:
            row["submitted_at"] = ts
    elif isinstance(event, ev.Running):
        if event.attempt < row["attempt"]:
            return None
        row.update(state="running", attempt=event.attempt, worker_id=event.worker_id,
                   node=event.node, devices=list(event.devices), started_at=ts, stale=False,
                   progress=None, reason=None)
        attempts[event.attempt] = _attempt(row, event.attempt, ts, event.worker_id,
                                           event.node, event.devices)
        return event.attempt
    elif isinstance(event, ev.Progress):
        if event.attempt == row["attempt"]:
            row["progress"], row["stale"] = event.progress, False
    elif isinstance(event, ev.Succeeded):
        row["result"], row["progress"] = event.result, 1.0
        _error(row, None)
        _end(row, "succeeded", ts)
        if event.duration_s is not None:
            row["duration_s"] = event.duration_s
        return _close(attempts, event.attempt, ts, "succeeded")
    elif isinstance(event, ev.Failed):
        _error(row, event.error)
        _end(row, "failed", ts)
        return _close(attempts, event.attempt, ts, "failed", event.error)
    elif isinstance(event, ev.Retrying):
        _error(row, event.error)
        row["state"], row["worker_id"] = "retrying", None
        return _close(attempts, event.attempt, ts, "failed", event.error)
    elif isinstance(event, ev.Cancelled):
        row["reason"] = event.reason
        _end(row, "cancelled", ts)
        return _close(attempts, event.attempt, ts, "cancelled")
    elif isinstance(event, ev.Lost):
        if event.attempt == row["attempt"]:
            row["state"], row["reason"] = "lost", event.reason
            row["error_code"], row["error_message"] = "worker_lost", event.reason
            return _close(attempts, event.attempt, ts, "lost", reopen_lost=False)
    elif isinstance(event, ev.Delegated):
        if event.attempt == row["attempt"]:
            row["state"], row["worker_id"], row["devices"] = "queued", None, []
            row["attempt"] = max(0, event.attempt - 1)
            return _close(attempts, event.attempt, ts, "delegated")
    elif isinstance(event, ev.Dead):
        _error(row, event.error)
        _end(row, "dead", ts)
        return _close(attempts, event.attempt, ts, "dead", event.error)
    elif isinstance(event, ev.Stale):
        row["stale"], row["reason"] = True, event.reason
    elif isinstance(event, ev.Resumed):
        if row["state"] == "lost" and event.attempt == row["attempt"]:
            row["state"], row["reason"], row["stale"] = "running", None, False
            _error(row, None)
            a = attempts.get(event.attempt)
            if a is not None:
                a.update(ended_at=None, outcome=None, error_code=None, error_message=None)
                return event.attempt
    elif isinstance(event, ev.Ended):
        row["exit_code"] = event.exit_code
        _end(row, "ended", ts)
        if event.runtime_s is not None:
            row["duration_s"] = event.runtime_s
        return _close(attempts, row["attempt"], ts, "ended")
    return None


def _discovered(row: Row, attempts: dict[int, Row], event: ev.Discovered) -> int | None:
    if row["state"] is not None and row["origin"] == "discovered":
        return None  # seen before: the first sighting stands
    started = event.process.create_time or event.ts
    row.update(origin="discovered", capability={"type": "discovered"},
               capability_type="discovered", user=event.process.username, node=event.node,
               devices=list(event.devices), submitted_at=started, started_at=started,
               process=msgspec.to_builtins(event.process), attempt=1, state="running")
    attempts[1] = _attempt(row, 1, started, None, event.node, event.devices)
    return 1
