"""The fleet's signing keys, NATS user JWTs and credentials files.

NATS runs in operator mode (decentralized JWTs): an operator signs two
accounts, the system account and the fleet's account (JetStream enabled), and
the fleet account's signing key signs one user JWT per credential, carrying
that user's permissions (bus/security.py). The server's config holds only
public JWTs (`server_config()`), so it can be copied to every machine of a
cluster; issuing a credential needs the signing keys, kept in one file readable
only by its owner (`<dir>/fleet-keys.json`), and touches no server.

A credentials file is the format `nats --creds FILE` and nats-py's
`user_credentials` read: the user JWT and the user's nkey seed. Every secret
file here is written mode 0600 from the start (never chmod-ed after the fact).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from bus.security import Grant, inbox_prefix, permissions

KEYS_FILE = "fleet-keys.json"
SERVER_CONFIG_FILE = "nats-auth.conf"
ACCOUNT_NAME = "jetfleet"
MAX_CONTROL_LINE = 64 * 1024
_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_CREDS_JWT = re.compile(r"-----BEGIN NATS USER JWT-----\s*([A-Za-z0-9_\-.]+)\s*------END NATS")


class CredentialsError(ValueError):
    """Missing or unreadable signing keys or credentials: a one-line reason."""


def _new_key(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public(kp: Any) -> str:
    return str(kp.public_key.decode())


def _seed(kp: Any) -> str:
    seed = kp.seed
    return seed.decode() if isinstance(seed, (bytes, bytearray)) else str(seed)


def encode_jwt(claims: dict[str, Any], signer: Any, *, issued_at: int | None = None) -> str:
    """A NATS JWT: `claims` issued and signed by `signer` (an nkeys key pair)."""
    body = dict(claims, iat=issued_at or int(time.time()), iss=_public(signer))
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps(_JWT_HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: for reading one's own credentials)."""
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise CredentialsError(f"not a NATS JWT ({exc})") from None
    return claims


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}


