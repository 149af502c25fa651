"""zuul.yaml: where ZooKeeper, Gearman, the state dir, the layout and the web are.

`zookeeper: tls:` and `gearman: tls:` ({ca, cert, key}, PEM) are the client
certificate the scheduler, the web and the CLI connect with; `gearman:
server-tls:` ({cert, key}) is the embedded Gearman server's, checked against
the same CA. Without them everything is plain TCP (for development on
loopback). The files are checked when a component connects, not here: the
quick start reads this file before it makes them.

`merger:` says where the scheduler serves its merger's repositories over git
(`git-listen`, `git-port`) and the URL launchers fetch them from (`git-url`,
to which the project name is appended; by default git://<listen>:<port>/).

`database: dburi:` is the SQLAlchemy URL of the build history (default
`sqlite:///<state-dir>/history.sqlite`; `postgresql://user:pw@host/db` for
PostgreSQL).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import voluptuous as v

from nodepool_lite import tls
from nodepool_lite.tls import TLSFiles
from zuul_lite import metrics
from zuul_lite.connections import driver_names, validate_connection
from zuul_lite.exceptions import ConfigError
from zuul_lite.layout import _read_yaml, _validate
from zuul_lite.metrics import MetricsConfig


def _gearman_tls(section: dict) -> dict:
    """The embedded server and its clients speak TLS together or not at all."""
    if "server-tls" in section and "tls" not in section:
        raise v.Invalid("server-tls needs tls (its ca checks the clients)", path=["tls"])
    if "tls" in section and section.get("start", True) and "server-tls" not in section:
        raise v.Invalid(
            "the embedded server (start: true) needs its certificate with tls", ["server-tls"]
        )
    return section


SCHEMA = v.Schema(
    {
        "state-dir": str,
        v.Required("zookeeper"): {v.Required("hosts"): str, "tls": tls.SCHEMA},
        v.Required("gearman"): v.All(
            {
                "server": str,
                "port": int,
                "start": bool,  # embed gear.Server in the scheduler
                "listen": str,
                "tls": tls.SCHEMA,
                "server-tls": {v.Required("cert"): str, v.Required("key"): str},
            },
            _gearman_tls,
        ),
        "scheduler": {
            "layout": str,
            "jobs-dir": str,
            "merger-workers": v.All(int, v.Range(min=1, max=16)),
            "metrics": metrics.SCHEMA,
        },
        "merger": {
            "git-listen": str,
            "git-port": v.All(int, v.Range(min=1, max=65535)),
            "git-url": str,
        },
        v.Required("connections"): {
            str: {v.Required("driver"): v.In(driver_names()), v.Extra: object}
        },
        "web": {
            "listen": str,
            "port": int,
            "url": str,
            # Operator actions from the web (doc/architecture.md, "Web"): off without.
            v.Exclusive("admin-token", "admin"): v.All(str, v.Length(min=16)),
            v.Exclusive("admin-token-file", "admin"): str,
        },
        "database": {v.Required("dburi"): str},
        "launcher": dict,
    },
    extra=v.PREVENT_EXTRA,
)


@dataclass
class ZuulConfig:
    path: Path
    state_dir: Path
    zk_hosts: str
    gearman_server: str
    gearman_port: int
    gearman_start: bool
    gearman_listen: str
    layout_path: Path
    jobs_dir: Path
    merger_workers: int = 2  # merges in parallel, each in its own git worktree
    git_listen: str = "127.0.0.1"
    git_port: int = 9418
    git_url: str = "git://127.0.0.1:9418/"  # ends with "/": the project name follows
    connections: dict[str, dict] = field(default_factory=dict)
    web_listen: str = "127.0.0.1"
    web_port: int = 9000
    web_url: str = "http://127.0.0.1:9000"
    launcher: dict = field(default_factory=dict)
    metrics: MetricsConfig | None = None  # the scheduler's /metrics; None: not served
    dburi: str = ""  # the build history; default: SQLite under the state dir
    web_admin_token: str | None = None  # None: the web is read-only
    zk_tls: TLSFiles | None = None
    gearman_tls: TLSFiles | None = None
    gearman_server_tls: TLSFiles | None = None  # the embedded server's, with gearman_tls.ca
    raw: dict = field(default_factory=dict)

    @property
    def log_root(self) -> Path:
        return Path(self.launcher.get("log-root", self.state_dir / "logs"))

    @property
    def log_url(self) -> str:
        return self.launcher.get("log-url", self.web_url.rstrip("/") + "/logs")


def load(path: Path | str) -> ZuulConfig:
    path = Path(path).resolve()
    data = _validate(SCHEMA, _read_yaml(path) or {}, path)
    for name, connection in data["connections"].items():
        try:
            validate_connection(name, connection)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    here = path.parent
    sched = data.get("scheduler", {})
    gearman = data["gearman"]
    web = data.get("web", {})
    state_dir = Path(data.get("state-dir", "/var/lib/zuul-lite"))
    listen = web.get("listen", "127.0.0.1")
    port = web.get("port", 9000)
    merger = data.get("merger", {})
    git_listen = merger.get("git-listen", "127.0.0.1")
    git_port = merger.get("git-port", 9418)
    git_url = merger.get("git-url") or _default_git_url(git_listen, git_port)
    zk_tls = gearman_tls = server_tls = None
    if "tls" in data["zookeeper"]:
        zk_tls = TLSFiles.from_config(data["zookeeper"]["tls"], here, f"{path} zookeeper.tls")
    if "tls" in gearman:
        gearman_tls = TLSFiles.from_config(gearman["tls"], here, f"{path} gearman.tls")
    if "server-tls" in gearman:
        server = {"ca": gearman["tls"]["ca"], **gearman["server-tls"]}
        server_tls = TLSFiles.from_config(server, here, f"{path} gearman.server-tls")
    return ZuulConfig(
        path=path,
        state_dir=state_dir,
        zk_hosts=data["zookeeper"]["hosts"],
        gearman_server=gearman.get("server", "127.0.0.1"),
        gearman_port=gearman.get("port", 4730),
        gearman_start=gearman.get("start", True),
        gearman_listen=gearman.get("listen", "127.0.0.1"),
        layout_path=(here / sched.get("layout", "layout.yaml")).resolve(),
        jobs_dir=(here / sched.get("jobs-dir", "../jobs")).resolve(),
        merger_workers=sched.get("merger-workers", 2),
        git_listen=git_listen,
        git_port=git_port,
        git_url=git_url.rstrip("/") + "/",
        connections=data["connections"],
        web_listen=listen,
        web_port=port,
        web_url=web.get("url", f"http://{listen}:{port}"),
        web_admin_token=_admin_token(path, web),
        launcher=data.get("launcher", {}),
        metrics=MetricsConfig.from_config(sched.get("metrics")),
        dburi=data.get("database", {}).get("dburi") or f"sqlite:///{state_dir / 'history.sqlite'}",
        zk_tls=zk_tls,
        gearman_tls=gearman_tls,
        gearman_server_tls=server_tls,
        raw=data,
    )


def _default_git_url(listen: str, port: int) -> str:
    """git://<listen>:<port>/, with this host's name when listening on every address."""
    host = socket.getfqdn() if listen in ("", "0.0.0.0", "::") else listen
    return f"git://[{host}]:{port}/" if ":" in host else f"git://{host}:{port}/"


def _admin_token(path: Path, web: dict) -> str | None:
    """The web's admin token, from the file named if there is one (kept out of
    a config that many can read); a file that cannot be read is one sentence."""
    if "admin-token" in web:
        return web["admin-token"]
    if "admin-token-file" not in web:
        return None
    token_file = path.parent / web["admin-token-file"]
    try:
        token = token_file.read_text().strip()
    except OSError as error:
        where = f"{path}: web/admin-token-file"
        raise ConfigError(f"{where}: {error.strerror}: {token_file}.") from None
    if len(token) < 16:
        where = f"{path}: web/admin-token-file"
        raise ConfigError(f"{where}: {token_file} holds fewer than 16 characters.")
    return token
