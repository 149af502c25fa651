"""Kernel votes end to end: the scheduler (local inbox, check pipeline), the
nodepool launcher lending a node (static driver: a host sshd on loopback),
zuul-launcher running the real playbooks of jobs/, and the vote.

The project is a tiny tree with the stand-ins of the playbook tests: a
tools/testing/kunit/kunit.py that prints the KTAP a UML kernel would for the
tests its kunit-tests.txt lists (tests/test_kunit_playbook.py), and a
Makefile whose compiler prints a W=1 warning for each `WARN_<name>` in a .c
file (tests/test_warnings_playbook.py); the real kunit.py and W=1 build run
in tests/test_jobs_playbooks.py on the real tree. Each vote is asserted: a
series that breaks a KUnit test (-1, run twice, the test named), a test
already failing on the base commit (+1, said why), a test that fails once
and then passes on a fresh node (+1, reported flaky, counted), a series
that adds a W=1 warning (-1, the warning named) and one that only moves
lines around a warning the base has (+1).

For kernel-boot-qemu the tree's "kernel" is a few lines of assembly that
real QEMU boots (multiboot: it prints a line on the serial port and resets,
which -no-reboot turns into QEMU's exit), built by the real kernel-build and
kernel-tools configure and build tasks through a stand-in Makefile: a series
that breaks the boot of a base that boots (-1, its console quoted) and a boot
that fails on the base as well with no baseline recorded (+1, said why: the
job built and booted the base itself).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.harness import SshHost, make_series, run_git, wait_for_votes, write_config
from tests.test_kunit_playbook import KUNIT
from tests.test_review_e2e import RealCI
from tests.test_warnings_playbook import TREE as WARNINGS_TREE
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# kernel-build-warnings on the stand-in tree, whose Makefile knows no tiny-bootable.
TINY_JOBS = [
    {
        "job": {
            "name": "kernel-build-warnings-tiny",
            "node-type": "kernel-debian",
            "timeout": 600,
            "run": "playbooks/kernel-build-warnings.yaml",
            "vars": {"kernel_config": "allnoconfig"},
        }
    }
]

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
WARNINGS_LAYOUT = {
    **LAYOUT,
    "projects": [{"name": "tiny", "check": {"jobs": ["kernel-build-warnings-tiny"]}}],
}
BOOT_LAYOUT = {
    **LAYOUT,
    "projects": [{"name": "tiny", "check": {"jobs": ["kernel-build", "kernel-boot-qemu"]}}],
}
# A multiboot "kernel": prints its line to the serial port, then resets (a
# triple fault: an empty IDT).
BOOT_S = """\
.code32
.text
.globl _start
.align 4
  .long 0x1BADB002, 0, -0x1BADB002
_start:
  mov $msg, %esi
1: lodsb
  test %al, %al
  jz 2f
  mov $0x3f8, %dx
  out %al, %dx
  jmp 1b
2: lidt idt
  int $3
.data
msg: .asciz "\\r\\n{line}\\r\\n"
idt: .word 0
  .long 0
"""
BOOT_TREE = {
    ".gitignore": ".config\n*.o\n/arch/\n",
    # configure.yaml's tiny-bootable: make tinyconfig, scripts/config, make olddefconfig.
    "scripts/config": "#!/bin/sh\n",
    "Makefile": """\
.SUFFIXES:
all: arch/x86/boot/bzImage
arch/x86/boot/bzImage: boot.S
\t@mkdir -p arch/x86/boot
\tas --32 -o boot.o boot.S
\tld -m elf_i386 -Ttext=0x100000 -o $@ boot.o
%config:
\t@echo CONFIG_TINY=y > .config
""",
}


def boot_tree(line: str) -> dict[str, str]:
    return {**BOOT_TREE, "boot.S": BOOT_S.format(line=line)}


def boot_builds(ci: KernelCI) -> list[Path]:
    """The log directories of the change's kernel-boot-qemu builds."""
    return sorted((ci.tmp / "logs").glob("*/*/check/kernel-boot-qemu/*/"))


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    host = SshHost(tmp_path_factory.mktemp("node"))
    yield host
    host.stop()


