"""The sample patch series in doc/examples/patches/ are real `git format-patch`
output that applies to the kernel tree of the installed Debian package and has
the checkpatch.pl outcome its name promises. Debian moves linux-source-6.1 with
every stable update, so this runs against whatever version is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from zuul_lite import kerneltree

PATCHES = Path(__file__).resolve().parents[1] / "doc" / "examples" / "patches"
# series -> (number of patches, files the series changes)
SERIES = {
    "good": (2, {"kernel/panic.c", "kernel/exit.c"}),
    "build-failure": (1, {"kernel/panic.c"}),
    "checkpatch-failure": (1, {"init/calibrate.c"}),
}

needs_kernel = pytest.mark.skipif(
    not kerneltree.TARBALL.is_file(), reason="linux-source-6.1 not installed"
)


def patches(series: str) -> list[Path]:
    return sorted((PATCHES / series).glob("*.patch"))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [
            "git",
            "-c",
            "user.name=zuul-lite tests",
            "-c",
            "user.email=tests@zuul-lite.invalid",
            *args,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.parametrize("series", sorted(SERIES))
def test_series_is_format_patch_output(series):
    count, _ = SERIES[series]
    files = patches(series)
    assert len(files) == count
    for n, path in enumerate(files, start=1):
        text = path.read_text()
        assert re.match(r"From [0-9a-f]{40} Mon Sep 17 00:00:00 2001\n", text)
        assert re.search(rf"^Subject: \[PATCH {n}/{count}\] \S", text, re.M)
        assert re.search(r"^Signed-off-by: .+ <.+@.+>$", text, re.M)
        assert path.name.startswith(f"{n:04d}-")


@pytest.fixture(scope="module")
def kernel_clone(tmp_path_factory) -> Path:
    """A clone of the imported tree, shared objects; each test resets master."""
    repo = kerneltree.ensure_kernel_repo()
    clone = tmp_path_factory.mktemp("samples") / "linux"
    subprocess.run(["git", "clone", "--quiet", "--shared", str(repo), str(clone)], check=True)
    return clone


def apply(clone: Path, series: str) -> str:
    """Apply the series on a fresh branch from master with `git am`; return the base."""
    git(clone, "checkout", "--quiet", "--force", "-B", series, "master")
    git(clone, "am", "--quiet", *map(str, patches(series)))
    return git(clone, "rev-parse", "master").strip()


def checkpatch(clone: Path, patch: Path) -> tuple[int, int, str]:
    """(errors, warnings, report) of the tree's checkpatch.pl on one patch."""
    out = subprocess.run(
        ["scripts/checkpatch.pl", "--color=never", str(patch)],
        cwd=clone,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"^total: (\d+) errors, (\d+) warnings", out, re.M)
    assert match, out
    return int(match[1]), int(match[2]), out


@needs_kernel
@pytest.mark.parametrize("series", sorted(SERIES))
def test_series_applies_with_git_am(kernel_clone, series):
    count, changed = SERIES[series]
    base = apply(kernel_clone, series)
    assert git(kernel_clone, "rev-list", "--count", f"{base}..HEAD").strip() == str(count)
    diff = git(kernel_clone, "diff", "--name-only", f"{base}..HEAD").split()
    assert set(diff) == changed


@needs_kernel
@pytest.mark.parametrize("series", ["good", "build-failure"])
def test_checkpatch_clean(kernel_clone, series):
    apply(kernel_clone, series)
    for patch in patches(series):
        errors, warnings, report = checkpatch(kernel_clone, patch)
        assert (errors, warnings) == (0, 0), report


@needs_kernel
def test_checkpatch_failure_has_errors(kernel_clone):
    apply(kernel_clone, "checkpatch-failure")
    (patch,) = patches("checkpatch-failure")
    errors, _, report = checkpatch(kernel_clone, patch)
    assert errors == 3, report
    assert "ERROR: trailing whitespace" in report
    assert "ERROR: code indent should use tabs where possible" in report


@needs_kernel
def test_build_failure_misspells_an_identifier(kernel_clone):
    """The compile error the kernel-build job must surface comes from this line."""
    base = apply(kernel_clone, "build-failure")
    diff = git(kernel_clone, "diff", "-U0", f"{base}..HEAD")
    assert re.search(r"^\+.*\bpanic_timout\b", diff, re.M)
    assert "panic_timout" not in git(kernel_clone, "show", f"{base}:kernel/panic.c")
