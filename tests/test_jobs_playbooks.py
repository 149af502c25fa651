"""The kernel job playbooks on a real node, against the real kernel tree.

A nodepool launcher boots one node of the untrusted label from the test image
(tests/images.py); the playbooks run there with `ansible-playbook` over the
node's ssh, as the launcher runs them, on Debian's kernel tree with our sample
series from doc/examples/patches/ applied: the kernel's make and scripts run
only in the node. The series are applied in a clone on this host (git alone)
and pushed to the node before each playbook, as the launcher pushes a change
(checked out or not, as the job's `checkout` says).
The node reads the machine's shared compiler cache (the one test_e2e's post
build fills), read-only as every untrusted build does; the test reads what the
playbooks leave through the node's root on this host.

Marked e2e: a tinyconfig build takes 1-4 minutes (ccache warm/cold).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from launcher.playbooks import CHANGE_REF, RECEIVE_PACK
from nodepool_lite import config as npconfig
from nodepool_lite.builder import cache_root
from nodepool_lite.launcher import NodePool
from nodepool_lite.model import Node
from nodepool_lite.zk import ZooKeeper
from tests.images import ensure_node_image
from tests.nodepool_env import LABEL, release, request, take_nodes, wait_for, write_config
from zuul_lite import kerneltree
from zuul_lite.layout import load_jobs

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "doc" / "examples" / "patches"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
JOBS = load_jobs(REPO / "jobs")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.node_image("kernel-ci-debian"),
    pytest.mark.skipif(not kerneltree.TARBALL.is_file(), reason="linux-source-6.1 missing"),
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="no systemd-nspawn"),
]


class KernelNode:
    """One node for the module's tests: `src` is this host's clone where tests
    make commits; `run` pushes its HEAD to the node and runs a playbook there;
    `home` is the node's home as this host sees it (for reading results)."""

    def __init__(self, node: Node, root: Path, key: Path, work: Path) -> None:
        self.node = node
        self.key = key
        self.work = work
        self.src = work / "linux"
        self.base_ref = ""
        self.saved_builds: set[str] = set()
        self.known_hosts = work / "known_hosts"
        self.known_hosts.write_text(
            "".join(f"[127.0.0.1]:{node.connection_port} {k}\n" for k in node.host_keys)
        )
        self.ssh_opts = [
            "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        ]  # fmt: skip
        self.home = root / self.ssh("printenv HOME").strip().lstrip("/")

    def ssh(self, command: str) -> str:
        return subprocess.run(
            ["ssh", *self.ssh_opts, "-p", str(self.node.connection_port), "zuul@127.0.0.1",
             command],
            check=True, capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=zuul", "-c", "user.email=zuul@zuul-lite.invalid", *args],
            cwd=self.src,
            check=True,
            capture_output=True,
            text=True,
            # One series applied twice gives the same commits (see built()).
            env={**os.environ, "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"},
        ).stdout.strip()

    def checkout(self, series: str) -> None:
        """Master plus the sample series, and empty log dirs on the node (the
        launcher hands every build a fresh node)."""
        self.git("checkout", "--quiet", "--force", "-B", series, "master")
        self.git("am", "--quiet", *map(str, sorted((PATCHES / series).glob("*.patch"))))
        self.base_ref = self.git("rev-parse", "master")
        self.ssh("rm -rf artifacts console deps && mkdir artifacts console deps")

    def built(self, series: str) -> None:
        """`series` checked out, and kernel-build's artifacts of it in
        ~/deps/kernel-build as a dependent job gets them. The build runs once
        per module and series: the same commits build the same kernel, and
        each boot test would otherwise spend ~25 s making it again."""
        self.checkout(series)
        saved = self._saved_build()
        if saved in self.saved_builds:
            self.ssh(f"mkdir -p deps/kernel-build && cp -a {saved} deps/kernel-build/artifacts")
        else:
            assert self.run("kernel-build").returncode == 0
            self.pass_artifacts("kernel-build")

    def _saved_build(self) -> str:
        return f"builds/{self.git('rev-parse', 'HEAD')}"

    def push(self, checkout: bool) -> None:
        """The tested commit to the node as the launcher's setup pushes it: to
        CHANGE_REF and, with `checkout`, onto the checked-out branch."""
        refspecs = ["HEAD:refs/heads/master"] if checkout else []
        subprocess.run(
            ["git", "-C", str(self.src), "push", "--quiet", "--force",
             f"--receive-pack={RECEIVE_PACK if checkout else 'git receive-pack'}",
             f"ssh://zuul@127.0.0.1:{self.node.connection_port}/~/src/linux",
             *refspecs, f"HEAD:{CHANGE_REF}"],
            check=True, capture_output=True, text=True, timeout=600,
            env={"GIT_SSH_COMMAND": shlex.join(["ssh", *self.ssh_opts]), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    def run(self, job: str, **job_vars) -> subprocess.CompletedProcess:
        self.push(JOBS[job].checkout)
        zuul = {
            "project": "linux",
            "branch": "master",
            "base_ref": self.base_ref,
            "job": job,
            "change": 1,
            "patchset": 1,
            "pipeline": "check",
        }
        vars_file = self.work / "vars.yaml"
        nodepool = {"image_build": self.node.image_build or ""}
        vars_file.write_text(
            yaml.safe_dump(
                {
                    **job_vars,
                    "zuul": zuul,
                    "zuul_artifacts_dir": "~/artifacts",
                    "nodepool": nodepool,
                }
            )
        )
        inventory = self.work / "inventory.yaml"
        host = {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.node.connection_port,
            "ansible_user": "zuul",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts}",
        }
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {"node": host}}}))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_PIPELINING": "True",
        }
        result = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-v", "-i", str(inventory), "-e", f"@{vars_file}",
             str(REPO / "jobs" / "playbooks" / f"{job}.yaml")],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        print(result.stdout[-20000:], result.stderr[-5000:])
        return result

    def pass_artifacts(self, job: str) -> None:
        """What the launcher does for a dependent job: copy artifacts/ to
        ~/deps/<job>/. A kernel-build's are also kept for built()."""
        self.ssh(f"rm -rf deps/{job} && mkdir -p deps/{job} && cp -a artifacts deps/{job}/")
        if job == "kernel-build":
            saved = self._saved_build()
            self.ssh(f"mkdir -p builds && rm -rf {saved} && cp -a artifacts {saved}")
            self.saved_builds.add(saved)


