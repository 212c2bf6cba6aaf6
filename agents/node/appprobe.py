"""Learn what an app declares, in a child process of the node agent.

    python -m agents.node.appprobe MODULE:ATTR

imports the app the way a worker would (the current folder first on the
path), and prints one AppDeclaration (schemas/apps.py) as JSON: its
capability types, labels, per-job resources and concurrency. An app that
fails to import prints one line on stderr and exits 1, so the agent can
report it without ever importing user code itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from schemas.apps import AppDeclaration, CapabilityDeclaration


class ProbeError(Exception):
    """The app cannot be loaded: one line that says why."""


def load(spec: str) -> tuple[object, float]:
    """The App named by `spec` and the seconds its module took to import."""
    from agents.worker import App

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ProbeError(f"{spec!r}: expected MODULE:ATTR, e.g. myapp:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:
        raise ProbeError(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    import_s = time.perf_counter() - t0
    app = getattr(mod, attr, None)
    if app is None:
        raise ProbeError(f"module {module_name} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise ProbeError(f"{spec}: {attr} is a {type(app).__name__}, not an agents.worker.App")
    if not app.capabilities:
        raise ProbeError(f"{spec}: the app declares no capability")
    return app, import_s


def declare(spec: str) -> AppDeclaration:
    from agents.worker import App

    app, import_s = load(spec)
    assert isinstance(app, App)
    return AppDeclaration(
        app=spec, name=app.name, import_s=round(import_s, 4),
        start_hooks=len(app.start_hooks), stop_hooks=len(app.stop_hooks),
        capabilities=[CapabilityDeclaration(type=c.type, labels=dict(c.labels),
                                            resources=c.resources, concurrency=c.concurrency)
                      for c in app.capabilities.values()])


def main(argv: list[str]) -> int:
    from bus import codec

    if len(argv) != 1:
        print("usage: python -m agents.node.appprobe MODULE:ATTR", file=sys.stderr)
        return 2
    try:
        decl = declare(argv[0])
    except ProbeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sys.stdout.write(codec.encode(decl).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
