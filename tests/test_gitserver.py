"""The scheduler's git server (zuul_lite.gitserver) with the real `git daemon`:
it serves the merger's refs, refuses pushes, comes back when it dies and ends
with the process that started it; and the URL builds name for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from nodepool_lite.zkserver import free_port
from tests.harness import write_config
from zuul_lite import config as zconfig
from zuul_lite.exceptions import ConfigError
from zuul_lite.gitserver import GitServer, GitServerError


def git(repo: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    where = ["-C", str(repo)] if repo else []
    cmd = ["git", *where, "-c", "user.name=t", "-c", "user.email=t@e", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def merger(tmp_path) -> Path:
    """A merger root with project `linux` and a published zuul ref."""
    repo = tmp_path / "merger" / "linux"
    git(None, "init", "-q", "-b", "master", str(repo))
    (repo / "README").write_text("base\n")
    git(repo, "add", "README")
    git(repo, "commit", "-qm", "base")
    git(repo, "commit", "-q", "--allow-empty", "-m", "change")
    git(repo, "update-ref", "refs/zuul/check/1/1/item", "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    return repo.parent


@pytest.fixture
def server(merger):
    server = GitServer(merger, "127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()


def test_serves_a_ref_and_refuses_a_push(server, merger, tmp_path):
    url = f"git://127.0.0.1:{server.port}/linux"
    clone = tmp_path / "clone"
    git(None, "init", "-q", "--bare", str(clone))
    git(clone, "fetch", "-q", url, "+refs/zuul/check/1/1/item:refs/heads/change")
    want = git(merger / "linux", "rev-parse", "refs/zuul/check/1/1/item").stdout
    assert git(clone, "rev-parse", "refs/heads/change").stdout == want
    pushed = git(clone, "push", url, "refs/heads/change:refs/heads/evil", check=False)
    assert pushed.returncode != 0 and "service not enabled" in pushed.stderr
    assert git(merger / "linux", "rev-parse", "--verify", "-q", "evil", check=False).stdout == ""
    # Nothing outside the merger's root, and the refusal says why.
    outside = git(None, "ls-remote", f"git://127.0.0.1:{server.port}/../../etc", check=False)
    assert "remote error: no such repository: /../../etc" in outside.stderr


def test_a_daemon_that_dies_is_started_again(server):
    url = f"git://127.0.0.1:{server.port}/linux"
    first = server._proc
    first.kill()
    wait_until(
        lambda: server._proc is not first and git(None, "ls-remote", url, check=False).stdout,
        15,
        "the git server to serve again",
    )


def test_a_port_in_use_is_one_sentence(merger):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(GitServerError) as error:
            GitServer(merger, "127.0.0.1", port).start()
    finally:
        taken.close()
    assert str(error.value) == (
        f"The git server could not listen on 127.0.0.1:{port}: "
        "Could not bind to 127.0.0.1: Address already in use."
    )


def test_the_daemon_ends_with_a_killed_scheduler(merger):
    """SIGKILL leaves no chance to stop it: the parent-death signal does."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from zuul_lite.gitserver import GitServer
        server = GitServer({str(merger)!r}, "127.0.0.1", {free_port()})
        server.start()
        print(server._proc.pid, flush=True)
        time.sleep(60)
        """
    )
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=repo_root
    )
    try:
        # setpriv execs git daemon in place: the pid is the daemon's.
        daemon = int(proc.stdout.readline())
        assert "git" in Path(f"/proc/{daemon}/cmdline").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: not Path(f"/proc/{daemon}").exists() or _zombie(daemon), 10, "the daemon")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_ends_the_daemon(merger):
    server = GitServer(merger, "127.0.0.1", free_port())
    server.start()
    pid = server._proc.pid
    server.stop()
    assert server._proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_url_builds_name_follows_the_config(tmp_path):
    path = write_config(tmp_path, "127.0.0.1:2181")
    data = yaml.safe_load(path.read_text())
    port = data["merger"]["git-port"]
    assert zconfig.load(path).git_url == f"git://127.0.0.1:{port}/"
    data["merger"] = {"git-listen": "0.0.0.0", "git-port": 9419}
    path.write_text(yaml.safe_dump(data))
    assert zconfig.load(path).git_url == f"git://{socket.getfqdn()}:9419/"
    data["merger"]["git-url"] = "ssh://git@merger.example.org/srv/merger"
    path.write_text(yaml.safe_dump(data))
    assert zconfig.load(path).git_url == "ssh://git@merger.example.org/srv/merger/"
    data["merger"] = {"git-port": 0}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="merger.git-port: value must be at least 1"):
        zconfig.load(path)