@dataclass
class FleetKeys:
    """The operator, the system account, the fleet account and its signing key."""

    operator: Any
    system: Any
    account: Any
    signing: Any

    @classmethod
    def generate(cls) -> FleetKeys:
        return cls(operator=_new_key(nkeys.PREFIX_BYTE_OPERATOR),
                   system=_new_key(nkeys.PREFIX_BYTE_ACCOUNT),
                   account=_new_key(nkeys.PREFIX_BYTE_ACCOUNT),
                   signing=_new_key(nkeys.PREFIX_BYTE_ACCOUNT))

    # ---- on disk -------------------------------------------------------------------------

    @staticmethod
    def path(directory: Path) -> Path:
        return directory / KEYS_FILE

    @classmethod
    def load(cls, directory: Path) -> FleetKeys:
        path = cls.path(directory)
        try:
            data = json.loads(path.read_text())
            return cls(**{k: nkeys.from_seed(bytearray(data[k].encode()))
                          for k in ("operator", "system", "account", "signing")})
        except FileNotFoundError:
            raise CredentialsError(
                f"no fleet signing keys in {directory} (no {KEYS_FILE}): create them with "
                f"`jetfleet creds server --data-dir {directory.parent}` or "
                "`jetfleet up --secure`") from None
        except PermissionError:
            raise CredentialsError(f"{path}: not readable by this user") from None
        except (ValueError, KeyError, nkeys.NkeysError) as exc:
            raise CredentialsError(f"{path}: not jetfleet signing keys ({exc!r})") from None

    @classmethod
    def load_or_create(cls, directory: Path) -> tuple[FleetKeys, bool]:
        """The keys in `directory`, made there first if absent; True when made now."""
        if cls.path(directory).exists():
            return cls.load(directory), False
        keys = cls.generate()
        keys.save(directory)
        return keys, True

    def save(self, directory: Path) -> None:
        private_dir(directory)
        body = {k: _seed(getattr(self, k)) for k in ("operator", "system", "account", "signing")}
        write_secret(self.path(directory), json.dumps(body, indent=2) + "\n")

    # ---- JWTs ----------------------------------------------------------------------------

    def operator_jwt(self) -> str:
        return encode_jwt({"sub": _public(self.operator), "name": "jetfleet",
                           "nats": {"type": "operator", "version": 2,
                                    "system_account": _public(self.system)}}, self.operator)

    def system_jwt(self) -> str:
        return encode_jwt({"sub": _public(self.system), "name": "SYS",
                           "nats": {"type": "account", "version": 2, "limits": _UNLIMITED}},
                          self.operator)

    def account_jwt(self) -> str:
        limits = dict(_UNLIMITED, mem_storage=-1, disk_storage=-1, streams=-1, consumer=-1)
        return encode_jwt({"sub": _public(self.account), "name": ACCOUNT_NAME,
                           "nats": {"type": "account", "version": 2, "limits": limits,
                                    "signing_keys": [_public(self.signing)]}}, self.operator)

    def server_config(self) -> str:
        """The nats-server config lines for this fleet's accounts: public JWTs only."""
        sys_pub, acc_pub = _public(self.system), _public(self.account)
        return ("# jetfleet accounts (operator mode): public JWTs only, no secret here.\n"
                # A CONNECT carries the user JWT with its permissions: a few KiB.
                f"max_control_line: {MAX_CONTROL_LINE}\n"
                f"operator: {self.operator_jwt()}\n"
                f"system_account: {sys_pub}\n"
                "resolver: MEMORY\n"
                "resolver_preload: {\n"
                f"  {sys_pub}: {self.system_jwt()}\n"
                f"  {acc_pub}: {self.account_jwt()}\n"
                "}\n")

    def user_creds(self, grant: Grant, *, expires_s: float | None = None) -> str:
        """A credentials file's text for a new user with `grant`'s permissions."""
        grant.check()
        user = _new_key(nkeys.PREFIX_BYTE_USER)
        pub = _public(user)
        nats: dict[str, Any] = {
            "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
            "issuer_account": _public(self.account),
            "tags": [f"role:{grant.role}"] + ([f"node:{grant.node}"] if grant.node else []),
            **permissions(grant, pub).as_claims(),
        }
        if grant.role != "admin":
            # Replying to a request (control endpoints) without a standing grant.
            nats["resp"] = {"max": 1, "ttl": 0}
        claims: dict[str, Any] = {"sub": pub, "name": grant.name, "nats": nats}
        if expires_s:
            claims["exp"] = int(time.time() + expires_s)
        token = encode_jwt(claims, self.signing)
        seed = _seed(user)
        return ("-----BEGIN NATS USER JWT-----\n"
                f"{token}\n"
                "------END NATS USER JWT------\n\n"
                "************************* IMPORTANT *************************\n"
                "NKEY Seed printed below can be used to sign and prove identity.\n"
                "NKEYs are sensitive and should be treated as secrets.\n\n"
                "-----BEGIN USER NKEY SEED-----\n"
                f"{seed}\n"
                "------END USER NKEY SEED------\n\n"
                "*************************************************************\n")


# ---- files -----------------------------------------------------------------------------


def private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path` readable only by its owner: created 0600 under a
    temporary name, then renamed over any old file (never a moment world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_creds(path: Path, keys: FleetKeys, grant: Grant, *,
                expires_s: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, keys.user_creds(grant, expires_s=expires_s))
    return path


@dataclass(frozen=True)
class Identity:
    """Who a credentials file says we are (read from its JWT, not its seed)."""

    user: str
    name: str
    role: str
    node: str | None
    expires: float | None

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)


def read_identity(path: str | os.PathLike[str]) -> Identity:
    """The identity in a credentials file; CredentialsError with a one-line reason."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {p} does not exist") from None
    except OSError as exc:
        raise CredentialsError(f"credentials file {p}: {exc.strerror or exc}") from None
    found = _CREDS_JWT.search(text)
    if found is None:
        raise CredentialsError(f"{p} is not a NATS credentials file (no user JWT in it)")
    claims = decode_jwt(found.group(1))
    tags = {t.partition(":")[0]: t.partition(":")[2]
            for t in claims.get("nats", {}).get("tags", []) if ":" in t}
    name = str(claims.get("name", ""))
    role = tags.get("role") or name.partition("@")[0]
    exp = claims.get("exp")
    return Identity(user=str(claims.get("sub", "")), name=name, role=role,
                    node=tags.get("node") or None, expires=float(exp) if exp else None)


def loose_mode(path: str | os.PathLike[str]) -> str | None:
    """'mode 0644' when others than the owner may read the file, else None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return f"mode {mode:04o}" if mode & 0o077 else None
