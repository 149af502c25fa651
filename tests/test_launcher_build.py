"""The launcher end to end through its real engines.

Real: gear server and client, ZooKeeper, ansible-playbook over ssh (pipelining)
to a host sshd on a loopback port, git, and the merger's repository served by
the scheduler's git server (zuul_lite.gitserver), from which the launcher
fetches the change and pushes it to the node. Stand-in: `FakeNodepool` plays
nodepool's part of the request handshake by writing a ready Node for each
request (pointing at that sshd) or failing requests for unknown labels, so the
launcher's own request, lock, in-use, used, unlock path runs for real.
The "node" is this host, so every test's sshd sets HOME to a tmp dir.
A ZooKeeper session is expired for real: a second client attaches to the
session and closes it, as a partition that outlasts the timeout would.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid as uuidlib
from pathlib import Path

import gear
import httpx
import pytest
import yaml
from kazoo.client import KazooClient

from launcher import logs
from launcher.config import LauncherConfig
from launcher.gearworker import NoDelayClient
from launcher.server import EXECUTE, LauncherServer
from nodepool_lite.model import Node, NodeState, RequestState
from nodepool_lite.zk import REQUEST_ROOT, ZooKeeper
from nodepool_lite.zkserver import free_port
from tests.harness import SshHost
from zuul_lite import autohold
from zuul_lite.gitserver import GitServer
from zuul_lite.state import ZuulState
from zuul_lite.web.app import create_app
from zuul_lite.web.server import WebServer

LABEL = "test-label"


class FakeNodepool:
    """Fulfils node requests the way nodepool's pool worker does (see module doc)."""

    def __init__(self, zk: ZooKeeper, host: SshHost) -> None:
        self.zk = zk
        self.host = host
        self.port = host.port
        self.nodes: list[str] = []
        self.seen: set[str] = set()
        self.todo: queue.Queue[str | None] = queue.Queue()
        self.requested: queue.Queue[str] = queue.Queue()  # every request id, as it appears
        self.serving = threading.Event()  # cleared: requests wait, as with no free quota
        self.serving.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        zk.watch_children(REQUEST_ROOT, self._on_children)

    def _on_children(self, children: list[str]) -> None:
        for child in children:
            if child not in self.seen:
                self.seen.add(child)
                self.requested.put(child)
                self.todo.put(child)

    def _run(self) -> None:
        while (request_id := self.todo.get()) is not None:
            self.serving.wait()
            req = self.zk.get_node_request(request_id)
            if req is None:
                continue
            self.zk.lock_node_request(req)
            req.state = RequestState.PENDING
            self.zk.store_node_request(req)
            if req.node_types != [LABEL]:
                req.state = RequestState.FAILED
                req.reason = f"No provider supports label {req.node_types[0]}"
            else:
                node = Node(
                    state=NodeState.READY,
                    type=LABEL,
                    provider="fake",
                    interface_ip="127.0.0.1",
                    connection_port=self.port,
                    username=getpass.getuser(),
                    host_keys=[self.host.host_key],
                    allocated_to=req.id,
                )
                self.zk.store_node(node)
                self.nodes.append(node.id)
                req.nodes = [node.id]
                req.state = RequestState.FULFILLED
            self.zk.store_node_request(req)
            self.zk.unlock_node_request(req)

    def next_request(self, timeout: float = 60) -> str:
        return self.requested.get(timeout=timeout)

    def stop(self) -> None:
        self.serving.set()
        self.todo.put(None)
        self.thread.join(10)


