"""The kernel-kunit playbook on a tiny git repository, in seconds: a stand-in
tools/testing/kunit/kunit.py prints the KTAP a UML kernel would (its tests
listed in the tree's kunit-tests.txt, so a patch can break one), and the job
turns it into per-test results, junit.xml and a vote that counts only what
the series broke: a test that fails on the base commit too is named, not
counted. Run as the launcher runs a build (see test_checkpatch_playbook)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from launcher.ansible import Outcome
from tests import test_checkpatch_playbook as playbook_harness
from zuul_lite.baseline import Baseline, Findings

# The tiny repository, the host sshd standing in for the node, and running a job.
commit, run_job, git = playbook_harness.commit, playbook_harness.run_job, playbook_harness.git
merger, node, ssh_host = playbook_harness.merger, playbook_harness.node, playbook_harness.ssh_host

KUNIT = """\
#!/usr/bin/env python3
# Stand-in for kunit.py run: the tree's kunit-tests.txt lists "test ok|fail".
import os, sys
print("kunit.py", *sys.argv[1:])
print("[00:00:00] in", os.getcwd())
print("[00:00:01] Starting KUnit Kernel (1/1)...")
tests = [line.split() for line in open("kunit-tests.txt") if line.strip()]
print("KTAP version 1")
print("1..1")
print("    KTAP version 1")
print("    # Subtest: tiny")
print(f"    1..{len(tests)}")
for n, (name, status) in enumerate(tests, 1):
    if status == "fail":
        print(f"    # {name}: EXPECTATION FAILED at lib/tiny_kunit.c:{10 + n}")
        print("    Expected tiny_add(1, 1) == 2, but")
        print(f"    not ok {n} {name}")
    else:
        print(f"    ok {n} {name}")
failed = any(status == "fail" for _, status in tests)
print(f"{'not ok' if failed else 'ok'} 1 tiny")
"""


def kunit(
    tmp_path, node, merger, base_tests: str, change: dict[str, str], on_base=None, prebuilt=False
):
    """Run kernel-kunit on a base whose tests are `base_tests` and a change
    writing `change` (with the baseline of the base saying `on_base`: test
    statuses); return the outcome, the output and the base sha. `prebuilt`:
    the node holds what an image built with DIB_KERNEL_TREE_KUNIT holds."""
    repo, _ = merger
    base = commit(
        repo,
        "Base with tests",
        {
            "tools/testing/kunit/kunit.py": KUNIT,
            "kunit-tests.txt": base_tests,
            ".gitignore": ".config\n",
        },
    )
    commit(repo, "The change", change)
    if prebuilt:
        image_tree(node.home / "src" / "tiny", repo, base)
    baseline = None
    if on_base is not None:
        findings = Findings(tests=on_base)
        baseline = Baseline("tiny", base, "kernel-kunit", "p1", "http://logs/p1/", findings)
    return (
        *run_job(
            tmp_path,
            node,
            repo,
            base,
            "kernel-kunit",
            {},
            baseline.to_dict() if baseline else None,
        ),
        base,
    )


def image_tree(tree, repo, base: str) -> None:
    """As elements/kernel-tree-cache leaves it: the branch at the base with
    an in-tree build, and a second work tree holding KUnit's build."""
    git(repo, "clone", "--quiet", "--no-hardlinks", str(repo), str(tree))
    git(tree, "checkout", "--quiet", "-B", "master", base)
    git(tree, "remote", "remove", "origin")
    (tree / ".config").write_text("CONFIG_TINY=y\n")
    (tree / ".git" / "info" / "exclude").write_text("/.kunit/\n")
    git(tree, "worktree", "add", "--quiet", "--detach", f"{tree}-kunit", "HEAD")
    Path(f"{tree}-kunit", ".kunit").mkdir()


def findings_of(node) -> Findings:
    return Findings.from_json((node.home / "artifacts" / "findings.json").read_bytes())


def test_a_patch_that_breaks_a_test_fails_naming_it(tmp_path, node, merger):
    tests = "tiny_add_test ok\ntiny_sub_test ok\n"
    broken = {"kunit-tests.txt": tests.replace("add_test ok", "add_test fail")}
    outcome, output, _ = kunit(tmp_path, node, merger, tests, broken)
    assert outcome == Outcome.FAILED
    assert "FAIL tiny.tiny_add_test\n" in output
    assert "    tiny_add_test: EXPECTATION FAILED at lib/tiny_kunit.c:11" in output
    assert "Comparing with base " in output and ": running the same tests there" in output
    assert "reproduce: sh artifacts/reproduce.sh <your clone> (base " in output
    artifacts = node.home / "artifacts"
    suite = ET.parse(artifacts / "junit.xml").getroot().find("testsuite[@name='tiny']")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    assert "EXPECTATION FAILED" in suite.find("testcase[@name='tiny_add_test']/failure").text
    log = (artifacts / "kunit" / "kunit.log").read_text()
    assert log.startswith("kunit.py run --arch=um --jobs=")
    assert "--make_options=CC=ccache gcc" in log
    assert (artifacts / "ktap" / "kunit.ktap").is_file()
    assert (artifacts / "ktap" / "kunit-base.ktap").is_file()
    reproduce = (artifacts / "reproduce.sh").read_text()
    assert "python3 tools/testing/kunit/kunit.py run --arch=um --jobs=" in reproduce
    assert "Subject: [PATCH] The change" in reproduce
    assert findings_of(node) == Findings(
        tests={"tiny.tiny_add_test": "FAIL", "tiny.tiny_sub_test": "PASS"}
    )


