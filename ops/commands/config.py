"""`jetfleet config init [FILE]`: every setting and option with its default."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("config", parents=common, help="write a config file with every setting",
                        description="Write a TOML file with every setting (JETFLEET_*) and "
                                    "every component option, each with its default and a line "
                                    "of help; use it with --config FILE or JETFLEET_CONFIG.")
    sp.add_argument("action", choices=("init",), help="init: write the file")
    sp.add_argument("file", nargs="?", default="jetfleet.toml",
                    help="where to write it (default jetfleet.toml)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(fn=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from ops.cli import build_parser
    from ops.config import init

    path = init(build_parser(), args.file, args.force)
    print(f"wrote {path}: edit it, then `jetfleet --config {path} up` (flags and "
          "JETFLEET_* variables still win)")
    return 0
