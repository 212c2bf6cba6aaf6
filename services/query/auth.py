"""API tokens with read and write scopes.

`--api-token T` is one token with both scopes; `--tokens-file F` holds one
token a line, `TOKEN read` or `TOKEN read,write` (`#` starts a comment). A
request under /api/v1 sends `Authorization: Bearer TOKEN`: none or an unknown
one is 401, a token without the route's scope is 403. With no token at all the
API is open (and the service says so when it starts).

On a secured bus (docs/security.md) the service runs as NATS role `query`: it
reads every stream, and the write scope publishes exactly what role `client`
may (jobs.submit, jobs.cancel), so a write token can submit and cancel as a
client can and nothing more. `jetfleet up --secure` never leaves the API open.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

SCOPES = ("read", "write")


class TokensError(ValueError):
    pass


@dataclass
class Tokens:
    scopes: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.scopes

    def add(self, token: str, scopes: frozenset[str]) -> None:
        if not token:
            raise TokensError("an API token may not be empty")
        self.scopes[token] = scopes

    def lookup(self, token: str) -> frozenset[str] | None:
        found = None
        for known, scopes in self.scopes.items():
            # Compare against every token, so timing says nothing about which matched.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = scopes
        return found

    @classmethod
    def load(cls, token: str | None = None, path: str | None = None) -> Tokens:
        tokens = cls()
        if token:
            tokens.add(token, frozenset(SCOPES))
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise TokensError(f"tokens file {path}: {exc.strerror or exc}") from None
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise TokensError(f"{path}:{n}: expected `TOKEN read` or `TOKEN read,write`")
                scopes = frozenset(s.strip() for s in parts[1].split(",") if s.strip())
                unknown = scopes - set(SCOPES)
                if unknown or not scopes:
                    raise TokensError(f"{path}:{n}: scopes are read and write, not "
                                      f"{', '.join(sorted(unknown)) or 'nothing'}")
                # write implies read: a token that can submit can see what it submitted.
                tokens.add(parts[0], scopes | {"read"})
        return tokens


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    kind, _, value = header.partition(" ")
    return value.strip() if kind.lower() == "bearer" and value.strip() else None


def guard(tokens: Tokens) -> Any:
    """A Litestar guard: each route says the scope it needs in `opt["scope"]`."""

    def check(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if tokens.open:
            return
        token = bearer(connection)
        if token is None:
            raise NotAuthorizedException(
                "this API needs a token: send `Authorization: Bearer <token>`",
                headers={"WWW-Authenticate": "Bearer"})
        scopes = tokens.lookup(token)
        if scopes is None:
            raise NotAuthorizedException("unknown API token",
                                         headers={"WWW-Authenticate": "Bearer"})
        needed = str(handler.opt.get("scope", "read"))
        if needed not in scopes:
            raise PermissionDeniedException(
                f"this token has the {', '.join(sorted(scopes))} scope; "
                f"{connection.scope.get('method', '')} {connection.url.path} needs {needed}")

    return check
