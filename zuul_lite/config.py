"""zuul.yaml: where ZooKeeper, Gearman, the state dir, the layout and the web are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import voluptuous as v

from zuul_lite.connections import driver_names
from zuul_lite.layout import _read_yaml, _validate

SCHEMA = v.Schema(
    {
        "state-dir": str,
        v.Required("zookeeper"): {v.Required("hosts"): str},
        v.Required("gearman"): {
            "server": str,
            "port": int,
            "start": bool,  # embed gear.Server in the scheduler
            "listen": str,
        },
        "scheduler": {
            "layout": str,
            "jobs-dir": str,
            "merger-workers": v.All(int, v.Range(min=1, max=16)),
        },
        v.Required("connections"): {
            str: {v.Required("driver"): v.In(driver_names()), v.Extra: object}
        },
        "web": {"listen": str, "port": int, "url": str},
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
    connections: dict[str, dict] = field(default_factory=dict)
    web_listen: str = "127.0.0.1"
    web_port: int = 9000
    web_url: str = "http://127.0.0.1:9000"
    launcher: dict = field(default_factory=dict)
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
    here = path.parent
    sched = data.get("scheduler", {})
    gearman = data["gearman"]
    web = data.get("web", {})
    state_dir = Path(data.get("state-dir", "/var/lib/zuul-lite"))
    listen = web.get("listen", "127.0.0.1")
    port = web.get("port", 9000)
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
        connections=data["connections"],
        web_listen=listen,
        web_port=port,
        web_url=web.get("url", f"http://{listen}:{port}"),
        launcher=data.get("launcher", {}),
        raw=data,
    )
