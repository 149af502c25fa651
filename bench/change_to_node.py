"""Getting the change under test onto a fresh nspawn node, for the full linux tree.

Now: the scheduler's git server (zuul_lite.gitserver) serves the merger's
repository, the launcher fetches the change into its cache (launcher.gitcache)
and pushes it over the node's ssh; the node checks it out as the push lands
(launcher.playbooks.RECEIVE_PACK). The peer is how it was before: the node
cloned `--shared` from a read-only bind mount of the merger's workspace,
fetched the change and checked it out. Both run the git commands of the setup
playbook over plain ssh (ansible's own overhead is the same for both).

Each way runs `-n` times on a fresh node, alternating; prints each time, the
medians and their ratio, and the launcher's fetches: the first of the project
(cold cache, once per launcher) and the next change's (warm).

Needs root, the cached node image (tests/images.py) and linux-source-6.1.

    .venv/bin/python bench/change_to_node.py [-n 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ holds the node image and nodepool helpers
    sys.path.insert(0, str(ROOT))

from launcher.gitcache import GitCache  # noqa: E402
from launcher.nodes import NodeRequester  # noqa: E402
from launcher.playbooks import RECEIVE_PACK, NodeAddress, known_hosts_lines  # noqa: E402
from nodepool_lite.launcher import NodePool  # noqa: E402
from nodepool_lite.zk import ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer, free_port  # noqa: E402
from tests.nodepool_env import LABEL, register_node_image, wait_for, write_config  # noqa: E402
from zuul_lite import kerneltree  # noqa: E402
from zuul_lite.build_contract import BuildRequest  # noqa: E402
from zuul_lite.gitserver import GitServer  # noqa: E402


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **kerneltree.COMMIT_ENV}
    cmd = ["git", "-C", str(repo), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip()


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.monotonic() - start


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.merger = root / "merger"
        self.zk_server = ZooKeeperServer(root / "zk", port=free_port(), force_sync=False)
        self.zk_server.start()
        self.zk = ZooKeeper(self.zk_server.hosts)
        self.zk.connect()
        register_node_image(self.zk)
        # The bind mount is the peer's (the old default); the new way ignores it.
        hosts = self.zk_server.hosts
        self.pool = NodePool(write_config(root, hosts, max_servers=1, bind_ro=[str(self.merger)]))
        self.pool.start()
        self.key = self.pool.config.state_dir / "keys" / "id_ed25519"
        self.git_server: GitServer | None = None

    def make_merger(self) -> list[str]:
        """The merger's clone of the kernel tree and two changes on it (empty
        commits: what moves is the tree and its history, as for any change)."""
        repo = self.merger / "linux"
        tree = str(kerneltree.ensure_kernel_repo())
        git(self.root, "clone", "--quiet", "--no-checkout", tree, str(repo))
        refs = []
        for n in (1, 2):
            sha = git(repo, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", f"change {n}")
            refs.append(f"refs/zuul/check/{n}/1/bench")
            git(repo, "update-ref", refs[-1], sha)
        return refs

    def serve(self) -> str:
        self.git_server = GitServer(self.merger, "127.0.0.1", free_port())
        self.git_server.start()
        return f"git://{self.git_server.address}/linux"

    def on_fresh_node(self, run) -> float:
        """`run(address, ssh command)` against a node of its own; its seconds."""
        requester = NodeRequester(self.zk, "bench")
        node = requester.request(LABEL, 300)
        try:
            address = NodeAddress.of(node)
            known = self.root / f"known_hosts-{node.id}"
            known.write_text("".join(line + "\n" for line in known_hosts_lines(address)))
            ssh = ["ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                   "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                   "-o", "BatchMode=yes"]  # fmt: skip
            return run(address, ssh)
        finally:
            requester.release(node)
            wait_for(lambda: not self.zk.nodes(), 120, "the node destroyed")

    def close(self) -> None:
        if self.git_server is not None:
            self.git_server.stop()
        self.pool.stop()
        self.pool.join()
        self.zk.disconnect()
        self.zk_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="runs of each way")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-change-to-node-"))
    bench = Bench(root)
    try:
        refs = bench.make_merger()
        url = bench.serve()
        cache = GitCache(root / "launcher-git", 3600)
        fetched = []
        for ref in refs:
            request = BuildRequest(
                uuid="b", job="j", node_type=LABEL, log_path="l", project="linux",
                branch="master", git_url=url, git_ref=ref,
            )  # fmt: skip
            start = time.monotonic()
            change = cache.fetch(request)
            fetched.append(time.monotonic() - start)
        workspace = bench.merger / "linux"

        def login(node: NodeAddress, ssh: list[str]) -> list[str]:
            return [*ssh, "-p", str(node.port), f"{node.username}@{node.host}"]

        def check(target: list[str]) -> None:
            head = subprocess.run(
                [*target, "git -C src/linux rev-parse HEAD"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            assert head == change.sha, (head, change.sha)

        def now(node: NodeAddress, ssh: list[str]) -> float:
            """The setup playbook's two steps: git init on the node, push from the cache."""
            target = login(node, ssh)
            push = ["git", "-C", str(change.repo), "push", "--quiet",
                    f"--receive-pack={RECEIVE_PACK}",
                    f"ssh://{node.username}@{node.host}:{node.port}/~/src/linux",
                    f"{change.sha}:refs/heads/master"]  # fmt: skip
            spent = timed([*target, "git init -q --initial-branch master src/linux"])
            spent += timed(push, env={**os.environ, "GIT_SSH_COMMAND": shlex.join(ssh)})
            check(target)
            return spent

        def before(node: NodeAddress, ssh: list[str]) -> float:
            """The old setup playbook's steps, from the bind-mounted workspace."""
            target = login(node, ssh)
            spent = timed([*target, (
                f"set -e; git config --global --replace-all safe.directory {workspace}; "
                f"git clone -q --shared --no-checkout {workspace} src/linux; cd src/linux; "
                f"git fetch -q {workspace} {refs[-1]}; git checkout -q --force --detach FETCH_HEAD"
            )])  # fmt: skip
            check(target)
            return spent

        times: dict[str, list[float]] = {"now": [], "before": []}
        for _ in range(args.n):
            for name, way in (("now", now), ("before", before)):
                times[name].append(bench.on_fresh_node(way))
                print(f"{name:6}: {times[name][-1]:6.1f} s", flush=True)
        print(f"launcher fetch: first of the project {fetched[0]:.1f} s, next change "
              f"{fetched[1]:.2f} s")  # fmt: skip
        now_s, before_s = (statistics.median(times[name]) for name in ("now", "before"))
        print(
            f"change onto a fresh node, median of {args.n}: now {now_s:.1f} s, "
            f"before {before_s:.1f} s, ratio now/before {now_s / before_s:.2f}"
        )
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
