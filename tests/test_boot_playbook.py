"""kernel-boot-qemu's verdict against the base commit's boot, in seconds: no
kernel image comes from kernel-build here, so the boot fails before QEMU
starts, and the job is judged by what the post pipeline found on the base
(zuul.baseline). The boot itself is tested in tests/test_jobs_playbooks.py.
Run as the launcher runs a build (see test_checkpatch_playbook)."""

from __future__ import annotations

import json
import subprocess

from launcher.ansible import Outcome
from launcher.logs import extract_summary
from tests import test_checkpatch_playbook as playbook_harness
from tests.kernel_tools import load
from zuul_lite.baseline import Baseline, Findings

reproduce = load("reproduce")
commit, run_job = playbook_harness.commit, playbook_harness.run_job
merger, node, ssh_host = playbook_harness.merger, playbook_harness.node, playbook_harness.ssh_host


def read_results_of(tmp_path) -> list[dict]:
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def boot(tmp_path, node, merger, on_base: str | None, tree: dict | None = None, job_vars=None):
    repo, _ = merger
    base = commit(repo, "Base", {"BOOT": f"base, {on_base}\n", **(tree or {})})
    commit(repo, "The change", {"BOOT": f"changed, {on_base}\n"})
    baseline = None
    if on_base is not None:
        findings = Findings(boot=on_base)
        baseline = Baseline("tiny", base, "kernel-boot-qemu", "p1", "http://logs/p1/", findings)
    outcome, output = run_job(
        tmp_path,
        node,
        repo,
        base,
        "kernel-boot-qemu",
        job_vars or {},
        baseline and baseline.to_dict(),
    )
    found = Findings.from_json((node.home / "artifacts" / "findings.json").read_bytes())
    return outcome, output, found, base[:12]


def test_a_boot_failing_on_base_too_is_not_counted(tmp_path, node, merger):
    outcome, output, found, base = boot(tmp_path, node, merger, "failed")
    assert outcome == Outcome.OK
    assert "No kernel image from kernel-build in: ~/deps/kernel-build/artifacts/bzImage" in output
    assert f"already failing on base {base}, not counted." in output
    assert found == Findings(boot="failed", already_failing=["boot"], base=base)
    assert found.note() == f"already failing on base {base}: boot"


def test_a_boot_failure_counts_unless_the_base_fails_too(tmp_path, node, merger):
    # A kernel image QEMU cannot load: it exits at once, the console says why.
    deps = node.home / "deps" / "kernel-build" / "artifacts"
    deps.mkdir(parents=True)
    (deps / "bzImage").write_bytes(b"not a kernel\n" * 64)
    (tmp_path / "series.mbox").write_text("")
    reproduce.main(
        ["--out", str(deps / "reproduce.sh"), "--job", "kernel-build", "--base", "1a2b3c4d" * 5,
         "--series", str(tmp_path / "series.mbox"), "--config-name", "tiny-bootable",
         "--build", "make bzImage", "--toolchain", "gcc: gcc 12", "--image", "debian-0000000007"]
    )  # fmt: skip
    outcome, output, found, base = boot(tmp_path, node, merger, "ok")
    assert outcome == Outcome.FAILED
    assert f"The boot failed; base {base} booted in this job in the post pipeline." in output
    assert found == Findings(boot="failed")
    # What the vote quotes: the ERROR line and the console's last lines under it.
    summary = extract_summary(read_results_of(tmp_path))
    assert summary.splitlines() == [
        "Task 'kernel-tools : Boot the kernel under QEMU (tcg, timeout 120 s)' failed in "
        "run-0.yaml:",
        "ERROR: the kernel did not boot: QEMU exited with 1 before ZUUL-LITE-BOOT-OK; "
        "the console's last lines:",
        "    qemu: linux kernel too old to load a ram disk",
        "reproduce: sh artifacts/reproduce.sh <your clone> (base 1a2b3c4d1a2b + 0 patch(es), "
        "tiny-bootable, gcc 12, image debian-0000000007; then kernel-boot-qemu)",
    ]
    script = (node.home / "artifacts" / "reproduce.sh").read_text()
    assert "make bzImage\n" in script and "echo ZUUL-LITE-BOOT-OK\n" in script
    assert "-kernel arch/x86/boot/bzImage -initrd" in script
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    # No baseline: the job builds the base's kernel itself; this tree's build
    # outlasts boot_base_build_timeout.
    makefile = "all:\n\tsleep 60\n%config:\n\techo CONFIG_TINY=y > .config\n"
    slow = {"kernel_config": "allnoconfig", "boot_base_build_timeout": 2}
    outcome, output, found, base = boot(
        tmp_path / "again", node, merger, None, {"Makefile": makefile}, slow
    )
    assert outcome == Outcome.FAILED
    assert f"Booting base {base} here: building its kernel" in output
    assert "make did not finish within 2 s and was stopped." in output
    assert f"base {base}'s kernel could not be built here" in output
    assert found == Findings(boot="failed")
    assert (
        extract_summary(read_results_of(tmp_path / "again"))
        .splitlines()[1]
        .startswith("ERROR: the kernel did not boot: QEMU exited with 1 before ZUUL-LITE-BOOT-OK")
    )
