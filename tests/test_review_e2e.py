"""Gerrit and Patchwork end to end with the real launcher: a change uploaded
to the review system is fetched by the scheduler, built by zuul-launcher
(ansible-playbook over ssh on a node from the nodepool launcher's static
driver), reported back (Verified votes; per-patch checks), then approved,
gated and merged.

Stand-ins, as in tests/test_gerrit.py and tests/test_patchwork.py: the review
systems themselves (tests/fake_gerrit.py speaks Gerrit's ssh commands and
serves its git; tests/fake_patchwork.py serves Patchwork's REST API), since
neither server can run here. Everything else is the real thing; the node is
a host sshd on loopback, lent by nodepool's static driver (the kernel jobs on
nspawn nodes are tested in tests/test_e2e.py).
"""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest
import yaml

from launcher.config import LauncherConfig
from launcher.server import LauncherServer
from nodepool_lite.launcher import NodePool
from tests.fake_patchwork import FakePatchwork
from tests.harness import FIXTURES, SshHost, run_git, wait_until
from tests.test_gerrit import Env as GerritEnv
from tests.test_patchwork import TOKEN
from tests.test_patchwork import Env as PatchworkEnv
from zuul_lite import config as zconfig
from zuul_lite.scheduler import Scheduler

JOBS = FIXTURES / "jobs-e2e"


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    host = SshHost(tmp_path_factory.mktemp("node"))
    yield host
    host.stop()


def use_real_jobs(cfg_path: Path, layout_name: str) -> zconfig.ZuulConfig:
    """The review system's test layout with one real job in check and gate."""
    data = yaml.safe_load(cfg_path.read_text())
    layout = yaml.safe_load((FIXTURES / "layouts" / layout_name).read_text())
    layout["pipelines"] = [p for p in layout["pipelines"] if p["name"] in ("check", "gate")]
    layout["projects"] = [
        {"name": "demo", "check": {"jobs": ["lint"]}, "gate": {"jobs": ["lint"]}}
    ]
    layout_path = cfg_path.parent / "layout-e2e.yaml"
    layout_path.write_text(yaml.safe_dump(layout))
    data["scheduler"] = {"layout": str(layout_path), "jobs-dir": str(JOBS)}
    cfg_path.write_text(yaml.safe_dump(data))
    return zconfig.load(cfg_path)


class RealCI:
    """The nodepool launcher (static driver, one host) and one zuul-launcher."""

    def __init__(
        self,
        tmp: Path,
        zk_hosts: str,
        host: SshHost,
        gearman_port: int,
        label: str = "small",
        jobs_dir: Path = JOBS,
    ) -> None:
        servers, _, chroot = zk_hosts.partition("/")
        address, port = servers.split(":")
        nodepool_yaml = tmp / "nodepool.yaml"
        nodepool_yaml.write_text(
            yaml.safe_dump(
                {
                    "zookeeper-servers": [{"host": address, "port": int(port), "chroot": chroot}],
                    "state-dir": str(tmp / "nodepool"),
                    "labels": [{"name": label}],
                    "providers": [
                        {
                            "name": "static",
                            "driver": "static",
                            "pools": [
                                {
                                    "name": "main",
                                    "max-servers": 1,
                                    "nodes": [
                                        {
                                            "name": "127.0.0.1",
                                            "labels": [label],
                                            "username": getpass.getuser(),
                                            "connection-port": host.port,
                                            "host-key": host.host_key,
                                        }
                                    ],
                                }
                            ],
                        }
                    ],
                }
            )
        )
        self.nodepool = NodePool(nodepool_yaml)
        self.nodepool.start()
        self.log_root = tmp / "logs"
        config = LauncherConfig(
            zk_hosts=zk_hosts,
            gearman_server="127.0.0.1",
            gearman_port=gearman_port,
            work_root=tmp / "launcher" / "work",
            log_root=self.log_root,
            log_url="http://logs.example/logs",
            jobs_dir=jobs_dir,
            private_key=host.client_key,
            name="e2e-launcher",
            max_builds=1,
            attempts=2,
            node_timeout=120,
            connect_timeout=60,
        )
        self.launcher = LauncherServer(config)
        self.launcher.start()
        self.launcher.worker.waitForServer()

    def commits_tested(self) -> list[str]:
        """What each build found checked out on its node, oldest first."""
        found = sorted(self.log_root.rglob("commits.txt"), key=lambda p: p.stat().st_mtime)
        return [p.read_text().strip() for p in found]

    def stop(self) -> None:
        self.launcher.stop()
        self.launcher.join(30)
        self.nodepool.stop()
        self.nodepool.join()


