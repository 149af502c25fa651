"""The kernel-checkpatch playbook on a tiny git repository, in seconds: patches
are checked with the base commit's scripts/checkpatch.pl (a stand-in with one
rule) and the base commit's configuration, whatever the series does to them.

It runs as the launcher runs a build: the change fetched from the "merger"
repository into the launcher's cache, write_ansible_dir's files (`zuul` all
`!unsafe`, the job definition's `checkout`), its setup playbook (which pushes
the change to the node) and the job's playbook, run by the launcher's
AnsibleRunner over ssh to a host sshd whose scratch HOME stands in for the node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.ansible import AnsibleRunner, Outcome, OutputLog
from launcher.config import default_ansible_playbook
from launcher.gitcache import GitCache
from launcher.jobdir import JobDir
from launcher.logs import extract_summary
from launcher.playbooks import write_ansible_dir
from tests.harness import SshHost
from zuul_lite.build_contract import BuildRequest
from zuul_lite.layout import load_jobs

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
if [ "$errors" -ne 0 ]; then  # as checkpatch.pl: the rule, where, the line, a blank line
  echo "ERROR: trailing whitespace"
  echo "#7: FILE: x.c:1:"
  grep -m 1 '^+.*[[:space:]]$' "$patch" | sed 's/$/$/'
  echo
fi
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


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    host = SshHost(tmp_path_factory.mktemp("sshd"))
    yield host
    host.stop()


@pytest.fixture
def node(ssh_host) -> SshHost:
    ssh_host.reset_home()
    return ssh_host


def run_job(
    tmp_path: Path,
    node: SshHost,
    repo: Path,
    base: str,
    job: str,
    job_vars: dict,
    baseline: dict | None = None,
) -> tuple[Outcome, str]:
    """Run setup and `job`'s playbook for the change at the repository's HEAD
    (with `baseline` as the scheduler's zuul.baseline); return how the last
    playbook ended and the build's output."""
    git(repo, "update-ref", "refs/zuul/master/1", "HEAD")
    git(repo, "checkout", "--quiet", base)
    request = BuildRequest(
        uuid="u1",
        job=job,
        node_type="kernel-debian",
        log_path=f"1/1/check/{job}/u1",
        project="tiny",
        branch="master",
        git_url=str(repo),
        git_ref="refs/zuul/master/1",
        base_ref=base,
        vars=job_vars,
        baseline=baseline,
        playbooks={"run": [f"playbooks/{job}.yaml"]},
        checkout=load_jobs(JOBS)[job].checkout,  # as the scheduler sends it
        subject="{{ lookup('pipe', 'false') }}",
        owner="{% raw %}Dev{% endraw %} <dev@example.org>",
    )
    jobdir = JobDir(tmp_path / "work", request.uuid)
    phases = write_ansible_dir(
        jobdir,
        request,
        node.address(),
        jobs_dir=JOBS,
        private_key=node.client_key,
        connect_timeout=10,
        change=GitCache(tmp_path / "git", 60).fetch(request),
        dependencies={},
    )
    output = OutputLog(tmp_path / "job-output.txt")
    runner = AnsibleRunner(jobdir, output, default_ansible_playbook())
    try:
        for phase in ("setup", "run"):
            outcome = runner.run(phases[phase][0], phase, 120)
            if outcome != Outcome.OK:
                break
    finally:
        runner.close_connections()
        if jobdir.results.exists():  # what the vote's summary is made of
            shutil.copyfile(jobdir.results, tmp_path / "results.jsonl")
        jobdir.cleanup()
    text = output.path.read_text()
    print(text[-10000:])
    assert "PLAY RECAP" in text
    return outcome, text


def run_checkpatch(tmp_path: Path, node: SshHost, repo: Path, base: str) -> tuple[Outcome, str]:
    return run_job(tmp_path, node, repo, base, "kernel-checkpatch", {"checkpatch_options": []})


def test_a_clean_series_passes(tmp_path, node, merger):
    repo, base = merger
    commit(repo, "Add x", {"x.c": "int x;\n"})
    outcome, output = run_checkpatch(tmp_path, node, repo, base)
    assert outcome == Outcome.OK
    assert "=== 0001-Add-x: ok (total: 0 errors, 0 warnings" in output
    reports = node.home / "artifacts" / "checkpatch"
    assert sorted(p.name for p in reports.glob("*.txt")) == ["0001-Add-x.txt", "summary.txt"]


def test_a_series_cannot_change_the_checkpatch_it_is_checked_with(tmp_path, node, merger):
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
    outcome, output = run_checkpatch(tmp_path, node, repo, base)
    assert outcome == Outcome.FAILED
    assert "=== 0001-Add-x-with-trailing-whitespace: FAILED (total: 1 errors" in output
    assert "ERROR: trailing whitespace" in output
    assert "=== 0002-Silence-checkpatch: ok (total: 0 errors" in output
    # The vote quotes each ERROR with where it is and the offending line.
    records = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    summary = extract_summary(records).splitlines()
    assert summary[1:-1] == [
        "=== 0001-Add-x-with-trailing-whitespace: FAILED (total: 1 errors, 0 warnings, "
        "20 lines checked)",
        "ERROR: trailing whitespace",
        "    #7: FILE: x.c:1:",
        "    +int x; $",
    ]
    # ...and ends with how to check the same at home, where it fails the same way.
    assert summary[-1] == (
        f"reproduce: sh artifacts/reproduce.sh <your clone> (base {base[:12]} + 2 patch(es), "
        "none (the base commit's checkpatch.pl on each patch), image unknown)"
    )
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(repo), str(clone))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    again = subprocess.run(
        ["sh", str(node.home / "artifacts" / "reproduce.sh"), str(clone)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GIT_COMMITTER_NAME": "me",
             "GIT_COMMITTER_EMAIL": "me@example.invalid", "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert again.returncode == 1, again.stderr
    assert not list(scratch.iterdir())  # its copy of checkpatch.pl and the patches went
    assert again.stdout.count("ERROR: trailing whitespace") == 1, again.stdout
    copy = node.home / "checkpatch-base" / "scripts"
    assert (copy / "checkpatch.pl").read_text() == CHECKPATCH
    assert (copy / "spelling.txt").is_file() and (copy / "const_structs.checkpatch").is_file()
    # The job takes no checkout of the change: the node has its commits, and
    # the tree checkpatch.pl ran in is the base commit's.
    tree = node.home / "src" / "tiny"
    change = git(repo, "rev-parse", "refs/zuul/master/1")
    assert git(tree, "rev-parse", "HEAD", "refs/zuul/change").split() == [base, change]
    assert (tree / "scripts" / "checkpatch.pl").read_text() == CHECKPATCH
    assert not (tree / "x.c").exists() and git(tree, "status", "--porcelain") == ""
