"""Helpers for scheduler tests: a small git project, patch series made with
`git format-patch`, a config on a free port, waits on ZooKeeper watches, and
a stand-in launcher."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from pathlib import Path

import gear
import yaml

from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import free_port

FIXTURES = Path(__file__).parent / "fixtures"


def run_git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "Dev",
        "GIT_AUTHOR_EMAIL": "dev@example.com",
        "GIT_COMMITTER_NAME": "Dev",
        "GIT_COMMITTER_EMAIL": "dev@example.com",
        "GIT_AUTHOR_DATE": "2026-01-01T00:00:00",
        "GIT_COMMITTER_DATE": "2026-01-01T00:00:00",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, env=env, capture_output=True, text=True
    ).stdout


def make_project(root: Path) -> Path:
    repo = root / "demo-src"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "master")
    (repo / "hello.c").write_text("int main(void)\n{\n\treturn 0;\n}\n")
    (repo / "README").write_text("demo\n")
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-qm", "Initial commit")
    return repo


def make_series(repo: Path, out: Path, edits: list[tuple[str, str, str]]) -> Path:
    """Commit each (file, content, subject) on a branch, format-patch them, reset."""
    base = run_git(repo, "rev-parse", "HEAD").strip()
    for name, content, subject in edits:
        (repo / name).write_text(content)
        run_git(repo, "add", name)
        run_git(repo, "commit", "-qs", "-m", subject)
    out.mkdir(parents=True, exist_ok=True)
    run_git(repo, "format-patch", "-q", "-o", str(out), base)
    run_git(repo, "reset", "-q", "--hard", base)
    return out


def write_config(root: Path, zk_hosts: str, layout: str = "demo.yaml") -> Path:
    cfg = {
        "state-dir": str(root / "state"),
        "zookeeper": {"hosts": zk_hosts},
        "gearman": {"server": "127.0.0.1", "port": free_port(), "start": True},
        "scheduler": {
            "layout": str(FIXTURES / "layouts" / layout),
            "jobs-dir": str(FIXTURES / "jobs"),
        },
        "connections": {"local": {"driver": "local"}},
        "web": {"listen": "127.0.0.1", "port": free_port()},
        "launcher": {"log-root": str(root / "state" / "logs")},
    }
    path = root / "zuul.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for_votes(zk: ZooKeeper, change: int, count: int = 1, timeout: float = 60) -> list:
    """Block on a DataWatch until the change has `count` votes."""
    done = threading.Event()
    found: list = []

    def on_change(data, version):
        if data and len(data.get("votes", [])) >= count:
            found[:] = data["votes"]
            done.set()
            return False
        return None

    zk.watch_data(f"/zuul/local/changes/{change}", on_change)
    if not done.wait(timeout):
        raise AssertionError(
            f"change {change} got no {count} vote(s) in {timeout}s; status: "
            + json.dumps(_status(zk), indent=1)[:3000]
        )
    return found


def _status(zk: ZooKeeper) -> dict:
    from zuul_lite.scheduler import status

    return status(zk)


class StandInLauncher(threading.Thread):
    """Stands in for zuul-launcher (tested on its own with real nodes) so the
    scheduler's tests stay fast: a real gear Worker that records each build's
    arguments, stores the result in ZooKeeper as the launcher does, then sends
    WORK_COMPLETE. `hold` keeps builds until `release(pattern)`."""

    def __init__(self, zk: ZooKeeper, port: int, results: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.zk = zk
        self.port = port
        self.results = results or {}
        self.builds: list[dict] = []
        self.held: list[tuple[gear.Job, dict]] = []
        self.hold = False
        self.lock = threading.Condition()
        self.worker = gear.Worker("stand-in-launcher")
        self.worker.addServer("127.0.0.1", port)
        self.running = True

    def run(self) -> None:
        self.worker.waitForServer()
        self.worker.registerFunction("launcher:execute")
        while self.running:
            try:
                job = self.worker.getJob()
            except gear.InterruptedError:
                continue
            args = json.loads(job.arguments)
            with self.lock:
                self.builds.append(args)
                self.zk.create(
                    f"/zuul/builds/{args['uuid']}/running",
                    {"launcher": "stand-in"},
                    ephemeral=True,
                )
                if self.hold:
                    self.held.append((job, args))
                    self.lock.notify_all()
                    continue
                self.lock.notify_all()
            self.finish(job, args)

    def finish(self, job: gear.Job, args: dict) -> None:
        result = self.results.get(args["job"], "SUCCESS")
        data = {
            "result": result,
            "log_url": f"http://logs/{args['log_path']}/",
            "elapsed": 1.5,
            "summary": "" if result == "SUCCESS" else f"{args['job']}: error: something broke",
        }
        self.zk.create(f"/zuul/builds/{args['uuid']}/result", data)
        self.zk.delete(f"/zuul/builds/{args['uuid']}/running")
        try:
            job.sendWorkComplete(json.dumps(data))
        except Exception:
            pass  # the scheduler (and its gear server) may be gone: ZK has the result

    def wait_for_builds(self, count: int, held: bool = False, timeout: float = 30) -> None:
        with self.lock:
            ok = self.lock.wait_for(
                lambda: len(self.held if held else self.builds) >= count, timeout
            )
        assert ok, f"only {len(self.builds)} builds started"

    def release(self, pattern: str = ".*") -> None:
        with self.lock:
            keep = []
            for job, args in self.held:
                if re.match(pattern, args["job"]):
                    self.finish(job, args)
                else:
                    keep.append((job, args))
            self.held = keep

    def stop(self) -> None:
        self.running = False
        self.worker.shutdown()
