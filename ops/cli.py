"""The `jetfleet` command: global options, the verbs of ops/commands, one-line errors."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ops.commands import COMMAND_MODULES
from ops.commands.common import UserError, add_global_options


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, top=False)
    p = argparse.ArgumentParser(prog="jetfleet",
                                description="Run accelerator work across a fleet of machines "
                                            "on NATS JetStream.")
    add_global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, [common])
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        from ops.config import apply

        apply(parser, args.config)  # the file's options become defaults; flags still win
        args = parser.parse_args(argv)
        # Children `jetfleet up` starts read the same file.
        os.environ["JETFLEET_CONFIG"] = os.path.abspath(args.config)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except UserError as exc:
        print(f"jetfleet: {exc}", file=sys.stderr)
        return exc.code
    from bus import tracing
    from bus.connection import ConnectError
    from bus.server import ServerError
    from sdk import JobNotFound

    if args.command != "run":  # components set up their own service name
        tracing.setup("jetfleet-cli")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"jetfleet: {exc}", file=sys.stderr)
        return exc.code
    except JobNotFound as exc:
        print(f"jetfleet: {exc}", file=sys.stderr)
        return 1
    except (ConnectError, ServerError) as exc:
        print(f"jetfleet: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"jetfleet: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
