"""The kernel repository import: a small fake tarball for the mechanics
(Debian .gitignore section, atomic rename, cache reuse, stable commit id) and
the real Debian tarball for the repository everything else is built on."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from zuul_lite import kerneltree

GITIGNORE = """\
#
# NOTE! Don't add files that are generated in specific
# subdirectories here.
#
.*
*.o

# Rust analyzer configuration
/rust-project.json

#
# Debian packaging: ignore everything at the top level, since it isn't
# included in our repository
#
/*
!/debian/
"""

MAKEFILE = """\
# SPDX-License-Identifier: GPL-2.0
VERSION = 6
PATCHLEVEL = 1
SUBLEVEL = 192
EXTRAVERSION =
NAME = Curry Ramen
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def fake_source(tmp_path, monkeypatch) -> Path:
    """A miniature linux-source tarball laid out like Debian's, version 6.1.192-9."""
    top = tmp_path / "src" / "linux-source-6.1"
    (top / "init").mkdir(parents=True)
    (top / "Makefile").write_text(MAKEFILE)
    (top / ".gitignore").write_text(GITIGNORE)
    (top / "init" / "main.c").write_text("int main(void) { return 0; }\n")
    (top / "init" / ".gitignore").write_text("/generated.h\n")
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(top, arcname="linux-source-6.1")
    monkeypatch.setattr(kerneltree, "TARBALL", tarball)
    monkeypatch.setattr(kerneltree, "package_version", lambda: "6.1.192-9")
    return tarball


def test_import_commits_top_level_files_once(fake_source, tmp_path):
    messages: list[str] = []
    repo = kerneltree.ensure_kernel_repo(tmp_path / "cache", progress=messages.append)

    assert repo == tmp_path / "cache" / "kernel" / "linux-6.1.192-9"
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "master"
    assert git(repo, "log", "--format=%s") == (
        "Linux 6.1.192 from Debian linux-source-6.1 6.1.192-9"
    )
    # The Debian section would have hidden every top-level file.
    # Dotfiles too, though `.*` ignores them (Debian dropped upstream's exceptions).
    assert git(repo, "ls-files").split() == [
        ".gitignore",
        "Makefile",
        "init/.gitignore",
        "init/main.c",
    ]
    assert "Debian" not in (repo / ".gitignore").read_text()
    assert (repo / ".gitignore").read_text().endswith("/rust-project.json\n")
    assert git(repo, "status", "--porcelain") == ""
    assert any("extracting" in m for m in messages)
    # No temp dir left next to it.
    assert [p.name for p in repo.parent.iterdir() if p.name != ".lock"] == [repo.name]

    # Second call: reused, nothing extracted.
    messages.clear()
    assert kerneltree.ensure_kernel_repo(tmp_path / "cache", progress=messages.append) == repo
    assert messages == []


def test_same_package_gives_same_commit_id(fake_source, tmp_path, monkeypatch):
    """Fixed author, committer and date: sample patches and results keep one base."""
    first = kerneltree.ensure_kernel_repo(tmp_path / "a")
    monkeypatch.setenv("ZUUL_LITE_CACHE", str(tmp_path / "b"))
    second = kerneltree.ensure_kernel_repo()
    assert second == tmp_path / "b" / "kernel" / "linux-6.1.192-9"
    assert git(first, "rev-parse", "HEAD") == git(second, "rev-parse", "HEAD")


def test_failed_import_leaves_nothing(fake_source, tmp_path, monkeypatch):
    real_git = kerneltree._git

    def broken_git(tree: Path, *args: str, env: dict[str, str] | None = None) -> str:
        if args[0] == "commit":
            raise KeyboardInterrupt  # as if the run were killed mid-import
        return real_git(tree, *args, env=env)

    monkeypatch.setattr(kerneltree, "_git", broken_git)
    with pytest.raises(KeyboardInterrupt):
        kerneltree.ensure_kernel_repo(tmp_path / "cache")
    kernel_dir = tmp_path / "cache" / "kernel"
    assert [p.name for p in kernel_dir.iterdir()] == [".lock"]

    monkeypatch.setattr(kerneltree, "_git", real_git)
    repo = kerneltree.ensure_kernel_repo(tmp_path / "cache")
    assert git(repo, "status", "--porcelain") == ""


def test_leftover_temp_dir_of_killed_run_is_removed(fake_source, tmp_path):
    stale = tmp_path / "cache" / "kernel" / ".import-6.1.192-9-dead"
    (stale / "half").mkdir(parents=True)
    repo = kerneltree.ensure_kernel_repo(tmp_path / "cache")
    assert not stale.exists()
    assert repo.is_dir()


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kerneltree, "PACKAGE", "linux-source-0.0-not-installed")
    with pytest.raises(kerneltree.KernelSourceMissing, match="apt-get install linux-source"):
        kerneltree.ensure_kernel_repo(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_gitignore_without_debian_section_is_left_alone(tmp_path):
    gitignore = tmp_path / ".gitignore"
    gitignore.write_text(".*\n*.o\n")
    kerneltree._strip_debian_gitignore(gitignore)
    assert gitignore.read_text() == ".*\n*.o\n"


@pytest.mark.skipif(not kerneltree.TARBALL.is_file(), reason="linux-source-6.1 not installed")
def test_real_debian_tree():
    """The repository the samples, the merger and the e2e tests use (~1 min first time)."""
    repo = kerneltree.ensure_kernel_repo()
    version = kerneltree.package_version()
    assert repo.name == f"linux-{version}"
    subject = git(repo, "log", "--format=%s")
    assert subject.startswith("Linux 6.1.")
    assert subject.endswith(f"from Debian linux-source-6.1 {version}")
    assert git(repo, "log", "--format=%an <%ae> %ad", "--date=iso") == (
        "zuul-lite kernel import <kernel-import@zuul-lite.invalid> 2000-01-01 00:00:00 +0000"
    )
    tracked = git(repo, "ls-files", "--", "Makefile", ".mailmap", "scripts/checkpatch.pl")
    assert tracked.split() == [".mailmap", "Makefile", "scripts/checkpatch.pl"]
    assert git(repo, "ls-files").count("\n") > 78000
    # Every file of the tarball is tracked: nothing untracked, nothing ignored.
    assert git(repo, "status", "--porcelain", "--ignored", "--untracked-files=all") == ""
