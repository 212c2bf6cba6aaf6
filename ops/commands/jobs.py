"""Jobs: submit, status, cancel, jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, get_args

from ops.commands.common import (
    UserError,
    ago,
    client_call,
    json_object,
    parse_kv,
    print_json,
    table,
)
from ops.commands.render import show_state

# Exit statuses of `submit --wait` (and `status` of a settled job).
EXIT_OK, EXIT_FAILED, EXIT_UNSCHEDULABLE, EXIT_TIMEOUT = 0, 1, 3, 4


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("submit", parents=common, help="submit a job",
                        description="Submit a job; prints its id at once.")
    sp.add_argument("capability", help="capability type, e.g. echo, sleep, kernel.verify")
    sp.add_argument("--payload", metavar="JSON", help="the job's payload, a JSON object")
    sp.add_argument("--label", action="append", metavar="K=V",
                    help="a capability label the worker must advertise (repeatable)")
    sp.add_argument("--resource", action="append", metavar="K=N",
                    help="devices to lease: gpus=1, gpu_memory_mb=8000, cpu_slots=2")
    sp.add_argument("--job-id", help="use this job id (letters, digits, _ and -); "
                                     "the same id submitted twice runs once")
    sp.add_argument("--priority", type=int, default=1, choices=(0, 1, 2),
                    help="0 highest .. 2 lowest (default 1)")
    sp.add_argument("--max-attempts", type=int, default=3, metavar="N",
                    help="attempts before the job is dead (default 3)")
    sp.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="time limit of each attempt in seconds")
    sp.add_argument("--user", help="who the job is for (GPU-hours are counted per user)")
    sp.add_argument("--wait", action="store_true",
                    help="wait until the job settles; exit 0 succeeded, 1 failed, "
                         "3 unschedulable, 4 still waiting at --wait-timeout")
    sp.add_argument("--keep-waiting", action="store_true",
                    help="with --wait: do not stop at unschedulable (a worker may appear)")
    sp.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                    help="with --wait: give up after S seconds")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", parents=common, help="a job's latest state",
                        description="A job's latest state (KV jobs), optionally its events.")
    sp.add_argument("job_id", help="the job's id")
    sp.add_argument("--events", action="store_true", help="also every event so far")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("cancel", parents=common, help="cancel a job",
                        description="Cancel a job: stopped where it runs, or ended where it "
                                    "waits.")
    sp.add_argument("job_id", help="the job's id")
    sp.add_argument("--reason", default="cancelled by request",
                    help="recorded with the cancel (default: cancelled by request)")
    sp.set_defaults(fn=cmd_cancel)

    from schemas.jobs import JobStatus

    sp = sub.add_parser("jobs", parents=common, help="recent jobs",
                        description="Recent jobs, newest first.")
    sp.add_argument("--limit", type=int, default=50, metavar="N",
                    help="at most N jobs (default 50)")
    sp.add_argument("--state", choices=sorted(get_args(JobStatus)), metavar="STATE",
                    help="only jobs in STATE (" + ", ".join(sorted(get_args(JobStatus))) + ")")
    sp.set_defaults(fn=cmd_jobs)




def cmd_submit(args: argparse.Namespace) -> int:
    payload = json_object(args.payload)
    capability = {"type": args.capability, **parse_kv(args.label, "--label")}
    try:
        resources = {k: int(v) for k, v in parse_kv(args.resource, "--resource").items()}
    except ValueError:
        raise UserError(f"--resource {' '.join(args.resource)}: values are whole numbers, "
                        "e.g. gpus=1") from None

    async def go(client: Any) -> Any:
        try:
            sub = client.submission(capability, payload, job_id=args.job_id,
                                    priority=args.priority, max_attempts=args.max_attempts,
                                    timeout_s=args.timeout, user=args.user,
                                    resources=resources or None)
        except (ValueError, TypeError) as exc:
            raise UserError(f"invalid submission: {exc}") from None
        from bus import topology

        await client.bus.publish(topology.SUBMIT, sub, msg_id=sub.job_id)
        if not args.wait:
            return {"job_id": sub.job_id}
        # The id first, so a person (or a script) has it while we wait.
        print(sub.job_id if args.json else f"submitted {sub.job_id}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        try:
            return await client.wait(sub.job_id, timeout=args.wait_timeout,
                                     keep_waiting=args.keep_waiting)
        except TimeoutError:
            state = await client.status(sub.job_id)
            now = state.state if state else "not yet recorded"
            raise UserError(f"job {sub.job_id} is still {now} after {args.wait_timeout:g}s "
                            f"(follow it with `jetfleet status {sub.job_id}`)",
                            EXIT_TIMEOUT) from None

    out = client_call(args, go)
    if not args.wait:
        if args.json:
            print_json(out)
        else:
            print(out["job_id"])
        return EXIT_OK
    show_state(out, as_json=args.json)
    return exit_status(out)


def exit_status(state: Any) -> int:
    if state.state == "succeeded":
        return EXIT_OK
    if state.state == "unschedulable":
        return EXIT_UNSCHEDULABLE
    return EXIT_FAILED


def _check_id(job_id: str) -> None:
    from schemas.common import is_valid_id

    if not is_valid_id(job_id):
        raise UserError(f"{job_id!r} is not a job id (letters, digits, '_' and '-')")


def cmd_status(args: argparse.Namespace) -> int:
    _check_id(args.job_id)

    async def go(client: Any) -> Any:
        state = await client.status(args.job_id)
        events = ([e async for e in client.events(args.job_id, follow=False)]
                  if args.events and state is not None else [])
        return state, events

    state, events = client_call(args, go)
    if state is None:
        raise UserError(f"no job {args.job_id}", 1)
    if args.json:
        print_json({"state": state, "events": events} if args.events else state)
        return 0
    show_state(state, as_json=False)
    if events:
        from bus import codec

        for e in events:
            print(json.dumps(codec.to_builtins(e)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _check_id(args.job_id)
    from sdk import JobNotFound

    async def go(client: Any) -> Any:
        try:
            return await client.cancel(args.job_id, reason=args.reason)
        except JobNotFound:
            raise UserError(f"no job {args.job_id}", 1) from None

    state = client_call(args, go)
    if state.terminal:
        raise UserError(f"job {args.job_id} had already ended ({state.state}); nothing to "
                        "cancel", 1)
    if args.json:
        print_json({"job_id": args.job_id, "cancel_requested": True, "state": state.state})
    else:
        print(f"cancel requested for {args.job_id} (it was {state.state})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError("--limit must be at least 1")

    async def go(client: Any) -> Any:
        from ops.commands.api import ApiError, list_jobs

        # A running query API answers from its projection (any number of jobs,
        # filtered there); without one (or without the token it wants), the KV
        # bucket is scanned.
        try:
            states = await list_jobs(client.bus, limit=args.limit, state=args.state)
        except ApiError as exc:
            if exc.status not in (401, 403):
                raise
            print("jetfleet: the query API wants a token (JETFLEET_API_TOKEN); reading KV jobs "
                  "instead", file=sys.stderr)
            states = None
        if states is not None:
            return states
        states = await client.list_jobs(limit=1_000_000 if args.state else args.limit)
        if args.state:
            states = [s for s in states if s.state == args.state][: args.limit]
        return states

    states = client_call(args, go)
    if args.json:
        print_json(states)
        return 0
    table("jobs", ["job", "capability", "state", "attempt", "worker", "submitted"],
          [[s.job_id, s.capability.get("type", ""), s.state, str(s.attempt),
            s.worker_id or "-", ago(s.submitted_at)] for s in states], keep=("job",))
    return 0


__all__ = ["asyncio"]
