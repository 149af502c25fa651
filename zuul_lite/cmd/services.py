"""Starting and stopping the embedded default's daemons as background processes.

Each daemon gets a pid file and a log file under `<state>/run/`; a daemon
whose pid file names a live process running the same command is reused, so
the quick start is idempotent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zuul_lite.cmd.services")

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]

    def pidfile(self, run_dir: Path) -> Path:
        return run_dir / f"{self.name}.pid"

    def logfile(self, run_dir: Path) -> Path:
        return run_dir / f"{self.name}.log"


def services(zuul_conf: Path, nodepool_conf: Path, run_dir: Path) -> list[Service]:
    zl = [str(BIN / "zuul-lite"), "-c", str(zuul_conf), "--log-file"]
    np = [str(BIN / "nodepool"), "-c", str(nodepool_conf), "--log-file"]
    return [
        Service("scheduler", [*zl, str(run_dir / "scheduler.log"), "scheduler"]),
        Service("web", [*zl, str(run_dir / "web.log"), "web"]),
        Service("nodepool-builder", [*np, str(run_dir / "nodepool-builder.log"), "builder"]),
        Service("nodepool-launcher", [*np, str(run_dir / "nodepool-launcher.log"), "launcher"]),
        Service(
            "zuul-launcher",
            [
                str(BIN / "zuul-launcher"),
                "-c",
                str(zuul_conf),
                "--log-file",
                str(run_dir / "zuul-launcher.log"),
            ],
        ),
    ]


def pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(service: Service, run_dir: Path) -> tuple[int, bool]:
    """Start unless running; returns (pid, started_now)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    pid = pid_alive(service.pidfile(run_dir))
    if pid is not None:
        return pid, False
    out = open(run_dir / f"{service.name}.out", "ab")
    proc = subprocess.Popen(
        service.argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()
    service.pidfile(run_dir).write_text(str(proc.pid))
    return proc.pid, True


def check_alive(service: Service, run_dir: Path) -> str | None:
    """None if running, else one sentence with the last lines of its output."""
    if pid_alive(service.pidfile(run_dir)) is not None:
        return None
    tail = ""
    for path in (run_dir / f"{service.name}.out", service.logfile(run_dir)):
        if path.exists():
            lines = path.read_text(errors="replace").strip().splitlines()
            if lines:
                tail = lines[-1]
    return f"{service.name} is not running (see {service.logfile(run_dir)}): {tail}"


def stop(service: Service, run_dir: Path, timeout: float = 20.0) -> bool:
    pid = pid_alive(service.pidfile(run_dir))
    if pid is None:
        service.pidfile(run_dir).unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(service.pidfile(run_dir)):
        time.sleep(0.2)
    if pid_alive(service.pidfile(run_dir)):
        os.killpg(pid, signal.SIGKILL)
    service.pidfile(run_dir).unlink(missing_ok=True)
    return True
