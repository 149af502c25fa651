"""A component's TLS identity for ZooKeeper and Gearman, and the schema that reads it.

kazoo and gear each take three PEM paths (the CA to trust, our certificate,
our key) but report a bad file deep in their connection threads, where a
missing file becomes a retry loop instead of an answer. So every component
checks its files once, up front (`check`), and gets one sentence naming the
config key and the file; `kazoo_args`/`gear_args` then spell the paths the
way each library wants them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import voluptuous as v

from nodepool_lite.exceptions import TLSError

SCHEMA = {v.Required("ca"): str, v.Required("cert"): str, v.Required("key"): str}


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA that signs every peer, and this component's cert and key."""

    ca: str
    cert: str
    key: str
    source: str = field(default="", compare=False)  # "<config file> <key path>", for errors

    @classmethod
    def from_config(cls, section: dict, base: Path, source: str) -> TLSFiles:
        """Paths relative to the config file's directory, as its other paths."""
        return cls(
            ca=str(base / section["ca"]),
            cert=str(base / section["cert"]),
            key=str(base / section["key"]),
            source=source,
        )

    def check(self) -> None:
        """Raise TLSError (one sentence) unless the three files load as a TLS identity."""
        where = f"{self.source}: " if self.source else ""
        for name, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                raise TLSError(
                    f"{where}cannot read the {name} file {path}: {error.strerror}."
                ) from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs: 50 ms saved
        try:
            context.load_verify_locations(cafile=self.ca)
        except ssl.SSLError:
            raise TLSError(f"{where}{self.ca} is not a PEM CA certificate.") from None
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError:
            raise TLSError(
                f"{where}{self.cert} and {self.key} are not a PEM certificate and its key."
            ) from None


def kazoo_args(tls: TLSFiles | None) -> dict:
    """KazooClient keyword arguments: TLS with our certificate, or none (plain TCP).

    kazoo also trusts the system's CAs, so the server's certificate must name
    the host we dial (check_hostname): no public CA signs 127.0.0.1 or localhost.
    """
    if tls is None:
        return {}
    tls.check()
    return {
        "use_ssl": True,
        "ca": tls.ca,
        "certfile": tls.cert,
        "keyfile": tls.key,
        "check_hostname": True,
    }


def gear_args(tls: TLSFiles | None) -> dict:
    """gear addServer()/Server() keyword arguments; gear uses TLS only given all three."""
    if tls is None:
        return {}
    tls.check()
    return {"ssl_ca": tls.ca, "ssl_cert": tls.cert, "ssl_key": tls.key}
