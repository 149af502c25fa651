"""TLS for ZooKeeper and Gearman: only holders of a certificate from our CA get in.

One real ZooKeeper with TLS (secure port only, client authentication) for the
module; gear servers per test. Refusals are waited on as events (a log record,
a failed handshake), never with a fixed sleep.
"""

from __future__ import annotations

import logging
import socket
import ssl
import stat
import threading
from pathlib import Path

import gear
import pytest
import yaml
from cryptography import x509

from launcher import config as launcher_config
from launcher.gearworker import NoDelayClient, NoDelayWorker
from nodepool_lite import config as nodepool_config
from nodepool_lite.certs import CLIENTS, CertDir, ensure_certs
from nodepool_lite.exceptions import TLSError, ZooKeeperServerError
from nodepool_lite.tls import TLSFiles, gear_args
from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import ZooKeeperServer, free_port
from tests.harness import StandInLauncher, make_project, make_series, wait_for_votes, write_config
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import ConfigError
from zuul_lite.gearman import GearServer
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertDir:
    return ensure_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory, certs) -> TLSFiles:
    """A client certificate from another CA, trusting ours (so only the server can refuse)."""
    theirs = ensure_certs(tmp_path_factory.mktemp("other-ca")).identity("cli")
    return TLSFiles(str(certs.ca), theirs.cert, theirs.key)


