"""What the build page reads from a build's log directory: the first error
lines of job-output.txt, the reproduce command, and the tree of its files.

Everything here reads output of code from the change under test, so every
path goes through `logs.resolve` (nothing outside the log root, whatever a
symlink says), reads are capped, and text reaches HTML only through Jinja's
escaping.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from zuul_lite.web.logs import resolve

JOB_OUTPUT = "job-output.txt"
# Lines of an ansible run or a kernel build that say what went wrong.
ERROR = re.compile(
    r"error:|\berror\b \d|\bERROR\b|FAILED!|fatal:|Kernel panic|BUG:|\*\*\* \[|"
    r"Traceback \(most recent call last\)|^\S.*: FAILED\b",
)
MAX_ERRORS = 20
# The HTML view; the raw file is always at /logs/. A line from a build can
# be of any length: what is shown of it is capped too.
MAX_SHOWN_LINES = 50_000
MAX_SHOWN_BYTES = 32 * 1024 * 1024
MAX_LINE = 4096
MAX_TREE = 500
REPRODUCE = ("reproduce.sh", "artifacts/reproduce.sh")
MAX_REPRODUCE = 16_384


@dataclass(frozen=True, slots=True)
class OutputLine:
    number: int
    text: str
    error: bool


@dataclass(frozen=True, slots=True)
class TreeEntry:
    path: str  # relative to the build's log dir, "/"-separated, "/" at the end of a dir
    depth: int
    href: str
    is_dir: bool


def build_dir(log_root: Path, log_path: str | None) -> Path | None:
    """The build's log directory inside the root, if it is there."""
    if not log_path:
        return None
    found = resolve(log_root, log_path)
    return found if found is not None and found.is_dir() else None


def _output_path(log_root: Path, directory: Path) -> Path | None:
    rel = directory.relative_to(log_root.resolve()) / JOB_OUTPUT
    found = resolve(log_root, str(rel))
    return found if found is not None and found.is_file() else None


def read_output(log_root: Path, directory: Path) -> tuple[list[OutputLine], bool]:
    """job-output.txt as numbered lines, error lines marked, and whether the
    file goes on beyond what is shown (MAX_SHOWN_LINES, MAX_SHOWN_BYTES)."""
    path = _output_path(log_root, directory)
    if path is None:
        return [], False
    lines = []
    budget = MAX_SHOWN_BYTES
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE), b""), 1):
            budget -= len(raw)
            while not raw.endswith(b"\n"):  # a longer line: skip its rest
                rest = handle.readline(MAX_LINE)
                budget -= len(rest)
                if not rest or rest.endswith(b"\n") or budget < 0:
                    break
            if number > MAX_SHOWN_LINES or budget < 0:
                return lines, True
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            lines.append(OutputLine(number, text, ERROR.search(text) is not None))
    return lines, False


def first_errors(log_root: Path, directory: Path) -> list[OutputLine]:
    """The first error lines of job-output.txt, for the build page's summary."""
    return [line for line in read_output(log_root, directory)[0] if line.error][:MAX_ERRORS]


def reproduce_command(log_root: Path, directory: Path) -> str | None:
    """The script a job left to run the failure again by hand, if it left one."""
    root = log_root.resolve()
    for name in REPRODUCE:
        found = resolve(log_root, str(directory.relative_to(root) / name))
        if found is not None and found.is_file():
            with found.open(encoding="utf-8", errors="replace") as handle:
                return handle.read(MAX_REPRODUCE)
    return None


def tree(log_root: Path, directory: Path, log_url_prefix: str = "/logs/") -> list[TreeEntry]:
    """Every file and directory below the build's log dir, depth first, sorted,
    at most MAX_TREE; entries that leave the root (symlinks) are left out."""
    root = log_root.resolve()
    base = directory.relative_to(root)
    entries: list[TreeEntry] = []
    for current, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        here = Path(current)
        children = [(d, True) for d in dirs] + [(f, False) for f in sorted(files)]
        keep = []
        for name, is_dir in children:
            rel = (here / name).relative_to(root)
            target = resolve(log_root, str(rel))
            if target is None or (is_dir and (here / name).is_symlink()):
                continue
            if is_dir:
                keep.append(name)
            inside = rel.relative_to(base).as_posix()
            slash = "/" if target.is_dir() else ""
            entries.append(
                TreeEntry(
                    path=inside + slash,
                    depth=inside.count("/"),
                    href=log_url_prefix + quote(rel.as_posix()) + slash,
                    is_dir=bool(slash),
                )
            )
            if len(entries) >= MAX_TREE:
                return sorted(entries, key=lambda e: e.path)
        dirs[:] = keep
    return sorted(entries, key=lambda e: e.path)
