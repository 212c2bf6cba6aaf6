"""A jetfleet config file (TOML): every setting and component option in one place.

    jetfleet config init jetfleet.toml      writes each with its default and a line of help
    jetfleet --config jetfleet.toml up      (or JETFLEET_CONFIG=jetfleet.toml)

Sections: [settings] holds the JETFLEET_* tunables (bus/settings.py); [up] the
options of `jetfleet up` and `demo`; [<component>] those of `jetfleet run
<component>`. Precedence: a flag, then the environment, then the file, then
the built-in default. A key the file does not know, or a value of the wrong
kind, is one clear line naming it.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from bus.settings import HELP, Settings
from ops.commands.common import UserError

SKIP_DESTS = {"help", "nats", "json", "connect_timeout", "instance_id", "config", "fn",
              "command", "component"}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # argparse keeps no public list of its actions
            if a.dest not in SKIP_DESTS and a.option_strings]


def _sections(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Section name -> the parser whose options it sets."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        assert isinstance(action, argparse._SubParsersAction)
        for name, sp in action.choices.items():
            if name == "up":
                out["up"] = sp
            elif name == "run":
                for sub in sp._subparsers._group_actions if sp._subparsers else []:
                    assert isinstance(sub, argparse._SubParsersAction)
                    out.update(sub.choices)
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(parser: argparse.ArgumentParser) -> str:
    lines = ["# jetfleet configuration. Precedence: flag > environment > this file > default.",
             "# Lines starting with '# key =' have no default; uncomment to set them.", "",
             "[settings]  # the JETFLEET_* tunables every component shares"]
    defaults = Settings()
    for f in fields(Settings):
        lines.append(f"# {HELP.get(f.name, '')} ({Settings.env_name(f.name)})")
        lines.append(f"{f.name} = {_toml(getattr(defaults, f.name))}")
    for section, sp in _sections(parser).items():
        title = "jetfleet up / demo" if section == "up" else f"jetfleet run {section}"
        lines += ["", f"[{section}]  # {title}"]
        for a in _options(sp):
            key = a.dest
            lines.append(f"# {(a.help or '').replace(chr(10), ' ')}")
            if a.default is None or a.default == argparse.SUPPRESS:
                lines.append(f"# {key} = ...")
            else:
                lines.append(f"{key} = {_toml(a.default)}")
    return "\n".join(lines) + "\n"


def init(parser: argparse.ArgumentParser, path: str, force: bool) -> Path:
    target = Path(path)
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to overwrite it")
    target.write_text(render(parser))
    return target


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config {path}: no such file (write one with `jetfleet config init "
                        f"{path}`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config {path}: not valid TOML: {exc}") from None


def _check(path: str, section: str, key: str, value: Any, action: argparse.Action) -> Any:
    where = f"config {path}: [{section}] {key} = {value!r}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: expected a list of strings")
        return value
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not isinstance(value, int)):
            raise UserError(f"{where}: expected {'a whole number' if kind is int else 'a number'}")
    elif not isinstance(value, str):
        raise UserError(f"{where}: expected a string")
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: expected one of {', '.join(map(str, action.choices))}")
    return value


def apply(parser: argparse.ArgumentParser, path: str) -> None:
    """Settings into the environment (unless set there); options as parser defaults."""
    data = load(path)
    sections = _sections(parser)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"config {path}: {section} must be a [section]")
        if section == "settings":
            known = {f.name: f for f in fields(Settings)}
            env: dict[str, str] = {}
            for key, value in values.items():
                if key not in known:
                    raise UserError(f"config {path}: unknown setting [settings] {key} (known: "
                                    f"{', '.join(known)})")
                env[Settings.env_name(key)] = str(value)
            try:
                Settings.from_env(env)
            except ValueError as exc:
                raise UserError(f"config {path}: [settings] {exc}") from None
            for name, value in env.items():
                if not os.environ.get(name):  # the environment wins, unless empty
                    os.environ[name] = value
            continue
        if section not in sections:
            raise UserError(f"config {path}: unknown section [{section}] (known: settings, "
                            f"{', '.join(sections)})")
        sp = sections[section]
        actions = {a.dest: a for a in _options(sp)}
        defaults: dict[str, Any] = {}
        for key, value in values.items():
            if key not in actions:
                raise UserError(f"config {path}: unknown option [{section}] {key} (known: "
                                f"{', '.join(actions)})")
            defaults[key] = _check(path, section, key, value, actions[key])
        sp.set_defaults(**defaults)
        if section == "up":
            demo = parser._subparsers._group_actions[0].choices.get("demo")  # type: ignore[union-attr]
            if demo is not None:
                demo.set_defaults(**defaults)
