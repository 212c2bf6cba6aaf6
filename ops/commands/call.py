"""`jetfleet call TYPE --payload JSON`: request/response for a script or a person.

Submits a job, waits for it, prints its result as one line of JSON on stdout.
Anything else is one line on stderr and an exit status a script can test:

    0  succeeded (the result on stdout; --json: the whole job state)
    1  failed, cancelled or dead (its error)
    2  a usage mistake (bad JSON, a bad label), or no server
    3  unschedulable: no live worker can run it (the job is cancelled, like
       a handler's ctx.call: nobody is waiting for it any more)
    4  still not settled at --timeout (the job goes on: its id is printed)

A wait longer than a few seconds says so on stderr, so nothing waits silently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ops.commands.common import UserError, client_call, json_object, parse_kv, print_json

EXIT_OK, EXIT_FAILED, EXIT_UNSCHEDULABLE, EXIT_TIMEOUT = 0, 1, 3, 4
DEFAULT_TIMEOUT_S = 60.0
SAY_WAITING_AFTER_S = 3.0


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "call", parents=common, help="run a capability and print its result (request/response)",
        description="Submit a job, wait for it and print its result as JSON. Exit 0 "
                    "succeeded, 1 failed, 3 unschedulable (the job is cancelled), 4 not "
                    "settled within --timeout (the job goes on; its id is printed).")
    sp.add_argument("capability", help="capability type, e.g. echo or image.thumbnail")
    sp.add_argument("--payload", metavar="JSON", help="the job's payload, a JSON object")
    sp.add_argument("--label", action="append", metavar="K=V",
                    help="a capability label the worker must advertise (repeatable)")
    sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                    help=f"give up waiting after S seconds (default {DEFAULT_TIMEOUT_S:g}; "
                         "0 waits until it settles)")
    sp.add_argument("--max-attempts", type=int, default=3, metavar="N",
                    help="attempts before the job fails for good (default 3)")
    sp.add_argument("--priority", type=int, default=1, choices=(0, 1, 2),
                    help="0 highest .. 2 lowest (default 1)")
    sp.add_argument("--user", help="who the job is for (GPU-hours are counted per user)")
    sp.set_defaults(fn=cmd_call)




def cmd_call(args: argparse.Namespace) -> int:
    payload = json_object(args.payload)
    capability = {"type": args.capability, **parse_kv(args.label, "--label")}
    if args.timeout < 0:
        raise UserError("--timeout must be 0 (no limit) or more seconds")
    if args.max_attempts < 1:
        raise UserError("--max-attempts must be at least 1")
    timeout = args.timeout or None

    async def go(client: Any) -> tuple[int, Any]:
        try:
            job_id = await client.submit(capability, payload, max_attempts=args.max_attempts,
                                         priority=args.priority, user=args.user)
        except (ValueError, TypeError) as exc:  # refused before anything was sent
            raise UserError(f"invalid call: {exc}") from None
        wait = asyncio.ensure_future(client.wait(job_id, timeout=timeout))
        said = False
        while not wait.done():
            await asyncio.wait({wait}, timeout=SAY_WAITING_AFTER_S)
            if not wait.done() and not said:
                said = True
                print(f"waiting for {args.capability} job {job_id}...", file=sys.stderr,
                      flush=True)
        try:
            state = wait.result()
        except TimeoutError:
            raise UserError(f"{args.capability} job {job_id} did not finish within "
                            f"{args.timeout:g}s; it goes on (follow it with `jetfleet status "
                            f"{job_id}`, stop it with `jetfleet cancel {job_id}`)",
                            EXIT_TIMEOUT) from None
        if state.state == "unschedulable":
            await client.cancel(job_id, reason="jetfleet call: nobody can run it")
            raise UserError(f"{args.capability} job {job_id} is unschedulable: {state.reason} "
                            "(cancelled)", EXIT_UNSCHEDULABLE)
        if state.state != "succeeded":
            err = state.error
            detail = f"{err.code}: {err.message}" if err else (state.reason or "")
            raise UserError(f"{args.capability} job {job_id} {state.state}: {detail}",
                            EXIT_FAILED)
        return EXIT_OK, (state if args.json else await client.result(job_id, timeout=10))

    status, out = client_call(args, go)
    if args.json:
        print_json(out)
    else:
        print(json.dumps(out, default=str))
    return int(status)
