"""The launcher against a real node: nodepool's own launcher boots an nspawn
container from the cached dib image (no stand-in for nodepool here); the
launcher fetches the change from the merger's git server and pushes it over
the node's ssh, where user `zuul` finds it checked out. Nothing of the host
is mounted into the node but the compiler cache.

The node image is the one tests/test_builder.py builds (once per machine and
elements/, shared through the cache): built here if it is not there yet.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from launcher.config import LauncherConfig
from launcher.server import EXECUTE, LauncherServer
from nodepool_lite.launcher import NodePool
from tests.images import ensure_node_image, node_config
from tests.nodepool_env import IMAGE, LABEL, wait_for, write_config
from tests.test_launcher_build import BuildClient, build_args, git_repo, merger_git  # noqa: F401

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="nspawn nodes need root"),
    pytest.mark.node_image("kernel-ci-debian"),
]


def test_build_on_a_real_nspawn_node(tmp_path, zk, zk_hosts, gear_server, merger_git):  # noqa: F811
    ensure_node_image(zk, node_config(tmp_path), IMAGE)
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    playbook = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Show the change", "ansible.builtin.shell":
            "cat ~/src/linux/README; id -un; git -C ~/src/linux log --oneline | wc -l; "
            "git -C ~/src/linux symbolic-ref HEAD"},
        {"name": "Leave an artifact", "ansible.builtin.shell":
            "uname -n > ~/artifacts/node.txt"},
    ]}]  # fmt: skip
    (jobs / "playbooks" / "ok.yaml").write_text(yaml.safe_dump(playbook))
    nodepool = NodePool(write_config(tmp_path, zk_hosts))
    nodepool.start()
    config = LauncherConfig(
        zk_hosts=zk_hosts, gearman_server="127.0.0.1", gearman_port=gear_server.port,
        work_root=tmp_path / "work", log_root=tmp_path / "logs", log_url="http://l/logs",
        jobs_dir=jobs, private_key=nodepool.config.state_dir / "keys" / "id_ed25519",
        name="nspawn-test", max_builds=1, attempts=1, node_timeout=120,
    )  # fmt: skip
    server = LauncherServer(config)
    server.start()
    client = BuildClient()
    client.addServer("127.0.0.1", gear_server.port)
    client.waitForServer()
    try:
        args = build_args({"git": merger_git}, {"run": ["playbooks/ok.yaml"]}, node_type=LABEL)
        result = client.wait(client.submit(EXECUTE, args), timeout=300)
        logdir = config.log_root / args["log_path"]
        output = (logdir / "job-output.txt").read_text()
        assert result["result"] == "SUCCESS", output[-3000:]
        assert "the change under test" in output and "| zuul" in output
        assert "| 2\n" in output and "| refs/heads/master\n" in output
        assert (logdir / "artifacts" / "node.txt").read_text().startswith("np-")
        assert json.loads((logdir / "job-output.json").read_text())[0]["phase"] == "setup"
        wait_for(lambda: not zk.nodes(), 60, "the used node destroyed")
    finally:
        client.shutdown()
        server.stop()
        server.join(30)
        nodepool.stop()
        nodepool.join()
