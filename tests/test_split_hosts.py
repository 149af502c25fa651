"""The change under test crosses hosts only over the network: the scheduler's
git server, a launcher and a node each in a network namespace of their own.

  scheduler host  10.231.0.1/24 ── veth ── 10.231.0.2/24  launcher host
  (git daemon on its veth address only)     (fetch into its cache; the node's
                                              ssh through a forward, as on a
  node: loopback only, sshd on 127.0.0.1     nodepool host)

The launcher host runs the launcher's own code in a process of its own: it
fetches the change from git://10.231.0.1 into its cache and runs the
synthesised setup playbook, which pushes the change to the node. The node
checks it out and reaches neither the scheduler host nor the launcher host.
Namespaces (and with them the veth pair) are deleted even when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.harness import SshHost
from zuul_lite.build_contract import BuildRequest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULER_IP, LAUNCHER_IP, GIT_PORT = "10.231.0.1", "10.231.0.2", 9418
REF = "refs/zuul/check/1/1/item"

# The scheduler host: the git server on its veth address, until stdin closes.
SCHEDULER = """
import sys
from zuul_lite.gitserver import GitServer
server = GitServer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""

# The launcher host: what a build does before its pre playbooks, with the
# launcher's own modules; the forward into the node's namespace stands in for
# the nodepool host's (nodepool_lite.drivers.netns).
LAUNCHER = """
import json, sys
from pathlib import Path
from launcher.ansible import AnsibleRunner, OutputLog
from launcher.config import default_ansible_playbook
from launcher.gitcache import GitCache
from launcher.jobdir import JobDir
from launcher.playbooks import NodeAddress, write_ansible_dir
from nodepool_lite.drivers.netns import Forward
from zuul_lite.build_contract import BuildRequest

args = json.loads(sys.argv[1])
work = Path(args["work"])
forward = Forward(args["node_pid"], args["node_port"])
request = BuildRequest.from_dict(args["request"])
change = GitCache(work / "git", 60).fetch(request)
jobdir = JobDir(work / "builds", request.uuid)
phases = write_ansible_dir(
    jobdir, request, NodeAddress("127.0.0.1", forward.port, args["user"], [args["host_key"]]),
    jobs_dir=work, private_key=Path(args["key"]), connect_timeout=20, change=change,
    dependencies={},
)
runner = AnsibleRunner(jobdir, OutputLog(work / "job-output.txt"), default_ansible_playbook())
outcome = runner.run(phases["setup"][0], "setup", 60)
runner.close_connections()
jobdir.cleanup()
forward.close()
print(json.dumps({"outcome": outcome.value, "sha": change.sha}), flush=True)
"""

# Run inside the node: the errno of a TCP connection to each address given.
PROBE = """
import json, socket, sys
result = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), 2).close()
        result[target] = 0
    except OSError as error:
        result[target] = error.errno
print(json.dumps(result))
"""


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e", *args]
    return run(*cmd).stdout.strip()


def python_in(netns: str, script: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(script), *args]


@pytest.fixture
def hosts():
    """Three namespaces: sched and launch joined by a veth pair, node alone."""
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"zl-{role}-{suffix}" for role in ("sched", "launch", "node")}
    procs: list[subprocess.Popen] = []
    try:
        for name in names.values():
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        # Made right inside the namespaces: nothing of it appears on this host.
        run("ip", "link", "add", "veth-s", "netns", names["sched"], "type", "veth",
            "peer", "name", "veth-l", "netns", names["launch"])  # fmt: skip
        for role, dev, ip in (
            ("sched", "veth-s", SCHEDULER_IP),
            ("launch", "veth-l", LAUNCHER_IP),
        ):
            run("ip", "-n", names[role], "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", names[role], "link", "set", dev, "up")
        yield names, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def merger(tmp_path) -> Path:
    repo = tmp_path / "merger" / "linux"
    git(tmp_path, "init", "-q", "-b", "master", str(repo))
    (repo / "README").write_text("base\n")
    git(repo, "add", "README")
    git(repo, "commit", "-qm", "base")
    (repo / "README").write_text("the change under test\n")
    git(repo, "commit", "-qam", "change")
    git(repo, "update-ref", REF, "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    return repo


def test_change_reaches_a_node_across_hosts(hosts, merger, tmp_path):
    names, procs = hosts
    scheduler = subprocess.Popen(
        python_in(names["sched"], SCHEDULER, str(merger.parent), SCHEDULER_IP, str(GIT_PORT)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    procs.append(scheduler)
    assert scheduler.stdout.readline().strip() == "ready"
    node = SshHost(tmp_path / "node", netns=names["node"])
    procs.append(node.proc)
    url = f"git://{SCHEDULER_IP}:{GIT_PORT}/linux"
    request = BuildRequest(
        uuid="b1", job="j", node_type="n", log_path="1/1/check/j/b1", project="linux",
        branch="master", git_url=url, git_ref=REF, base_ref=git(merger, "rev-parse", "HEAD"),
    )  # fmt: skip
    launcher = tmp_path / "launcher"
    launcher.mkdir()
    args = {
        "work": str(launcher),
        "node_pid": node.proc.pid,
        "node_port": node.port,
        "request": request.to_dict(),
        "user": node.address().username,
        "host_key": node.host_key,
        "key": str(node.client_key),
    }
    out = subprocess.run(
        python_in(names["launch"], LAUNCHER, json.dumps(args)),
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    output = (launcher / "job-output.txt").read_text() if out.returncode == 0 else out.stderr
    assert out.returncode == 0, output[-3000:]
    result = json.loads(out.stdout)
    assert result["outcome"] == "ok", (launcher / "job-output.txt").read_text()[-3000:]
    # The node has the change, checked out on its branch, from no path of ours.
    src = node.home / "src" / "linux"
    assert (src / "README").read_text() == "the change under test\n"
    assert git(src, "rev-parse", "HEAD") == result["sha"] == git(merger, "rev-parse", REF)
    assert git(src, "symbolic-ref", "HEAD") == "refs/heads/master"
    assert not (src / ".git" / "objects" / "info" / "alternates").exists()
    # It came over the veth: the git server listens on nothing else.
    loopback = f"git://127.0.0.1:{GIT_PORT}/linux"
    local = subprocess.run(
        ["ip", "netns", "exec", names["sched"], "git", "ls-remote", loopback],
        capture_output=True, text=True,
    )  # fmt: skip
    assert local.returncode != 0 and "Connection refused" in local.stderr
    # The node reaches neither the scheduler host nor the launcher host.
    targets = [f"{SCHEDULER_IP}:{GIT_PORT}", f"{LAUNCHER_IP}:22"]
    probe = run(*python_in(names["node"], PROBE, *targets))
    assert json.loads(probe.stdout) == {target: errno.ENETUNREACH for target in targets}
    fetch = subprocess.run(
        ["ip", "netns", "exec", names["node"], "git", "ls-remote", url],
        capture_output=True, text=True,
    )  # fmt: skip
    assert fetch.returncode != 0 and "Network is unreachable" in fetch.stderr
