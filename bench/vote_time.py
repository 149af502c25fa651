"""Time to vote of one-patch series in `check`, with every real engine.

The quick start on a private state dir (as tests/test_e2e.py): ZooKeeper, the
scheduler, the nodepool builder and launcher with nspawn nodes from the node
image (tests/images.py: the kernel tree at the project's base, already built,
elements/kernel-tree-cache), a zuul-launcher and the web. The quick start's
own samples and the post build of the branch head warm everything up; then
`-n` one-patch series, each adding a small function to another C file of the
tiny-bootable kernel (so the build compiles it), are submitted one after the
other, each once the previous one has its vote.

Prints, per series and as p50/p95: submit to vote, and per job from the
build history and each build's job-output.json: queue wait (enqueue, or the
dependency's end, to the launcher taking it), node (the node request and the
fetch of the change), setup (the setup playbook: ssh, the push that moves
the node's tree to the change), run (the job's playbooks), logs (collecting
and publishing them). The ratio is to the ~45 s floor of issue 14 (incremental
build 5 s + boot 2 s + KUnit rerun 9 s + checkpatch 0.3 s + node and Ansible
overhead).

Needs root, systemd-nspawn and linux-source-6.1.

    .venv/bin/python bench/vote_time.py [-n 5] [--kunit] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ holds the node image and the e2e configs
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench._zuul_env import median, percentile  # noqa: E402
from nodepool_lite import config as npconfig  # noqa: E402
from nodepool_lite.certs import ensure_certs  # noqa: E402
from nodepool_lite.zk import ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer  # noqa: E402
from tests.images import ensure_node_image  # noqa: E402
from tests.test_e2e import write_configs  # noqa: E402
from zuul_lite import kerneltree  # noqa: E402
from zuul_lite.connections.local import LocalConnection  # noqa: E402
from zuul_lite.state import ZuulState  # noqa: E402

FLOOR = 45.0
# C files every tiny-bootable build compiles: one per series.
FILES = [
    "kernel/panic.c", "kernel/exit.c", "kernel/fork.c", "kernel/sys.c", "init/main.c",
    "kernel/signal.c", "kernel/printk/printk.c", "mm/mmap.c", "fs/open.c", "lib/string.c",
]  # fmt: skip
PHASES = ("queue", "node", "setup", "run", "logs")


def git(repo: Path, *args: str) -> str:
    # One identity: checkpatch wants the author's Signed-off-by.
    who = {"NAME": "Bench Hacker", "EMAIL": "bench@example.org"}
    env = {**os.environ, **{f"GIT_{role}_{k}": v for role in ("AUTHOR", "COMMITTER")
                            for k, v in who.items()}}  # fmt: skip
    cmd = ["git", "-C", str(repo), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout


def make_series(work: Path, count: int) -> list[Path]:
    """`count` one-patch series on the base, each adding a function to FILES[i]."""
    clone = work / "series-clone"
    git(work, "clone", "--quiet", "--shared", "--no-checkout",
        str(kerneltree.ensure_kernel_repo()), str(clone))  # fmt: skip
    git(clone, "sparse-checkout", "set", "--no-cone", *FILES)
    git(clone, "checkout", "--quiet", kerneltree.BRANCH)
    out = []
    for n in range(count):
        path = FILES[n % len(FILES)]
        git(clone, "checkout", "--quiet", "--force", "-B", f"bench-{n}", kerneltree.BRANCH)
        with open(clone / path, "a") as source:
            source.write(
                f"\nint __maybe_unused zuul_lite_bench_{n}(void)\n{{\n\treturn {n};\n}}\n"
            )
        git(clone, "commit", "--quiet", "--signoff", "--all",
            "-m", f"{path.rsplit('/', 1)[0]}: add zuul_lite_bench_{n}()",
            "-m", "A function no caller uses, for bench/vote_time.py.")  # fmt: skip
        series = work / f"series-{n}"
        git(clone, "format-patch", "--quiet", "-o", str(series), "-1")
        out.append(series)
    return out


def add_kunit(etc: Path) -> None:
    """kernel-kunit in the check pipeline of a copy of etc/layout.yaml, and
    KUnit prebuilt in the node image (DIB_KERNEL_TREE_KUNIT), as
    etc/nodepool.yaml tells an operator to do for it."""
    nodepool = yaml.safe_load((etc / "nodepool.yaml").read_text())
    for diskimage in nodepool["diskimages"]:
        diskimage["env-vars"]["DIB_KERNEL_TREE_KUNIT"] = "1"
    (etc / "nodepool.yaml").write_text(yaml.safe_dump(nodepool, sort_keys=False))
    layout = yaml.safe_load((ROOT / "etc" / "layout.yaml").read_text())
    for project in layout["projects"]:
        project["check"]["jobs"].append("kernel-kunit")
    (etc / "layout.yaml").write_text(yaml.safe_dump(layout, sort_keys=False))
    zuul = yaml.safe_load((etc / "zuul.yaml").read_text())
    zuul["scheduler"]["layout"] = str(etc / "layout.yaml")
    (etc / "zuul.yaml").write_text(yaml.safe_dump(zuul))


def wait_vote(zk: ZooKeeper, local: LocalConnection, number: int, timeout: float) -> dict:
    event = threading.Event()
    zk.watch_data(local.change_path(number), lambda data, stat: event.set())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        votes = local.get_change_data(number)["votes"]
        if votes:
            return votes[-1]
        event.wait(30)
        event.clear()
    raise SystemExit(f"bench: no vote on change {number} within {timeout:.0f} s")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def breakdown(state: Path, change: int) -> dict[str, dict[str, float]]:
    """Per job of the change's check build set: the seconds of each of PHASES."""
    db = sqlite3.connect(state / "history.sqlite")
    deadline = time.monotonic() + 60
    while True:  # the scheduler records the build set as it reports: moments apart
        rows = db.execute(
            "select id, enqueue_time from zuul_buildset where change = ? and pipeline = 'check'",
            (change,),
        ).fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    enqueue = rows[-1]
    builds = db.execute(
        "select job_name, start_time, end_time, log_path from zuul_build "
        "where buildset_id = ? and start_time is not null order by start_time",
        (enqueue[0],),
    ).fetchall()
    ends = {job: end for job, _, end, _ in builds}
    jobs = {}
    for job, start, end, log_path in builds:
        logs = state / "logs" / log_path
        playbooks = json.loads((logs / "job-output.json").read_text())
        first = playbooks[0]
        run = [p for p in playbooks if p["phase"] in ("pre", "run", "post")]
        # A dependent job waits for what it depends on; its queue starts there.
        deps = [e for j, e in ends.items() if j != job and e <= start]
        queued_from = max([enqueue[1], *deps])
        jobs[job] = {
            "queue": start - queued_from,
            "node": _ts(first["start"]) - start,
            "setup": _ts(first["end"]) - _ts(first["start"]),
            "run": sum(_ts(p["end"]) - _ts(p["start"]) for p in run),
            "logs": end - _ts(run[-1]["end"]) if run else 0.0,
        }
    return jobs


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="one-patch series, one after the other")
    parser.add_argument(
        "--kunit", action="store_true", help="kernel-kunit in check, KUnit prebuilt in the image"
    )
    parser.add_argument("--keep", action="store_true", help="keep the state dir")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-vote-time-"))
    etc, zk_port = write_configs(root)
    if args.kunit:
        add_kunit(etc)
    state = root / "state"
    certs = ensure_certs(state / "tls")
    zkserver = ZooKeeperServer(state / "zk", port=zk_port, tls=certs)
    zkserver.start()
    zk = ZooKeeper(zkserver.hosts, tls=certs.identity("cli"))
    zk.connect()
    cmd = [str(Path(sys.executable).parent / "zuul-lite"), "-c", str(etc / "zuul.yaml")]
    try:
        start = time.monotonic()
        build = ensure_node_image(zk, npconfig.load(etc / "nodepool.yaml"))
        print(f"node image {build.path}: {time.monotonic() - start:.0f} s "
              f"(load {loadavg()})", flush=True)  # fmt: skip
        start = time.monotonic()
        subprocess.run([*cmd, "quickstart"], check=True, capture_output=True, timeout=3600)
        print(f"warm-up (quick start: post build, the three samples): "
              f"{time.monotonic() - start:.0f} s (load {loadavg()})", flush=True)  # fmt: skip
        local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), state)
        times, per_job = [], []
        for series in make_series(root, args.n):
            submitted = time.time()
            number, _ = local.submit(series, "linux")
            vote = wait_vote(zk, local, number, 3600)
            times.append(vote["time"] - submitted)
            jobs = breakdown(state, number)
            per_job.append(jobs)
            shown = ", ".join(f"{job} {sum(p.values()):.0f}s" for job, p in sorted(jobs.items()))
            print(f"change {number}: Verified {vote['value']} in {times[-1]:.1f} s ({shown}); "
                  f"load {loadavg()}", flush=True)  # fmt: skip
        print()
        print(f"time to vote, {len(times)} one-patch series: p50 {median(times):.1f} s, "
              f"p95 {percentile(times, 95):.1f} s, ratio p50/floor({FLOOR:.0f} s) "
              f"{median(times) / FLOOR:.2f}")  # fmt: skip
        print(f"{'job (p50 s)':24}" + "".join(f"{p:>8}" for p in PHASES) + f"{'total':>8}")
        for job in sorted({j for jobs in per_job for j in jobs}):
            rows = [jobs[job] for jobs in per_job if job in jobs]
            cells = [median([r[p] for r in rows]) for p in PHASES]
            total = median([sum(r.values()) for r in rows])
            print(f"{job:24}" + "".join(f"{c:8.1f}" for c in cells) + f"{total:8.1f}")
        print(f"load average at the end: {loadavg()}")
    finally:
        zk.disconnect()
        subprocess.run([*cmd, "quickstart", "--stop"], capture_output=True, timeout=300)
        zkserver.stop()
        if args.keep:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
