"""Secrets never leave the node: an environment allow-list, and redaction of
anything that looks like a token, key, password or secret in command lines,
config files and code.

Names are judged by their words (`--api-key`, `HF_TOKEN`, `db.password`),
values by their shape (URLs with credentials, well-known token formats,
private-key blocks). Over-redacting a harmless value is the cheap mistake;
the other one is not, so an unsure case is redacted.
"""

from __future__ import annotations

import fnmatch
import functools
import re

REDACTED = "[REDACTED]"

# Environment variables worth knowing about a job, and nothing else.
DEFAULT_ENV_ALLOW: tuple[str, ...] = (
    "CUDA_*", "NCCL_*", "*_VISIBLE_DEVICES", "WORLD_SIZE", "RANK", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_*",
    "TORCHELASTIC_*", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NNODES",
    "CONDA_DEFAULT_ENV", "VIRTUAL_ENV", "JETFLEET_JOB_ID",
)

# Words that make a name secret wherever they stand in it.
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "apikey",
    "credential", "credentials", "creds", "auth", "authorization", "cookie", "privatekey",
    "accesskey", "secretkey", "sessionkey", "signature", "bearer",
})
# `key` is secret as the last word (`--api-key`, `ACCESS_KEY`, `--key`), not as the
# first of others (`--key-frames`).
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def secret_name(name: str) -> bool:
    """True when a parameter, variable or config key names a secret."""
    words = [w for w in _WORD_SPLIT.split(_CAMEL.sub("_", name).lower()) if w]
    if not words:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    joined = "".join(words)
    return words[-1] in ("key", "pat") or joined.endswith(("apikey", "accesskey", "secretkey"))


# Values that are secrets by their shape, wherever they appear.
_SHAPES: tuple[re.Pattern[str], ...] = (
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
               re.S),
    re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"),
    re.compile(r"\b(?:ghp|gho|ghs|ghu|ghr)_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\bnpm_[A-Za-z0-9]{30,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
)
# scheme://user:password@host -> scheme://user:[REDACTED]@host
_URL_CREDS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):([^/\s@]+)@")
# ?token=...&password=... inside URLs and query strings
_QUERY_SECRET = re.compile(r"([?&;])([A-Za-z0-9_.-]+)=([^&#\s]*)")


def redact_value(text: str) -> str:
    """Redact secret-shaped parts of one string (an argument, a value, a line)."""
    if not text:
        return text
    out = _URL_CREDS.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    for shape in _SHAPES:
        out = shape.sub(REDACTED, out)
    if "=" in out and ("?" in out or "&" in out):
        out = _QUERY_SECRET.sub(
            lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if secret_name(m.group(2)) else m.group(0),
            out)
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with secret options' values and secret-shaped values redacted:
    `--api-key X`, `--password=X`, `token=X`, URLs with credentials."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not (arg.startswith("-") and not numeric(arg)):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("-") and not numeric(arg):
            name, eq, _value = arg.lstrip("-").partition("=")
            if secret_name(name):
                if eq:
                    out.append(f"{arg.split('=', 1)[0]}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        elif "=" in arg:
            name, _, _value = arg.partition("=")
            if _KEY.match(name) and secret_name(name):
                out.append(f"{name}={REDACTED}")
                continue
        out.append(redact_value(arg))
    return out


_KEY = re.compile(r"^[A-Za-z_+~][A-Za-z0-9_.+~-]*$")


def numeric(arg: str) -> bool:
    """`-1.5` is a value, not an option."""
    try:
        float(arg)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _allow_re(allow: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in allow) or "(?!)")


def env_allowed(name: str, allow: tuple[str, ...] = DEFAULT_ENV_ALLOW) -> bool:
    return _allow_re(allow).match(name) is not None


def capture_env(environ: dict[str, str], allow: tuple[str, ...] = DEFAULT_ENV_ALLOW,
                limit: int = 64) -> dict[str, str]:
    """The allow-listed variables only; a secret-named one keeps its name, not its value."""
    out: dict[str, str] = {}
    for name in sorted(environ):
        if len(out) >= limit:
            break
        if not env_allowed(name, allow):
            continue
        value = environ[name]
        out[name] = REDACTED if secret_name(name) else redact_value(value[:1024])
    return out


# `key: value`, `key = value`, `"key": "value"`, `KEY=value` inside a config or script.
_ASSIGN = re.compile(
    r"""(?P<key>["']?[A-Za-z_][A-Za-z0-9_.-]*["']?)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,#;}\]\n]+)""")


def redact_text(text: str, *, code: bool = False) -> str:
    """Redact a config file or a script: values assigned to secret-named keys
    (in code only string literals, so expressions stay readable) and
    secret-shaped values anywhere."""

    def assignment(m: re.Match[str]) -> str:
        key = m.group("key").strip("\"'")
        value = m.group("value")
        if not secret_name(key):
            return m.group(0)
        if code and not (value[:1] in "\"'" and len(value) > 2):
            return m.group(0)
        quote = value[0] if value[:1] in "\"'" else ""
        return f"{m.group('key')}{m.group('sep')}{quote}{REDACTED}{quote}"

    return redact_value(_ASSIGN.sub(assignment, text))
