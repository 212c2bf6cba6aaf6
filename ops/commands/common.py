"""What every verb shares: global options, the client call, output, user errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bus import codec

DEFAULT_DATA_DIR = ".jetfleet"


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--nats, --json and --connect-timeout, accepted before or after the verb.

    On the verbs' parsers the defaults are SUPPRESS, so an option given before
    the verb is not overwritten by the verb's parser."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p.add_argument("--nats", metavar="URL", default=default(None),
                   help="NATS server URL(s), comma-separated (default: $JETFLEET_NATS_URL, "
                        "else nats://127.0.0.1:4222)")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print machine-readable JSON (listings print a JSON list)")
    p.add_argument("--config", metavar="FILE",
                   default=default(os.environ.get("JETFLEET_CONFIG") if top else None),
                   help="read settings and options from FILE (TOML; see `jetfleet config "
                        "init`); flags and JETFLEET_* variables win (default $JETFLEET_CONFIG)")
    p.add_argument("--connect-timeout", metavar="S", type=float, default=default(None),
                   help="give up when no server answers within S seconds (default "
                        "$JETFLEET_CONNECT_TIMEOUT_S, else 5)")


def client_call(args: argparse.Namespace, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Connect (bounded by --connect-timeout), run `fn(client)`, close."""
    from sdk import Client

    async def go() -> Any:
        async with await Client.connect(args.nats, connect_timeout=args.connect_timeout) as client:
            return await fn(client)

    return asyncio.run(go())


def print_json(obj: Any) -> None:
    print(json.dumps(codec.to_builtins(obj), indent=2, sort_keys=True))


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    d = time.time() - ts
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def table(title: str, columns: list[str], rows: list[list[str]], *,
          keep: tuple[str, ...] = ()) -> None:
    """A table; columns named in `keep` (ids) are never cut: when they cannot fit
    the terminal beside the others, each row prints as one plain line instead."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    widths = {c: max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)}
    needed = sum(widths[c] for c in keep) + 4 * len(columns) + 6 * (len(columns) - len(keep))
    if rows and needed > console.width:
        print(f"{title}: {'  '.join(columns)}")
        for r in rows:
            print("  ".join(r))
        return
    t = Table(title=title)
    for c in columns:
        if c in keep:
            t.add_column(c, no_wrap=True, min_width=widths[c])
        else:
            t.add_column(c, overflow="ellipsis")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r}: expected key=value")
        out[key] = value
    return out


def json_object(raw: str | None, option: str = "--payload") -> dict[str, Any]:
    """An option's JSON object (absent: {}), or a one-line UserError."""
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{option} must be a JSON object")
    return value


def fail(message: str, code: int = 1) -> int:
    print(f"jetfleet: {message}", file=sys.stderr)
    return code
