"""What a command line says about a job: its launcher, entry script or module,
its parameters, and the config file it names.

    python -u train.py --lr 0.01 --batch-size 32 --fp16 --config cfg.yaml
      -> script train.py; {"lr": "0.01", "batch_size": "32", "fp16": "true",
                           "config": "cfg.yaml"}; config cfg.yaml
    torchrun --nproc_per_node 8 train.py --epochs=3 model.depth=12
      -> launcher torchrun; script train.py; {"epochs": "3", "model.depth": "12"}

Values stay strings (argv has no types). Secret-named parameters are redacted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from agents.node.redact import REDACTED, numeric, redact_value, secret_name

MAX_PARAMS = 256
MAX_KEY = 128
MAX_VALUE = 1024

_PYTHON = re.compile(r"^python[0-9.]*[a-z]?$")
# Interpreter options that take a value as the next argument.
_PY_OPTS_WITH_VALUE = frozenset({"-W", "-X", "--check-hash-based-pycs"})
_LAUNCHERS = frozenset({"torchrun", "deepspeed", "accelerate", "horovodrun", "mpirun", "srun"})
CONFIG_KEYS = ("config", "config_file", "config_path", "cfg", "conf", "configs",
               "deepspeed_config", "hparams", "c")
CONFIG_EXTENSIONS = (".yaml", ".yml", ".json", ".toml", ".ini", ".cfg", ".conf")
_HYDRA_KEY = re.compile(r"^[+~]{0,2}[A-Za-z_][A-Za-z0-9_.\-/]*$")


@dataclass
class Entry:
    """How a process was launched."""

    launcher: str | None = None  # torchrun, deepspeed, accelerate, python -m torch.distributed.run
    script: str | None = None  # as written in argv (relative to the process's cwd)
    module: str | None = None  # python -m <module>
    args: list[str] = field(default_factory=list)  # the script's own arguments


def _base(arg: str) -> str:
    return os.path.basename(arg)


def split_entry(argv: list[str]) -> Entry:
    """Find the launcher, the entry script or module, and the script's arguments."""
    if not argv:
        return Entry()
    first = _base(argv[0])
    rest = argv[1:]
    if _PYTHON.match(first):
        i = 0
        while i < len(rest):
            arg = rest[i]
            if arg == "-m" and i + 1 < len(rest):
                module = rest[i + 1]
                if module.startswith("torch.distributed."):
                    return _after_launcher(f"python -m {module}", rest[i + 2:])
                if module == "accelerate.commands.launch":
                    return _after_launcher("accelerate", rest[i + 2:])
                return Entry(module=module, args=rest[i + 2:])
            if arg.startswith("-m") and len(arg) > 2:
                return Entry(module=arg[2:], args=rest[i + 1:])
            if arg == "-c":
                return Entry(args=rest[i + 2:])
            if arg in _PY_OPTS_WITH_VALUE:
                i += 2
                continue
            if arg.startswith("-") and arg != "-":
                i += 1
                continue
            return Entry(script=arg, args=rest[i + 1:])
        return Entry()
    if first in _LAUNCHERS:
        if first == "accelerate" and rest[:1] == ["launch"]:
            rest = rest[1:]
        return _after_launcher(first, rest)
    if first.endswith(".py"):
        return Entry(script=argv[0], args=rest)
    return Entry(args=rest)


def _after_launcher(launcher: str, rest: list[str]) -> Entry:
    """Launcher options come first; the entry is the first `*.py` (or `-m mod`)."""
    for i, arg in enumerate(rest):
        if arg.endswith(".py") and not arg.startswith("-"):
            return Entry(launcher=launcher, script=arg, args=rest[i + 1:])
        if arg in ("-m", "--module") and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            # torchrun -m pkg.train ...: the module is the entry.
            return Entry(launcher=launcher, module=rest[i + 1], args=rest[i + 2:])
    return Entry(launcher=launcher, args=rest)



def _is_option(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and not numeric(arg)


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")[:MAX_KEY]


def _value(value: str) -> str:
    return value if len(value) <= MAX_VALUE else value[:MAX_VALUE - 1] + "…"


def parse_params(args: list[str]) -> dict[str, str]:
    """`--lr 0.01` / `--lr=0.01` / `-lr 0.01` / `lr=0.01` give lr: "0.01";
    a bare `--fp16` gives fp16: "true"; positionals are left out. Secret-named
    parameters keep their name with a redacted value."""
    params: dict[str, str] = {}
    i = 0
    while i < len(args) and len(params) < MAX_PARAMS:
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if _is_option(arg):
            name, eq, value = arg.partition("=")
            key = _key(name)
            if not key:
                continue
            if not eq:
                if i < len(args) and not _is_option(args[i]) and args[i] != "--":
                    value = args[i]
                    i += 1
                else:
                    value = "true"
            params[key] = REDACTED if secret_name(key) else _value(redact_value(value))
        elif "=" in arg:
            name, _, value = arg.partition("=")
            if _HYDRA_KEY.match(name):
                key = name.lstrip("+~")[:MAX_KEY]
                params[key] = REDACTED if secret_name(key) else _value(redact_value(value))
    return params


def config_path(params: dict[str, str]) -> str | None:
    """The config file a command line names: `--config x.yaml` and friends, hydra's
    `--config-path dir --config-name name`, else the first value that looks like
    a config file."""
    if "config_name" in params:
        name = params["config_name"]
        if not name.endswith(CONFIG_EXTENSIONS):
            name += ".yaml"
        return os.path.join(params.get("config_path", "."), name)
    for key in CONFIG_KEYS:
        value = params.get(key)
        if value and value not in ("true", REDACTED):
            return value
    files = [(key, v) for key, v in params.items() if v.endswith(CONFIG_EXTENSIONS)]
    files.sort(key=lambda kv: "config" not in kv[0] and "cfg" not in kv[0])
    return files[0][1] if files else None
