"""apps.toml: the apps a node agent may start workers for, and their limits.

    gpu_slots = 1                  # optional: how the node's workers split each GPU

    [[app]]
    app = "mymodule:app"           # MODULE:ATTR, imported from `cwd`
    gpus = 1                       # whole GPUs this worker's share (default: what its
                                   #   capabilities declare per job)
    gpu_memory_mb = 0              # or a memory share of one GPU (with gpu_slots > 1)
    min = 0                        # workers kept running
    max = 2                        # workers at most on this node
    idle_stop_s = 300              # stop one after it has been idle this long
    scale_up_after_s = 1.0         # add one when work has waited this long
    backoff_s = 1.0                # first delay after a failure, doubled each time ...
    max_backoff_s = 60.0           # ... up to this
    cwd = "."                      # relative to this file's folder (the default)
    env = { MODEL = "tiny" }       # added to the worker's environment
    name = "chat"                  # default: the module's name

Mistakes are ConfigError with the file, the app and the key in one line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")
_APP_KEYS = {"app", "name", "gpus", "gpu_memory_mb", "cpu_slots", "min", "max", "idle_stop_s",
             "scale_up_after_s", "backoff_s", "max_backoff_s", "stop_grace_s", "cwd", "env"}
_TOP_KEYS = {"app", "gpu_slots"}


class ConfigError(ValueError):
    """apps.toml cannot be used as written: one line naming where and why."""


@dataclass(frozen=True)
class AppConfig:
    app: str
    name: str
    cwd: Path
    gpus: int | None = None  # None: what the app's capabilities declare
    gpu_memory_mb: int | None = None
    cpu_slots: int = 0
    min: int = 0
    max: int = 1
    idle_stop_s: float = 300.0
    scale_up_after_s: float = 1.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    stop_grace_s: float = 10.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AppsFile:
    path: Path
    apps: list[AppConfig]
    gpu_slots: int = 1


def _number(where: str, key: str, value: Any, *, whole: bool, least: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            whole and not isinstance(value, int)):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    if value < least:
        raise ConfigError(f"{where}: {key} must be at least {least:g}, got {value!r}")
    return value


def _app(path: Path, index: int, raw: Any) -> AppConfig:
    where = f"{path} [[app]] #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(raw) - _APP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(_APP_KEYS))})")
    spec = raw.get("app")
    if not isinstance(spec, str) or ":" not in spec or not all(spec.partition(":")[::2]):
        raise ConfigError(f"{where}: app must be \"MODULE:ATTR\", e.g. \"myapp:app\", "
                          f"got {spec!r}")
    where = f"{path} app {spec}"
    name = raw.get("name", spec.partition(":")[0].rsplit(".", 1)[-1])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    name = _NAME_RE.sub("-", name)[:40]
    values: dict[str, Any] = {}
    for key, whole, least in (("gpus", True, 0), ("gpu_memory_mb", True, 0),
                              ("cpu_slots", True, 0), ("min", True, 0), ("max", True, 1),
                              ("idle_stop_s", False, 0.1), ("scale_up_after_s", False, 0),
                              ("backoff_s", False, 0.05), ("max_backoff_s", False, 0.05),
                              ("stop_grace_s", False, 0.1)):
        if key in raw:
            values[key] = _number(where, key, raw[key], whole=whole, least=least)
    if values.get("max", 1) < values.get("min", 0):
        raise ConfigError(f"{where}: min ({values['min']}) is more than max "
                          f"({values.get('max', 1)})")
    if "min" in values and "max" not in values:
        values["max"] = max(1, values["min"])
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str | int | float)
                                            and not isinstance(v, bool) for k, v in env.items()):
        raise ConfigError(f"{where}: env must be a table of strings, e.g. "
                          "env = { MODEL = \"tiny\" }")
    cwd_raw = raw.get("cwd", ".")
    if not isinstance(cwd_raw, str):
        raise ConfigError(f"{where}: cwd must be a folder path")
    cwd = (path.parent / cwd_raw).resolve()
    if not cwd.is_dir():
        raise ConfigError(f"{where}: cwd {cwd} is not a folder")
    return AppConfig(app=spec, name=name, cwd=cwd, env={k: str(v) for k, v in env.items()},
                     **values)


def load_apps(path: str | Path) -> AppsFile:
    p = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (an app is an [[app]] table; "
                          "top-level keys: gpu_slots)")
    tables = raw.get("app", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[app]] table (one per app: app = \"MODULE:ATTR\", ...)")
    apps = [_app(p, i, t) for i, t in enumerate(tables)]
    names = [a.name for a in apps]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{path}: two apps are named {n!r}: give one a name = \"...\"")
    slots = raw.get("gpu_slots", 1)
    _number(str(path), "gpu_slots", slots, whole=True, least=1)
    return AppsFile(path=p, apps=apps, gpu_slots=int(slots))
