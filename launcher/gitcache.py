"""The launcher's copy of each project, from which a build's change reaches its node.

The scheduler names where its merger serves the change (`git_url`: a git URL,
or a path for a launcher on the scheduler's host) and the ref of the tested
state (`git_ref`). The launcher fetches that ref into a bare repository of its
own per project, `<state>/launcher/git/<project>.git`, and the setup playbook
pushes the commit from there into the node over the node's ssh: nothing on the
node, and nothing here, reads a path of the scheduler's host. The base commit
(`base_ref`) is an ancestor of the tested state, so it comes along.

Each branch's last fetched state stays as `refs/tips/<branch>`: the next fetch
negotiates from it and moves only the new change's few commits, where the
first fetch of a project moves its whole history once. Fetches into one
project take a file lock, so the threads of this launcher (and any launcher
sharing the directory) never fetch into it at once; a push only reads, so
builds push to their nodes concurrently. A build pushes its commit by id, and
gc keeps even unreferenced objects for two weeks (gc.pruneExpire), so a later
fetch that moves the branch tip never takes a build's commit away.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from launcher.buildlog import Log
from zuul_lite.build_contract import BuildRequest

log = logging.getLogger("launcher.gitcache")


class GitCacheError(Exception):
    """The change could not be fetched: one sentence naming what and from where."""


@dataclass(frozen=True)
class FetchedChange:
    """The tested state, ready to push: the cache repository and the commit in it."""

    repo: Path
    sha: str


class GitCache:
    """Bare repositories under `root`, one per project; git commands time out."""

    def __init__(self, root: Path, timeout: float) -> None:
        self.root = Path(root)
        self.timeout = timeout

    def repo(self, project: str) -> Path:
        """The project's cache; its name is quoted, so no project name climbs out."""
        return self.root / f"{quote(project, safe='')}.git"

    def fetch(self, request: BuildRequest, build_log: Log = log) -> FetchedChange:
        """Fetch the request's git_ref into the project's cache; GitCacheError if not."""
        if not (request.git_url and request.git_ref and request.branch):
            raise GitCacheError("The build names no change to test (git_url, git_ref, branch).")
        repo = self.repo(request.project)
        tip = f"refs/tips/{request.branch}"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(repo.with_name(repo.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (repo / "HEAD").exists():
                build_log.info("Making the cache %s", repo)
                self._git(request, None, "init", "--quiet", "--bare", str(repo))
                # gc runs in the foreground, under the lock: never beside a fetch.
                self._git(request, repo, "config", "gc.autoDetach", "false")
            self._git(
                request,
                repo,
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",  # the tip ref holds what was fetched
                "--",
                request.git_url,
                f"+{request.git_ref}:{tip}",
            )
            sha = self._git(request, repo, "rev-parse", "--verify", f"{tip}^{{commit}}").strip()
            self._git(request, repo, "gc", "--auto", "--quiet")
        build_log.info("Fetched %s from %s: %s", request.git_ref, request.git_url, sha)
        return FetchedChange(repo, sha)

    def _git(self, request: BuildRequest, repo: Path | None, *args: str) -> str:
        cmd = ["git", *(["-C", str(repo)] if repo is not None else []), *args]
        what = f"Could not fetch {request.git_ref} of {request.project} from {request.git_url}"
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            )
        except subprocess.TimeoutExpired:
            raise GitCacheError(
                f"{what}: git {args[0]} did not finish within {self.timeout:.0f} seconds."
            ) from None
        if proc.returncode != 0:
            lines = [ln.strip().removeprefix("fatal: ") for ln in proc.stderr.splitlines()]
            why = " ".join(ln for ln in lines if ln)[:500] or f"exit status {proc.returncode}"
            raise GitCacheError(f"{what}: {why.rstrip('.')}.")
        return proc.stdout