@pytest.fixture(scope="module")
def node(tmp_path_factory, zookeeper):
    work = tmp_path_factory.mktemp("kernel-node")
    zk = ZooKeeper(f"{zookeeper.hosts}/test-{uuid.uuid4().hex[:12]}")
    zk.connect()
    config = write_config(
        work, zk.hosts, max_servers=1, labels=(LABEL,), ccache=cache_root() / "ccache-nodes"
    )
    ensure_node_image(zk, npconfig.load(config))
    pool = NodePool(config)
    pool.start()
    nodes: list[Node] = []
    try:
        req, done, _ = request(zk, LABEL)
        assert done.wait(120), zk.get_node_request(req.id)
        nodes = take_nodes(zk, req)
        root = pool.config.state_dir / "nodes" / nodes[0].id / "root"
        kernel = KernelNode(nodes[0], root, pool.config.state_dir / "keys" / "id_ed25519", work)
        subprocess.run(
            ["git", "clone", "--quiet", "--shared", str(kerneltree.ensure_kernel_repo()),
             str(kernel.src)],
            check=True,
        )  # fmt: skip
        kernel.ssh("mkdir -p src && git init --quiet --initial-branch=master src/linux")
        yield kernel
    finally:
        release(zk, nodes)
        wait_for(lambda: not zk.nodes(), 60, "the node destroyed")
        pool.stop()
        pool.join()
        zk.disconnect()


def test_checkpatch_passes_good_series(node):
    node.checkout("good")
    result = node.run("kernel-checkpatch")
    assert result.returncode == 0
    assert "0001-panic-fix-a-typo-in-a-comment: ok (total: 0 errors, 0 warnings" in result.stdout
    reports = sorted(p.name for p in (node.home / "artifacts" / "checkpatch").glob("*.txt"))
    assert reports == [
        "0001-panic-fix-a-typo-in-a-comment.txt",
        "0002-exit-fix-a-typo-in-a-comment.txt",
        "summary.txt",
    ]
    # No checkout of the change: checkpatch ran in the tree at the base commit.
    heads = node.ssh(f"git -C src/linux rev-parse HEAD {CHANGE_REF}").split()
    assert heads == [node.base_ref, node.git("rev-parse", "HEAD")]


def test_checkpatch_fails_with_the_error_lines(node):
    node.checkout("checkpatch-failure")
    result = node.run("kernel-checkpatch")
    assert result.returncode != 0
    assert "FAILED (total: 3 errors, 2 warnings" in result.stdout
    assert "ERROR: trailing whitespace" in result.stdout
    assert "ERROR: code indent should use tabs where possible" in result.stdout


def test_checkpatch_is_the_base_trees(node):
    """A patch that makes the tree's scripts/checkpatch.pl pass everything does not
    change the verdict: the base tree's checkpatch.pl checks the series."""
    node.checkout("checkpatch-failure")
    (node.src / "scripts" / "checkpatch.pl").write_text(
        '#!/usr/bin/perl\nprint "total: 0 errors, 0 warnings, 1 lines checked\\n";\n'
    )
    node.git("commit", "--quiet", "--all", "--signoff", "-m", "checkpatch: pass everything")
    result = node.run("kernel-checkpatch")
    assert result.returncode != 0
    assert "0001-init-calibrate-add-spaces-after-commas-in-lpj_setup: FAILED" in result.stdout
    assert "FAILED (total: 3 errors, 2 warnings" in result.stdout
    assert "ERROR: trailing whitespace" in result.stdout


