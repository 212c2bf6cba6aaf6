"""TLS on the bus, against real nats-servers: generated certificates (made once,
reused, private keys 0600), given certificates, a client without the CA refused
in one line, and `jetfleet up --tls --secure` end to end."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bus.connection import ConnectError, connect
from bus.objects import ObjectStore
from bus.server import EmbeddedServer
from bus.settings import Settings
from bus.tls import TlsFiles, generate, load_or_generate
from sdk import Client
from tests.fleet_up import cli, env, up


def test_generated_certificates_are_made_once_and_kept_private(tmp_path: Path) -> None:
    files, made = load_or_generate(tmp_path / "tls")
    assert made
    first = files.cert.read_bytes()
    for key in (files.key, tmp_path / "tls" / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again, made_again = load_or_generate(tmp_path / "tls")
    assert not made_again and again.cert.read_bytes() == first
    # Asked for other names, it makes a certificate that carries them.
    other, remade = load_or_generate(tmp_path / "tls", ("127.0.0.1", "localhost", "node-a"))
    assert remade and other.cert.read_bytes() != first


async def test_a_server_with_given_certificates_serves_clients_with_the_ca(
        tmp_path: Path) -> None:
    given = generate(tmp_path / "given")  # as if made by the site's own CA
    files = TlsFiles(cert=given.cert, key=given.key, ca=given.ca).check()
    with EmbeddedServer(tmp_path / "nats", tls=files) as server:
        assert "tls {" in server.config() and str(given.cert) in server.config()
        bus = await connect(Settings(nats_tls_ca=str(given.ca)), url=server.url)
        try:
            assert bus.nc.connected_url is not None
            await Client(bus).submit("echo", {"over": "tls"})
            # An object's data link speaks TLS too, checked against the same CA.
            store = ObjectStore(bus, link_min_bytes=0)
            data = os.urandom(3 << 20)
            assert await store.get(await store.put(data, name="over/tls")) == data
            assert store.links_used == 2 and store.link_unavailable is None
        finally:
            await bus.close()
        with pytest.raises(ConnectError, match=r"TLS .* failed.*JETFLEET_NATS_TLS_CA"):
            await connect(Settings(), url=server.url, connect_timeout=10)
        stranger = generate(tmp_path / "stranger")
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await connect(Settings(nats_tls_ca=str(stranger.ca)), url=server.url,
                          connect_timeout=10)


def test_up_refuses_half_given_certificates_in_one_line(tmp_path: Path) -> None:
    out = cli("up", "--tls-cert", str(tmp_path / "c.pem"), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "go together" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    given = generate(tmp_path / "g")
    out = cli("up", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(given.key),
              "--tls-ca", str(given.ca), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "missing.pem: no such file" in out.stderr


def test_up_tls_with_generated_certificates_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "fleet"
    with up(data, "--tls", "--secure", "--workers", "1", "--no-api") as fleet:
        ca = data / "tls" / "ca.pem"
        assert f"export JETFLEET_NATS_TLS_CA={ca}" in fleet.text()
        assert "tls {" in (data / "nats" / "nats-server.conf").read_text()
        creds = str(data / "creds" / "client.creds")
        ran = cli("submit", "echo", "--payload", '{"tls": 1}', "--wait", timeout=90,
                  environ=env(JETFLEET_NATS_URL=fleet.url, JETFLEET_NATS_CREDS=creds,
                              JETFLEET_NATS_TLS_CA=str(ca)))
        assert ran.returncode == 0, ran.stderr + fleet.text()
        assert '"tls": 1' in ran.stdout and "eof_received" not in ran.stderr
        # Without the CA a client is told what is missing, in one line, at once.
        refused = cli("jobs", environ=env(JETFLEET_NATS_URL=fleet.url, JETFLEET_NATS_CREDS=creds))
        assert refused.returncode == 2, refused.stdout
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
        assert "JETFLEET_NATS_TLS_CA" in refused.stderr
        for child in fleet.descendants():
            if "ops.cli" in " ".join(child.cmdline()):
                assert child.environ()["JETFLEET_NATS_TLS_CA"] == str(ca)
    assert "all 5 components finished their work" in fleet.text()