class KernelCI:
    def __init__(
        self, tmp: Path, zk_hosts: str, host: SshHost, layout: dict, tree: dict[str, str]
    ) -> None:
        host.reset_home()
        path = write_config(tmp, zk_hosts)
        data = yaml.safe_load(path.read_text())
        (tmp / "layout.yaml").write_text(yaml.safe_dump(layout))
        jobs = tmp / "jobs"  # a copy of jobs/ (the launcher runs no link) and one job more
        shutil.copytree(JOBS, jobs)
        (jobs / "tiny.yaml").write_text(yaml.safe_dump(TINY_JOBS))
        data["scheduler"] = {"layout": str(tmp / "layout.yaml"), "jobs-dir": str(jobs)}
        path.write_text(yaml.safe_dump(data))
        self.cfg = zconfig.load(path)
        self.src = tmp / "tiny-src"
        self.src.mkdir()
        run_git(self.src, "init", "-q", "-b", "master")
        for name, text in {"README": "tiny\n", **tree}.items():
            (self.src / name).parent.mkdir(parents=True, exist_ok=True)
            (self.src / name).write_text(text)
            if name.startswith("scripts/"):
                (self.src / name).chmod(0o755)
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
            tmp, zk_hosts, host, self.sched.gearman_port, label="kernel-debian", jobs_dir=jobs
        )
        self.tmp = tmp

    def submit(self, name: str, tests: str, path: str = "kunit-tests.txt") -> dict:
        """A one-patch series writing `path` (the tests' list); its check vote."""
        out = make_series(self.src, self.tmp / name, [(path, tests, name)])
        number, _ = self.local.submit(out, "tiny")
        (vote,) = wait_for_votes(self.zk, number, timeout=300)
        return vote

    def stop(self) -> None:
        self.ci.stop()
        self.sched.stop()
        self.zk.disconnect()


@pytest.fixture
def kernel_ci(tmp_path, zk_hosts, ssh_host):
    made: list[KernelCI] = []

    def make(layout: dict, tree: dict[str, str]) -> KernelCI:
        made.append(KernelCI(tmp_path, zk_hosts, ssh_host, layout, tree))
        return made[-1]

    yield make
    for ci in made:
        ci.stop()


def kunit_tree(tests: str) -> dict[str, str]:
    return {"tools/testing/kunit/kunit.py": FLIPPING, "kunit-tests.txt": tests}


def test_a_series_that_breaks_a_test_gets_minus_one_naming_it(kernel_ci) -> None:
    ci = kernel_ci(LAYOUT, kunit_tree("tiny_add_test ok\ntiny_sub_test ok\n"))
    vote = ci.submit("break-add", "tiny_add_test fail\ntiny_sub_test ok\n")
    message = vote["message"]
    assert vote["value"] == -1, message
    assert "- kernel-kunit http://logs.example/logs/" in message
    assert "FAIL tiny.tiny_add_test" in message
    assert "(the first run, on another node: FAILURE http://logs.example/logs/" in message
    assert f"reproduce: sh artifacts/reproduce.sh <your clone> (base {ci.base[:12]}" in message


def test_a_test_failing_on_base_keeps_plus_one_and_says_why(kernel_ci) -> None:
    ci = kernel_ci(LAYOUT, kunit_tree("tiny_add_test ok\ntiny_old_test fail\n"))
    vote = ci.submit("add-sub", "tiny_add_test ok\ntiny_old_test fail\ntiny_sub_test ok\n")
    assert vote["value"] == 1, vote["message"]
    assert "- kernel-kunit http://logs.example/logs/" in vote["message"]
    assert f"(already failing on base {ci.base[:12]}: tiny.tiny_old_test)" in vote["message"]
    assert "flaky" not in vote["message"]