@pytest.mark.parametrize("series", ["good", "checkpatch-failure"])
def test_build_and_boot(node, series):
    node.checkout(series)
    build = node.run("kernel-build")
    assert build.returncode == 0
    artifacts = node.home / "artifacts"
    assert 500_000 < (artifacts / "bzImage").stat().st_size < 2_000_000
    assert "CONFIG_SERIAL_8250_CONSOLE=y" in (artifacts / ".config").read_text()
    assert "Kernel: arch/x86/boot/bzImage is ready" in (artifacts / "build.log").read_text()
    stats = (artifacts / "ccache-stats.txt").read_text()
    # An untrusted node: it reads the shared cache and cannot write it.
    assert stats.startswith("compiler cache hits: ") and "(shared cache read-only)" in stats
    assert "Hits:" in stats

    node.pass_artifacts("kernel-build")
    boot = node.run("kernel-boot-qemu")
    assert boot.returncode == 0
    console = (node.home / "console" / "serial.log").read_text(errors="replace")
    assert "ZUUL-LITE-BOOT-OK" in console
    assert "boot marker ZUUL-LITE-BOOT-OK found" in boot.stdout


def test_kselftest_runs_in_the_guest(node):
    """The size target, built on the node, runs in the QEMU guest; its KTAP
    comes back from the serial console as per-test results."""
    node.built("good")
    result = node.run("kernel-kselftest")
    assert result.returncode == 0
    artifacts = node.home / "artifacts"
    ktap = (artifacts / "ktap" / "kselftest.ktap").read_text()
    assert "ok 1 selftests: size: get_size" in ktap
    suite = ET.parse(artifacts / "junit.xml").getroot().find("testsuite")
    assert suite.get("name") == "selftests: size: get_size"
    assert suite.find("testcase").get("name") == "get runtime memory use"
    assert "1 tests: 1 pass, 0 fail" in result.stdout
    tests = json.loads((artifacts / "findings.json").read_text())["tests"]
    assert list(tests.values()) == ["PASS"], tests  # what flakes and baselines read
    # reproduce.sh: kernel-build's, then the target into the initramfs and the boot.
    reproduce = (artifacts / "reproduce.sh").read_text()
    build = (node.home / "deps/kernel-build/artifacts/reproduce.sh").read_text()
    assert reproduce.splitlines()[:2] == build.splitlines()[:2]
    assert (
        reproduce.splitlines()[2]
        == "# ... then kernel-kselftest, as the CI node ran it (at the end)."
    )
    assert build.split("# The build.")[1].strip() in reproduce
    assert "make -C tools/testing/selftests TARGETS=size" in reproduce
    assert 'INSTALL_PATH="$boot/initramfs/kselftest"' in reproduce
    assert "/kselftest/run_kselftest.sh" in reproduce
    assert subprocess.run(["sh", "-n", str(artifacts / "reproduce.sh")]).returncode == 0


def test_build_failure_shows_the_compiler_error(node):
    node.checkout("build-failure")
    result = node.run("kernel-build")
    assert result.returncode != 0
    # LANG=C.UTF-8 (pinned by the playbook): gcc quotes with ‘’.
    error = "kernel/panic.c:407:58: error: ‘panic_timout’ undeclared"
    assert error in result.stdout
    assert error in (node.home / "artifacts" / "build.log").read_text()
    assert (node.home / "artifacts" / ".config").is_file()
    assert (node.home / "artifacts" / "ccache-stats.txt").is_file()
    # What reproduces it: the line at the end of the failure, the script in the logs.
    assert f"reproduce: sh artifacts/reproduce.sh <your clone> (base {node.base_ref[:12]} + " in (
        result.stdout
    )
    reproduce = (node.home / "artifacts" / "reproduce.sh").read_text()
    assert 'make -j"$(nproc)" ARCH=x86_64\n' in reproduce
    assert "panic: use a proper ellipsis in the reboot message" in reproduce


def test_boot_fails_when_init_cannot_run(node):
    """No marker: the job quotes the panic from the console. No baseline is
    recorded, so the job builds the base's kernel in the node's prebuilt tree
    (incremental) and boots it the same way: the base panics too, so the job
    passes, already failing on base."""
    node.built("good")
    boot = node.run(
        "kernel-boot-qemu", kernel_cmdline="console=ttyS0 panic=-1 rdinit=/nope init=/nope"
    )
    assert "boot marker ZUUL-LITE-BOOT-OK not found" in boot.stdout
    assert "Kernel panic - not syncing: Requested init /nope failed" in boot.stdout
    assert boot.returncode == 0, boot.stdout
    base = node.base_ref[:12]
    assert f"(console/serial-base.log): already failing on base {base}" in boot.stdout
    console = (node.home / "console" / "serial-base.log").read_text(errors="replace")
    assert "Requested init /nope failed" in console
    assert (node.home / "artifacts" / "base" / ".config").is_file()


