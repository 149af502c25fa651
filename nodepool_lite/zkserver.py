"""Run a real ZooKeeper server (Debian's `zookeeper` package) as a plain process.

The quick start and the tests both need a server on loopback with its data
under a state directory; systemd is not used because the machine may not run
it and because a test wants its own throwaway server.

With `tls` (a CertDir from nodepool_lite.certs) the server listens only on a
`secureClientPort` and requires a client certificate from our CA
(`ssl.clientAuth=need`): there is no plain port at all, since one would let
anything on the host read and write. Readiness is still the four-letter word
`ruok`, sent over TLS with the server's own certificate (it is also a client
certificate): that proves the JVM is up, the keystores load and a handshake
with client authentication works; a kazoo session would prove no more.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from nodepool_lite.certs import CertDir
from nodepool_lite.exceptions import ZooKeeperServerError

log = logging.getLogger("nodepool_lite.zkserver")

ZK_JARS = [
    "/usr/share/java/zookeeper.jar",
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
]
# Debian's zookeeper.jar manifest leaves these out: without them the Netty
# connection factory (the one that speaks TLS) fails every TLS client.
NETTY_JARS = [
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
]


def _ruok(host: str, port: int, context: ssl.SSLContext | None = None) -> bool:
    # A closed port fails at once either way; a handshake with a JVM that has
    # just started (or a loaded host) can take a while, and is not a "no".
    try:
        sock = socket.create_connection((host, port), timeout=5.0 if context else 0.5)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        with sock:
            sock.sendall(b"ruok")
            return sock.recv(4) == b"imok"
    except OSError:  # ssl.SSLError is one too
        return False


def _probe_context(tls: CertDir) -> ssl.SSLContext:
    """The server's identity as a client; the CA is pinned, so the host name is not checked
    (a test or an operator may reach the server by a name its certificate does not carry)."""
    server = tls.identity("server")
    context = ssl.create_default_context(cafile=server.ca)
    context.check_hostname = False
    context.load_cert_chain(server.cert, server.key)
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ZooKeeperServer:
    """One ZooKeeper server whose config, data and log live in `root`."""

    def __init__(
        self,
        root: Path,
        port: int = 2181,
        host: str = "127.0.0.1",
        force_sync: bool = True,
        tls: CertDir | None = None,
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.host = host
        self.force_sync = force_sync
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def hosts(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.root / "zookeeper.pid"

    def _write_config(self) -> Path:
        conf = self.root / "conf"
        for sub in ("data", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        conf.mkdir(parents=True, exist_ok=True)
        if self.tls is None:
            listen = f"clientPort={self.port}\nclientPortAddress={self.host}\n"
        else:
            # The password files keep the secret out of zoo.cfg and the command line.
            listen = (
                f"secureClientPort={self.port}\n"
                f"secureClientPortAddress={self.host}\n"
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
                "ssl.clientAuth=need\n"
                f"ssl.keyStore.location={self.tls.keystore}\n"
                "ssl.keyStore.type=PKCS12\n"
                f"ssl.keyStore.passwordPath={self.tls.password_file}\n"
                f"ssl.trustStore.location={self.tls.truststore}\n"
                "ssl.trustStore.type=PKCS12\n"
                f"ssl.trustStore.passwordPath={self.tls.password_file}\n"
            )
        (conf / "zoo.cfg").write_text(
            "tickTime=2000\n"
            f"dataDir={self.root / 'data'}\n"
            f"{listen}"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr,mntr\n"
        )
        (conf / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, FILE\n"
            "log4j.appender.FILE=org.apache.log4j.FileAppender\n"
            f"log4j.appender.FILE.File={self.root / 'log' / 'zookeeper.log'}\n"
            "log4j.appender.FILE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.FILE.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c: %m%n\n"
        )
        return conf

    def running(self) -> bool:
        return _ruok(self.host, self.port, _probe_context(self.tls) if self.tls else None)

    def _pid_running_here(self) -> int | None:
        """The pid of a ZooKeeper started on this root that is still alive."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.root / "conf").encode() in cmdline else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server unless one already answers on the port."""
        if self.running():
            log.info("ZooKeeper already answers on %s", self.hosts)
            return
        pid = self._pid_running_here()
        if pid is not None:
            raise ZooKeeperServerError(
                f"The ZooKeeper of {self.root} (pid {pid}) does not answer on {self.hosts} "
                "with these settings (port or TLS changed?): stop it first."
            )
        java = shutil.which("java")
        jars = ZK_JARS + (NETTY_JARS if self.tls else [])
        missing = [jar for jar in jars if not os.path.exists(jar)]
        if not java or missing:
            raise ZooKeeperServerError(
                "ZooKeeper is not installed: install the Debian packages 'zookeeper' and "
                f"'default-jre-headless' (missing: {', '.join(missing or ['java'])})."
            )
        conf = self._write_config()
        cmd = [
            java,
            f"-Dzookeeper.log.dir={self.root / 'log'}",
            f"-Dlog4j.configuration=file:{conf / 'log4j.properties'}",
            "-Xmx256m",
            "-XX:+UseSerialGC",
        ]
        if not self.force_sync:
            cmd.append("-Dzookeeper.forceSync=no")
        cmd += [
            "-cp",
            ":".join([str(conf), *jars]),
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(conf / "zoo.cfg"),
        ]
        out = open(self.root / "log" / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.pidfile.write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running():
                log.info("ZooKeeper ready on %s (pid %s)", self.hosts, self.proc.pid)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise ZooKeeperServerError(
            f"ZooKeeper did not start on {self.hosts}; see {self.root / 'log'}."
        )

    def stop(self) -> None:
        pid = None
        if self.proc is not None:
            pid = self.proc.pid
        elif self.pidfile.exists():
            pid = int(self.pidfile.read_text())
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pidfile.unlink(missing_ok=True)
