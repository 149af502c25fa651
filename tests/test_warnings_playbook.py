"""kernel-build-warnings with baselines, in seconds, on a stand-in tree: a
Makefile whose compiler prints a W=1 warning for each `WARN_<name>` in a
.c file. On a branch head (post) the job builds the whole tree and records
its warnings; a series is then compared with that baseline without a base
build. The real W=1 build is tested in tests/test_jobs_playbooks.py. Run as
the launcher runs a build (see test_checkpatch_playbook)."""

from __future__ import annotations

from launcher.ansible import Outcome
from tests import test_checkpatch_playbook as playbook_harness
from zuul_lite.baseline import Baseline, Findings

commit, run_job = playbook_harness.commit, playbook_harness.run_job
merger, node, ssh_host = playbook_harness.merger, playbook_harness.node, playbook_harness.ssh_host

MAKEFILE = """\
.SUFFIXES:
all:
\t@sh ./fakecc.sh $(patsubst %.c,%.o,$(wildcard kernel/*.c))
%.o: %.c
\t@sh ./fakecc.sh $@
%config:
\t@echo CONFIG_TINY=y > .config
"""

FAKECC = """\
for obj; do
  src=${obj%.o}.c
  echo "  CC      $obj"
  grep -n -o 'WARN_[a-z]*' "$src" | while IFS=: read -r line name; do
    echo "$src: In function ‘f’:" >&2
    echo "$src:$line:5: warning: unused variable ‘$name’ [-Wunused-variable]" >&2
  done
  : > "$obj"
done
"""

TREE = {
    "Makefile": MAKEFILE,
    "fakecc.sh": FAKECC,
    "kernel/a.c": "int f(void)\n{\n\tint WARN_old;\n\treturn 0;\n}\n",
    "kernel/b.c": "int g(void)\n{\n\treturn 0;\n}\n",
}
VARS = {"kernel_config": "allnoconfig"}
OLD = "kernel/a.c\tf\tunused variable 'WARN_old'\t-Wunused-variable"


def findings_of(node) -> Findings:
    return Findings.from_json((node.home / "artifacts" / "findings.json").read_bytes())


def test_a_branch_head_records_the_warnings_of_the_whole_tree(tmp_path, node, merger):
    repo, _ = merger
    head = commit(repo, "A tree with one warning", TREE)
    outcome, output = run_job(tmp_path, node, repo, head, "kernel-build-warnings", VARS)
    assert outcome == Outcome.OK
    assert "A branch head: the whole tree is built W=1 to record its warnings." in output
    assert "1 warning(s) in 2 compiled file(s)" in output
    assert findings_of(node) == Findings(
        warnings=[OLD], warning_files=["kernel/a.c", "kernel/b.c"]
    )


def test_a_series_is_compared_with_the_baseline_without_a_base_build(tmp_path, node, merger):
    repo, _ = merger
    base = commit(repo, "A tree with one warning, again", {**TREE, "README": "again\n"})
    moved = "/* moved */\n" + TREE["kernel/a.c"]  # the old warning's line shifts
    added = TREE["kernel/b.c"].replace("return 0;", "int WARN_new;\n\treturn 0;")
    commit(repo, "Move one warning, add another", {"kernel/a.c": moved, "kernel/b.c": added})
    recorded = Findings(warnings=[OLD], warning_files=["kernel/a.c", "kernel/b.c"])
    baseline = Baseline("tiny", base, "kernel-build-warnings", "p1", "http://l/p1/", recorded)
    outcome, output = run_job(
        tmp_path, node, repo, base, "kernel-build-warnings", VARS, baseline.to_dict()
    )
    assert outcome == Outcome.FAILED
    assert f"what this job found on {base[:12]} in the post" in output
    assert "base: make W=1" not in output  # no base build
    assert (
        "kernel/b.c:3:5: warning: unused variable ‘WARN_new’ [-Wunused-variable] (in f)" in output
    )
    assert f"(1 already on base {base[:12]}, not counted; 0 removed" in output
    assert sorted(findings_of(node).warning_files) == ["kernel/a.c", "kernel/b.c"]


def test_a_baseline_without_a_touched_file_means_a_base_build(tmp_path, node, merger):
    repo, _ = merger
    base = commit(repo, "A tree with one warning, once more", {**TREE, "README": "more\n"})
    commit(repo, "Touch b.c", {"kernel/b.c": TREE["kernel/b.c"] + "/* touched */\n"})
    recorded = Findings(warnings=[OLD], warning_files=["kernel/a.c"])  # b.c not compiled
    baseline = Baseline("tiny", base, "kernel-build-warnings", "p1", "http://l/p1/", recorded)
    outcome, output = run_job(
        tmp_path, node, repo, base, "kernel-build-warnings", VARS, baseline.to_dict()
    )
    assert outcome == Outcome.OK
    assert "base: make W=1 of 1 object(s) exited with 0" in output
    assert "in the post pipeline (its baseline" not in output