def test_a_test_failing_on_base_too_does_not_fail_the_job(tmp_path, node, merger):
    tests = "tiny_add_test fail\ntiny_sub_test ok\n"
    outcome, output, base = kunit(tmp_path, node, merger, tests, {"README": "tiny, documented\n"})
    assert outcome == Outcome.OK
    assert f"FAIL tiny.tiny_add_test (already failing on base {base[:12]})" in output


def test_no_ktap_means_the_tests_did_not_run(tmp_path, node, merger):
    build_error = {
        "tools/testing/kunit/kunit.py": "print('lib/tiny.c:3:1: error: expected ‘;’')\n"
    }
    outcome, output, _ = kunit(tmp_path, node, merger, "tiny_add_test ok\n", build_error)
    assert outcome == Outcome.FAILED
    assert "No KTAP output in" in output
    assert "lib/tiny.c:3:1: error: expected ‘;’" in output


def test_the_baseline_of_the_base_replaces_running_it_again(tmp_path, node, merger):
    """A failure the post pipeline saw on the base too is not counted, and
    the base is not run here; one it did not see fails the job."""
    tests = "tiny_add_test fail\ntiny_sub_test ok\n"
    on_base = {"tiny.tiny_add_test": "FAIL", "tiny.tiny_sub_test": "PASS"}
    outcome, output, base = kunit(tmp_path, node, merger, tests, {"README": "x\n"}, on_base)
    assert outcome == Outcome.OK
    assert f"Comparing with what this job found on base {base[:12]} in the post" in output
    assert f"Comparing with base {base[:12]}: running" not in output
    assert f"FAIL tiny.tiny_add_test (already failing on base {base[:12]})" in output
    assert not (node.home / "artifacts" / "ktap" / "kunit-base.ktap").exists()
    found = findings_of(node)
    assert (found.already_failing, found.base) == (["tiny.tiny_add_test"], base[:12])
    assert found.note() == f"already failing on base {base[:12]}: tiny.tiny_add_test"


def test_a_failure_the_baseline_does_not_have_fails_without_a_base_run(tmp_path, node, merger):
    tests = "tiny_add_test ok\ntiny_sub_test ok\n"
    broken = {"kunit-tests.txt": tests.replace("sub_test ok", "sub_test fail")}
    on_base = {"tiny.tiny_add_test": "PASS", "tiny.tiny_sub_test": "PASS"}
    outcome, output, base = kunit(tmp_path, node, merger, tests, broken, on_base)
    assert outcome == Outcome.FAILED
    assert "FAIL tiny.tiny_sub_test\n" in output and "already failing" not in output
    assert f"Comparing with base {base[:12]}: running" not in output
    assert findings_of(node).failed_tests() == ["tiny.tiny_sub_test"]


def test_the_images_kunit_work_tree_is_moved_to_the_change_and_run_there(tmp_path, node, merger):
    """The in-tree build stays (no mrproper), and kunit.py runs in the work
    tree holding KUnit's build, at the change, then at the base and back."""
    tests = "tiny_add_test ok\ntiny_sub_test ok\n"
    broken = {"kunit-tests.txt": tests.replace("add_test ok", "add_test fail")}
    outcome, output, base = kunit(tmp_path, node, merger, tests, broken, prebuilt=True)
    assert outcome == Outcome.FAILED
    assert "FAIL tiny.tiny_add_test\n" in output
    assert "checkout kept: src/tiny" in output
    kunit_tree = node.home / "src" / "tiny-kunit"
    log = (node.home / "artifacts" / "kunit" / "kunit.log").read_text()
    assert f"[00:00:00] in {kunit_tree}\n" in log
    assert f"Comparing with base {base[:12]}: running" in output
    assert "make mrproper" not in output
    assert (node.home / "src" / "tiny" / ".config").exists()
    change = git(node.home / "src" / "tiny", "rev-parse", "HEAD")
    assert git(kunit_tree, "rev-parse", "HEAD") == change != base
