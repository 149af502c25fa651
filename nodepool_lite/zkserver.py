"""Run a real ZooKeeper server (Debian's `zookeeper` package) as a plain process.

The quick start and the tests both need a server on loopback with its data
under a state directory; systemd is not used because the machine may not run
it and because a test wants its own throwaway server.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from nodepool_lite.exceptions import ZooKeeperServerError

log = logging.getLogger("nodepool_lite.zkserver")

ZK_JARS = [
    "/usr/share/java/zookeeper.jar",
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
]


def _ruok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"ruok")
            return sock.recv(4) == b"imok"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ZooKeeperServer:
    """One ZooKeeper server whose config, data and log live in `root`."""

    def __init__(
        self, root: Path, port: int = 2181, host: str = "127.0.0.1", force_sync: bool = True
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.host = host
        self.force_sync = force_sync
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
        (conf / "zoo.cfg").write_text(
            "tickTime=2000\n"
            f"dataDir={self.root / 'data'}\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.host}\n"
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
        return _ruok(self.host, self.port)

    def start(self, timeout: float = 30.0) -> None:
        """Start the server unless one already answers on the port."""
        if self.running():
            log.info("ZooKeeper already answers on %s", self.hosts)
            return
        java = shutil.which("java")
        missing = [jar for jar in ZK_JARS if not os.path.exists(jar)]
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
            ":".join([str(conf)] + ZK_JARS),
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
