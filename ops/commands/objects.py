"""Objects: ls, put, get, rm on the object store `objects`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ops.commands.common import UserError, ago, client_call, print_json, table


def register(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("objects", parents=common, help="the object store: ls, put, get, rm",
                        description="Large values passed by reference (object store "
                                    "`objects`).")
    verbs = sp.add_subparsers(dest="verb", required=True, metavar="VERB")

    v = verbs.add_parser("ls", parents=common, help="live objects",
                         description="Live objects: name, size, digest, age, expiry.")
    v.set_defaults(fn=cmd_ls)

    v = verbs.add_parser("put", parents=common, help="store a file; prints its ObjRef as JSON",
                         description="Store FILE (- reads stdin) and print its ObjRef as JSON, "
                                     "ready to pass in a job's payload.")
    v.add_argument("file", metavar="FILE", help="the file to store, or - for stdin")
    v.add_argument("--name", metavar="N", help="object name (default: a new unique one); an "
                                                "object of that name is replaced")
    v.add_argument("--ttl", metavar="S", type=float,
                   help="delete the object after S seconds (whole seconds, at least 1)")
    v.set_defaults(fn=cmd_put)

    v = verbs.add_parser("get", parents=common, help="write an object to a file",
                         description="Write object NAME (a name or an ObjRef as JSON) to FILE, "
                                     "its digest checked; nothing is written if it fails.")
    v.add_argument("name", metavar="NAME", help="object name, or its ObjRef as JSON")
    v.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="where to write it (- for stdout)")
    v.set_defaults(fn=cmd_get)

    v = verbs.add_parser("rm", parents=common, help="delete an object",
                         description="Delete object NAME.")
    v.add_argument("name", metavar="NAME", help="object name, or its ObjRef as JSON")
    v.set_defaults(fn=cmd_rm)


def _call(args: argparse.Namespace, fn: Any) -> Any:
    """Run fn(objects) on the fleet; an object-store error is one line."""
    from sdk.objects import ObjectError, Objects

    async def go(client: Any) -> Any:
        try:
            return await fn(Objects(client))
        except ObjectError as exc:
            raise UserError(str(exc), 1) from None
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None

    return client_call(args, go)


def cmd_ls(args: argparse.Namespace) -> int:
    metas = _call(args, lambda objects: objects.list())
    if args.json:
        print_json([{**_ref_json(m.ref()), "mtime": m.mtime} for m in metas])
        return 0
    now = time.time()
    rows = []
    for m in metas:
        expires = m.expires_at
        rows.append([m.name, _size(m.size), m.digest, _mtime_ago(m.mtime),
                     "-" if expires is None else f"in {max(0.0, expires - now):.0f}s"])
    table("objects", ["name", "size", "digest", "modified", "expires"], rows, keep=("name",))
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    if args.ttl is not None and not args.ttl > 0:
        raise UserError(f"--ttl {args.ttl:g}: give a positive number of seconds")
    if args.file == "-":
        source: Any = sys.stdin.buffer
    else:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"{args.file}: no such file")
        if not os.access(path, os.R_OK):
            raise UserError(f"{args.file}: not readable")
        source = path
    ref = _call(args, lambda objects: objects.put(source, name=args.name, ttl=args.ttl))
    print_json(_ref_json(ref))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.output == "-":
        async def to_stdout(objects: Any) -> Any:
            async with objects.open(args.name) as reader:
                async for chunk in reader:
                    sys.stdout.buffer.write(chunk)
                return reader.meta.ref()

        _call(args, to_stdout)
        sys.stdout.buffer.flush()
        return 0
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"-o {args.output} is a directory; name a file")
    if not out.parent.is_dir():
        raise UserError(f"-o {args.output}: no directory {out.parent}")
    ref = _call(args, lambda objects: objects.get_to(args.name, out))
    if args.json:
        print_json(_ref_json(ref))
    else:
        print(f"wrote {ref.bucket}/{ref.name} ({_size(ref.size)}) to {out}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _call(args, lambda objects: objects.delete(args.name))
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted {args.name}")
    return 0


def _ref_json(ref: Any) -> dict[str, Any]:
    """An ObjRef as JSON, its bucket always spelled out."""
    from bus import codec

    return {"bucket": ref.bucket, **codec.to_builtins(ref)}


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _mtime_ago(mtime: str) -> str:
    import datetime

    try:
        return ago(datetime.datetime.fromisoformat(mtime).timestamp())
    except ValueError:
        return "-"
