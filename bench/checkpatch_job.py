"""kernel-checkpatch on a fresh nspawn node of the test image, as the launcher runs it.

For each run: a fresh node (the image's kernel-tree-cache checkout, built),
the launcher's synthesised setup playbook (launcher.playbooks) and the job's
run playbook, by the launcher's AnsibleRunner, for the sample series
doc/examples/patches/good on the Debian tree. Prints, per run, the seconds of
the setup and run playbooks and of each of their tasks (from the zuul_json
callback's results), then the medians: where a checkpatch build's setup and
run time goes. `--checkout yes` runs the setup as for a job that checks the
change out (what kernel-checkpatch got before it had `checkout: false`).
The launcher's fetch of the change is done once, before (the launcher's
cache is warm for every build but the first of a project).

Needs root, the cached node image (tests/images.py) and linux-source-6.1.

    .venv/bin/python bench/checkpatch_job.py [-n 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ holds the node image and nodepool helpers
    sys.path.insert(0, str(ROOT))

from launcher.ansible import AnsibleRunner, Outcome, OutputLog  # noqa: E402
from launcher.config import default_ansible_playbook  # noqa: E402
from launcher.gitcache import GitCache  # noqa: E402
from launcher.jobdir import JobDir  # noqa: E402
from launcher.nodes import NodeRequester  # noqa: E402
from launcher.playbooks import NodeAddress, write_ansible_dir  # noqa: E402
from nodepool_lite.builder import cache_root  # noqa: E402
from nodepool_lite.launcher import NodePool  # noqa: E402
from nodepool_lite.zk import ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer, free_port  # noqa: E402
from tests.nodepool_env import LABEL, register_node_image, wait_for, write_config  # noqa: E402
from zuul_lite import kerneltree  # noqa: E402
from zuul_lite.build_contract import BuildRequest  # noqa: E402
from zuul_lite.layout import load_jobs  # noqa: E402

JOB = "kernel-checkpatch"
SERIES = ROOT / "doc" / "examples" / "patches" / "good"


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **kerneltree.COMMIT_ENV}
    cmd = ["git", "-C", str(repo), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip()


def task_seconds(results: Path) -> list[tuple[str, str, float]]:
    """(playbook, task, seconds) of every task the zuul_json callback recorded."""
    rows = []
    for line in results.read_text().splitlines():
        record = json.loads(line)
        for play in record.get("plays", []):
            for task in play["tasks"]:
                if "end" not in task:
                    continue
                start, end = (datetime.datetime.fromisoformat(task[k]) for k in ("start", "end"))
                rows.append((record["playbook"], task["name"], (end - start).total_seconds()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="runs, each on a fresh node")
    parser.add_argument(
        "--checkout",
        choices=("job", "yes"),
        default="job",
        help="job: as jobs.yaml says (no checkout); yes: the change checked out, for comparison",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-checkpatch-"))
    zk_server = ZooKeeperServer(root / "zk", port=free_port(), force_sync=False)
    zk_server.start()
    zk = ZooKeeper(zk_server.hosts)
    zk.connect()
    build = register_node_image(zk)
    if build.builder == "dev":
        sys.exit("No cached node image for the current elements/: build one (tests/images.py).")
    config = write_config(root, zk.hosts, max_servers=1, ccache=cache_root() / "ccache-nodes")
    pool = NodePool(config)
    pool.start()
    key = pool.config.state_dir / "keys" / "id_ed25519"
    try:
        merger = root / "merger" / "linux"
        tree = str(kerneltree.ensure_kernel_repo())
        git(root, "clone", "--quiet", "--shared", tree, str(merger))
        base = git(merger, "rev-parse", "HEAD")
        git(merger, "am", "--quiet", *map(str, sorted(SERIES.glob("*.patch"))))
        git(merger, "update-ref", "refs/zuul/master/1", "HEAD")
        request = BuildRequest(
            uuid="bench-checkpatch", job=JOB, node_type=LABEL, log_path=f"1/1/check/{JOB}/b",
            project="linux", branch="master", git_url=str(merger),
            git_ref="refs/zuul/master/1", base_ref=base, vars={"checkpatch_options": []},
            playbooks={"run": [f"playbooks/{JOB}.yaml"]}, change=1, patchset=1, pipeline="check",
        )  # fmt: skip
        if args.checkout == "job":
            request.checkout = load_jobs(ROOT / "jobs")[JOB].checkout
        change = GitCache(root / "launcher-git", 3600).fetch(request)
        phases_s: dict[str, list[float]] = defaultdict(list)
        tasks_s: dict[tuple[str, str], list[float]] = defaultdict(list)
        for number in range(args.n):
            requester = NodeRequester(zk, "bench")
            node = requester.request(LABEL, 300)
            jobdir = JobDir(root / "work", f"{request.uuid}-{number}")
            try:
                phases = write_ansible_dir(
                    jobdir, request, NodeAddress.of(node), jobs_dir=ROOT / "jobs",
                    private_key=key, connect_timeout=30, change=change, dependencies={},
                )  # fmt: skip
                output = OutputLog(root / f"job-output-{number}.txt")
                runner = AnsibleRunner(jobdir, output, default_ansible_playbook())
                try:
                    for phase in ("setup", "run"):
                        start = time.monotonic()
                        outcome = runner.run(phases[phase][0], phase, 300)
                        phases_s[phase].append(time.monotonic() - start)
                        if outcome != Outcome.OK:
                            print(output.path.read_text()[-5000:])
                            sys.exit(f"{phase} ended {outcome}")
                finally:
                    runner.close_connections()
                for playbook, task, seconds in task_seconds(jobdir.results):
                    tasks_s[(playbook, task)].append(seconds)
                print(
                    f"run {number + 1}: setup {phases_s['setup'][-1]:.1f} s, "
                    f"run {phases_s['run'][-1]:.1f} s",
                    flush=True,
                )
            finally:
                jobdir.cleanup()
                requester.release(node)
                wait_for(lambda: not zk.nodes(), 120, "the node destroyed")
        print(f"\nmedians of {args.n} runs, seconds:")
        for phase, values in phases_s.items():
            median = statistics.median(values)
            print(f"  {phase:5} playbook (ansible-playbook wall): {median:6.2f}")
        for (playbook, task), values in tasks_s.items():
            print(f"    {playbook:12} {statistics.median(values):6.2f}  {task}")
        total = statistics.median(
            a + b for a, b in zip(phases_s["setup"], phases_s["run"], strict=True)
        )
        print(f"  setup + run: {total:.2f}")
    finally:
        pool.stop()
        pool.join()
        zk.disconnect()
        zk_server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