class BuildClient(NoDelayClient):
    """Submits one job and lets the test wait on events instead of polling."""

    def __init__(self) -> None:
        super().__init__(client_id="test-launcher")
        self.done: dict[str, threading.Event] = {}
        self.phases: dict[str, list[str]] = {}
        self.phase_event = threading.Condition()

    def submit(self, name: str, args: dict) -> gear.TextJob:
        job = gear.TextJob(name, json.dumps(args), unique=str(uuidlib.uuid4()))
        self.done[job.unique] = threading.Event()
        self.phases[job.unique] = []
        self.submitJob(job)
        return job

    def wait(self, job: gear.TextJob, timeout: float = 180) -> dict:
        assert self.done[job.unique].wait(timeout), "build did not complete"
        assert job.complete and not job.failure, f"job failed: {job.exception}"
        return json.loads(job.data[-1])

    def wait_failed(self, job: gear.TextJob, timeout: float = 180) -> None:
        """WORK_FAIL: the launcher gave the build back without a result."""
        assert self.done[job.unique].wait(timeout), "build did not end"
        assert job.failure and job.exception is None, (job.data, job.exception)

    def wait_phase(self, job: gear.TextJob, phase: str, timeout: float = 60) -> None:
        with self.phase_event:
            assert self.phase_event.wait_for(lambda: phase in self.phases[job.unique], timeout)

    def _finished(self, packet: gear.Packet) -> None:
        self.done[packet.getJob().unique].set()

    def handleWorkData(self, packet):  # noqa: N802
        job = super().handleWorkData(packet)
        with self.phase_event:
            self.phases[job.unique].append(json.loads(job.data[-1])["phase"])
            self.phase_event.notify_all()
        return job

    def handleWorkComplete(self, packet):  # noqa: N802
        job = super().handleWorkComplete(packet)
        self.done[job.unique].set()
        return job

    def handleWorkFail(self, packet):  # noqa: N802
        job = super().handleWorkFail(packet)
        self.done[job.unique].set()
        return job

    def handleWorkException(self, packet):  # noqa: N802
        job = super().handleWorkException(packet)
        self.done[job.unique].set()
        return job


