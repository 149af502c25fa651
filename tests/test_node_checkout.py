"""The setup playbook's choice of the node's repository (launcher.playbooks).

A node whose image holds the project's branch built (elements/kernel-tree-cache)
keeps that checkout, and the push of the change moves it: only the files the
change touches are rewritten, and build outputs (ignored files) stay, so make
rebuilds only what the change affects. Anything else becomes an empty repository
that the push fills (KEEP_OR_INIT). A job with `checkout: false` keeps any
repository as it is and gets only the change's commits (KEEP_REPOSITORY). Real
git, with the launcher's receive-pack and refspecs, in a scratch HOME.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import jinja2
import pytest

from launcher.playbooks import CHANGE_REF, KEEP_OR_INIT, KEEP_REPOSITORY, RECEIVE_PACK

ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    ).stdout.strip()


@pytest.fixture
def cache(tmp_path) -> tuple[Path, str, str]:
    """The launcher's repository: a base commit on master and a change on it."""
    repo = tmp_path / "launcher"
    repo.mkdir()
    git(repo, "init", "-q", "--initial-branch=master")
    (repo / ".gitignore").write_text("*.o\n")
    for name in ("a.c", "b.c"):
        (repo / name).write_text(f"int {name[0]};\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD")
    (repo / "a.c").write_text("int a = 1;\n")
    git(repo, "commit", "-qam", "change")
    return repo, base, git(repo, "rev-parse", "HEAD")


def setup(home: Path, cache: Path, sha: str, branch: str = "master", checkout: bool = True) -> str:
    """The playbook's two steps on the node: keep or init, then the push."""
    templates = jinja2.Environment()
    templates.filters["quote"] = shlex.quote
    script = KEEP_OR_INIT if checkout else KEEP_REPOSITORY
    text = templates.from_string(script).render(zuul={"project": "linux", "branch": branch})
    home.mkdir(exist_ok=True)
    (home / "src").mkdir(exist_ok=True)
    out = subprocess.run(
        ["bash", "-c", text], cwd=home, check=True, capture_output=True, text=True
    ).stdout
    refspecs = [f"+{sha}:refs/heads/{branch}"] if checkout else []
    receive_pack = RECEIVE_PACK if checkout else "git receive-pack"
    git(cache, "push", "-q", f"--receive-pack={receive_pack}", str(home / "src" / "linux"),
        *refspecs, f"+{sha}:{CHANGE_REF}")  # fmt: skip
    return out


def cached_tree(home: Path, cache: Path, base: str) -> Path:
    """What the image holds: a clone at the base, "built" (an ignored object)."""
    tree = home / "src" / "linux"
    git(cache, "clone", "-q", "--no-hardlinks", str(cache), str(tree))
    git(tree, "checkout", "-q", "-B", "master", base)
    git(tree, "config", "core.checkStat", "minimal")
    git(tree, "config", "core.trustctime", "false")
    (tree / "a.o").write_text("object\n")
    return tree


def test_a_node_without_a_checkout_gets_an_empty_repository(tmp_path, cache):
    repo, _, change = cache
    out = setup(tmp_path / "home", repo, change)
    assert out.startswith("empty repository: src/linux")
    tree = tmp_path / "home" / "src" / "linux"
    assert git(tree, "rev-parse", "HEAD") == change
    assert (tree / "a.c").read_text() == "int a = 1;\n"


def test_the_images_checkout_is_moved_to_the_change(tmp_path, cache):
    repo, base, change = cache
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    tree = cached_tree(home, repo, base)
    untouched = (tree / "b.c").stat().st_mtime_ns
    out = setup(home, repo, change)
    assert out.startswith(f"checkout kept: src/linux at {base}")
    assert git(tree, "rev-parse", "HEAD") == change
    assert (tree / "a.c").read_text() == "int a = 1;\n"
    # Only the changed file was written; the build's outputs stay.
    assert (tree / "b.c").stat().st_mtime_ns == untouched
    assert (tree / "a.o").read_text() == "object\n"
    assert git(tree, "status", "--porcelain") == ""


def node_tree(home: Path, cache: Path, base: str, state: str) -> Path:
    """The image's tree (cached_tree), as it is or spoiled: a changed file, another branch."""
    (home / "src").mkdir(parents=True)
    tree = cached_tree(home, cache, base)
    if state == "changed file":
        (tree / "b.c").write_text("int b = 2;\n")
    elif state == "other branch":
        git(tree, "checkout", "-q", "-b", "stable")
    return tree


@pytest.mark.parametrize("spoil", ["changed file", "other branch"])
def test_a_checkout_that_cannot_move_makes_way(tmp_path, cache, spoil):
    repo, base, change = cache
    tree = node_tree(tmp_path / "home", repo, base, spoil)
    out = setup(tmp_path / "home", repo, change)
    assert out.startswith("empty repository: src/linux")
    assert git(tree, "rev-parse", "HEAD") == change
    assert (tree / "b.c").read_text() == "int b;\n"
    assert not (tree / "a.o").exists()


@pytest.mark.parametrize("state", ["image", "changed file", "other branch"])
def test_without_checkout_the_tree_stays_and_the_change_is_a_ref(tmp_path, cache, state):
    """checkout: false keeps whatever the node holds, work tree untouched."""
    repo, base, change = cache
    tree = node_tree(tmp_path / "home", repo, base, state)
    a_c = (tree / "a.c").stat().st_mtime_ns
    out = setup(tmp_path / "home", repo, change, checkout=False)
    assert out.startswith("repository kept: src/linux, its work tree not moved")
    assert git(tree, "rev-parse", "HEAD", CHANGE_REF).split() == [base, change]
    assert (tree / "a.c").stat().st_mtime_ns == a_c and (tree / "a.c").read_text() == "int a;\n"
    assert (tree / "a.o").read_text() == "object\n"
    assert (tree / "b.c").read_text() == (
        "int b = 2;\n" if state == "changed file" else "int b;\n"
    )


def test_without_checkout_a_node_without_a_repository_gets_the_commits_only(tmp_path, cache):
    repo, base, change = cache
    out = setup(tmp_path / "home", repo, change, checkout=False)
    assert out.startswith("empty repository: src/linux")
    tree = tmp_path / "home" / "src" / "linux"
    assert git(tree, "rev-parse", CHANGE_REF) == change
    assert git(tree, "cat-file", "-t", base) == "commit"
    assert sorted(p.name for p in tree.iterdir()) == [".git"]
