"""Certificates made at test time, and the three server brokers with TLS and a password.

``make_pki(directory)`` writes a CA and a server certificate signed by it (for
``127.0.0.1`` and ``localhost``), plus a second CA that signed nothing: a client that trusts
only that one must refuse the server. Keys are P-256 (fast to make), PEM, unencrypted.

The servers extend ``tests/servers.py``'s, which stay as they were for everyone else:
``TlsRedisServer`` (``--tls-port`` only, ``requirepass``), ``TlsPostgresServer``
(``ssl=on``, a role with a scram-sha-256 password) and ``TlsNatsServer`` (a ``tls {}``
block, and users with passwords or a token).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from servers import NatsServer, PostgresServer, RedisServer


@dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA that signed the server's certificate (what a client should trust)."""
    cert: Path
    key: Path
    wrong_ca: Path
    """A CA that signed nothing here: trusting only it, a client must refuse the server."""
    client_cert: Path
    """A client certificate the CA signed (for servers that verify clients)."""
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ca(common_name: str, path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, and a wrong CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("taskmill test CA", directory / "ca.pem")
    _ca("taskmill wrong CA", directory / "wrong-ca.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / "server.key")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(_name("taskmill-client"))
        .issuer_name(ca_cert.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "client.pem").write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(client_key, directory / "client.key")
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
               directory / "wrong-ca.pem", directory / "client.pem",
               directory / "client.key")  # fmt: skip


# --- Redis -------------------------------------------------------------------------------------


class TlsRedisServer(RedisServer):
    """``redis-server`` that listens only on a TLS port, with ``requirepass``."""

    def __init__(self, directory: Path, pki: Pki, password: str) -> None:
        super().__init__(directory)
        self.pki = pki
        self.password = password

    def url_with(self, ca: Path | None = None, *, password: str | None = None) -> str:
        """``rediss://:password@127.0.0.1:port/0?ssl_ca_certs=CA`` (this server's CA unless
        another is given)."""
        secret = quote(self.password if password is None else password, safe="")
        ca_path = quote(str(ca or self.pki.ca), safe="/")
        return f"rediss://:{secret}@{self.host}:{self.port}/0?ssl_ca_certs={ca_path}"

    @property
    def url(self) -> str:
        return self.url_with()

    def args(self) -> list[str]:
        args = super().args()
        at = args.index("--port")
        args[at + 1] = "0"  # no plain port at all
        return [
            *args,
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.pki.cert),
            "--tls-key-file", str(self.pki.key),
            "--tls-ca-cert-file", str(self.pki.ca),
            "--tls-auth-clients", "no",
            "--requirepass", self.password,
        ]  # fmt: skip

    def client(self, **options: Any) -> redis.Redis:
        kwargs: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_certs": str(self.pki.ca),
            "password": self.password,
        }
        kwargs.update(options)
        return super().client(**kwargs)


# --- PostgreSQL --------------------------------------------------------------------------------


class TlsPostgresServer(PostgresServer):
    """A PostgreSQL cluster with ``ssl=on`` (the certificate in its directory, owned by the
    server's user) and a login role that needs its password (scram-sha-256) over TCP."""

    role = "app"

    def __init__(self, pki: Pki, password: str) -> None:
        super().__init__()
        self.password = password
        self.tls_dir = self.directory / "tls"
        self.tls_dir.mkdir()
        for source in (pki.cert, pki.key, pki.ca):
            shutil.copy(source, self.tls_dir / source.name)
        if self._run_as is not None:  # the server's user must own its key (mode 0600)
            for path in (self.tls_dir, *self.tls_dir.iterdir()):
                shutil.chown(path, self._run_as, self._run_as)
        self.pki = pki

    def args(self) -> list[str]:
        return [
            *super().args(),
            "-c", "ssl=on",
            "-c", f"ssl_cert_file={self.tls_dir / self.pki.cert.name}",
            "-c", f"ssl_key_file={self.tls_dir / self.pki.key.name}",
        ]  # fmt: skip

    def url_with(
        self,
        ca: Path | None = None,
        *,
        sslmode: str = "verify-full",
        password: str | None = None,
        database: str = "postgres",
    ) -> str:
        secret = quote(self.password if password is None else password, safe="")
        ca_path = quote(str(ca or self.pki.ca), safe="/")
        return (
            f"postgresql://{self.role}:{secret}@{self.host}:{self.port}/{database}"
            f"?sslmode={sslmode}&sslrootcert={ca_path}"
        )

    def ssl_in_use(self, url: str) -> bool:
        """Whether a connection made with ``url`` (libpq's options only) uses TLS."""
        with psycopg.connect(url, connect_timeout=5) as conn:
            found = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            row = found.fetchone()
            return bool(row and row[0])


# --- NATS --------------------------------------------------------------------------------------


class TlsNatsServer(NatsServer):
    """``nats-server -js`` with a ``tls {}`` block (TLS required of every client) and an
    ``authorization`` block: ``users`` (name → password), or one ``token``."""

    def __init__(
        self,
        directory: Path,
        pki: Pki | None,
        *,
        users: dict[str, str] | None = None,
        token: str | None = None,
        verify_clients: bool = False,
    ) -> None:
        super().__init__(directory, sync_always=False)
        self.pki = pki
        self.verify_clients = verify_clients
        self.users = users or {}
        self.token = token

    def config(self) -> str:
        lines = [super().config()]
        if self.pki is not None:
            lines += [
                "tls {",
                f'  cert_file: "{self.pki.cert}"',
                f'  key_file: "{self.pki.key}"',
                "  timeout: 2",
                *([f'  ca_file: "{self.pki.ca}"', "  verify: true"] if self.verify_clients else []),
                "}",
            ]
        if self.token is not None:
            lines += ["authorization {", f'  token: "{self.token}"', "}"]
        elif self.users:
            entries = ", ".join(
                f'{{user: "{name}", password: "{password}"}}'
                for name, password in self.users.items()
            )
            lines += ["authorization {", f"  users: [{entries}]", "}"]
        return "\n".join(lines) + "\n"

    def url_with(self, userinfo: str = "", *, ca: Path | None = None) -> str:
        """``nats://userinfo@127.0.0.1:port`` with ``?tls_ca=CA`` when the server has TLS."""
        at = f"{userinfo}@" if userinfo else ""
        url = f"nats://{at}{self.host}:{self.port}"
        if self.pki is not None:
            url += f"?tls_ca={quote(str(ca or self.pki.ca), safe='/')}"
        return url
