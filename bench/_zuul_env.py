"""Shared setup for the scheduler benchmarks (bench/gate.py, bench/scheduler.py).

One real ZooKeeper (fsync off, as tests/conftest.py), one Scheduler in this
process with its embedded gear server, a project imported into the local
inbox, and a StandInLauncher (tests/harness.py) answering builds. Everything
lives under one tempfile directory that `close()` removes.

The bench side (submitting, approving, watching votes) and the stand-in use
ZooKeeper sessions of their own, as the CLI and the launcher would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from nodepool_lite.zk import Transaction, ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer, free_port  # noqa: E402
from tests.harness import FIXTURES, StandInLauncher, make_project, run_git  # noqa: E402
from zuul_lite import config as zconfig  # noqa: E402
from zuul_lite.connections.local import LocalConnection  # noqa: E402
from zuul_lite.model import TriggerEvent  # noqa: E402
from zuul_lite.scheduler import Scheduler  # noqa: E402
from zuul_lite.state import ZuulState  # noqa: E402


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("gear", "zuul_lite", "nodepool_lite"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # kazoo warns "Connection dropped" when nodepool_lite.zk closes the client
    # it uses to create the chroot: expected, not worth a line.
    logging.getLogger("kazoo").setLevel(logging.ERROR)


class WorkCounter:
    """Counts, in this process, the ZooKeeper transactions committed and the
    git processes started: what a phase costs, which the load of a shared
    machine does not change (its time it does)."""

    def __init__(self) -> None:
        self.transactions = self.git = 0
        counter = self
        commit = Transaction.commit
        popen_init = subprocess.Popen.__init__

        def counted_commit(txn: Transaction) -> list:
            counter.transactions += 1
            return commit(txn)

        def counted_init(proc: subprocess.Popen, args, *rest, **kwargs) -> None:
            if isinstance(args, (list, tuple)) and args and args[0] == "git":
                counter.git += 1
            popen_init(proc, args, *rest, **kwargs)

        Transaction.commit = counted_commit  # type: ignore[method-assign]
        subprocess.Popen.__init__ = counted_init  # type: ignore[method-assign]

    def snapshot(self) -> tuple[int, int]:
        return self.transactions, self.git

    def since(self, before: tuple[int, int], items: int) -> str:
        txns, gits = (now - then for now, then in zip(self.snapshot(), before, strict=True))
        return (
            f"{txns} ZooKeeper transactions, {gits} git processes "
            f"({txns / items:.1f} and {gits / items:.1f} per item)"
        )


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process `pid` has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuCounter:
    """CPU seconds spent by this process (scheduler, merger, stand-in
    launchers, the bench), by the git processes it waited for, and by the
    ZooKeeper server: the work a phase took, which a busy machine stretches
    in time but does not change much. Two cores give at most 2 s of it per
    second of wall time."""

    def __init__(self, zk_pid: int) -> None:
        self.zk_pid = zk_pid

    def snapshot(self) -> tuple[float, float, float]:
        t = os.times()
        return t.user + t.system, t.children_user + t.children_system, cpu_seconds(self.zk_pid)

    def since(self, before: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(now - then for now, then in zip(self.snapshot(), before, strict=True))


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p100 is the maximum)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def make_patches(repo: Path, out: Path, names: list[str]) -> list[Path]:
    """One one-patch series per name, each adding its own file `<name>.txt`
    on the same base (so none conflict): commit them all on a branch,
    `git format-patch` once, reset. Returns one .patch file per name."""
    base = run_git(repo, "rev-parse", "HEAD").strip()
    for name in names:
        (repo / f"{name}.txt").write_text(f"{name}\n")
        run_git(repo, "add", f"{name}.txt")
        run_git(repo, "commit", "-qs", "-m", f"{name}: add")
    out.mkdir(parents=True, exist_ok=True)
    run_git(repo, "format-patch", "-q", "-o", str(out), base)
    run_git(repo, "reset", "-q", "--hard", base)
    files = sorted(out.glob("*.patch"))
    assert len(files) == len(names), (len(files), len(names))
    # format-patch numbers them in commit order, which is the order of `names`.
    return files


class ZuulEnv:
    """ZooKeeper server + scheduler + stand-in launcher in a temp dir."""

    def __init__(
        self,
        layout: dict,
        launcher_cls: type[StandInLauncher] = StandInLauncher,
        hold: bool = False,
        results: dict[str, str] | None = None,
        launchers: int = 1,
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="zuul-lite-bench-"))
        self.launchers: list[StandInLauncher] = []
        self.launcher_count = launchers
        self.zk_server = ZooKeeperServer(self.tmp / "zk", port=free_port(), force_sync=False)
        self.sched: Scheduler | None = None
        self.launcher: StandInLauncher | None = None
        self.clients: list[ZooKeeper] = []
        self.event_times: dict[int, list[float]] = {}  # change -> TriggerEvent.time, in order
        try:
            self._start(layout, launcher_cls, hold, results)
        except BaseException:
            self.close()
            raise

    def _client(self, hosts: str) -> ZooKeeper:
        client = ZooKeeper(hosts)
        client.connect()
        self.clients.append(client)
        return client

    def _start(self, layout, launcher_cls, hold, results) -> None:
        self.zk_server.start()
        hosts = f"{self.zk_server.hosts}/bench"
        layout_path = self.tmp / "layout.yaml"
        layout_path.write_text(yaml.safe_dump(layout, sort_keys=False))
        cfg_path = self.tmp / "zuul.yaml"
        cfg_path.write_text(
            yaml.safe_dump(
                {
                    "state-dir": str(self.tmp / "state"),
                    "zookeeper": {"hosts": hosts},
                    "gearman": {"server": "127.0.0.1", "port": free_port(), "start": True},
                    "scheduler": {
                        "layout": str(layout_path),
                        "jobs-dir": str(FIXTURES / "jobs"),
                    },
                    "merger": {"git-listen": "127.0.0.1", "git-port": free_port()},
                    "connections": {"local": {"driver": "local"}},
                    "web": {"listen": "127.0.0.1", "port": free_port()},
                    "launcher": {"log-root": str(self.tmp / "state" / "logs")},
                }
            )
        )
        self.cfg = zconfig.load(cfg_path)
        self.zk_sched = self._client(hosts)
        self.zk_user = self._client(hosts)
        self.zk_launcher = self._client(hosts)
        self.state = ZuulState(self.zk_user)
        self.held: list[TriggerEvent] | None = None
        self.src = make_project(self.tmp)
        self.local = LocalConnection(
            "local",
            {"driver": "local"},
            self.state,
            self.cfg.state_dir,
            post_event=self._post_event,
        )
        self.local.import_project("demo", self.src)
        self.sched = Scheduler(self.cfg, self.zk_sched)
        self.sched.start()
        # Several stand-ins take builds at once, as several launchers would.
        for i in range(self.launcher_count):
            zk = self.zk_launcher if i == 0 else self._client(hosts)
            launcher = launcher_cls(zk, self.sched.gearman_port, results)
            launcher.hold = hold
            launcher.start()
            self.launchers.append(launcher)
        self.launcher = self.launchers[0]

    def _post_event(self, event: TriggerEvent) -> None:
        """As the CLI posts it, remembering the event's own timestamp; kept
        back while `held` is a list (to post a burst of events at once)."""
        if self.held is not None:
            self.held.append(event)
            return
        self.event_times.setdefault(event.change, []).append(event.time)
        self.state.put_trigger_event(event.to_dict())

    def post_held(self) -> None:
        held, self.held = self.held or [], None
        for event in held:
            event.time = time.time()
            self._post_event(event)

    def patches(self, prefix: str, count: int) -> list[Path]:
        names = [f"{prefix}{i:04d}" for i in range(count)]
        return make_patches(self.src, self.tmp / f"patches-{prefix}", names)

    def submit(self, patch: Path) -> int:
        number, _ = self.local.submit(patch, "demo")
        return number

    def watch(self, numbers: list[int], done: Callable[[dict], bool]) -> ChangeWatch:
        return ChangeWatch(self.zk_user, self.state, numbers, done)

    def status_dump(self) -> str:
        return json.dumps(self.state.read_status(), indent=1)[:2000]

    def close(self) -> None:
        # Held builds die with the gear connections: gear logs each at ERROR.
        logging.getLogger("gear").setLevel(logging.CRITICAL)
        if self.sched is not None:
            self.sched.stop()
            self.sched.join(10)
        for launcher in self.launchers:
            launcher.stop()
        for client in self.clients:
            try:
                client.disconnect()
            except Exception:
                pass
        self.zk_server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ChangeWatch:
    """DataWatches on changes until `done(change data)` holds for each; records
    the monotonic time each one got there and its data then."""

    def __init__(
        self, zk: ZooKeeper, state: ZuulState, numbers: list[int], done: Callable[[dict], bool]
    ) -> None:
        self.numbers = list(numbers)
        self.done = done
        self.at: dict[int, float] = {}
        self.data: dict[int, dict] = {}
        self.cond = threading.Condition()
        for number in self.numbers:
            zk.watch_data(state.local_path("changes", number), self._callback(number))

    def _callback(self, number: int):
        def on_change(data, version):
            if data and self.done(data):
                now = time.monotonic()
                with self.cond:
                    if number not in self.at:
                        self.at[number] = now
                        self.data[number] = data
                    self.cond.notify_all()
                return False
            return None

        return on_change

    def wait(self, timeout: float, env: ZuulEnv | None = None) -> float:
        """Monotonic time the last change got there."""
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.at) == len(self.numbers), timeout)
        if not ok:
            missing = [n for n in self.numbers if n not in self.at]
            raise RuntimeError(
                f"changes {missing} not done in {timeout}s"
                + (f"; status: {env.status_dump()}" if env else "")
            )
        return max(self.at.values())
