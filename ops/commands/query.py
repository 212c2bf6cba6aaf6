"""`jetfleet query ...`: the query service's projection and API from the command line.

    query url        where the running query API(s) are
    query status     each running query service: API, projection, position, lag
    query rebuild    replay the streams into a fresh projection
    query sql        run SQL on a projection file no service has open
    query get PATH   GET an API path (with JETFLEET_API_TOKEN), print the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ops.commands.common import UserError, client_call, print_json, table


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    qp = sub.add_parser("query", parents=common, help="the query service's projection and API",
                        description="The query service: find its API, rebuild its DuckDB "
                                    "projection, run SQL on a projection file.")
    qs = qp.add_subparsers(dest="query_command", required=True, metavar="WHAT")

    sp = qs.add_parser("url", parents=common, help="where the running query API is",
                       description="Print the URL of every running query API on this bus.")
    sp.set_defaults(fn=cmd_url)

    sp = qs.add_parser("status", parents=common, help="running query services and their lag",
                       description="Each running query service: API URL, projection file, "
                                   "applied stream sequences and messages not yet applied.")
    sp.set_defaults(fn=cmd_status)

    sp = qs.add_parser("rebuild", parents=common, help="rebuild a projection by replay",
                       description="Replay EVENTS and TELEMETRY into a fresh projection. With "
                                   "--db, rebuild that file offline (no service may have it "
                                   "open); without, ask every running query service (or "
                                   "--url) to rebuild its own.")
    sp.add_argument("--db", metavar="FILE", help="the projection file to rebuild offline")
    sp.add_argument("--url", help="the query API to ask (default: every one on the bus)")
    sp.add_argument("--timeout", type=float, default=600.0, metavar="S",
                    help="give up an offline replay after S seconds (default 600)")
    sp.set_defaults(fn=cmd_rebuild)

    sp = qs.add_parser("sql", parents=common, help="run SQL on a projection file",
                       description="Run SQL on a projection file opened read-only (stop the "
                                   "service that writes it first, or query a copy).")
    sp.add_argument("statement", help="the SQL, e.g. \"SELECT state, count(*) FROM jobs "
                                      "GROUP BY ALL\"")
    sp.add_argument("--db", required=True, metavar="FILE", help="the projection file")
    sp.set_defaults(fn=cmd_sql)

    sp = qs.add_parser("get", parents=common, help="GET an API path and print it",
                       description="GET a path of the running query API (JETFLEET_API_URL or "
                                   "the one found on the bus; JETFLEET_API_TOKEN is sent).")
    sp.add_argument("path", help="e.g. /api/v1/stats/cluster")
    sp.add_argument("param", nargs="*", metavar="K=V", help="query parameters")
    sp.set_defaults(fn=cmd_get)


def _apis(args: argparse.Namespace) -> list[Any]:
    from ops.commands import api

    return list(client_call(args, lambda c: api.discover(c.bus)))


def cmd_url(args: argparse.Namespace) -> int:
    apis = _apis(args)
    if not apis:
        raise UserError("no query API runs on this bus (start one with `jetfleet run query` "
                        "or `jetfleet up --api-port 0`)", 1)
    if args.json:
        print_json([{"url": a.url, "instance": a.instance, "auth": a.auth} for a in apis])
    else:
        for a in apis:
            print(a.url)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bus.control import request
    from ops.commands import api

    async def go(client: Any) -> list[dict[str, Any]]:
        out = []
        for a in await api.discover(client.bus):
            info = await request(client.bus, "query", a.instance or "", "info", timeout=2.0)
            out.append(info)
        return out

    infos = client_call(args, go)
    if args.json:
        print_json(infos)
        return 0
    if not infos:
        print("no query service runs on this bus")
        return 0
    table("query services", ["instance", "api", "auth", "projection", "applied", "behind"],
          [[str(i.get("instance")), str(i.get("api_url")), str(i.get("auth")), str(i.get("db")),
            ", ".join(f"{k} {v}" for k, v in (i.get("applied") or {}).items()),
            ", ".join(f"{k} {v}" for k, v in (i.get("lag_messages") or {}).items())]
           for i in infos], keep=("instance", "api"))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    if args.db:
        return _rebuild_file(args)
    from ops.commands import api

    async def go(client: Any) -> list[str]:
        targets = ([api.QueryApi(url=args.url.rstrip("/"))] if args.url
                   else await api.discover(client.bus))
        if not targets:
            raise UserError("no query API runs on this bus: rebuild a file offline with "
                            "`jetfleet query rebuild --db FILE`", 1)
        for t in targets:
            await api.call(t, "POST", "/api/v1/admin/rebuild")
        return [t.url for t in targets]

    urls = client_call(args, go)
    if args.json:
        print_json({"rebuilding": urls})
    else:
        for url in urls:
            print(f"rebuilding the projection behind {url} (it catches up in the background; "
                  "`jetfleet query status` shows how far)")
    return 0


def _rebuild_file(args: argparse.Namespace) -> int:
    import os

    from services.query.service import rebuild_file
    from services.query.writer import ProjectionLocked

    db = Path(args.db)
    if db.exists() and not db.is_file():
        raise UserError(f"--db {db}: not a file")

    def progress(done: dict[str, int], targets: dict[str, int]) -> None:
        if not args.json:
            text = ", ".join(f"{s} {done[s]}/{targets[s]}" for s in targets)
            print(f"\r  replaying: {text}   ", end="", file=sys.stderr, flush=True)

    async def go(client: Any) -> dict[str, int]:
        return await rebuild_file(client.bus, db, instance=f"rebuild-{os.getpid()}",
                                  timeout=args.timeout, progress=progress)

    try:
        applied = client_call(args, go)
    except ProjectionLocked as exc:
        raise UserError(str(exc)) from None
    except TimeoutError as exc:
        raise UserError(f"{exc}; the old projection is untouched") from None
    if args.json:
        print_json({"db": str(db), "applied": applied})
    else:
        print(f"\rrebuilt {db}: " + ", ".join(f"{s} up to {n}" for s, n in applied.items()))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    if not Path(args.db).is_file():
        raise UserError(f"--db {args.db}: no such projection file")
    try:
        con = duckdb.connect(args.db, read_only=True)
    except duckdb.Error as exc:
        text = str(exc).splitlines()[0]
        if "lock" in text.lower():
            raise UserError(f"{args.db} is open in a running query service; stop it or query "
                            "a copy of the file (or use the HTTP API)") from None
        raise UserError(f"cannot open {args.db}: {text}") from None
    try:
        cur = con.execute(args.statement)
        columns = [d[0] for d in cur.description or []]
        rows = cur.fetchall()
    except duckdb.Error as exc:
        raise UserError(f"SQL failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    if args.json:
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str,
                         indent=2))
        return 0
    table("", columns, [["" if v is None else str(v) for v in r] for r in rows])
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from ops.commands import api

    params: dict[str, Any] = {}
    for item in args.param:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"{item!r}: expected key=value")
        params[k] = v
    path = args.path if args.path.startswith("/") else "/" + args.path

    async def go(client: Any) -> Any:
        target = await api.find_api(client.bus)
        if target is None:
            raise UserError("no query API runs on this bus (or set JETFLEET_API_URL)", 1)
        return await api.call(target, "GET", path, params)

    print(json.dumps(client_call(args, go), indent=2))
    return 0


