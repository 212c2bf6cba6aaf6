"""`jetfleet creds`: credentials for components on other machines, and the
server configuration that trusts them (docs/security.md).

    jetfleet creds server [-o FILE]                 the nats-server auth config (public JWTs);
                                                    makes the fleet's signing keys if absent
    jetfleet creds ROLE [--node N] [--capability T ...] [--worker-id ID ...] [-o FILE]
                                                    a credentials file for one role (0600)

Both read the signing keys from DATA_DIR/creds/fleet-keys.json (`up --secure`
makes them there too); issuing a credential changes nothing on the servers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ops.commands.common import DEFAULT_DATA_DIR, UserError


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    from bus.security import ROLES

    sp = sub.add_parser(
        "creds", parents=common, help="credentials for a role, or the server's auth config",
        description="Write a NATS credentials file for one role (0600), for a component on "
                    "another machine, or (ROLE `server`) the nats-server configuration that "
                    "trusts this fleet's credentials. Uses the fleet's signing keys in "
                    "DATA_DIR/creds.")
    sp.add_argument("role", metavar="ROLE", choices=(*ROLES, "server"),
                    help=f"one of {', '.join(ROLES)}; or server")
    sp.add_argument("--node", metavar="NODE",
                    help="the node a worker, evolver or agent runs on (required for them): "
                         "its leases, telemetry and inventory are that node's")
    sp.add_argument("--capability", action="append", metavar="TYPE",
                    help="a capability whose work this worker may take (repeatable; default "
                         "every one; the evolver: kernel.generate, kernel.single, kernel.evolve)")
    sp.add_argument("--worker-id", action="append", metavar="ID",
                    help="a worker id this credential speaks for (its advert and control "
                         "endpoints; repeatable; default NODE-worker, NODE-evolver); for an "
                         "agent, a worker it may drain")
    sp.add_argument("--any-worker-id", action="store_true",
                    help="a worker that may use any worker id (weaker: it could replace "
                         "another worker's advert)")
    sp.add_argument("--expires", type=float, metavar="DAYS",
                    help="the credential stops working after DAYS (default: never)")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="where to write it (default ./ROLE[-NODE].creds; for server "
                         "DATA_DIR/creds/nats-auth.conf)")
    sp.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                    help=f"the fleet's data dir, whose creds/ holds its signing keys "
                         f"(default {DEFAULT_DATA_DIR})")
    sp.set_defaults(fn=cmd_creds)


def grant_from(args: argparse.Namespace) -> Any:
    """The Grant these options ask for (UserError when they cannot work)."""
    from bus.security import EVOLVER_CAPABILITIES, RUNS_JOBS, Grant, GrantError

    role = args.role
    capabilities: tuple[str, ...] | None = None
    if args.capability:
        capabilities = tuple(dict.fromkeys(args.capability))
    elif role == "evolver":
        capabilities = EVOLVER_CAPABILITIES
    worker_ids: tuple[str, ...] | None = tuple(dict.fromkeys(args.worker_id or ())) or None
    if args.any_worker_id:
        if args.worker_id:
            raise UserError("--worker-id and --any-worker-id: one or the other")
        if role not in RUNS_JOBS:
            raise UserError(f"--any-worker-id is for the worker and evolver roles, not {role}")
        worker_ids = None
    elif role in RUNS_JOBS and worker_ids is None and args.node:
        worker_ids = (f"{args.node}-{role}",)
    elif worker_ids is not None and role not in (*RUNS_JOBS, "agent"):
        raise UserError(f"--worker-id is for the worker, evolver and agent roles, not {role}")
    if args.node and role not in (*RUNS_JOBS, "agent"):
        raise UserError(f"--node is for the worker, evolver and agent roles, not {role}")
    try:
        return Grant(role, node=args.node, capabilities=capabilities,
                     worker_ids=worker_ids).check()
    except GrantError as exc:
        raise UserError(str(exc)) from None


def cmd_creds(args: argparse.Namespace) -> int:
    from bus.credentials import (
        SERVER_CONFIG_FILE,
        CredentialsError,
        FleetKeys,
        read_identity,
        write_creds,
    )
    from bus.security import inbox_prefix

    creds_dir = Path(args.data_dir) / "creds"
    if args.expires is not None and args.expires <= 0:
        raise UserError("--expires must be a positive number of days")
    if args.role == "server":
        try:
            keys, made = FleetKeys.load_or_create(creds_dir)
        except (CredentialsError, OSError) as exc:
            raise UserError(str(exc)) from None
        out = Path(args.output) if args.output else creds_dir / SERVER_CONFIG_FILE
        _write(out, keys.server_config())
        if made:
            print(f"jetfleet creds: new fleet signing keys in {FleetKeys.path(creds_dir)} (0600; "
                  "keep them safe: whoever holds them can issue any credential)")
        print(f"jetfleet creds: wrote {out} (public JWTs only): include it in every "
              "nats-server's config (`include` or paste); see docs/cluster.md")
        return 0
    grant = grant_from(args)
    try:
        keys = FleetKeys.load(creds_dir)
    except CredentialsError as exc:
        raise UserError(str(exc)) from None
    name = f"{grant.role}-{grant.node}" if grant.node else grant.role
    out = Path(args.output) if args.output else Path(f"{name}.creds")
    try:
        write_creds(out, keys, grant,
                    expires_s=args.expires * 86400 if args.expires is not None else None)
    except OSError as exc:
        raise UserError(f"{out}: {exc.strerror or exc}") from None
    who = read_identity(out)
    if args.json:
        print(json.dumps({"path": str(out.absolute()), "role": grant.role, "node": grant.node,
                          "capabilities": list(grant.capabilities) if grant.capabilities
                          is not None else None,
                          "worker_ids": list(grant.worker_ids) if grant.worker_ids is not None
                          else None, "user": who.user, "inbox_prefix": inbox_prefix(who.user),
                          "expires": who.expires}, indent=2))
        return 0
    print(f"jetfleet creds: wrote {out} (0600): {grant.describe()}")
    print(f"  jetfleet: JETFLEET_NATS_CREDS={out.absolute()}")
    if grant.role in ("worker", "evolver") and grant.worker_ids:
        print(f"  start it with --node {grant.node} --worker-id {grant.worker_ids[0]}")
    elif grant.role == "agent":
        print(f"  start it with --node {grant.node}")
    print(f"  nats CLI: nats --creds {out} --inbox-prefix {inbox_prefix(who.user)} ...")
    return 0


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or exc}") from None
