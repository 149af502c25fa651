"""jobs/jobs.yaml loads with the layout's own parser and every playbook is
plain, syntactically valid Ansible that uses only ansible.builtin modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zuul_lite.layout import load_jobs, load_layout

ROOT = Path(__file__).resolve().parents[1]
JOBS_DIR = ROOT / "jobs"
PLAYBOOKS = sorted((JOBS_DIR / "playbooks").glob("*.yaml"))
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

# Task keywords that are not module names.
TASK_KEYWORDS = {
    "name",
    "when",
    "loop",
    "register",
    "changed_when",
    "failed_when",
    "environment",
    "vars",
    "block",
    "always",
    "rescue",
    "ignore_errors",
    "no_log",
    "tags",
    "args",
}


def test_jobs_load_with_the_layout_parser():
    jobs = load_jobs(JOBS_DIR)
    assert jobs.pop("noop").node_type is None  # Zuul's built-in: no node
    assert set(jobs) == {
        "kernel-checkpatch",
        "kernel-build",
        "kernel-build-defconfig",
        "kernel-build-arm64",
        "kernel-build-warnings",
        "kernel-build-trusted",
        "kernel-kunit",
        "kernel-kselftest",
        "kernel-boot-qemu",
    }
    assert jobs["kernel-boot-qemu"].dependencies == ["kernel-build"]
    # A boot may fail for a reason of the node (TCG under load): it is run
    # once more before it counts. A checkpatch or build failure is the change's.
    assert [name for name, job in jobs.items() if job.rerun_on_failure] == [
        "kernel-boot-qemu",
        "kernel-kunit",
        "kernel-kselftest",
    ]
    assert jobs["kernel-kselftest"].dependencies == ["kernel-build"]
    # checkpatch reads the series' commits, not its tree: no checkout of the change.
    assert [name for name, job in jobs.items() if not job.checkout] == ["kernel-checkpatch"]
    assert jobs["kernel-build"].vars == {"kernel_config": "tiny-bootable"}
    # The post pipeline's build: the same build of a merged tree, on the node
    # type whose compiler cache is writable.
    trusted = jobs.pop("kernel-build-trusted")
    assert trusted.trusted and trusted.node_type == "kernel-debian-trusted"
    assert (trusted.run, trusted.vars) == (jobs["kernel-build"].run, jobs["kernel-build"].vars)
    # kernel-build's matrix: the same playbook, other variables.
    assert {
        name: (job.run, job.vars)
        for name in ("kernel-build-defconfig", "kernel-build-arm64")
        for job in [jobs.pop(name)]
    } == {
        "kernel-build-defconfig": (
            ["playbooks/kernel-build.yaml"],
            {"kernel_config": "defconfig"},
        ),
        "kernel-build-arm64": (
            ["playbooks/kernel-build.yaml"],
            {"kernel_arch": "arm64", "kernel_config": "defconfig"},
        ),
    }
    for job in jobs.values():
        assert job.node_type == "kernel-debian" and not job.trusted
        assert job.run == [f"playbooks/{job.name}.yaml"]
        assert job.description
    assert trusted.description


def test_layout_runs_trusted_jobs_only_in_post():
    layout = load_layout(ROOT / "etc" / "layout.yaml", JOBS_DIR, {"local"})
    assert {name: p.trusted for name, p in layout.pipelines.items()} == {
        "check": False,
        "gate": False,
        "post": True,
    }
    assert [j.name for j in layout.jobs_for("linux", "post")] == ["kernel-build-trusted"]
    for pipeline in ("check", "gate"):
        assert not any(j.trusted for j in layout.jobs_for("linux", pipeline))


def test_every_playbook_is_used_by_a_job():
    used = {p for job in load_jobs(JOBS_DIR).values() for p in job.run}
    assert {f"playbooks/{p.name}" for p in PLAYBOOKS} == used


def _tasks(tasks: list[dict]):
    for task in tasks:
        yield task
        for section in ("block", "always", "rescue"):
            yield from _tasks(task.get(section, []))


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_uses_only_builtin_modules(playbook):
    for play in yaml.safe_load(playbook.read_text()):
        assert play["gather_facts"] is False  # nodes answer faster without
        for task in _tasks(play["tasks"]):
            assert task.get("name"), f"unnamed task in {playbook.name}: {task}"
            modules = set(task) - TASK_KEYWORDS
            if "block" not in task:
                assert len(modules) == 1, task
                assert next(iter(modules)).startswith("ansible.builtin."), task


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_syntax(playbook, tmp_path):
    result = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "-i", "localhost,", str(playbook)],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