PLAYBOOKS = {
    "ok.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Read the change",
                    "ansible.builtin.command": "cat README",
                    "args": {"chdir": "~/src/{{ zuul.project }}"},
                },
                {
                    "name": "Leave an artifact",
                    "ansible.builtin.shell": (
                        "echo {{ greeting }} > ~/artifacts/hello.txt; "
                        "echo boot > ~/console/serial.log"
                    ),
                },
            ],
        }
    ],
    "compile-error.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Build",
                    "ansible.builtin.shell": (
                        "echo 'CC kernel/fork.o'; "
                        "echo \"kernel/fork.c:42:1: error: expected ';' before '}' token\" >&2; "
                        "exit 2"
                    ),
                },
            ],
        }
    ],
    "use-dep.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Use the dependency's artifact",
                    "ansible.builtin.command": "cat ~/deps/dep-job/artifacts/hello.txt",
                }
            ],
        }
    ],
    "sleep.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [{"name": "Sleep", "ansible.builtin.command": "sleep 120"}],
        }
    ],
    "fail.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [{"name": "Fail", "ansible.builtin.fail": {"msg": "ERROR: pre step broke"}}],
        }
    ],
    "caught.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {"name": "Ignored", "ansible.builtin.command": "false", "ignore_errors": True},
                {"name": "Never failed", "ansible.builtin.command": "false", "failed_when": False},
                {
                    "block": [{"name": "Rescued", "ansible.builtin.command": "false"}],
                    "rescue": [{"name": "Rescue", "ansible.builtin.command": "true"}],
                },
            ],
        }
    ],
    "oops.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Boot",
                    "ansible.builtin.shell": "echo 'BUG: kernel NULL pointer dereference'",
                }
            ],
        }
    ],
    "wait-release.yaml": [
        {
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Wait until the test releases the post playbook",
                    "ansible.builtin.wait_for": {"path": "~/release", "timeout": 60},
                }
            ],
        }
    ],
}


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    host = SshHost(tmp_path_factory.mktemp("sshd"))
    yield host
    host.stop()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def git_repo(tmp_path) -> tuple[Path, str]:
    """A merger-like repo with the change under test at a zuul ref."""
    repo = tmp_path / "merger" / "linux"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "master")
    (repo / "README").write_text("base\n")
    git(repo, "add", "README")
    git(repo, "commit", "-qm", "base")
    (repo / "README").write_text("the change under test\n")
    git(repo, "commit", "-qam", "change")
    git(repo, "update-ref", "refs/zuul/check/1/1/item", "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    return repo, "refs/zuul/check/1/1/item"


@pytest.fixture
def merger_git(git_repo) -> tuple[str, str]:
    """git_repo's merger root served over git as the scheduler serves it: (url, ref)."""
    repo, ref = git_repo
    server = GitServer(repo.parent, "127.0.0.1", free_port())
    server.start()
    yield f"git://{server.address}/{repo.name}", ref
    server.stop()


@pytest.fixture
def launcher_env(tmp_path, zk, zk_hosts, gear_server, ssh_host, merger_git):
    ssh_host.reset_home()  # a fresh "node" for every test
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    for name, content in PLAYBOOKS.items():
        (jobs / "playbooks" / name).write_text(yaml.safe_dump(content, sort_keys=False))
    nodepool = FakeNodepool(zk, ssh_host)
    config = LauncherConfig(
        zk_hosts=zk_hosts,
        gearman_server="127.0.0.1",
        gearman_port=gear_server.port,
        work_root=tmp_path / "work",
        log_root=tmp_path / "logs",
        log_url="http://logs.example/logs",
        jobs_dir=jobs,
        private_key=ssh_host.client_key,
        name="test-launcher",
        max_builds=2,
        attempts=1,
        node_timeout=30,
        connect_timeout=60,
    )
    client = BuildClient()
    client.addServer("127.0.0.1", gear_server.port)
    client.waitForServer()
    env = {
        "config": config,
        "zk": zk,
        "state": ZuulState(zk),
        "ssh_host": ssh_host,
        "nodepool": nodepool,
        "client": client,
        "git": merger_git,
        "servers": [],
    }

    def start(**overrides) -> LauncherServer:
        for key, value in overrides.items():
            setattr(config, key, value)
        server = LauncherServer(config)
        server.start()
        server.worker.waitForServer()
        env["servers"].append(server)
        return server

    env["start"] = start
    yield env
    for server in env["servers"]:
        server.stop()
        server.join(30)
    client.shutdown()
    nodepool.stop()


def build_args(env, playbooks: dict, **extra) -> dict:
    url, ref = env["git"]
    build = uuidlib.uuid4().hex
    args = {
        "uuid": build,
        "job": "test-job",
        "node_type": LABEL,
        "project": "linux",
        "branch": "master",
        "change": 1,
        "patchset": 1,
        "pipeline": "check",
        "git_ref": ref,
        "git_url": url,
        "base_ref": "master",
        "vars": {"greeting": "hello"},
        "timeout": 120,
        "playbooks": playbooks,
        "artifacts": {},
        "log_path": f"1/1/check/test-job/{build}",
    }
    args.update(extra)
    return args


def run_build(env, playbooks: dict, **extra) -> tuple[dict, dict]:
    args = build_args(env, playbooks, **extra)
    job = env["client"].submit(EXECUTE, args)
    return args, env["client"].wait(job)


def assert_nodes_used(env) -> None:
    for node_id in env["nodepool"].nodes:
        node = env["zk"].get_node(node_id)
        assert node.state == NodeState.USED
    assert env["zk"].get_children("/nodepool/nodes/" + env["nodepool"].nodes[0] + "/lock") == []


def test_success_publishes_logs_and_result(launcher_env, caplog):
    env = launcher_env
    caplog.set_level(logging.INFO, logger="launcher")
    env["start"]()
    args, result = run_build(env, {"run": ["playbooks/ok.yaml"]}, event_id="ev-1")
    assert result["result"] == "SUCCESS", result
    assert result["log_url"] == f"http://logs.example/logs/{args['log_path']}/"
    assert result["summary"] == ""
    logdir = env["config"].log_root / args["log_path"]
    text = (logdir / "job-output.txt").read_text()
    assert "the change under test" in text
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \| ")
    assert all(line.match(row) for row in text.splitlines())
    assert (logdir / "artifacts" / "hello.txt").read_text() == "hello\n"
    assert (logdir / "console" / "serial.log").read_text() == "boot\n"
    records = json.loads((logdir / "job-output.json").read_text())
    assert [r["phase"] for r in records] == ["setup", "run", "collect"]
    # The change came through the launcher's cache, pushed onto the branch it
    # is tested on: the node's repository owes nothing to a path of the merger.
    cache = env["config"].git_cache / "linux.git"
    src = env["ssh_host"].home / "src" / "linux"
    assert git(src, "symbolic-ref", "HEAD") == "refs/heads/master"
    assert git(src, "rev-parse", "HEAD") == git(cache, "rev-parse", "refs/tips/master")
    assert git(src, "status", "--porcelain") == ""
    assert not (src / ".git" / "objects" / "info" / "alternates").exists()
    published = {p.name for p in (logdir / "_ansible").iterdir()}
    assert {
        "inventory.yaml",
        "ansible.cfg",
        "vars.yaml",
        "setup.yaml",
        "run-0.yaml",
        "collect-logs.yaml",
        "known_hosts",
    } <= published
    assert "tmp" not in published
    assert (
        "id_ed25519"
        not in (logdir / "_ansible" / "inventory.yaml")
        .read_text()
        .split("ansible_ssh_private_key_file")[0]
    )
    assert env["state"].get_build_result(args["uuid"]).to_dict() == result
    assert not env["state"].build_running(args["uuid"])
    assert env["state"].get_early_failure(args["uuid"]) is None
    assert_nodes_used(env)
    assert not (env["config"].work_root / args["uuid"]).exists()
    prefix = f"[e: ev-1] [build: {args['uuid']}] "
    assert prefix + "SUCCESS in " in caplog.text
    assert prefix + f"Node {env['nodepool'].nodes[0]} released (used)" in caplog.text


def test_node_logs_past_a_cap_are_truncated_with_a_line_in_the_log(launcher_env, monkeypatch):
    """A cap on the node's log archive (3 entries here) does not fail the build:
    what fitted is published and job-output.txt says why the rest is missing."""
    env = launcher_env
    capped = functools.partial(logs.unpack_node_logs, max_entries=3)
    monkeypatch.setattr(logs, "unpack_node_logs", capped)
    env["start"]()
    args, result = run_build(env, {"run": ["playbooks/ok.yaml"]})
    assert result["result"] == "SUCCESS", result
    logdir = env["config"].log_root / args["log_path"]
    assert (logdir / "artifacts" / "hello.txt").read_text() == "hello\n"
    assert not (logdir / "console" / "serial.log").exists()
    output = (logdir / "job-output.txt").read_text()
    assert "| The node's logs were truncated: the archive has more than 3 entries.\n" in output


def test_dependency_artifacts_are_copied_to_the_node(launcher_env):
    """The scheduler names a dependency by its log path, relative to the log
    root; the launcher copies it from its own log root, and from nowhere else."""
    env = launcher_env
    env["start"]()
    first, result = run_build(env, {"run": ["playbooks/ok.yaml"]})
    assert result["result"] == "SUCCESS"
    use_dep = {"run": ["playbooks/use-dep.yaml"]}
    args, result = run_build(env, use_dep, artifacts={"dep-job": first["log_path"]})
    assert result["result"] == "SUCCESS", result
    output = (env["config"].log_root / args["log_path"] / "job-output.txt").read_text()
    assert "TASK [Use the dependency's artifact]" in output
    assert "| hello" in output
    # An absolute path (an older scheduler's) works while it is in the log root.
    absolute = str(env["config"].log_root / first["log_path"])
    _, result = run_build(env, use_dep, artifacts={"dep-job": absolute})
    assert result["result"] == "SUCCESS", result
    _, result = run_build(env, use_dep, artifacts={"dep-job": "../.."})
    assert result["result"] == "FAILURE"
    assert result["summary"] == "The log path ../.. of dependency dep-job leaves the log root."
    _, result = run_build(env, use_dep, artifacts={"dep-job": "1/1/check/nothing"})
    assert result["result"] == "FAILURE"
    assert (
        "The artifacts of dependency dep-job are not in this launcher's log root"
        in (result["summary"])
    )
    assert len(env["nodepool"].nodes) == 3  # the refused builds asked for no node


def test_unreachable_merger_is_node_failure_without_a_node(launcher_env, monkeypatch, caplog):
    env = launcher_env
    caplog.set_level(logging.INFO, logger="launcher")
    monkeypatch.setattr("launcher.build.FETCH_RETRY_DELAYS", (0.1,))
    env["start"]()
    url = f"git://127.0.0.1:{free_port()}/linux"  # nothing listens there
    args, result = run_build(env, {"run": ["playbooks/ok.yaml"]}, git_url=url)
    assert result["result"] == "NODE_FAILURE", result
    assert result["summary"].startswith(
        f"Could not fetch refs/zuul/check/1/1/item of linux from {url}: unable to connect"
    )
    assert "\n" not in result["summary"] and result["summary"].endswith(".")
    assert env["nodepool"].nodes == []
    assert f"[build: {args['uuid']}] Could not fetch" in caplog.text  # the first try
    _, result = run_build(env, {"run": ["playbooks/ok.yaml"]}, git_ref="refs/zuul/nothing")
    assert result["result"] == "NODE_FAILURE"
    assert "couldn't find remote ref refs/zuul/nothing" in result["summary"]


def test_run_failure_quotes_compiler_error(launcher_env):
    env = launcher_env
    env["start"]()
    _, result = run_build(env, {"run": ["playbooks/compile-error.yaml"]})
    assert result["result"] == "FAILURE"
    assert "kernel/fork.c:42:1: error: expected ';' before '}' token" in result["summary"]
    assert result["summary"].splitlines()[0] == "Task 'Build' failed in run-0.yaml:"
    assert_nodes_used(env)


def test_unreachable_node_is_node_failure(launcher_env):
    env = launcher_env
    env["nodepool"].port = free_port()  # nothing listens there
    env["start"](connect_timeout=3)
    args, result = run_build(env, {"run": ["playbooks/ok.yaml"]})
    assert result["result"] == "NODE_FAILURE", result
    assert_nodes_used(env)
    assert env["state"].get_early_failure(args["uuid"]) is None


def test_unreachable_retries_on_new_node_then_retry_limit(launcher_env):
    env = launcher_env
    env["nodepool"].port = free_port()
    env["start"](attempts=2, connect_timeout=3)
    _, result = run_build(env, {"run": ["playbooks/ok.yaml"]})
    assert result["result"] == "RETRY_LIMIT", result
    assert len(env["nodepool"].nodes) == 2


def test_failed_request_is_node_failure_with_reason(launcher_env):
    env = launcher_env
    env["start"]()
    _, result = run_build(env, {"run": ["playbooks/ok.yaml"]}, node_type="no-such-label")
    assert result["result"] == "NODE_FAILURE"
    assert result["summary"] == (
        "Node request for no-such-label failed: No provider supports label no-such-label."
    )


def test_resubmission_returns_stored_result(launcher_env):
    env = launcher_env
    env["start"]()
    args, first = run_build(env, {"run": ["playbooks/ok.yaml"]})
    again = env["client"].wait(env["client"].submit(EXECUTE, args))
    assert again == first
    assert len(env["nodepool"].nodes) == 1


def test_timeout_and_post_failure(launcher_env):
    env = launcher_env
    env["start"]()
    _, result = run_build(env, {"run": ["playbooks/sleep.yaml"]}, timeout=5)
    assert result["result"] == "TIMED_OUT"
    assert result["summary"] == "The job exceeded its timeout of 5 seconds."
    _, result = run_build(env, {"run": ["playbooks/ok.yaml"], "post": ["playbooks/fail.yaml"]})
    assert result["result"] == "POST_FAILURE"
    assert "ERROR: pre step broke" in result["summary"]


def test_pre_failure_is_retried_and_early_only_on_the_last_attempt(launcher_env):
    env = launcher_env
    env["start"](attempts=2)
    args = build_args(env, {"pre": ["playbooks/fail.yaml"], "run": ["playbooks/ok.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    env["nodepool"].next_request()
    env["nodepool"].next_request()  # asked for once the first attempt has ended
    assert env["state"].get_early_failure(args["uuid"]) is None
    result = env["client"].wait(job)
    assert result["result"] == "RETRY_LIMIT"
    assert "ERROR: pre step broke" in result["summary"]
    assert len(env["nodepool"].nodes) == 2
    early = env["state"].get_early_failure(args["uuid"])
    assert early["reason"] == "Task 'Fail' failed in pre-0.yaml."


def test_stop_aborts_a_running_build(launcher_env):
    env = launcher_env
    server = env["start"]()
    args = build_args(env, {"run": ["playbooks/sleep.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    env["client"].wait_phase(job, "run")
    live = env["config"].log_root / args["log_path"] / "job-output.txt"
    assert "PLAYBOOK [setup] setup.yaml" in live.read_text()  # followable while it runs
    stop = env["client"].submit(server.stop_function, {"uuid": args["uuid"]})
    assert env["client"].wait(stop) == {"uuid": args["uuid"], "cancelled": True}
    result = env["client"].wait(job)
    assert result["result"] == "ABORTED"
    assert env["state"].get_build_result(args["uuid"]).result == "ABORTED"
    assert_nodes_used(env)


def test_at_most_max_builds_run_at_once(launcher_env):
    env = launcher_env
    server = env["start"](max_builds=2)
    client = env["client"]
    # The "nodes" share one host and HOME: builds running at once each clone
    # into a directory of their own, as they would on separate nodes.
    builds = [
        build_args(env, {"run": ["playbooks/sleep.yaml"]}, project=f"linux{n}") for n in range(3)
    ]
    jobs = [client.submit(EXECUTE, args) for args in builds]
    client.wait_phase(jobs[0], "run")
    client.wait_phase(jobs[1], "run")
    assert client.phases[jobs[2].unique] == []  # still queued in gearman
    assert not env["state"].build_running(builds[2]["uuid"])
    client.wait(client.submit(server.stop_function, {"uuid": builds[0]["uuid"]}))
    client.wait_phase(jobs[2], "run")
    for args in builds[1:]:
        client.wait(client.submit(server.stop_function, {"uuid": args["uuid"]}))
    assert [client.wait(job)["result"] for job in jobs] == ["ABORTED"] * 3


def test_node_lost_mid_build_is_node_failure(launcher_env):
    env = launcher_env
    env["start"]()
    args = build_args(env, {"run": ["playbooks/sleep.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    env["client"].wait_phase(job, "run")
    node = env["zk"].get_node(env["nodepool"].nodes[0])
    node.state = NodeState.DELETING  # as nodepool does when it takes a node back
    env["zk"].store_node(node)
    result = env["client"].wait(job)
    assert result["result"] == "NODE_FAILURE"
    assert result["summary"] == f"Node {node.id} went deleting while the build ran."
    assert env["zk"].get_node(node.id).state == NodeState.DELETING


def test_unknown_playbook_fails_without_a_node(launcher_env):
    env = launcher_env
    env["start"]()
    _, result = run_build(env, {"run": ["playbooks/missing.yaml"]})
    assert result["result"] == "FAILURE"
    assert "names playbook playbooks/missing.yaml" in result["summary"]
    assert env["nodepool"].nodes == []


def test_console_script_serves_and_stops_on_sigterm(tmp_path, zk_hosts, gear_server, ssh_host):
    conf = tmp_path / "zuul.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "state-dir": str(tmp_path / "state"),
                "zookeeper": {"hosts": zk_hosts},
                "gearman": {"server": "127.0.0.1", "port": gear_server.port},
                "launcher": {"private-key": str(ssh_host.client_key), "name": "cli"},
            }
        )
    )
    launcher = Path(sys.executable).parent / "zuul-launcher"
    proc = subprocess.Popen([str(launcher), "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        client = BuildClient()
        client.addServer("127.0.0.1", gear_server.port)
        client.waitForServer()
        job = client.submit(EXECUTE, {"uuid": "x"})
        assert client.done[job.unique].wait(60)
        assert job.exception == "The build arguments miss job, node_type, log_path."
        client.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, 30) == 0, proc.stderr.read()


def test_console_script_refuses_a_bad_config(tmp_path):
    conf = tmp_path / "zuul.yaml"
    conf.write_text("zookeeper: {hosts: h}\nlauncher: {max-builds: lots}\n")
    launcher = Path(sys.executable).parent / "zuul-launcher"
    out = subprocess.run([str(launcher), "-c", str(conf)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "launcher/max-builds: expected int." in out.stderr


def write_launcher_config(env, path: Path) -> Path:
    """A zuul.yaml for the console script that matches launcher_env's config."""
    config = env["config"]
    path.write_text(
        yaml.safe_dump(
            {
                "state-dir": str(path.parent / "state"),
                "zookeeper": {"hosts": config.zk_hosts},
                "gearman": {"server": "127.0.0.1", "port": config.gearman_port},
                "launcher": {
                    "name": "cli",
                    "private-key": str(config.private_key),
                    "jobs-dir": str(config.jobs_dir),
                    "log-root": str(config.log_root),
                    "attempts": 1,
                },
            }
        )
    )
    return path


def stopped_within(proc: subprocess.Popen, timeout: float) -> int:
    """proc's exit code; if it hangs, its threads' stacks (SIGUSR2) go into the failure."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2)  # faulthandler writes before the kill below ends it
        proc.kill()
        proc.wait()
        raise AssertionError(f"Still running after {timeout} s:\n{proc.stderr.read()}") from None


def test_sigterm_gives_running_builds_back_without_a_result(launcher_env, tmp_path):
    env = launcher_env
    client, state = env["client"], env["state"]
    conf = write_launcher_config(env, tmp_path / "zuul.yaml")
    launcher = Path(sys.executable).parent / "zuul-launcher"
    proc = subprocess.Popen([str(launcher), "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        args = build_args(env, {"run": ["playbooks/sleep.yaml"]})
        job = client.submit(EXECUTE, args)
        client.wait_phase(job, "run")
        assert state.build_running(args["uuid"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, 60) == 0, proc.stderr.read()
    client.wait_failed(job)  # no vote: the scheduler runs the build again
    assert state.get_build_result(args["uuid"]) is None
    assert not state.build_running(args["uuid"])
    assert_nodes_used(env)
    output = (env["config"].log_root / args["log_path"] / "job-output.txt").read_text()
    assert "The launcher stopped; the build will run again on a new node." in output
    # Run again (as the scheduler does, same uuid) it runs on a new node.
    env["start"]()
    again = client.wait(
        client.submit(EXECUTE, {**args, "playbooks": {"run": ["playbooks/ok.yaml"]}})
    )
    assert again["result"] == "SUCCESS"
    assert len(env["nodepool"].nodes) == 2


def test_stop_of_the_server_fails_the_gear_job(launcher_env):
    env = launcher_env
    server = env["start"]()
    args = build_args(env, {"run": ["playbooks/sleep.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    env["client"].wait_phase(job, "run")
    server.stop()
    env["client"].wait_failed(job)
    assert env["state"].get_build_result(args["uuid"]) is None
    assert not env["state"].build_running(args["uuid"])
    assert_nodes_used(env)


def expire_session(zk: ZooKeeper) -> None:
    """End zk's session on the server: a second client attaches to it and closes it."""
    session_id, password = zk.client.client_id
    other = KazooClient(hosts=zk.hosts, client_id=(session_id, password))
    other.start(timeout=30)
    other.stop()
    other.close()


def test_session_expiry_while_waiting_for_a_node_asks_again(launcher_env, caplog):
    env = launcher_env
    caplog.set_level(logging.INFO, logger="launcher")
    nodepool, state = env["nodepool"], env["state"]
    nodepool.serving.clear()  # no node yet: the build waits on its request
    server = env["start"]()
    args = build_args(env, {"run": ["playbooks/ok.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    first = nodepool.next_request()
    assert state.build_running(args["uuid"])
    expire_session(server.zk)  # returns once the server dropped the session's ephemerals
    second = nodepool.next_request()
    assert second != first and env["zk"].get_node_request(first) is None
    claimed = threading.Event()
    state.watch_build(args["uuid"], lambda names: claimed.set() if "running" in names else None)
    assert claimed.wait(30), "the build was not claimed again"
    nodepool.serving.set()
    result = env["client"].wait(job)
    assert result["result"] == "SUCCESS", result
    assert len(nodepool.nodes) == 1
    assert f"node request {first} waited; asking again" in caplog.text
    assert f"[build: {args['uuid']}] Claimed the build again" in caplog.text


def test_failed_task_is_reported_before_post_playbooks_end(launcher_env):
    env = launcher_env
    state = env["state"]
    env["start"]()
    args = build_args(
        env, {"run": ["playbooks/compile-error.yaml"], "post": ["playbooks/wait-release.yaml"]}
    )
    marked = threading.Event()
    state.watch_build(
        args["uuid"], lambda names: marked.set() if "early-failure" in names else None
    )
    job = env["client"].submit(EXECUTE, args)
    assert marked.wait(120), "no early failure"
    reason = "Task 'Build' failed in run-0.yaml."
    assert state.get_early_failure(args["uuid"])["reason"] == reason
    assert state.get_build_result(args["uuid"]) is None  # post still waits for us
    (env["ssh_host"].home / "release").touch()
    result = env["client"].wait(job)
    assert result["result"] == "FAILURE"
    assert "kernel/fork.c:42:1: error: expected" in result["summary"]
    output = (env["config"].log_root / args["log_path"] / "job-output.txt").read_text()
    assert f"Early failure, reported to the scheduler: {reason}" in output
    assert '"task": "Build"' not in output  # the callback's token line stays out


def test_ignored_and_rescued_failures_are_not_early_failures(launcher_env):
    env = launcher_env
    env["start"]()
    args, result = run_build(env, {"run": ["playbooks/caught.yaml"]})
    assert result["result"] == "SUCCESS", result
    assert env["state"].get_early_failure(args["uuid"]) is None


def test_failure_output_match_fails_the_build_early(launcher_env):
    env = launcher_env
    env["start"]()
    args, result = run_build(env, {"run": ["playbooks/oops.yaml"]}, failure_output=[r"^BUG: "])
    reason = "Output matched failure-output '^BUG: ': BUG: kernel NULL pointer dereference"
    assert env["state"].get_early_failure(args["uuid"])["reason"] == reason
    assert result["result"] == "FAILURE"
    assert result["summary"] == reason


def test_live_console_follows_a_running_build_through_the_web(launcher_env):
    """The launcher streams job-output.txt while the build runs; the web relays
    it as server-sent events found through the build's claim in ZooKeeper."""
    env = launcher_env
    env["start"]()
    args = build_args(env, {"run": ["playbooks/wait-release.yaml"]})
    job = env["client"].submit(EXECUTE, args)
    env["client"].wait_phase(job, "run")
    web = WebServer(create_app(env["zk"], env["config"].log_root), port=0)
    web.start()
    try:
        with httpx.stream("GET", f"{web.url}/api/console/{args['uuid']}", timeout=60) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            seen = []
            for line in lines:  # what was written before we came, then live lines
                seen.append(line)
                if "Wait until the test releases" in line:
                    break
            assert any(line.startswith("data: ") and "PLAYBOOK [setup]" in line for line in seen)
            (env["ssh_host"].home / "release").touch()
            rest = list(lines)  # the stream ends with the build
        assert rest[-3:] == ["event: end", "data: ", ""]
        assert any("PLAYBOOK [collect]" in line for line in rest)
        assert env["client"].wait(job)["result"] == "SUCCESS"
        gone = httpx.get(f"{web.url}/api/console/{args['uuid']}")
        assert gone.status_code == 404
        assert "is not running" in gone.json()["detail"]
    finally:
        web.stop()


def test_autohold_keeps_the_node_of_the_next_failing_builds(launcher_env):
    """Zuul's autohold: the next `count` failing builds of the job keep their
    node in nodepool's hold state with the reason; then nodes go back as usual."""
    env = launcher_env
    env["start"]()
    state = env["state"]
    request = autohold.add(
        state, autohold.AutoholdRequest(project="linux", job="test-job", reason="dev: why?")
    )
    run_build(env, {"run": ["playbooks/ok.yaml"]})  # a success keeps nothing
    args, result = run_build(env, {"run": ["playbooks/compile-error.yaml"]})
    assert result["result"] == "FAILURE"
    _, result = run_build(env, {"run": ["playbooks/compile-error.yaml"]})  # count 1: used up
    assert result["result"] == "FAILURE"
    states = [env["zk"].get_node(n) for n in env["nodepool"].nodes]
    assert [n.state for n in states] == [NodeState.USED, NodeState.HOLD, NodeState.USED]
    held = states[1]
    assert (held.hold_job, held.comment) == ("linux/test-job", "dev: why?")
    assert autohold.requests(state)[0].nodes == [held.id]
    output = (env["config"].log_root / args["log_path"] / "job-output.txt").read_text()
    assert f"Node {held.id} is held for autohold request {request.id}: dev: why?" in output
