"""The launcher's view of etc/zuul.yaml: its own `launcher:` section plus the
shared `gearman:`, `zookeeper:`, `state-dir` and `web:` keys.

The scheduler validates the whole file; this schema checks only the
`launcher:` section and the `tls:` of the shared ones, so the two can evolve
apart. Defaults match the scheduler's: log root `<state-dir>/logs`, log URL
`<web url>/logs`, jobs dir `../jobs` beside the config file.

TLS: the launcher connects to ZooKeeper and Gearman with `zookeeper: tls:`
and `gearman: tls:`, each CA as given there; `launcher: tls:` ({cert, key})
replaces the certificate in both, so a launcher has an identity of its own.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import voluptuous as v
import yaml

from nodepool_lite import tls
from nodepool_lite.tls import TLSFiles
from zuul_lite import metrics
from zuul_lite.metrics import MetricsConfig

LAUNCHER_SCHEMA = v.Schema(
    {
        "name": str,
        "state-dir": str,
        "log-root": str,
        "log-url": str,
        "jobs-dir": str,
        "max-builds": v.All(int, v.Range(min=1)),
        "private-key": str,
        "attempts": v.All(int, v.Range(min=1)),
        "node-timeout": v.All(v.Coerce(float), v.Range(min=1)),
        "connect-timeout": v.All(int, v.Range(min=1)),
        "setup-timeout": v.All(v.Coerce(float), v.Range(min=1)),
        "post-timeout": v.All(v.Coerce(float), v.Range(min=1)),
        "ansible-playbook": str,
        "tls": {v.Required("cert"): str, v.Required("key"): str},
        "metrics": metrics.SCHEMA,
        # The live console (launcher/console.py): where it listens, and the
        # host name the web server connects to if not the listen address.
        "console": {"listen": str, "port": v.All(int, v.Range(min=0, max=65535)), "host": str},
    },
    extra=v.PREVENT_EXTRA,
)
TLS_SCHEMA = v.Schema(tls.SCHEMA)


class ConfigError(Exception):
    """The config file is unreadable or invalid; the message names file and key."""


@dataclass
class LauncherConfig:
    """Everything a LauncherServer needs; tests build one directly."""

    zk_hosts: str
    gearman_server: str
    gearman_port: int
    work_root: Path
    log_root: Path
    log_url: str
    jobs_dir: Path
    private_key: Path
    name: str = socket.gethostname()
    max_builds: int = 2
    attempts: int = 3
    node_timeout: float = 3600.0
    connect_timeout: int = 120
    setup_timeout: float = 900.0
    post_timeout: float = 900.0
    ansible_playbook: str = ""
    zk_tls: TLSFiles | None = None
    gearman_tls: TLSFiles | None = None
    metrics: MetricsConfig | None = None  # /metrics of this launcher; None: not served
    console_listen: str = "127.0.0.1"
    console_port: int = 0  # a free port: the claim in ZooKeeper says which
    console_host: str | None = None

    def __post_init__(self) -> None:
        if not self.ansible_playbook:
            self.ansible_playbook = default_ansible_playbook()

    @property
    def git_cache(self) -> Path:
        """Where changes are fetched to on their way to nodes (launcher/gitcache.py)."""
        return self.work_root.parent / "git"


def default_ansible_playbook() -> str:
    """The ansible-playbook of our own venv first: it is the one we tested with."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return str(beside)
    return shutil.which("ansible-playbook") or "ansible-playbook"


def load(path: Path | str) -> LauncherConfig:
    """Read zuul.yaml; raise ConfigError with one sentence naming the bad key."""
    path = Path(path).resolve()
    try:
        data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"Cannot read {path}: {error}") from error
    try:
        section = LAUNCHER_SCHEMA(data.get("launcher") or {})
    except v.Invalid as error:
        where = "/".join(str(p) for p in ["launcher", *error.path])
        raise ConfigError(f"{path}: {where}: {error.msg}.") from error
    try:
        zk_hosts = data["zookeeper"]["hosts"]
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: zookeeper/hosts is required.") from None
    here = path.parent
    gearman = data.get("gearman") or {}
    zk_tls = _tls(path, data, "zookeeper", section.get("tls"))
    gearman_tls = _tls(path, data, "gearman", section.get("tls"))
    state_dir = here / section.get("state-dir", data.get("state-dir", "/var/lib/zuul-lite"))
    web = data.get("web") or {}
    web_url = web.get("url", f"http://{web.get('listen', '127.0.0.1')}:{web.get('port', 9000)}")
    console = section.get("console") or {}
    jobs_dir = section.get("jobs-dir") or (data.get("scheduler") or {}).get("jobs-dir", "../jobs")
    return LauncherConfig(
        zk_hosts=zk_hosts,
        gearman_server=gearman.get("server", "127.0.0.1"),
        gearman_port=gearman.get("port", 4730),
        work_root=state_dir / "launcher" / "builds",
        log_root=here / section.get("log-root", state_dir / "logs"),
        log_url=section.get("log-url", web_url.rstrip("/") + "/logs"),
        jobs_dir=(here / jobs_dir).resolve(),
        private_key=here / section.get("private-key", state_dir / "keys" / "id_ed25519"),
        name=section.get("name", socket.gethostname()),
        max_builds=section.get("max-builds", 2),
        attempts=section.get("attempts", 3),
        node_timeout=section.get("node-timeout", 3600.0),
        connect_timeout=section.get("connect-timeout", 120),
        setup_timeout=section.get("setup-timeout", 900.0),
        post_timeout=section.get("post-timeout", 900.0),
        ansible_playbook=section.get("ansible-playbook", ""),
        zk_tls=zk_tls,
        gearman_tls=gearman_tls,
        metrics=MetricsConfig.from_config(section.get("metrics")),
        console_listen=console.get("listen", "127.0.0.1"),
        console_port=console.get("port", 7900),
        console_host=console.get("host"),
    )


def _tls(path: Path, data: dict, service: str, own: dict | None) -> TLSFiles | None:
    """`<service>: tls:`, with the launcher's own certificate if it has one."""
    section = (data.get(service) or {}).get("tls")
    if section is None:
        return None
    try:
        files = TLSFiles.from_config(TLS_SCHEMA(section), path.parent, f"{path} {service}/tls")
    except v.Invalid as error:
        where = "/".join(str(p) for p in [service, "tls", *error.path])
        raise ConfigError(f"{path}: {where}: {error.msg}.") from error
    if own is None:
        return files
    return dataclasses.replace(
        files,
        cert=str(path.parent / own["cert"]),
        key=str(path.parent / own["key"]),
        source=f"{path} launcher/tls",
    )
