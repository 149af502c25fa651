"""The Linux tree that zuul-lite tests patches against, imported once from Debian.

The machines have no network access to kernel.org, but Debian's
`linux-source-6.1` package ships the full 6.1 stable tree as a tarball. We turn
it into a git repository (one commit on `master`) that the local inbox, the
merger, the sample patches and the tests all use as the project's base. The
import costs ~40 s and 1.5 GB, so it is done once per package version and cached
under `<cache>/kernel/linux-<package version>/`.

The commit has a fixed author, committer and date, so the same package version
always yields the same commit id: sample patches and recorded results keep
pointing at the same base across machines and cache wipes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("zuul_lite.kerneltree")

PACKAGE = "linux-source-6.1"
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BRANCH = "master"

# Fixed identity and date: the commit id then depends only on the tree content.
COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "zuul-lite kernel import",
    "GIT_AUTHOR_EMAIL": "kernel-import@zuul-lite.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "zuul-lite kernel import",
    "GIT_COMMITTER_EMAIL": "kernel-import@zuul-lite.invalid",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}

ProgressCallback = Callable[[str], None]


class KernelSourceMissing(RuntimeError):
    """The Debian package that carries the kernel tarball is not installed."""


def _default_cache_dir() -> Path:
    return Path(os.environ.get("ZUUL_LITE_CACHE", "/var/cache/zuul-lite"))


def package_version() -> str:
    """Debian version of the installed source package (e.g. `6.1.192-2`).

    It keys the cache: a Debian security update brings a new tarball and so a
    new repository, while the old one stays valid for anything recorded on it.
    """
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        out = None
    status, _, version = (out.stdout if out else "").partition(" ")
    if out is None or out.returncode != 0 or status != "installed" or not TARBALL.is_file():
        raise KernelSourceMissing(
            f"The kernel source is missing: {TARBALL} comes from the Debian package "
            f"{PACKAGE}; install it with `apt-get install {PACKAGE}`."
        )
    return version.strip()


def _strip_debian_gitignore(gitignore: Path) -> None:
    """Drop the Debian section at the end of the tarball's `.gitignore`.

    Debian appends `/*` and `!/debian/`, which ignores every top-level file
    (Makefile, Kconfig, ...), so `git add -A` would add almost nothing.
    """
    lines = gitignore.read_text().splitlines(keepends=True)
    try:
        cut = lines.index("/*\n")
    except ValueError:
        return
    # Also drop the comment block that introduces the section.
    while cut > 0 and lines[cut - 1].startswith("#"):
        cut -= 1
    while cut > 0 and not lines[cut - 1].strip():
        cut -= 1
    gitignore.write_text("".join(lines[:cut]))


def _kernel_version(tree: Path) -> str:
    """`VERSION.PATCHLEVEL.SUBLEVEL` from the top-level Makefile, for the commit subject."""
    head = tree.joinpath("Makefile").read_text(errors="replace")[:2000]
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d+)$", head, re.M))
    return ".".join(fields.get(k, "?") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def _git(tree: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {tree}: {result.stderr.strip()}")
    return result.stdout


def _import(tree: Path, pkg_version: str, report: ProgressCallback) -> None:
    """Extract the tarball into `tree` and commit it as the only commit of master."""
    report(f"extracting {TARBALL}")
    subprocess.run(
        ["tar", "-I", "xz -T0", "-xf", str(TARBALL), "-C", str(tree), "--strip-components=1"],
        check=True,
        capture_output=True,
    )
    _strip_debian_gitignore(tree / ".gitignore")
    version = _kernel_version(tree)
    report(f"committing Linux {version} ({pkg_version}) to git")
    _git(tree, "init", "--quiet", f"--initial-branch={BRANCH}")
    # The import leaves ~78k loose objects: without this, the first later git
    # command in the cache would start a long background auto-gc.
    _git(tree, "config", "gc.auto", "0")
    # Debian's .gitignore also lacks upstream's `!.gitignore`-style exceptions
    # to `.*`, which would leave out every dotfile (.gitignore, .mailmap, ...)
    # and a few more; the tarball holds only source, so add all of it.
    _git(tree, "add", "--all", "--force")
    _git(
        tree,
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        f"Linux {version} from Debian {PACKAGE} {pkg_version}",
        env=COMMIT_ENV,
    )
    _pack(tree, report)


def _pack(tree: Path, report: ProgressCallback) -> None:
    """Put the ~83k loose objects of the import into one pack.

    Clones of the cache (review tree, merger) hardlink what they find; loose,
    every later fetch over git (a launcher's first fetch from the merger)
    made git pack them again with a delta search: 87 s measured. Packed once
    without deltas (the tree has one commit: they would save little), a
    fetch sends the pack's data as it is.
    """
    report("packing the repository (once)")
    _git(tree, "repack", "-a", "-d", "-q", "--window=0")


def _packed(repo: Path) -> bool:
    return any((repo / ".git" / "objects" / "pack").glob("*.pack"))


def ensure_kernel_repo(
    cache_dir: Path | None = None, progress: ProgressCallback | None = None
) -> Path:
    """Return the cached git repository of the Debian 6.1 tree, importing it if needed.

    The import is built in a temporary directory next to its final place and
    renamed into place, so a killed run never leaves a half-made repository;
    a file lock keeps concurrent callers from importing the same version twice.
    `cache_dir` defaults to `$ZUUL_LITE_CACHE` or `/var/cache/zuul-lite`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    report = progress or (lambda message: log.info("%s", message))
    pkg_version = package_version()
    kernel_dir = cache_dir / "kernel"
    repo = kernel_dir / f"linux-{pkg_version}"
    if (repo / ".git").is_dir() and _packed(repo):
        return repo
    kernel_dir.mkdir(parents=True, exist_ok=True)
    with open(kernel_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (repo / ".git").is_dir():
            if not _packed(repo):  # imported before imports were packed
                _pack(repo, report)
            return repo
        # Leftovers of killed runs: temp dirs nobody holds the lock for.
        for stale in kernel_dir.glob(".import-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".import-{pkg_version}-", dir=kernel_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the tree from other users
            _import(tmp, pkg_version, report)
            tmp.rename(repo)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report(f"kernel repository ready: {repo}")
    return repo
