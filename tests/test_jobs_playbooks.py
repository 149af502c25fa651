"""Development harness for the kernel jobs, kept as tests.

Until nodes exist everywhere, the job playbooks run here with
`ansible-playbook -i localhost, -c local` in a scratch HOME laid out like a
node's (~/src/linux checked out at the change, ~/artifacts, ~/console,
~/deps/kernel-build/artifacts/), against the real Debian kernel tree with our
own sample series from doc/examples/patches/ applied: the kernel's make and
scripts run on this host, which is acceptable only because the patches are
ours. The compiler cache is `$ZUUL_LITE_CACHE/ccache`, kept between runs.

Marked e2e: a tinyconfig build takes 1-4 minutes (ccache warm/cold).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zuul_lite import kerneltree

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "doc" / "examples" / "patches"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
CACHE = Path(os.environ.get("ZUUL_LITE_CACHE", "/var/cache/zuul-lite"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not kerneltree.TARBALL.is_file(), reason="linux-source-6.1 missing"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]


class LocalNode:
    """A scratch HOME standing in for a node; the playbooks run on localhost."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.src = home / "src" / "linux"
        self.base_ref = ""

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=zuul", "-c", "user.email=zuul@zuul-lite.invalid", *args],
            cwd=self.src,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def checkout(self, series: str) -> None:
        """Check out master plus the sample series, and start with empty log dirs
        (the launcher hands every build a fresh node)."""
        self.git("checkout", "--quiet", "--force", "-B", series, "master")
        self.git("am", "--quiet", *map(str, sorted((PATCHES / series).glob("*.patch"))))
        self.base_ref = self.git("rev-parse", "master")
        for name in ("artifacts", "console", "deps"):
            shutil.rmtree(self.home / name, ignore_errors=True)
            (self.home / name).mkdir()

    def run(self, job: str, **job_vars) -> subprocess.CompletedProcess:
        zuul = {
            "project": "linux",
            "branch": "master",
            "base_ref": self.base_ref,
            "job": job,
            "change": 1,
            "patchset": 1,
            "pipeline": "check",
        }
        vars_file = self.home / "vars.yaml"
        vars_file.write_text(
            yaml.safe_dump(
                {
                    **job_vars,
                    "zuul": zuul,
                    "zuul_artifacts_dir": "~/artifacts",
                    "ccache_dir": str(CACHE / "ccache"),
                }
            )
        )
        env = {
            **os.environ,
            "HOME": str(self.home),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
        }
        result = subprocess.run(
            [
                str(ANSIBLE_PLAYBOOK),
                "-v",  # the output of tasks that succeed, too
                "-i",
                "localhost,",
                "-c",
                "local",
                "-e",
                f"ansible_python_interpreter={sys.executable}",
                "-e",
                f"@{vars_file}",
                str(REPO / "jobs" / "playbooks" / f"{job}.yaml"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        print(result.stdout[-20000:], result.stderr[-5000:])
        return result

    def pass_artifacts(self, job: str) -> None:
        """What the launcher does for a dependent job: copy artifacts/ to ~/deps/<job>/."""
        shutil.copytree(self.home / "artifacts", self.home / "deps" / job / "artifacts")


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> LocalNode:
    home = tmp_path_factory.mktemp("node-home")
    local = LocalNode(home)
    local.src.parent.mkdir(parents=True)
    subprocess.run(
        [
            "git",
            "clone",
            "--quiet",
            "--shared",
            str(kerneltree.ensure_kernel_repo()),
            str(local.src),
        ],
        check=True,
    )
    return local


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
    assert "Hits:" in (artifacts / "ccache-stats.txt").read_text()

    node.pass_artifacts("kernel-build")
    boot = node.run("kernel-boot-qemu")
    assert boot.returncode == 0
    console = (node.home / "console" / "serial.log").read_text(errors="replace")
    assert "ZUUL-LITE-BOOT-OK" in console
    assert "boot marker ZUUL-LITE-BOOT-OK found" in boot.stdout


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


def test_boot_fails_when_init_cannot_run(node):
    """No marker: the job fails and quotes the panic from the console."""
    node.checkout("good")
    assert node.run("kernel-build").returncode == 0
    node.pass_artifacts("kernel-build")
    boot = node.run(
        "kernel-boot-qemu", kernel_cmdline="console=ttyS0 panic=-1 rdinit=/nope init=/nope"
    )
    assert boot.returncode != 0
    assert "boot marker ZUUL-LITE-BOOT-OK not found" in boot.stdout
    assert "Kernel panic - not syncing: Requested init /nope failed" in boot.stdout


def test_boot_times_out(node):
    """A kernel that hangs (panic=0 waits forever) is killed after boot_timeout."""
    node.checkout("good")
    assert node.run("kernel-build").returncode == 0
    node.pass_artifacts("kernel-build")
    boot = node.run(
        "kernel-boot-qemu",
        boot_timeout=15,
        kernel_cmdline="console=ttyS0 panic=0 rdinit=/nope init=/nope",
    )
    assert boot.returncode != 0
    assert "TIMED OUT: no boot marker after 15 s" in boot.stdout
