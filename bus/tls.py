"""TLS for the bus: a generated certificate authority and server certificate.

`jetfleet up --tls` without certificates of its own makes a CA and a server
certificate for 127.0.0.1 and localhost (ECDSA P-256, 825 days) in
`<data-dir>/tls/`, and reuses them on later starts while they are valid for
those names. Clients verify the server with the CA (JETFLEET_NATS_TLS_CA).
Private keys are written mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus.credentials import private_dir, write_secret

LOCAL_NAMES = ("127.0.0.1", "localhost")
VALID_DAYS = 825


class TlsError(ValueError):
    """Certificates that cannot be used: a one-line reason."""


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA clients verify it with."""

    cert: Path
    key: Path
    ca: Path

    def check(self) -> TlsFiles:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key),
                           ("--tls-ca", self.ca)):
            if not path.is_file():
                raise TlsError(f"{what} {path}: no such file")
        try:
            x509.load_pem_x509_certificate(self.cert.read_bytes())
            x509.load_pem_x509_certificate(self.ca.read_bytes())
        except ValueError as exc:
            raise TlsError(f"{self.cert} or {self.ca}: not a PEM certificate ({exc})") from None
        except PermissionError as exc:
            raise TlsError(f"{exc.filename}: not readable by this user") from None
        return self

    def server_block(self, verify_clients: bool = False) -> str:
        """The nats-server `tls { }` block."""
        return ("tls {\n"
                f"  cert_file: {str(self.cert)!r}\n"
                f"  key_file: {str(self.key)!r}\n"
                f"  ca_file: {str(self.ca)!r}\n"
                + ("  verify: true\n" if verify_clients else "")
                + "  timeout: 5\n"
                "}\n")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jetfleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def generate(directory: Path, names: tuple[str, ...] = LOCAL_NAMES) -> TlsFiles:
    """A new CA and a server certificate for `names`, written into `directory`."""
    private_dir(directory)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("jetfleet CA")).issuer_name(_name("jetfleet CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(names), critical=False)
            # clientAuth too: the same certificate serves a cluster's routes.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(cert=directory / "server.pem", key=directory / "server-key.pem",
                     ca=directory / "ca.pem")
    write_secret(directory / "ca-key.pem", _key_pem(ca_key))
    write_secret(files.key, _key_pem(key))
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def load_or_generate(directory: Path, names: tuple[str, ...] = LOCAL_NAMES
                     ) -> tuple[TlsFiles, bool]:
    """The certificates in `directory` when still valid for `names`, else new ones;
    True when made now."""
    files = TlsFiles(cert=directory / "server.pem", key=directory / "server-key.pem",
                     ca=directory / "ca.pem")
    if all(p.is_file() for p in (files.cert, files.key, files.ca)):
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
            have |= set(san.get_values_for_type(x509.DNSName))
            left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if set(names) <= have and left > datetime.timedelta(days=1):
                return files, False
        except (ValueError, x509.ExtensionNotFound):
            pass
    return generate(directory, names), True
