"""The kernel-checkpatch playbook on a tiny git repository, in seconds: patches
are checked with the base commit's scripts/checkpatch.pl (a stand-in with one
rule) and the base commit's configuration, whatever the series does to them.

It runs from the files the launcher writes: write_ansible_dir's vars (`zuul`
all `!unsafe`), its setup playbook (clone the "merger" repository, fetch and
check out the change) and the job's playbook, over a local connection in a
scratch HOME that stands in for the node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import default_ansible_playbook
from tests.harness import local_ansible_dir
from zuul_lite.build_contract import BuildRequest

JOBS = Path(__file__).resolve().parents[1] / "jobs"

CHECKPATCH = """\
#!/bin/sh
# Stand-in for the kernel's checkpatch.pl: its report's last line, one rule (an
# added line ending in whitespace is an ERROR), a data file it reads beside
# itself and options from .checkpatch.conf in its working directory or .scripts/.
[ -r "$(dirname "$0")/spelling.txt" ] || { echo "no spelling.txt beside $0"; exit 2; }
for patch; do :; done
errors=$(grep -c '^+.*[[:space:]]$' "$patch")
if cat .checkpatch.conf .scripts/.checkpatch.conf 2>/dev/null | grep -q -- --ignore; then
  errors=0
fi
[ "$errors" -eq 0 ] || echo "ERROR: trailing whitespace"
echo "total: $errors errors, 0 warnings, $(wc -l < "$patch") lines checked"
[ "$errors" -eq 0 ]
"""

ALWAYS_PASSES = '#!/bin/sh\necho "total: 0 errors, 0 warnings, 1 lines checked"\n'


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=zuul", "-c", "user.email=zuul@zuul-lite.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def commit(repo: Path, message: str, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".pl"):
            path.chmod(0o755)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def merger(tmp_path) -> tuple[Path, str]:
    """The merger's repository of project `tiny` and its base commit."""
    repo = tmp_path / "merger" / "tiny"
    repo.mkdir(parents=True)
    git(repo, "init", "--quiet", "--initial-branch", "master")
    base = commit(
        repo,
        "Base",
        {
            "README": "tiny\n",
            "scripts/checkpatch.pl": CHECKPATCH,
            "scripts/spelling.txt": "teh||the\n",
            "scripts/const_structs.checkpatch": "file_operations\n",
            "Documentation/dev-tools/checkpatch.rst": "checkpatch\n",
        },
    )
    return repo, base


def run_checkpatch(tmp_path: Path, repo: Path, base: str) -> subprocess.CompletedProcess:
    """Run setup and kernel-checkpatch for the change at the repository's HEAD."""
    git(repo, "update-ref", "refs/zuul/master/1", "HEAD")
    git(repo, "checkout", "--quiet", base)
    request = BuildRequest(
        uuid="u1",
        job="kernel-checkpatch",
        node_type="kernel-debian",
        log_path="1/1/check/kernel-checkpatch/u1",
        project="tiny",
        branch="master",
        git_url=str(repo),
        git_ref="refs/zuul/master/1",
        base_ref=base,
        vars={"checkpatch_options": []},
        playbooks={"run": ["playbooks/kernel-checkpatch.yaml"]},
        subject="{{ lookup('pipe', 'false') }}",
        owner="{% raw %}Dev{% endraw %} <dev@example.org>",
    )
    jobdir, phases = local_ansible_dir(tmp_path, request, JOBS)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(jobdir.tmp),
        "ANSIBLE_HOME": str(jobdir.tmp),
    }
    for playbook in (phases["setup"][0], phases["run"][0]):
        result = subprocess.run(
            [
                default_ansible_playbook(),
                "-v",
                "-i",
                "node,",
                "-c",
                "local",
                "-e",
                f"ansible_python_interpreter={sys.executable}",
                "-e",
                f"@{jobdir.vars}",
                str(playbook),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        print(result.stdout[-10000:], result.stderr[-3000:])
        if result.returncode != 0:
            break
    assert "PLAY RECAP" in result.stdout
    return result


def test_a_clean_series_passes(tmp_path, merger):
    repo, base = merger
    commit(repo, "Add x", {"x.c": "int x;\n"})
    result = run_checkpatch(tmp_path, repo, base)
    assert result.returncode == 0
    assert "=== 0001-Add-x: ok (total: 0 errors, 0 warnings" in result.stdout
    reports = tmp_path / "home" / "artifacts" / "checkpatch"
    assert sorted(p.name for p in reports.glob("*.txt")) == ["0001-Add-x.txt", "summary.txt"]


def test_a_series_cannot_change_the_checkpatch_it_is_checked_with(tmp_path, merger):
    """The second patch silences checkpatch three ways (each alone would be
    enough if the tree's copy or configuration were used): the first still fails."""
    repo, base = merger
    commit(repo, "Add x with trailing whitespace", {"x.c": "int x; \n"})
    ignore = "--ignore TRAILING_WHITESPACE\n"
    commit(
        repo,
        "Silence checkpatch",
        {
            "scripts/checkpatch.pl": ALWAYS_PASSES,
            ".checkpatch.conf": ignore,
            ".scripts/.checkpatch.conf": ignore,
        },
    )
    result = run_checkpatch(tmp_path, repo, base)
    assert result.returncode != 0
    assert "=== 0001-Add-x-with-trailing-whitespace: FAILED (total: 1 errors" in result.stdout
    assert "ERROR: trailing whitespace" in result.stdout
    assert "=== 0002-Silence-checkpatch: ok (total: 0 errors" in result.stdout
    copy = tmp_path / "home" / "checkpatch-base" / "scripts"
    assert (copy / "checkpatch.pl").read_text() == CHECKPATCH
    assert (copy / "spelling.txt").is_file() and (copy / "const_structs.checkpatch").is_file()