@pytest.fixture(scope="module")
def tls_zookeeper(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("zk-tls")
    server = ZooKeeperServer(root, port=free_port(), force_sync=False, tls=certs)
    server.start()
    yield server
    server.stop()


class Records(logging.Handler):
    """Sets `seen` when a record of `logger` contains `text`."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.seen = text, threading.Event()
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    def __enter__(self) -> Records:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def handshake(port: int, ca: str, cert: TLSFiles | None = None) -> bytes:
    """`ruok` over TLS: b"imok" when let in; raises ssl.SSLError when refused."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"ruok")
            return sock.recv(4)


# -- the CA ------------------------------------------------------------------


def test_certificates_are_made_once_and_private(tmp_path):
    made = ensure_certs(tmp_path / "tls", ["zk.example"])
    files = sorted(p.name for p in made.path.iterdir() if p.name != ".lock")
    expected = {"ca", "server", *CLIENTS}
    assert files == sorted(
        [f"{n}.{ext}" for n in expected for ext in ("pem", "key")]
        + ["store-password", "truststore.p12", "zookeeper.p12"]
    )
    assert stat.S_IMODE(made.path.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in made.path.iterdir())
    before = {p.name: p.read_bytes() for p in made.path.iterdir()}
    ensure_certs(tmp_path / "tls", ["zk.example"])
    assert {p.name: p.read_bytes() for p in made.path.iterdir()} == before
    for name in ("server", *CLIENTS):
        made.identity(name).check()  # each loads as a certificate and its key

    # A new host name gets a new server certificate (and keystore) that keeps the old names.
    ensure_certs(tmp_path / "tls", ["zk2.example"])
    server = (made.path / "server.pem").read_bytes()
    assert server != before["server.pem"]
    assert (made.path / "ca.pem").read_bytes() == before["ca.pem"]
    names = x509.load_pem_x509_certificate(server).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dns = set(names.value.get_values_for_type(x509.DNSName))
    assert {"localhost", "zk.example", "zk2.example"} <= dns

    # Without the CA key nothing missing can be signed: one sentence says so.
    (made.path / "ca.key").unlink()
    (made.path / "launcher.pem").unlink()
    with pytest.raises(TLSError, match=r"ca.key is missing, so launcher cannot be signed"):
        ensure_certs(tmp_path / "tls")


def test_tls_files_are_checked_in_one_sentence(tmp_path, certs):
    scheduler = certs.identity("scheduler")
    missing = TLSFiles(scheduler.ca, str(tmp_path / "nope.pem"), scheduler.key, "zuul.yaml x.tls")
    with pytest.raises(TLSError) as error:
        missing.check()
    assert str(error.value) == (
        f"zuul.yaml x.tls: cannot read the cert file {tmp_path / 'nope.pem'}: "
        "No such file or directory."
    )
    mismatched = TLSFiles(scheduler.ca, scheduler.cert, certs.identity("launcher").key)
    with pytest.raises(TLSError, match="are not a PEM certificate and its key"):
        mismatched.check()
    with pytest.raises(TLSError, match="cannot read the cert file"):
        ZooKeeper("127.0.0.1:1", tls=missing).connect()
    with pytest.raises(TLSError, match="cannot read the cert file"):
        GearServer(port=0, tls=missing)


# -- ZooKeeper -----------------------------------------------------------------


def test_zookeeper_with_our_certificate_reads_and_writes(tls_zookeeper, certs):
    zoo_cfg = (tls_zookeeper.root / "conf" / "zoo.cfg").read_text()
    assert "secureClientPort=" in zoo_cfg and "\nclientPort=" not in zoo_cfg
    assert "ssl.clientAuth=need" in zoo_cfg
    # A chroot: the bootstrap client that creates it speaks TLS too.
    zk = ZooKeeper(f"{tls_zookeeper.hosts}/tls-rw", tls=certs.identity("nodepool"))
    zk.connect()
    try:
        zk.create("/hello", {"over": "tls"})
        assert zk.get("/hello")[0] == {"over": "tls"}
    finally:
        zk.disconnect()
    assert handshake(tls_zookeeper.port, str(certs.ca), certs.identity("cli")) == b"imok"


def test_zookeeper_settings_changed_under_a_running_server(tls_zookeeper):
    """The quick start after `tls` or the port changed: one sentence, not a second
    server on the same data."""
    plain = ZooKeeperServer(tls_zookeeper.root, port=free_port())
    with pytest.raises(ZooKeeperServerError, match=r"does not answer .* stop it first"):
        plain.start()
    assert tls_zookeeper.running()


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_zookeeper_refuses_clients_without_our_certificate(tls_zookeeper, certs, stranger, who):
    from kazoo.client import KazooClient

    cert = None if who == "no certificate" else stranger
    with pytest.raises(ssl.SSLError):
        handshake(tls_zookeeper.port, str(certs.ca), cert)
    # kazoo itself: its first attempt is refused, and it never connects.
    args = {"use_ssl": True, "ca": str(certs.ca)}
    if cert is not None:
        args.update(certfile=cert.cert, keyfile=cert.key)
    client = KazooClient(hosts=tls_zookeeper.hosts, **args)
    with Records("kazoo.client", "Connection dropped") as refused:
        client.start_async()
        try:
            assert refused.seen.wait(20)
            assert not client.connected
        finally:
            client.stop()
            client.close()
    # Plain TCP gets nothing either: the server closes on what is not a TLS record
    # (a record header is 5 bytes, so a lone 4-letter word would just wait).
    with socket.create_connection(("127.0.0.1", tls_zookeeper.port), timeout=5) as sock:
        sock.sendall(b"ruok" * 4)
        assert sock.recv(4) == b""


# -- Gearman -------------------------------------------------------------------


@pytest.fixture
def tls_gear(certs):
    server = GearServer(port=0, tls=certs.identity("server"))
    yield server
    server.shutdown()


def test_gearman_worker_with_our_certificate_gets_a_job(tls_gear, certs):
    # A peer that connects and never handshakes must not hold up anyone else.
    idle = socket.create_connection(("127.0.0.1", tls_gear.port))
    worker = NoDelayWorker("tls-worker")
    client = NoDelayClient("tls-client")
    try:
        worker.addServer("127.0.0.1", tls_gear.port, **gear_args(certs.identity("launcher")))
        client.addServer("127.0.0.1", tls_gear.port, **gear_args(certs.identity("scheduler")))
        worker.waitForServer(10)
        client.waitForServer(10)
        worker.registerFunction("tls:echo")
        job = gear.TextJob("tls:echo", "hello")
        client.submitJob(job)
        got = worker.getJob()
        assert got.arguments == b"hello"
        [conn] = [c for c in tls_gear.active_connections if c.ssl_subject == "launcher"]
        assert b"tls:echo" in conn.functions
        got.sendWorkComplete(b"done")
    finally:
        idle.close()
        worker.shutdown()
        client.shutdown()


def test_gearman_refuses_workers_without_our_certificate(tls_gear, certs, stranger):
    with pytest.raises(ssl.SSLError):
        handshake(tls_gear.port, str(certs.ca), stranger)
    plain = gear.Worker("plain-worker")
    with Records("zuul_lite.gearman", "Refused a Gearman connection") as refused:
        plain.addServer("127.0.0.1", tls_gear.port)
        plain.registerFunction("tls:plain")
        try:
            assert refused.seen.wait(20)
            assert not any(b"tls:plain" in c.functions for c in tls_gear.active_connections)
            assert all(c.ssl_subject for c in tls_gear.active_connections)
        finally:
            plain.shutdown()


# -- configuration and the scheduler -------------------------------------------


def _with_tls(path: Path, certs: CertDir, zk_hosts: str) -> Path:
    data = yaml.safe_load(path.read_text())
    scheduler = {"ca": str(certs.ca), **_pair(certs, "scheduler")}
    data["zookeeper"] = {"hosts": zk_hosts, "tls": scheduler}
    data["gearman"].update(tls=scheduler, **{"server-tls": _pair(certs, "server")})
    data["launcher"]["tls"] = _pair(certs, "launcher")
    path.write_text(yaml.safe_dump(data))
    return path


def _pair(certs: CertDir, name: str) -> dict:
    files = certs.identity(name)
    return {"cert": files.cert, "key": files.key}


def test_scheduler_and_launcher_speak_tls(tmp_path, tls_zookeeper, certs):
    """The whole check pipeline over TLS: scheduler (ZooKeeper, its gear server
    and client) and a stand-in launcher with its own certificate."""
    path = _with_tls(write_config(tmp_path, "x"), certs, f"{tls_zookeeper.hosts}/sched")
    cfg = zconfig.load(path)
    launcher = launcher_config.load(path)
    own = certs.identity("launcher")
    assert launcher.zk_tls == TLSFiles(str(certs.ca), own.cert, own.key)
    assert launcher.gearman_tls == launcher.zk_tls
    zk = ZooKeeper(cfg.zk_hosts, tls=cfg.zk_tls)
    zk.connect()
    sched = Scheduler(cfg, zk)
    sched.start()
    stand_in = StandInLauncher(zk, sched.gearman_port, tls=launcher.gearman_tls)
    stand_in.start()
    try:
        src = make_project(tmp_path)
        local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), cfg.state_dir)
        local.import_project("demo", src)
        series = make_series(src, tmp_path / "s", [("README", "tls\n", "README: tls")])
        change, _ = local.submit(series, "demo")
        [vote] = wait_for_votes(zk, change)
        assert vote["value"] == 1
    finally:
        stand_in.stop()
        sched.stop()
        zk.disconnect()


