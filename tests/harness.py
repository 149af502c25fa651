"""Helpers for scheduler tests: a small git project, patch series made with
`git format-patch`, a config on a free port, waits on ZooKeeper watches, and
a stand-in launcher."""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import gear
import yaml

from launcher.gearworker import NoDelayWorker
from launcher.gitcache import FetchedChange
from launcher.jobdir import JobDir
from launcher.playbooks import NodeAddress, write_ansible_dir
from nodepool_lite.tls import TLSFiles, gear_args
from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import free_port
from zuul_lite.build_contract import BuildRequest, BuildResult
from zuul_lite.state import ZuulState

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


class SshHost:
    """A host sshd on 127.0.0.1 with its own host key and one authorised key;
    given `netns`, in that network namespace (a node that has only its loopback)."""

    def __init__(self, root: Path, netns: str | None = None) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.client_key = root / "id_ed25519"
        host_key = root / "ssh_host_ed25519_key"
        for key in (self.client_key, host_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        (root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.host_key = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        conf = root / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
            "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
            f"SetEnv HOME={self.home}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        enter = ["ip", "netns", "exec", netns] if netns else []  # execs sshd: same pid
        self.proc = subprocess.Popen(
            [*enter, "/usr/sbin/sshd", "-f", str(conf), "-D", "-e"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:  # "Server listening on 127.0.0.1 port N."
            if "Server listening" in line:
                break
        else:
            raise RuntimeError("sshd did not start")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def address(self) -> NodeAddress:
        """How the launcher reaches this "node": as the current user, its host key known."""
        return NodeAddress("127.0.0.1", self.port, getpass.getuser(), [self.host_key])

    def reset_home(self) -> None:
        """A fresh, empty HOME: the next test gets a new node."""
        shutil.rmtree(self.home)
        self.home.mkdir()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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
        "merger": {"git-listen": "127.0.0.1", "git-port": free_port()},
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

    zk.watch_data(ZuulState(zk).local_path("changes", change), on_change)
    if not done.wait(timeout):
        raise AssertionError(
            f"change {change} got no {count} vote(s) in {timeout}s; status: "
            + json.dumps(ZuulState(zk).read_status(), indent=1)[:3000]
        )
    return found


def _undelivered(sched, launcher) -> bool:
    """Whether a build the scheduler submitted has not reached the launcher
    (or one of a list of launchers) yet."""
    if launcher is None:
        return False
    seen = set()
    for one in launcher if isinstance(launcher, list) else [launcher]:
        with one.lock:
            seen.update(b["uuid"] for b in one.builds)
    return any(
        build.state == "queued" and build.uuid not in seen
        for _, _, build in list(sched._all_builds())
    )


def _unprocessed_results(sched) -> list[str]:
    """Builds with a result in ZooKeeper the scheduler has not taken yet: its
    watch notification may still be on the way (slow under load)."""
    done = {build.uuid for _, _, build in list(sched._all_builds()) if build.state != "queued"}
    return [
        uuid
        for uuid in sched.state.build_uuids()
        if uuid not in done and sched.state.get_build_result(uuid) is not None
    ]


def settle(sched, launcher=None, timeout: float = 30, ignore: tuple[str, ...] = ()) -> None:
    """Wait until the scheduler has nothing left to do (Zuul's waitUntilSettled):
    no event in memory or in ZooKeeper, no merge under way, the loop asleep,
    nothing left to submit or to clean up, every submitted build taken by the
    stand-in launcher and every stored result taken by the scheduler."""
    checks = {
        "loop awake": lambda: not sched.idle.is_set() or sched.wake_event.is_set(),
        "events in memory": lambda: not sched.events.empty(),
        "dispatcher": sched.dispatcher.busy,
        "gate merges": sched.landing.busy,
        "janitor": sched.cleaning_up,
        "merges": lambda: any(m.merges_pending() for m in sched.managers.values()),
        "trigger events": sched.state.trigger_events,
        "management events": sched.state.management_events,
        "builds not delivered": lambda: _undelivered(sched, launcher),
        "results not taken": lambda: _unprocessed_results(sched),
    }
    for name in ignore:  # what a test holds on purpose
        del checks[name]
    deadline = time.monotonic() + timeout
    quiet_since = None
    busy = None
    while time.monotonic() < deadline:
        busy = next((name for name, check in checks.items() if check()), None)
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.05:
            return
        sched.idle.wait(0.01)
        time.sleep(0.005)
    leftover = {
        uuid: sched.zk.get_children(f"{sched.state.build_path(uuid)}")
        for uuid in _unprocessed_results(sched)
    }
    raise AssertionError(
        f"the scheduler did not settle ({busy}; results not taken: {leftover}); status: "
        + json.dumps(sched.state.read_status(), indent=1)[:3000]
    )


class StandInLauncher(threading.Thread):
    """Stands in for zuul-launcher (tested on its own with real nodes) so the
    scheduler's tests stay fast: a real gear Worker that records each build's
    request, claims it and stores its result in ZooKeeper as the launcher does,
    then sends WORK_COMPLETE. It answers `launcher:stop:stand-in` like a real
    launcher. `hold` keeps builds until `release(pattern)`; `results` maps a
    job name, or "job:change", to its result (or a list: one per build, in
    turn); `findings` maps them to what the build found (baseline.Findings
    as a dict); `history` lists every build
    with how it ended (Zuul's assertHistory). `tls` is its Gearman certificate."""

    STOP = "launcher:stop:stand-in"

    def __init__(
        self,
        zk: ZooKeeper,
        port: int,
        results: dict[str, str | list[str]] | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.state = ZuulState(zk)
        self.port = port
        self.results = results or {}
        self.findings: dict[str, dict | list[dict]] = {}  # a list: successive builds
        self.builds: list[dict] = []
        self.history: list[dict] = []
        self.held: list[tuple[gear.Job, dict]] = []
        self.hold = False
        self.lock = threading.Condition()
        # TCP_NODELAY as the real launcher's worker: without it every build
        # waits ~40 ms on Nagle and delayed ACKs (MACHINE-NOTES).
        self.worker = NoDelayWorker("stand-in-launcher")
        self.worker.addServer("127.0.0.1", port, **gear_args(tls))
        self.stopper = NoDelayWorker("stand-in-launcher-stop")
        self.stopper.addServer("127.0.0.1", port, **gear_args(tls))
        self.running = True

    def run(self) -> None:
        self.worker.waitForServer()
        self.stopper.waitForServer()
        self.worker.registerFunction("launcher:execute")
        self.stopper.registerFunction(self.STOP)
        threading.Thread(target=self._serve_stops, daemon=True).start()
        while self.running:
            try:
                job = self.worker.getJob()
            except gear.InterruptedError:
                continue
            args = BuildRequest.from_dict(json.loads(job.arguments)).to_dict()
            with self.lock:
                self.builds.append(args)
                self.state.claim_build(args["uuid"], "stand-in")
                job.sendWorkData(json.dumps({"stop": self.STOP, "uuid": args["uuid"]}).encode())
                if self.hold:
                    self.held.append((job, args))
                    self.lock.notify_all()
                    continue
                self.lock.notify_all()
            self.finish(job, args)

    def _serve_stops(self) -> None:
        while self.running:
            try:
                job = self.stopper.getJob()
            except gear.InterruptedError:
                continue
            uuid = json.loads(job.arguments)["uuid"]
            with self.lock:
                for held_job, args in list(self.held):
                    if args["uuid"] == uuid:
                        self.held.remove((held_job, args))
                        self.finish(held_job, args, "ABORTED")
                self.lock.notify_all()
            # gear's connection is None once the server closed it (a test's teardown).
            with contextlib.suppress(AttributeError, OSError):
                job.sendWorkComplete(json.dumps({"uuid": uuid}).encode())

    def result_for(self, args: dict) -> str:
        """A list gives the results of successive builds (the last one stays)."""
        result = self.results.get(
            f"{args['job']}:{args['change']}", self.results.get(args["job"], "SUCCESS")
        )
        if isinstance(result, list):
            return result.pop(0) if len(result) > 1 else result[0]
        return result

    def findings_for(self, args: dict) -> dict | None:
        found = self.findings.get(
            f"{args['job']}:{args['change']}", self.findings.get(args["job"])
        )
        if isinstance(found, list):
            return found.pop(0) if len(found) > 1 else found[0]
        return found

    def finish(self, job: gear.Job, args: dict, result: str | None = None) -> None:
        result = result or self.result_for(args)
        data = BuildResult(
            result=result,
            log_url=f"http://logs/{args['log_path']}/",
            elapsed=1.5,
            summary="" if result == "SUCCESS" else f"{args['job']}: error: something broke",
            findings=self.findings_for(args),
        )
        self.history.append(
            {
                "name": args["job"],
                "result": result,
                "changes": args["changes"],
                "uuid": args["uuid"],
            }
        )
        self.state.store_build_result(args["uuid"], data)
        self.state.release_build(args["uuid"])
        try:
            job.sendWorkComplete(json.dumps(data.to_dict()).encode())
        except Exception:
            pass  # the scheduler (and its gear server) may be gone: ZK has the result

    def early_fail(self, pattern: str) -> None:
        """Held builds matching `pattern` say they will fail, and stay held."""
        with self.lock:
            for _, args in self.held:
                if re.match(pattern, args["job"]):
                    self.state.mark_early_failure(args["uuid"], "task 'make' failed")

    def wait_for_builds(self, count: int, held: bool = False, timeout: float = 30) -> None:
        with self.lock:
            ok = self.lock.wait_for(
                lambda: len(self.held if held else self.builds) >= count, timeout
            )
        assert ok, f"only {len(self.held if held else self.builds)} builds started"

    def held_builds(self) -> list[tuple[str, str]]:
        """(job, changes) of every held build, in the order they started."""
        with self.lock:
            return [(args["job"], args["changes"]) for _, args in self.held]

    def release(self, pattern: str = ".*", change: int | None = None) -> None:
        with self.lock:
            keep = []
            for job, args in self.held:
                if re.match(pattern, args["job"]) and change in (None, args["change"]):
                    self.finish(job, args)
                else:
                    keep.append((job, args))
            self.held = keep

    def stop(self) -> None:
        self.running = False
        self.worker.shutdown()
        self.stopper.shutdown()


# Helpers for the fault and CLI gate tests (tests/test_gate_faults.py,
# tests/test_cli_gate.py) -------------------------------------------------

REPO_ROOT = Path(__file__).parents[1]


def start_scheduler_process(config: Path, log: Path, **popen) -> subprocess.Popen:
    """`zuul-lite scheduler` in a process of its own (to be killed with -9)."""
    import os
    import sys

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zuul_lite.cmd.client",
            "-c",
            str(config),
            "-v",
            "--log-file",
            str(log),
            "scheduler",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        **popen,
    )


def wait_until(predicate, timeout: float = 30, what: str = "the condition") -> None:
    """Wait for `predicate()` to hold (for state another process writes, where
    no watch or settle() applies); fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def pipeline_status(zk: ZooKeeper, pipeline: str) -> list[dict]:
    """The stored items of `pipeline`, in queue order (as `zuul-lite status` reads them)."""
    for p in ZuulState(zk).read_status()["pipelines"]:
        if p["name"] == pipeline:
            return p["items"]
    return []


def queue_shape(zk: ZooKeeper, pipeline: str) -> list[tuple[int, str, str | None]]:
    """(change number, item uuid, uuid of the item ahead) of each item, in order."""
    items = pipeline_status(zk, pipeline)
    return [(i["change"]["number"], i["uuid"], i["item_ahead"]) for i in items]


def votes_in(zk: ZooKeeper, change: int, pipeline: str) -> list:
    """The values of the votes `pipeline` left on `change`."""
    data = zk.get_or_none(ZuulState(zk).local_path("changes", change)) or {}
    return [v["value"] for v in data.get("votes", []) if v["pipeline"] == pipeline]


def local_ansible_dir(tmp_path: Path, request: BuildRequest, jobs_dir: Path):
    """The launcher's Ansible files for `request`, for a job playbook run with
    the local connection (not the setup playbook, which needs a node to push
    to): (JobDir, phases)."""
    jobdir = JobDir(tmp_path / "work", request.uuid)
    phases = write_ansible_dir(
        jobdir,
        request,
        NodeAddress("127.0.0.1", 22, "zuul", []),
        jobs_dir=jobs_dir,
        private_key=tmp_path / "key",
        connect_timeout=5,
        change=FetchedChange(tmp_path / "git" / "none.git", "0" * 40),
        dependencies={},
    )
    return jobdir, phases


def local_project(root: Path, zk_hosts: str, layout: str, **scheduler_keys):
    """A config with `layout`, a ZooKeeper client and the local inbox holding
    project `demo`: (config, zk, local connection, the project's source).
    `scheduler_keys` go into the config's `scheduler:` section (e.g. `metrics`)."""
    from zuul_lite import config as zconfig
    from zuul_lite.connections.local import LocalConnection

    path = write_config(root, zk_hosts, layout=layout)
    data = yaml.safe_load(path.read_text())
    data["scheduler"].update(scheduler_keys)
    path.write_text(yaml.safe_dump(data))
    cfg = zconfig.load(path)
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    src = make_project(root)
    local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), cfg.state_dir)
    local.import_project("demo", src)
    return cfg, zk, local, src


@contextlib.contextmanager
def noop_check_run(root: Path, zk_hosts: str, **scheduler_keys):
    """The real scheduler runs check on one series with the `noop` job (no
    node, no launcher), settled after its vote; yields (config, scheduler,
    change number) and stops it afterwards."""
    from zuul_lite.scheduler import Scheduler

    cfg, zk, local, src = local_project(root, zk_hosts, "noop.yaml", **scheduler_keys)
    sched = Scheduler(cfg, zk)
    try:
        sched.start()
        series = make_series(src, root / "series", [("README", "more\n", "README: more")])
        change, _ = local.submit(series, "demo")
        assert [v["value"] for v in wait_for_votes(zk, change)] == [1]
        settle(sched)
        yield cfg, sched, change
    finally:
        sched.stop()
        zk.disconnect()
