"""What the agent records about a job's process, once, when it first sees it:
command line, parameters, allow-listed environment, the config file it names,
the entry script's code and the libraries it imports, a framework guess.

Everything is size-capped and redacted here, before it can reach the bus.
Text larger than the inline limit is handed back as a blob for the object
store; binary files and unreadable paths become notes, never errors.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from dataclasses import dataclass, field

from agents.node.params import config_path, parse_params, split_entry
from agents.node.redact import DEFAULT_ENV_ALLOW, capture_env, redact_argv, redact_text
from schemas.telemetry import ProcessInfo

MAX_ARGS = 512
MAX_CMDLINE_CHARS = 16 * 1024
MAX_IMPORTS = 200
JOB_ID_VAR = "JETFLEET_JOB_ID"


@dataclass(frozen=True)
class CaptureLimits:
    inline_bytes: int = 64 * 1024  # code or config carried in the job record itself
    object_bytes: int = 4 * 1024 * 1024  # larger text goes to the object store, up to this
    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW


@dataclass
class Blob:
    """Redacted text too large to travel inline: the tracker stores it and
    sets `code_ref` / `config_ref` on the process before announcing the job."""

    field: str  # "code" or "config"
    name: str  # object-store name
    data: bytes


@dataclass
class Captured:
    info: ProcessInfo
    blobs: list[Blob] = field(default_factory=list)


@dataclass
class RawProcess:
    """What psutil gave for the process; None where it would not say."""

    pid: int
    create_time: float
    cmdline: list[str]
    ppid: int | None = None
    exe: str | None = None
    cwd: str | None = None
    username: str | None = None
    environ: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


def clean(text: str) -> str:
    """Valid UTF-8 text: bytes a process put in its argv or environment that do
    not decode (psutil keeps them as surrogates) become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def trim_cmdline(cmdline: list[str]) -> tuple[list[str], bool]:
    """At most MAX_ARGS arguments and MAX_CMDLINE_CHARS characters in all."""
    out: list[str] = []
    total = 0
    for arg in map(clean, cmdline[:MAX_ARGS]):
        if total + len(arg) > MAX_CMDLINE_CHARS:
            out.append(arg[:max(0, MAX_CMDLINE_CHARS - total)])
            return out, True
        out.append(arg)
        total += len(arg)
    return out, len(cmdline) > MAX_ARGS


def capture(raw: RawProcess, node: str, limits: CaptureLimits = CaptureLimits()) -> Captured:
    cmdline, cut = trim_cmdline(raw.cmdline)
    entry = split_entry(cmdline)
    params = parse_params(entry.args)
    notes = list(raw.notes)
    if cut:
        notes.append(f"command line cut to {len(cmdline)} of {len(raw.cmdline)} arguments")
    environ = {clean(k): clean(v) for k, v in (raw.environ or {}).items()}
    job_id = environ.get(JOB_ID_VAR) or None
    info = ProcessInfo(
        pid=raw.pid, create_time=raw.create_time, cmdline=redact_argv(cmdline),
        exe=clean(raw.exe) if raw.exe else None, cwd=clean(raw.cwd) if raw.cwd else None,
        username=clean(raw.username) if raw.username else None, parameters=params,
        env=capture_env(environ, limits.env_allow), job_id=job_id, ppid=raw.ppid,
        cmdline_truncated=cut, notes=notes,
    )
    out = Captured(info)
    if entry.script:
        info.script = _resolve(entry.script, raw.cwd)
        text, cut = _read_text(info.script, limits, notes, "script")
        if text is not None:
            info.imports = imports_of(text)
            info.code_truncated = cut
            _place(out, "code", redact_text(text, code=True), node, limits)
    elif entry.module:
        info.script = f"-m {entry.module}"
    conf = config_path(params)
    if conf:
        info.config_path = _resolve(conf, raw.cwd)
        text, cut = _read_text(info.config_path, limits, notes, "config")
        if text is not None:
            info.config_truncated = cut
            _place(out, "config", redact_text(text), node, limits)
    info.framework = guess_framework(entry.launcher, entry.module, info.imports, cmdline)
    return out


def _resolve(path: str, cwd: str | None) -> str:
    if os.path.isabs(path) or not cwd:
        return path
    return os.path.normpath(os.path.join(cwd, path))


def _read_text(path: str, limits: CaptureLimits, notes: list[str],
               what: str) -> tuple[str | None, bool]:
    """The file's text and whether it was cut at the object limit; None (with a
    note) when it is missing, unreadable, not a regular file or not text."""
    try:
        if not os.path.isfile(path):
            notes.append(f"{what} {path}: not a readable file")
            return None, False
        with open(path, "rb") as f:
            data = f.read(limits.object_bytes + 1)
    except OSError as exc:
        notes.append(f"{what} {path}: {exc.strerror or exc}")
        return None, False
    if b"\0" in data[:8192]:
        notes.append(f"{what} {path}: binary, not captured")
        return None, False
    truncated = len(data) > limits.object_bytes
    if truncated:
        data = data[:limits.object_bytes]
        notes.append(f"{what} {path}: larger than {limits.object_bytes} bytes, cut")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if not truncated:
            notes.append(f"{what} {path}: not UTF-8 text, not captured")
            return None, False
        text = data.decode("utf-8", errors="ignore")  # the cut split a character
    return text, truncated


def _place(out: Captured, which: str, text: str, node: str, limits: CaptureLimits) -> None:
    """Inline when small, else a blob for the object store."""
    from bus import topology

    info = out.info
    # Redaction can lengthen the text a little: the cap holds for what is stored.
    data = text.encode()[:limits.object_bytes]
    if len(data) <= limits.inline_bytes:
        if which == "code":
            info.code = text
        else:
            info.config = text
        return
    digest = hashlib.sha256(data).hexdigest()
    out.blobs.append(Blob(field=which, name=topology.code_object(node, digest[:32]), data=data))


_IMPORT_LINE = re.compile(r"^\s*(?:from\s+([A-Za-z_][\w.]*)\s+import|import\s+([A-Za-z_][\w., ]*))",
                          re.M)


def imports_of(text: str) -> list[str]:
    """Top-level names of the libraries a script imports (relative imports left out)."""
    names: list[str] = []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        for m in _IMPORT_LINE.finditer(text):
            if m.group(1):
                names.append(m.group(1))
            else:
                names.extend(part.strip().split(" ")[0] for part in m.group(2).split(","))
    else:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
    seen: dict[str, None] = {}
    for name in names:
        top = name.split(".")[0]
        if top:
            seen.setdefault(top, None)
    return list(seen)[:MAX_IMPORTS]


# (import or launcher name, framework), in order of precedence.
_FRAMEWORKS: tuple[tuple[str, str], ...] = (
    ("deepspeed", "deepspeed"), ("accelerate", "accelerate"), ("lightning", "lightning"),
    ("pytorch_lightning", "lightning"), ("torch", "torch"), ("jax", "jax"), ("flax", "jax"),
    ("tensorflow", "tensorflow"), ("keras", "tensorflow"), ("paddle", "paddle"),
    ("mindspore", "mindspore"), ("mxnet", "mxnet"), ("transformers", "transformers"),
)


def guess_framework(launcher: str | None, module: str | None, imports: list[str],
                    cmdline: list[str]) -> str | None:
    if launcher:
        if launcher in ("torchrun",) or launcher.startswith("python -m torch."):
            return "torch"
        if launcher in ("deepspeed", "accelerate"):
            return launcher
    names = set(imports)
    if module:
        names.add(module.split(".")[0])
    for name, framework in _FRAMEWORKS:
        if name in names:
            return framework
    return None
