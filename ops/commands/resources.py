"""Resources: put, get, ls of versioned shared resources (KV `resources`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ops.commands.common import UserError, ago, client_call, print_json, table
from ops.commands.objects import _size


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("resources", parents=common,
                        help="versioned shared resources: put, get, ls",
                        description="Versioned shared resources (KV `resources`): each put "
                                    "is a new numbered version; handlers read the latest or "
                                    "a pinned one.")
    verbs = sp.add_subparsers(dest="verb", required=True, metavar="VERB")

    v = verbs.add_parser("put", parents=common, help="a new version from a file or JSON",
                         description="Put a new version of NAME: the bytes of FILE (- for "
                                     "stdin), or a JSON value with --value. Large values go to "
                                     "the object store by reference.")
    v.add_argument("name", metavar="NAME", help="resource name")
    v.add_argument("file", metavar="FILE", nargs="?", help="the new value's bytes")
    v.add_argument("--value", metavar="JSON", help="the new value as JSON")
    v.add_argument("--description", metavar="TEXT", help="what changed, kept with the version")
    v.set_defaults(fn=cmd_put)

    v = verbs.add_parser("get", parents=common, help="the latest or a pinned version",
                         description="Print the latest version of NAME (or --version V): a "
                                     "JSON value as JSON, bytes as text or to -o FILE.")
    v.add_argument("name", metavar="NAME", help="resource name")
    v.add_argument("--version", metavar="V", type=int, help="this version, not the latest")
    v.add_argument("-o", "--output", metavar="FILE", help="write the value to FILE")
    v.set_defaults(fn=cmd_get)

    v = verbs.add_parser("ls", parents=common, help="resources, or the versions of one",
                         description="The latest version of every resource, or with NAME the "
                                     "versions of NAME the bucket keeps.")
    v.add_argument("name", metavar="NAME", nargs="?", help="list this resource's versions")
    v.set_defaults(fn=cmd_ls)


def _call(args: argparse.Namespace, fn: Any) -> Any:
    """Run fn(resources) on the fleet; a resource error is one line."""
    from sdk.objects import ObjectError
    from sdk.resources import ResourceError, Resources

    async def go(client: Any) -> Any:
        try:
            return await fn(Resources(client))
        except (ResourceError, ObjectError) as exc:
            raise UserError(str(exc), 1) from None
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None

    return client_call(args, go)


def _summary(r: Any) -> dict[str, Any]:
    where = f"object {r.ref.bucket}/{r.ref.name}" if r.ref is not None else "inline"
    return {"name": r.name, "version": r.version, "kind": r.kind, "size": r.size,
            "where": where, "created_at": r.created_at, "description": r.description}


def cmd_put(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.value is None):
        raise UserError("give FILE or --value JSON (one of them)")
    if args.value is not None:
        try:
            value = json.loads(args.value)
        except json.JSONDecodeError as exc:
            raise UserError(f"--value is not valid JSON: {exc}") from None

        def put(res: Any) -> Any:
            return res.put(args.name, value, description=args.description)
    else:
        if args.file == "-":
            data: Any = sys.stdin.buffer
        else:
            data = Path(args.file)
            if not data.is_file():
                raise UserError(f"{args.file}: no such file")

        def put(res: Any) -> Any:
            return res.put(args.name, data=data, description=args.description)

    record = _call(args, put)
    if args.json:
        print_json(record)
    else:
        s = _summary(record)
        print(f"{record.name} version {record.version} ({record.kind}, {_size(record.size)}, "
              f"{s['where']})")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.version is not None and args.version < 1:
        raise UserError("--version counts from 1")
    if args.output:
        out = Path(args.output)
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"-o {args.output}: not a file in an existing directory")
        record = _call(args, lambda res: res.get_to(args.name, out, version=args.version))
        print(f"wrote {record.name} version {record.version} ({_size(record.size)}) to {out}",
              file=sys.stderr)
        return 0
    got = _call(args, lambda res: res.get(args.name, version=args.version))
    if got.kind == "json":
        if args.json:
            print_json({**_summary(got.record), "value": got.value})
        else:
            print(json.dumps(got.value, indent=2, sort_keys=True))
        return 0
    try:
        text = bytes(got.value).decode()
    except UnicodeDecodeError:
        raise UserError(f"resource {args.name} version {got.version} is binary "
                        f"({_size(len(got.value))}): write it with -o FILE", 1) from None
    if args.json:
        print_json({**_summary(got.record), "value": text})
    else:
        sys.stdout.write(text)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    if args.name:
        records = _call(args, lambda res: res.versions(args.name))
        if not records:
            raise UserError(f"no resource {args.name!r}", 1)
    else:
        records = _call(args, lambda res: res.list())
    if args.json:
        print_json([_summary(r) for r in records])
        return 0
    rows = [[r.name, str(r.version), r.kind, _size(r.size), _summary(r)["where"],
             ago(r.created_at), r.description or ""] for r in records]
    table(f"versions of {args.name}" if args.name else "resources",
          ["name", "version", "kind", "size", "where", "created", "description"], rows,
          keep=("name",))
    return 0
