"""End to end: the quick start on a private state dir, with every real engine.

ZooKeeper, the scheduler with its gear server, the nodepool builder and
launcher, a zuul-launcher and the web server run as the daemons the README
starts; nodes are systemd-nspawn containers from the diskimage-builder image;
the kernel is Debian's linux-source-6.1, built and booted under QEMU (TCG) for
the three sample series.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

from nodepool_lite import config as npconfig
from nodepool_lite.certs import ensure_certs
from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import ZooKeeperServer, free_port
from tests.images import ensure_node_image
from zuul_lite.state import ZuulState

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.node_image("kernel-ci-debian"),
]


def write_configs(root: Path) -> tuple[Path, int]:
    state = root / "state"
    zk_port, web_port = free_port(), free_port()
    etc = root / "etc"
    etc.mkdir()
    zuul = yaml.safe_load(
        (REPO / "etc" / "zuul.yaml").read_text().replace("/var/lib/zuul-lite", str(state))
    )
    zuul["state-dir"] = str(state)
    zuul["zookeeper"]["hosts"] = f"127.0.0.1:{zk_port}"
    zuul["gearman"]["port"] = free_port()
    zuul["merger"]["git-port"] = free_port()
    zuul["scheduler"] = {
        "layout": str(REPO / "etc" / "layout.yaml"),
        "jobs-dir": str(REPO / "jobs"),
    }
    zuul["web"] = {"listen": "127.0.0.1", "port": web_port, "url": f"http://127.0.0.1:{web_port}"}
    zuul["launcher"].update(
        {
            "log-root": str(state / "logs"),
            "log-url": f"http://127.0.0.1:{web_port}/logs",
            "jobs-dir": str(REPO / "jobs"),
            "private-key": str(state / "keys" / "id_ed25519"),
            "metrics": {"listen": "127.0.0.1", "port": free_port()},
        }
    )
    (etc / "zuul.yaml").write_text(yaml.safe_dump(zuul))
    text = (REPO / "etc" / "nodepool.yaml").read_text()
    # One compiler cache per machine for every e2e run: a warm cache turns the
    # kernel builds from minutes into seconds.
    ccache = Path(os.environ.get("ZUUL_LITE_CACHE", "/var/cache/zuul-lite")) / "ccache-nodes"
    text = text.replace("/var/lib/zuul-lite/ccache", str(ccache))
    text = text.replace("/var/lib/zuul-lite", str(state)).replace("port: 2281", f"port: {zk_port}")
    text = text.replace("launcher-port: 9104", f"launcher-port: {free_port()}")
    text = text.replace("builder-port: 9105", f"builder-port: {free_port()}")
    (etc / "nodepool.yaml").write_text(text)
    return etc, zk_port


def test_quickstart_votes_on_the_samples(tmp_path):
    etc, zk_port = write_configs(tmp_path)
    state = state_dir = tmp_path / "state"
    # TLS as the README's quick start: the same CA, which the quick start reuses.
    certs = ensure_certs(state / "tls")
    zkserver = ZooKeeperServer(state / "zk", port=zk_port, tls=certs)
    zkserver.start()
    zk = ZooKeeper(zkserver.hosts, tls=certs.identity("cli"))
    zk.connect()
    # The node image is built once per machine and shared by every test run.
    ensure_node_image(zk, npconfig.load(etc / "nodepool.yaml"))
    cmd = [str(Path(sys.executable).parent / "zuul-lite"), "-c", str(etc / "zuul.yaml")]
    try:
        proc = subprocess.run(
            [*cmd, "quickstart"],
            capture_output=True,
            text=True,
            timeout=3000,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        print(proc.stdout)
        print(proc.stderr, file=sys.stderr)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
        changes = {}
        state = ZuulState(zk)
        for n in zk.get_children(state.local_path("changes")):
            change = state.get(state.local_path("changes", n))
            changes[change["number"]] = change
        assert len(changes) == 3
        good, broken, style = (changes[n]["votes"][-1] for n in sorted(changes))
        assert good["value"] == 1, good["message"]
        assert "kernel-boot-qemu" in good["message"]
        assert broken["value"] == -1
        assert "kernel-build" in broken["message"] and "error:" in broken["message"]
        assert "- kernel-boot-qemu : SKIPPED" in broken["message"]
        assert style["value"] == -1
        lines = {ln.split()[1]: ln for ln in style["message"].splitlines() if ln.startswith("- ")}
        assert ": FAILURE" in lines["kernel-checkpatch"]
        assert ": SUCCESS" in lines["kernel-build"] and ": SUCCESS" in lines["kernel-boot-qemu"]
        assert "ERROR:" in style["message"]
        assert "Verified +1" in out and "Verified -1" in out
        # Every log URL in a vote opens, _ansible/ included.
        for ln in good["message"].splitlines():
            if ln.startswith("- ") and "http" in ln:
                url = ln.split()[2]
                with urllib.request.urlopen(url + "job-output.txt") as r:
                    assert b"| " in r.read()
                with urllib.request.urlopen(url + "_ansible/inventory.yaml") as r:
                    assert r.status == 200
        boot = next(
            ln.split()[2]
            for ln in good["message"].splitlines()
            if ln.startswith("- kernel-boot-qemu")
        )
        with urllib.request.urlopen(boot + "console/serial.log") as r:
            assert b"ZUUL-LITE-BOOT-OK" in r.read()
        # The post pipeline's trusted build of the branch head may write the
        # shared compiler cache; the patch's build only reads it.
        [post_stats] = (state_dir / "logs").glob(
            "*/*/post/kernel-build-trusted/*/artifacts/ccache-stats.txt"
        )
        assert "(shared cache writable)" in post_stats.read_text().splitlines()[0]
        build = next(
            ln.split()[2] for ln in good["message"].splitlines() if ln.startswith("- kernel-build")
        )
        with urllib.request.urlopen(build + "artifacts/ccache-stats.txt") as r:
            first = r.read().decode().splitlines()[0]
        print(first)
        assert first.endswith("(shared cache read-only)"), first
        # The node image holds the branch head built (kernel-tree-cache): the
        # push moved that checkout to the series and make compiled what the
        # two patches touch (and the boot code that embeds the kernel's
        # size), not the ~700 objects of a full build.
        with urllib.request.urlopen(build + "job-output.txt") as r:
            assert "checkout kept: src/linux at " in r.read().decode()
        with urllib.request.urlopen(build + "artifacts/build.log") as r:
            compiled = [
                ln.split()[1] for ln in r.read().decode().splitlines() if ln.split()[:1] == ["CC"]
            ]
        assert "kernel/panic.o" in compiled and len(compiled) < 10, compiled
        # Every node was used once and destroyed.
        gone = threading.Event()
        zk.watch_children("/nodepool/nodes", lambda c: gone.set() if not c else None)
        assert gone.wait(120), zk.get_children("/nodepool/nodes")
    finally:
        zk.disconnect()
        subprocess.run([*cmd, "quickstart", "--stop"], timeout=120)
        zkserver.stop()
