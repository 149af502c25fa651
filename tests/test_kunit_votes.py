"""KUnit votes end to end: the scheduler (local inbox, check pipeline), the
nodepool launcher lending a node (static driver: a host sshd on loopback),
zuul-launcher running the real kernel-kunit playbook of jobs/, and the vote.

The project is a tiny tree whose tools/testing/kunit/kunit.py is the
stand-in of tests/test_kunit_playbook.py: it prints the KTAP a UML kernel
would for the tests its kunit-tests.txt lists, so a series breaks a test by
editing that file (the real kunit.py, a UML kernel build, is run by
tests/test_jobs_playbooks.py's jobs on the real tree). Each vote is
asserted: a series that breaks a test (-1, run twice, the test named), a
test already failing on the base commit (+1, said why) and a test that
fails once and then passes on a fresh node (+1, reported flaky, counted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.harness import SshHost, make_series, run_git, wait_for_votes, write_config
from tests.test_kunit_playbook import KUNIT
from tests.test_review_e2e import RealCI
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState

JOBS = Path(__file__).resolve().parents[1] / "jobs"

# A test listed "flip" fails the first time it runs on this host, then passes:
# a marker outside the tree, which the node's next build finds.
FLIPPING = KUNIT.replace(
    'tests = [line.split() for line in open("kunit-tests.txt") if line.strip()]',
    """import os
tests = []
for line in open("kunit-tests.txt"):
    if line.strip():
        name, status = line.split()
        if status == "flip":
            marker = os.path.expanduser(f"~/.flipped-{name}")
            status = "ok" if os.path.exists(marker) else "fail"
            open(marker, "w").close()
        tests.append((name, status))""",
)
assert FLIPPING != KUNIT

LAYOUT = {
    "pipelines": [
        {
            "name": "check",
            "manager": "independent",
            "source": "local",
            "trigger": {"local": [{"event": "patchset-created"}]},
            "success": {"local": {"verified": 1}},
            "failure": {"local": {"verified": -1}},
        }
    ],
    "projects": [{"name": "tiny", "check": {"jobs": ["kernel-kunit"]}}],
}


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    host = SshHost(tmp_path_factory.mktemp("node"))
    yield host
    host.stop()


class KunitCI:
    def __init__(self, tmp: Path, zk_hosts: str, host: SshHost, base_tests: str) -> None:
        host.reset_home()
        path = write_config(tmp, zk_hosts)
        data = yaml.safe_load(path.read_text())
        (tmp / "layout.yaml").write_text(yaml.safe_dump(LAYOUT))
        data["scheduler"] = {"layout": str(tmp / "layout.yaml"), "jobs-dir": str(JOBS)}
        path.write_text(yaml.safe_dump(data))
        self.cfg = zconfig.load(path)
        self.src = tmp / "tiny-src"
        self.src.mkdir()
        run_git(self.src, "init", "-q", "-b", "master")
        kunit = self.src / "tools" / "testing" / "kunit" / "kunit.py"
        kunit.parent.mkdir(parents=True)
        kunit.write_text(FLIPPING)
        (self.src / "kunit-tests.txt").write_text(base_tests)
        (self.src / "README").write_text("tiny\n")
        run_git(self.src, "add", "-A")
        run_git(self.src, "commit", "-qm", "Base with tests")
        self.base = run_git(self.src, "rev-parse", "HEAD").strip()
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.state = ZuulState(self.zk)
        self.local = LocalConnection("local", {"driver": "local"}, self.state, self.cfg.state_dir)
        self.local.import_project("tiny", self.src)
        self.sched = Scheduler(self.cfg, self.zk)
        self.sched.start()
        self.ci = RealCI(
            tmp, zk_hosts, host, self.sched.gearman_port, label="kernel-debian", jobs_dir=JOBS
        )
        self.tmp = tmp

    def submit(self, name: str, tests: str) -> dict:
        """A one-patch series writing kunit-tests.txt; its check vote."""
        out = make_series(self.src, self.tmp / name, [("kunit-tests.txt", tests, f"{name}")])
        number, _ = self.local.submit(out, "tiny")
        (vote,) = wait_for_votes(self.zk, number, timeout=300)
        return vote

    def stop(self) -> None:
        self.ci.stop()
        self.sched.stop()
        self.zk.disconnect()


@pytest.fixture
def kunit_ci(tmp_path, zk_hosts, ssh_host):
    made: list[KunitCI] = []

    def make(base_tests: str) -> KunitCI:
        made.append(KunitCI(tmp_path, zk_hosts, ssh_host, base_tests))
        return made[-1]

    yield make
    for ci in made:
        ci.stop()


def test_a_series_that_breaks_a_test_gets_minus_one_naming_it(kunit_ci) -> None:
    ci = kunit_ci("tiny_add_test ok\ntiny_sub_test ok\n")
    vote = ci.submit("break-add", "tiny_add_test fail\ntiny_sub_test ok\n")
    message = vote["message"]
    assert vote["value"] == -1, message
    assert "- kernel-kunit http://logs.example/logs/" in message
    assert "FAIL tiny.tiny_add_test" in message
    assert "(the first run, on another node: FAILURE http://logs.example/logs/" in message
    assert f"reproduce: sh artifacts/reproduce.sh <your clone> (base {ci.base[:12]}" in message


def test_a_test_failing_on_base_keeps_plus_one_and_says_why(kunit_ci) -> None:
    ci = kunit_ci("tiny_add_test ok\ntiny_old_test fail\n")
    vote = ci.submit("add-sub", "tiny_add_test ok\ntiny_old_test fail\ntiny_sub_test ok\n")
    assert vote["value"] == 1, vote["message"]
    assert "- kernel-kunit http://logs.example/logs/" in vote["message"]
    assert f"(already failing on base {ci.base[:12]}: tiny.tiny_old_test)" in vote["message"]
    assert "flaky" not in vote["message"]


def test_a_test_that_flips_is_reported_flaky_and_plus_one(kunit_ci) -> None:
    ci = kunit_ci("tiny_add_test ok\n")
    vote = ci.submit("add-flip", "tiny_add_test ok\ntiny_flip_test flip\n")
    assert vote["value"] == 1, vote["message"]
    assert "then SUCCESS on a fresh node; flaky tests: tiny.tiny_flip_test)" in vote["message"]
    [count] = ci.state.flake_counts()
    assert (count.project, count.job, count.runs, count.flips) == ("tiny", "kernel-kunit", 1, 1)
    assert count.tests == {"tiny.tiny_flip_test": 1}