def test_boot_times_out(node):
    """A kernel that hangs (panic=0 waits forever) is killed after boot_timeout.
    (boot_base off: the base would hang the same way, another 15 s.)"""
    node.built("good")
    boot = node.run(
        "kernel-boot-qemu",
        boot_timeout=15,
        boot_base=False,
        kernel_cmdline="console=ttyS0 panic=0 rdinit=/nope init=/nope",
    )
    assert boot.returncode != 0
    assert "TIMED OUT: no boot marker after 15 s" in boot.stdout


# W=1 warnings for tests/test_jobs_playbooks: one the base already has (a
# function without a prototype), one the series adds (a variable set but
# never used, inside a function).
OLD_WARNING = "\nvoid zuul_w1_old(void)\n{\n}\n"
NEW_WARNING = (
    "\nint zuul_w1_new(int a);\nint zuul_w1_new(int a)\n{\n"
    "\tint unused;\n\n\tunused = a;\n\treturn 0;\n}\n"
)


def test_build_warnings_counts_only_what_the_series_adds(node):
    """The base has a W=1 warning; the series moves it down (lines added above
    it) and adds one: only the new one is reported and fails the job."""
    node.git("checkout", "--quiet", "--force", "-B", "w1", "master")
    panic = node.src / "kernel" / "panic.c"
    text = panic.read_text()
    panic.write_text(text + OLD_WARNING)
    node.git("commit", "--quiet", "--all", "-m", "panic: a helper without a prototype")
    node.base_ref = node.git("rev-parse", "HEAD")
    panic.write_text(
        text
        + "\n/*\n * Three lines that move\n * the old warning.\n */\n"
        + OLD_WARNING
        + NEW_WARNING
    )
    node.git("commit", "--quiet", "--all", "-m", "panic: add zuul_w1_new")
    node.ssh("rm -rf artifacts console deps && mkdir artifacts console deps")
    result = node.run("kernel-build-warnings")
    assert result.returncode != 0
    artifacts = node.home / "artifacts"
    report = (artifacts / "warnings.txt").read_text()
    added, _, rest = report.partition("already on base")
    assert added.splitlines()[0] == (
        f"1 warning(s) added by the series, compared with base {node.base_ref[:12]}"
    )
    assert added.splitlines()[1].startswith("kernel/panic.c:")
    assert added.splitlines()[1].endswith(
        ": warning: variable ‘unused’ set but not used [-Wunused-but-set-variable]"
        " (in zuul_w1_new)"
    )
    assert "no previous prototype for ‘zuul_w1_old’" in rest
    assert "variable ‘unused’ set but not used" in result.stdout
    assert (artifacts / "warnings" / "files.txt").read_text() == "kernel/panic.c\n"
    # reproduce.sh: the base, the series as applied, the config, the W=1 make.
    reproduce = (artifacts / "reproduce.sh").read_text()
    assert f"base={node.base_ref}" in reproduce
    assert "Subject: [PATCH] panic: add zuul_w1_new" in reproduce
    assert 'make "$@" tinyconfig' in reproduce
    assert 'make -j"$(nproc)" ARCH=x86_64 CC=gcc W=1 kernel/panic.o\n' in reproduce
    assert f"node image   {node.node.image_build}" in reproduce
    assert subprocess.run(["sh", "-n", str(artifacts / "reproduce.sh")]).returncode == 0
    assert (
        f"reproduce: sh artifacts/reproduce.sh <your clone> (base {node.base_ref[:12]} + "
        "1 patch(es), tiny-bootable, gcc (" in result.stdout
    )


def test_build_jobs_refuse_bad_input_in_one_sentence(node):
    """An architecture without a compiler on the node, a config target the
    tree lacks: the job fails before building anything, saying which."""
    node.checkout("good")
    # The image has Debian's aarch64 compiler: name one it lacks.
    cross = {"x86_64": "", "arm64": "nosuch-linux-gnu-"}
    result = node.run("kernel-build", kernel_arch="arm64", kernel_cross_compile=cross)
    assert result.returncode != 0
    assert "This node has no compiler for arm64: nosuch-linux-gnu-gcc is not installed." in (
        result.stdout
    )
    result = node.run("kernel-build-warnings", kernel_config="nosuch_defconfig")
    assert result.returncode != 0
    assert (
        "The config target nosuch_defconfig does not exist in this tree for ARCH=x86_64."
        in result.stdout
    )
