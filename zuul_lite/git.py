"""Running git: the one place that spawns it for the scheduler side."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger("zuul_lite.git")

# Fixed identity so refs the merger makes do not depend on who runs it.
IDENTITY = {
    "GIT_AUTHOR_NAME": "zuul-lite",
    "GIT_AUTHOR_EMAIL": "zuul-lite@localhost",
    "GIT_COMMITTER_NAME": "zuul-lite",
    "GIT_COMMITTER_EMAIL": "zuul-lite@localhost",
}


class GitError(Exception):
    def __init__(self, args: list[str], returncode: int, output: str) -> None:
        super().__init__(f"git {' '.join(args)} failed ({returncode}): {output.strip()[:500]}")
        self.returncode = returncode
        self.output = output


def git(
    repo: Path | None,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> str:
    cmd = ["git"]
    if repo is not None:
        cmd += ["-C", str(repo)]
    cmd += list(args)
    full_env = {**os.environ, **IDENTITY, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    proc = subprocess.run(
        cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env
    )
    out = proc.stdout.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, out)
    return out


def rev_parse(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", "--verify", "--quiet", rev).strip()


def cat_blobs(repo: Path, revs: list[str]) -> list[bytes | None]:
    """The bytes of several blobs, exactly as stored, from one git process
    (`cat-file --batch`); None for a rev that names no object."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        input="".join(f"{rev}\n" for rev in revs).encode(),
        capture_output=True,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    if proc.returncode != 0:
        raise GitError(
            ["cat-file", "--batch"], proc.returncode, proc.stderr.decode("utf-8", "replace")
        )
    out, pos, blobs = proc.stdout, 0, []
    for _ in revs:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) != 3:  # "<rev> missing" (or ambiguous)
            blobs.append(None)
            continue
        size = int(header[2])
        blobs.append(out[pos : pos + size])
        pos += size + 1
    return blobs
