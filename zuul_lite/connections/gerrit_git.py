"""A local mirror of a Gerrit project's git: the merger's branch repository
and where a patchset's commit is turned into a series.

The merger reads branches from a local path (cheap to look at, no credentials
in the merger), so the connection fetches from Gerrit into
`<state>/gerrit/<connection>/<project>.git` whenever it needs fresh data: the
branches with every series, and after each ref-updated event.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
import time
from pathlib import Path

from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.git import GitError, git

log = logging.getLogger("zuul_lite.connections.gerrit")

FETCH_RETRIES = (1.0, 2.0)  # seconds before the second and third attempt


def change_ref(number: int, patchset: int) -> str:
    """Where Gerrit keeps a patchset: refs/changes/<last two digits>/<change>/<patchset>."""
    return f"refs/changes/{number % 100:02d}/{number}/{patchset}"


def ssh_command(key: Path, known_hosts: Path | None) -> str:
    """GIT_SSH_COMMAND for fetches: our key only, an unknown host refused."""
    words = ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    words += ["-o", "StrictHostKeyChecking=yes"]
    if known_hosts is not None:
        words += ["-o", f"UserKnownHostsFile={known_hosts}"]
    return " ".join(shlex.quote(w) for w in words)


class GitMirror:
    def __init__(self, root: Path, url_base: str, ssh: str) -> None:
        self.root = root
        self.url_base = url_base if url_base.endswith("/") else url_base + "/"
        self.env = {"GIT_SSH_COMMAND": ssh}
        self._lock = threading.Lock()  # one fetch at a time updates the refs

    def path(self, project: str) -> Path:
        return self.root / f"{project}.git"

    def exists(self, project: str) -> bool:
        return (self.path(project) / "HEAD").exists()

    def fetch(self, project: str, *refs: str) -> Path:
        """Fetch every branch and `refs` (each to the same name) into the mirror."""
        repo = self.path(project)
        specs = ["+refs/heads/*:refs/heads/*", *(f"+{r}:{r}" for r in refs)]
        with self._lock:
            if not self.exists(project):
                repo.parent.mkdir(parents=True, exist_ok=True)
                git(None, "init", "--quiet", "--bare", str(repo))
            for delay in (*FETCH_RETRIES, None):
                try:
                    git(
                        repo,
                        "fetch",
                        "--quiet",
                        "--no-tags",
                        self.url_base + project,
                        *specs,
                        env=self.env,
                    )
                    return repo
                except GitError as error:
                    log.warning("git fetch of %s failed: %s", project, error.output.strip())
                    if delay is None:
                        first = (error.output.strip().splitlines() or ["no message"])[0]
                        raise ZuulLiteError(
                            f"Cannot fetch {project} from Gerrit: {first}"
                        ) from None
                    time.sleep(delay)
        raise AssertionError("unreachable")

    def series(self, project: str, number: int, patchset: int) -> bytes:
        """The patchset's commit as `git format-patch` writes it. A Gerrit
        change is one commit; one stacked on other changes names them as
        dependencies instead (see GerritConnection.get_change), so each is
        applied once, in order."""
        ref = change_ref(number, patchset)
        repo = self.fetch(project, ref)
        proc = subprocess.run(
            ["git", "-C", str(repo), "format-patch", "--stdout", "-1", ref],
            capture_output=True,
        )
        if proc.returncode != 0:
            raise GitError(["format-patch"], proc.returncode, proc.stderr.decode(errors="replace"))
        log.debug("Series of %s,%s: %d bytes", number, patchset, len(proc.stdout))
        return proc.stdout
