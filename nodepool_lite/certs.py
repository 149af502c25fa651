"""The embedded default's private CA: made at the first start, reused after.

ZooKeeper (with client authentication) and Gearman accept only peers that
hold a certificate this CA signed, so nothing else on the host (a job on a
node, say) can read or write either. Everything lives in one directory,
`<state>/tls/` by default, mode 0700 with every file 0600:

    ca.pem ca.key                  the CA; its key signs whatever is missing later
    server.pem server.key          ZooKeeper's and the Gearman server's certificate
    <client>.pem <client>.key      scheduler, launcher, nodepool, cli
    zookeeper.p12 truststore.p12   the server identity and the CA for Java (PKCS12)
    store-password                 their password; zoo.cfg names the file, not the secret

Keys are EC P-256: made in milliseconds, and Java, OpenSSL and Python all
speak it. The server certificate names 127.0.0.1, ::1, localhost, this host
and the configured host names, and is issued again when a configured name is
new to it.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodepool_lite.exceptions import TLSError
from nodepool_lite.tls import TLSFiles

log = logging.getLogger("nodepool_lite.certs")

CLIENTS = ("scheduler", "launcher", "nodepool", "cli")
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class CertDir:
    """Where ensure_certs() put everything; names the files, reads nothing."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / "ca.pem"

    def identity(self, name: str) -> TLSFiles:
        """`server` or one of CLIENTS, as the TLSFiles a component connects with."""
        return TLSFiles(
            str(self.ca), str(self.path / f"{name}.pem"), str(self.path / f"{name}.key")
        )

    @property
    def keystore(self) -> Path:
        return self.path / "zookeeper.p12"

    @property
    def truststore(self) -> Path:
        return self.path / "truststore.p12"

    @property
    def password_file(self) -> Path:
        return self.path / "store-password"


def _write(path: Path, data: bytes) -> None:
    """Whole file or nothing, 0600 from the start (never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zuul-lite"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf (EC keys) only signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"zuul-lite CA on {socket.gethostname()}")
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    name: str,
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    sans: list[str] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate; with `sans` it serves (and also connects, for probes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _builder(_name(name), ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans is not None:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def server_names(hosts: Iterable[str] = ()) -> list[str]:
    """Every name a client may use for the server: loopback, this host, configured ones."""
    names = ["127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn(), *hosts]
    return list(dict.fromkeys(n for n in names if n))


class _Maker:
    """Fills in what is missing in one directory (under its lock)."""

    def __init__(self, certs: CertDir) -> None:
        self.certs = certs
        self.ca_key: PrivateKeyTypes | None = None
        self.ca_cert: x509.Certificate | None = None

    def _file(self, name: str) -> Path:
        return self.certs.path / name

    def _load_ca(self) -> bool:
        """Load the CA; False if there is none (a new directory)."""
        ca_pem, ca_key = self._file("ca.pem"), self._file("ca.key")
        if not ca_pem.exists():
            return False
        self.ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        if ca_key.exists():
            self.ca_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        return True

    def _signer(self, what: str) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
        if self.ca_key is None or self.ca_cert is None:
            raise TLSError(
                f"{self._file('ca.key')} is missing, so {what} cannot be signed: restore it, "
                f"or remove {self.certs.path} to make a new CA (then restart everything)."
            )
        return self.ca_key, self.ca_cert

    def _save(self, name: str, key: PrivateKeyTypes, cert: x509.Certificate) -> None:
        _write(self._file(f"{name}.key"), _key_pem(key))
        _write(self._file(f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM))

    def _missing(self, name: str) -> bool:
        return not (self._file(f"{name}.pem").exists() and self._file(f"{name}.key").exists())

    def run(self, sans: list[str]) -> None:
        fresh = not self._load_ca()
        if fresh:
            self.ca_key, self.ca_cert = _make_ca()
            self._save("ca", self.ca_key, self.ca_cert)
            log.info("Made a new CA in %s", self.certs.path)
        for client in CLIENTS:
            if fresh or self._missing(client):
                self._save(client, *_issue(client, *self._signer(client)))
                log.info("Issued the client certificate %s", client)
        server = self._file("server.pem")
        had = [] if fresh or self._missing("server") else self._names(server)
        if fresh or self._missing("server") or not set(sans) <= set(had):
            sans = list(dict.fromkeys([*sans, *had]))  # never drop a name a client uses
            self._save("server", *_issue("server", *self._signer("server"), sans=sans))
            log.info("Issued the server certificate for %s", ", ".join(sans))
            self._write_stores()
        elif not all(
            p.exists()
            for p in (self.certs.keystore, self.certs.truststore, self.certs.password_file)
        ):
            self._write_stores()

    def _names(self, server: Path) -> list[str]:
        cert = x509.load_pem_x509_certificate(server.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [str(n) for n in san.get_values_for_type(x509.IPAddress)] + list(
            san.get_values_for_type(x509.DNSName)
        )

    def _write_stores(self) -> None:
        """PKCS12 for ZooKeeper's JVM, with a fresh password in its own file."""
        password = secrets.token_urlsafe(24)
        _write(self.certs.password_file, password.encode())
        encryption = serialization.BestAvailableEncryption(password.encode())
        ca = x509.load_pem_x509_certificate(self.certs.ca.read_bytes())
        key = serialization.load_pem_private_key(
            self._file("server.key").read_bytes(), password=None
        )
        cert = x509.load_pem_x509_certificate(self._file("server.pem").read_bytes())
        _write(
            self.certs.keystore,
            pkcs12.serialize_key_and_certificates(b"server", key, cert, [ca], encryption),
        )
        _write(
            self.certs.truststore,
            pkcs12.serialize_java_truststore([pkcs12.PKCS12Certificate(ca, b"ca")], encryption),
        )


def ensure_certs(directory: Path | str, hosts: Iterable[str] = ()) -> CertDir:
    """Make whatever is missing in `directory` and return where it all is.

    Idempotent and safe to run from two processes at once (a lock file);
    TLSError (one sentence) when the directory cannot be written or a missing
    certificate cannot be signed because the CA key is gone.
    """
    certs = CertDir(Path(directory))
    try:
        certs.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.fdopen(os.open(certs.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _Maker(certs).run(server_names(hosts))
    except OSError as error:
        raise TLSError(
            f"Cannot make the TLS certificates in {certs.path}: "
            f"{error.strerror or error} ({error.filename or certs.path})."
        ) from None
    except ValueError as error:
        raise TLSError(
            f"{certs.path} holds a certificate or key that does not load ({error}); "
            "remove the directory to make a new CA."
        ) from None
    return certs