def test_a_test_that_flips_is_reported_flaky_and_plus_one(kernel_ci) -> None:
    ci = kernel_ci(LAYOUT, kunit_tree("tiny_add_test ok\n"))
    vote = ci.submit("add-flip", "tiny_add_test ok\ntiny_flip_test flip\n")
    assert vote["value"] == 1, vote["message"]
    assert "then SUCCESS on a fresh node; flaky tests: tiny.tiny_flip_test)" in vote["message"]
    [count] = ci.state.flake_counts()
    assert (count.project, count.job, count.runs, count.flips) == ("tiny", "kernel-kunit", 1, 1)
    assert count.tests == {"tiny.tiny_flip_test": 1}


def test_a_series_that_adds_a_w1_warning_gets_minus_one_naming_it(kernel_ci) -> None:
    ci = kernel_ci(WARNINGS_LAYOUT, WARNINGS_TREE)
    added = WARNINGS_TREE["kernel/b.c"].replace("return 0;", "int WARN_new;\n\treturn 0;")
    vote = ci.submit("add-warning", added, path="kernel/b.c")
    assert vote["value"] == -1, vote["message"]
    assert "- kernel-build-warnings-tiny http://logs.example/logs/" in vote["message"]
    assert (
        "kernel/b.c:3:5: warning: unused variable ‘WARN_new’ [-Wunused-variable] (in f)"
        in vote["message"]
    )
    assert "WARN_old" not in vote["message"]


def test_a_series_that_moves_a_warning_of_the_base_keeps_plus_one(kernel_ci) -> None:
    ci = kernel_ci(WARNINGS_LAYOUT, WARNINGS_TREE)
    moved = "/* three lines\n * above the old\n * warning */\n" + WARNINGS_TREE["kernel/a.c"]
    vote = ci.submit("move-warning", moved, path="kernel/a.c")
    assert vote["value"] == 1, vote["message"]
    assert "- kernel-build-warnings-tiny http://logs.example/logs/" in vote["message"]


def test_a_series_that_breaks_the_boot_of_a_booting_base_gets_minus_one(kernel_ci) -> None:
    ci = kernel_ci(BOOT_LAYOUT, boot_tree("ZUUL-LITE-BOOT-OK"))
    broken = BOOT_S.format(line="Kernel panic - not syncing: broken by the series")
    vote = ci.submit("break-boot", broken, path="boot.S")
    message = vote["message"]
    assert vote["value"] == -1, message
    assert "- kernel-build http://logs.example/logs/" in message
    assert "- kernel-boot-qemu http://logs.example/logs/" in message
    assert "ERROR: the kernel did not boot" in message
    assert "Kernel panic - not syncing: broken by the series" in message
    assert "already failing" not in message
    for build in boot_builds(ci):  # the first run and the rerun: each booted the base
        output = (build / "job-output.txt").read_text()
        assert f"base {ci.base[:12]}'s kernel, built and booted here, booted" in output
        assert "ZUUL-LITE-BOOT-OK" in (build / "console" / "serial-base.log").read_text()
        assert "broken by the series" in (build / "console" / "serial.log").read_text()
        reproduce = (build / "artifacts" / "reproduce.sh").read_text()  # the change's
        assert f"base={ci.base}\n" in reproduce and "git am" in reproduce


def test_a_boot_failing_on_base_too_keeps_plus_one_without_a_baseline(kernel_ci) -> None:
    ci = kernel_ci(BOOT_LAYOUT, boot_tree("Kernel panic - not syncing: broken on base"))
    other = BOOT_S.format(line="Kernel panic - not syncing: still broken")
    vote = ci.submit("still-broken", other, path="boot.S")
    message = vote["message"]
    assert vote["value"] == 1, message
    assert "- kernel-boot-qemu http://logs.example/logs/" in message
    assert f"(already failing on base {ci.base[:12]}: boot)" in message
    [build] = boot_builds(ci)
    assert "broken on base" in (build / "console" / "serial-base.log").read_text()
    assert (
        "built and booted here (console/serial-base.log)" in (build / "job-output.txt").read_text()
    )
