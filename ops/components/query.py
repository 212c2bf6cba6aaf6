"""The query service: a DuckDB projection of the fleet and the HTTP API over it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from bus.connection import Bus
from bus.control import ControlService

HELP = "DuckDB projection of events and telemetry, served as the HTTP query API"
log = logging.getLogger("jetfleet.query")

DEFAULT_DB = "jetfleet-query.duckdb"
RATE_UNITS = ("second", "minute", "hour", "day")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8080, metavar="P",
                   help="HTTP port (default 8080; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="FILE",
                   help=f"the DuckDB projection this process alone writes (default {DEFAULT_DB})")
    p.add_argument("--api-token", default=os.environ.get("JETFLEET_API_TOKEN"), metavar="T",
                   help="token with read and write scopes (default $JETFLEET_API_TOKEN); "
                        "without any token the API is open")
    p.add_argument("--tokens-file", metavar="FILE",
                   help="more tokens, one a line: `TOKEN read` or `TOKEN read,write`")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; * for any)")
    p.add_argument("--rate-limit", metavar="N/UNIT",
                   help="requests per client address, e.g. 100/second or 5000/minute")
    p.add_argument("--full-resolution", type=float, default=24 * 3600.0, metavar="S",
                   help="keep metrics at full resolution for S seconds (default 86400)")
    p.add_argument("--downsample", type=float, default=60.0, metavar="S",
                   help="then average them into S-second buckets (default 60)")
    p.add_argument("--retention", type=float, default=30 * 86400.0, metavar="S",
                   help="drop metrics older than S seconds (default 30 days; 0 keeps all)")
    p.add_argument("--batch-rows", type=int, default=20_000, metavar="N",
                   help="write a batch at N rows (default 20000)")
    p.add_argument("--batch-delay", type=float, default=0.25, metavar="S",
                   help="or when its oldest message has waited S seconds (default 0.25)")


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-port", type=int, default=0, metavar="P",
                   help="port of the query API (default 0: a free one; `jetfleet query url` "
                        "says where); its projection lives in the data dir")
    p.add_argument("--no-api", action="store_true",
                   help="do not start the query service and its API")
    p.add_argument("--api-token", default=None, metavar="T",
                   help="the query API's token (read and write); default $JETFLEET_API_TOKEN")


def up_children(args: Any) -> list[tuple[str, list[str]]]:
    if getattr(args, "no_api", False) or getattr(args, "api_port", None) is None:
        return []
    argv = ["--port", str(args.api_port),
            "--db", str(Path(args.data_dir).absolute() / "query.duckdb")]
    if args.api_token:
        argv += ["--api-token", args.api_token]
    return [("query", argv)]


def check(args: argparse.Namespace) -> None:
    """Refuse bad options before connecting (one line, no traceback)."""
    from ops.commands.common import UserError

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0..65535")
    _rate(args.rate_limit)
    _tokens(args)
    for name in ("full_resolution", "downsample"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.retention < 0:
        raise UserError("--retention must be 0 (keep all) or positive")
    if args.batch_rows < 1 or args.batch_delay <= 0:
        raise UserError("--batch-rows must be at least 1 and --batch-delay positive")


def _rate(value: str | None) -> tuple[Any, int] | None:
    from ops.commands.common import UserError

    if not value:
        return None
    n, _, unit = value.partition("/")
    unit = unit.strip() or "second"
    if not n.strip().isdigit() or int(n) < 1 or unit not in RATE_UNITS:
        raise UserError(f"--rate-limit {value!r}: expected N/UNIT with UNIT one of "
                        f"{', '.join(RATE_UNITS)}, e.g. 100/second")
    return unit, int(n)


def _tokens(args: argparse.Namespace) -> Any:
    from ops.commands.common import UserError
    from services.query.auth import Tokens, TokensError

    try:
        return Tokens.load(args.api_token, args.tokens_file)
    except TokensError as exc:
        raise UserError(str(exc)) from None


async def run(bus: Bus, args: argparse.Namespace, stopping: asyncio.Event,
              control: ControlService) -> None:
    from services.query.api import ApiConfig
    from services.query.service import QueryService, ServiceConfig
    from services.query.writer import Retention

    config = ServiceConfig(
        db=Path(args.db), instance=control.instance, host=args.host, port=args.port,
        api=ApiConfig(tokens=_tokens(args), cors_origins=list(args.cors_origin),
                      rate_limit=_rate(args.rate_limit)),
        retention=Retention(full_resolution_s=args.full_resolution, bucket_s=args.downsample,
                            keep_s=args.retention),
        max_rows=args.batch_rows, max_delay_s=args.batch_delay)
    service = QueryService(bus, config)
    control.info = service.info
    try:
        await service.start()
        # Where the API is, for whoever reads this process's output (up keeps it in
        # logs/query.log); `jetfleet query url` finds it over the bus.
        print(f"jetfleet query: API at {service.url} (projection {args.db})", flush=True)
        await stopping.wait()
    finally:
        await service.stop()
