"""`jetfleet up --secure` and `--tls`: the fleet's keys, a credential per role,
certificates, and what each child is given (paths in its environment, never a
secret on a command line).

    <data-dir>/creds/fleet-keys.json   the signing keys (0600; `jetfleet creds` uses them)
    <data-dir>/creds/<role>.creds      one credential per role (0600), issued at each start
    <data-dir>/creds/api-token         the query API's token when none was given (0600)
    <data-dir>/tls/                    generated CA and server certificate (keys 0600)
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bus.credentials import FleetKeys, private_dir, write_creds, write_secret
from bus.security import EVOLVER_CAPABILITIES, Grant
from bus.settings import Settings

if TYPE_CHECKING:
    from bus.tls import TlsFiles

# The role each component runs under.
COMPONENT_ROLES = {"dispatcher": "dispatcher", "worker": "worker", "evolver": "evolver",
                   "agent": "agent", "monitor": "monitor", "query": "query"}


@dataclass
class FleetSecurity:
    data_dir: Path
    secure: bool = False
    tls: TlsFiles | None = None
    node: str = ""
    keys: FleetKeys | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def creds_dir(self) -> Path:
        return self.data_dir / "creds"

    def creds(self, role: str) -> Path:
        return self.creds_dir / f"{role}.creds"

    @classmethod
    def prepare(cls, data_dir: Path, *, secure: bool, tls: TlsFiles | None) -> FleetSecurity:
        from agents.devices import node_name

        sec = cls(data_dir=data_dir, secure=secure, tls=tls, node=node_name())
        if secure:
            sec.keys, made = FleetKeys.load_or_create(sec.creds_dir)
            if made:
                sec.notes.append(f"new fleet signing keys in {FleetKeys.path(sec.creds_dir)} "
                                 "(0600; `jetfleet creds` issues credentials with them)")
        return sec

    def server_config(self) -> str:
        return self.keys.server_config() if self.keys is not None else ""

    def issue(self, workers: list[str], evolvers: list[str], app_workers: list[str]) -> None:
        """A credential per role for this start: workers may take any capability's
        work on this node and speak for exactly their own worker ids."""
        if self.keys is None:
            return
        private_dir(self.creds_dir)
        node = self.node
        grants = {
            "admin": Grant("admin"),
            "client": Grant("client"),
            "dispatcher": Grant("dispatcher"),
            "monitor": Grant("monitor"),
            "query": Grant("query"),
            "agent": Grant("agent", node=node, worker_ids=tuple(app_workers)),
            "worker": Grant("worker", node=node, worker_ids=tuple(workers + app_workers)),
            "evolver": Grant("evolver", node=node, capabilities=EVOLVER_CAPABILITIES,
                             worker_ids=tuple(evolvers)),
        }
        for role, grant in grants.items():
            write_creds(self.creds(role), self.keys, grant)
        self.notes.append(f"every component runs under its own role; credentials in "
                          f"{self.creds_dir} (0600)")
        self.notes.append(f"export JETFLEET_NATS_CREDS={self.creds('client')}   "
                          f"(client role; {self.creds('admin').name} for admin verbs)")

    def api_tokens(self) -> Path | None:
        """A read-and-write API token for the query service when none was given: the
        token file is 0600 and the token never appears on a command line."""
        if not self.secure:
            return None
        private_dir(self.creds_dir)
        token_path = self.creds_dir / "api-token"
        if token_path.exists():
            token = token_path.read_text().strip()
        else:
            token = secrets.token_urlsafe(32)
            write_secret(token_path, token + "\n")
        tokens = self.creds_dir / "api-tokens"
        write_secret(tokens, f"# the query API's tokens: TOKEN SCOPES\n{token} read,write\n")
        self.notes.append(f"query API token in {token_path}: "
                          f"export JETFLEET_API_TOKEN=$(cat {token_path})")
        return tokens

    def env(self, component: str | None) -> dict[str, str]:
        """What a child (or, with None, a client of this fleet as admin) is given."""
        out: dict[str, str] = {}
        if self.keys is not None:
            role = COMPONENT_ROLES.get(component or "", "admin")
            out["JETFLEET_NATS_CREDS"] = str(self.creds(role))
            out["JETFLEET_NODE"] = self.node
            if component == "agent":
                out["JETFLEET_WORKER_CREDS"] = str(self.creds("worker"))
        if self.tls is not None:
            out["JETFLEET_NATS_TLS_CA"] = str(self.tls.ca)
        return out

    def admin_settings(self) -> Settings:
        creds = str(self.creds("admin")) if self.keys is not None else ""
        return Settings(nats_creds=creds, nats_tls_ca=str(self.tls.ca) if self.tls else "")

    def apply_topology(self, url: str, replicas: int) -> None:
        """Declare streams, buckets and the object store once, as admin, before the
        children start (most roles may not declare them)."""
        if self.keys is None:
            return
        from dataclasses import replace

        from bus.connection import connect

        async def apply() -> None:
            settings = replace(Settings.from_env(), nats_creds=str(self.creds("admin")),
                               nats_tls_ca=str(self.tls.ca) if self.tls else "",
                               replicas=replicas)
            bus = await connect(settings, url=url, name="jetfleet-up", connect_timeout=15.0)
            await bus.close()

        asyncio.run(apply())