def test_configs_name_the_bad_tls_key(tmp_path):
    path = write_config(tmp_path, "h:1")
    data = yaml.safe_load(path.read_text())
    data["gearman"]["tls"] = {"ca": "ca.pem", "cert": "c.pem", "key": "c.key"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"gearman.server-tls: the embedded server"):
        zconfig.load(path)
    data["gearman"]["server-tls"] = {"cert": "s.pem", "key": "s.key"}
    path.write_text(yaml.safe_dump(data))
    cfg = zconfig.load(path)
    assert cfg.gearman_server_tls == TLSFiles(
        str(tmp_path / "ca.pem"), str(tmp_path / "s.pem"), str(tmp_path / "s.key")
    )
    data["zookeeper"]["tls"] = {"ca": "ca.pem"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"zookeeper.tls.(cert|key): required key not provided"):
        zconfig.load(path)
    with pytest.raises(launcher_config.ConfigError, match="zookeeper/tls/(cert|key): required"):
        launcher_config.load(path)
    nodepool = tmp_path / "nodepool.yaml"
    nodepool.write_text(yaml.safe_dump({"zookeeper-tls": {"ca": "a", "cert": "b"}}))
    with pytest.raises(nodepool_config.ConfigError, match="zookeeper-tls.key: required key"):
        nodepool_config.load(nodepool)