def test_gerrit_change_is_verified_gated_and_submitted(tmp_path, zk_hosts, ssh_host) -> None:
    ssh_host.reset_home()
    env = GerritEnv(tmp_path, zk_hosts)
    env.cfg = use_real_jobs(tmp_path / "zuul.yaml", "gerrit.yaml")
    env.sched = Scheduler(env.cfg, env.zk)
    env.sched.start()
    ci = RealCI(tmp_path, zk_hosts, ssh_host, env.sched.gearman_port)
    try:
        env.fake.wait_for_streams()
        good = env.upload("good")
        (check,) = env.votes(good, 1, timeout=120)
        assert check["labels"] == {"Verified": 1}, check["message"]
        assert "- lint http://logs.example/logs/1/1/check/lint/" in check["message"]
        bad = env.upload("please fail")
        (minus,) = env.votes(bad, 1, timeout=120)
        assert minus["labels"] == {"Verified": -1}
        assert "the series asked to fail: please fail: add" in minus["message"]

        env.fake.approve(good)
        _, gate = env.votes(good, 2, timeout=120)
        assert gate["labels"] == {"Verified": 1}
        assert "Build succeeded; merged." in gate["message"]
        assert env.fake.changes[good].status == "MERGED"
        log = run_git(env.fake.repo("demo"), "log", "--format=%s", "master").split("\n")[:-1]
        assert log == ["good: add", "Initial commit"]
        assert ci.commits_tested() == ["good: add", "please fail: add", "good: add"]
    finally:
        ci.stop()
        env.stop()
        env.fake.stop()
        env.zk.disconnect()


def test_patchwork_series_gets_checks_then_is_gated_and_accepted(
    tmp_path, zk_hosts, ssh_host
) -> None:
    ssh_host.reset_home()
    fake = FakePatchwork().start()
    env = PatchworkEnv(tmp_path, zk_hosts, fake, TOKEN)
    env.cfg = use_real_jobs(tmp_path / "zuul.yaml", "patchwork.yaml")
    env.sched = Scheduler(env.cfg, env.zk)
    env.sched.start()
    ci = RealCI(tmp_path, zk_hosts, ssh_host, env.sched.gearman_port)
    try:
        sid = env.series(
            "two",
            [
                ("hello.c", "int main(void)\n{\n\treturn 1;\n}\n", "hello: return 1"),
                ("README", "demo project\n", "README: say more"),
            ],
        )
        env.wait_checks(sid, {"lint": "success"}, timeout=120)
        for patch in fake.series_patches(sid):
            (check,) = [c for c in fake.checks(patch) if c["state"] == "success"]
            assert check["target_url"].startswith(f"http://logs.example/logs/{sid}/1/check/lint/")
        for patch in fake.series_patches(sid):
            fake.set_state(patch, "under-review")
        wait_until(
            lambda: {fake.state_of(p) for p in fake.series_patches(sid)} == {"accepted"},
            timeout=120,
            what="patches accepted",
        )
        log = run_git(env.repo, "log", "--format=%s", "master").splitlines()
        assert log == ["README: say more", "hello: return 1", "Initial commit"]
        tested = "README: say more\nhello: return 1"
        assert ci.commits_tested() == [tested, tested]  # check, then gate
        # Each patch: pending then success, in check and then in gate.
        wait_until(
            lambda: (
                [sorted(c["state"] for c in fake.checks(p)) for p in fake.series_patches(sid)]
                == [["pending", "pending", "success", "success"]] * 2
            ),
            what="the gate's checks",
        )
    finally:
        ci.stop()
        env.sched.stop()
        env.zk.disconnect()
        fake.stop()
