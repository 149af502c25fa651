"""The built-in local inbox: a review system kept in ZooKeeper plus bare git repos.

It plays the part Gerrit plays elsewhere: `zuul-lite submit` uploads a series
as a change (or a new patchset of one), `recheck` leaves a comment, and each
of these puts a trigger event on the same ZooKeeper queue the Gerrit watcher
feeds, so the scheduler cannot tell the sources apart. The series itself is
stored in the project's bare repository as a blob under
`refs/changes/<nn>/<change>/<patchset>`; changes, patchsets, comments and
votes are JSON under `/zuul/local/changes/<number>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nodepool_lite.exceptions import BadVersionError, NoNodeError
from nodepool_lite.zk import ZooKeeper
from zuul_lite.exceptions import InboxError
from zuul_lite.git import git
from zuul_lite.model import TriggerEvent
from zuul_lite.series import Series, read_series

log = logging.getLogger("zuul_lite.connections.local")

EVENT_QUEUE = "/zuul/events/trigger"
ROOT = "/zuul/local"


class LocalConnection:
    driver = "local"

    def __init__(self, name: str, zk: ZooKeeper, state_dir: Path) -> None:
        self.name = name
        self.zk = zk
        self.git_root = Path(state_dir) / "git"

    # Projects -----------------------------------------------------------

    def repo_path(self, project: str) -> Path:
        return self.git_root / f"{project}.git"

    def projects(self) -> list[str]:
        return self.zk.get_children(f"{ROOT}/projects")

    def get_project(self, project: str) -> dict:
        data = self.zk.get_or_none(f"{ROOT}/projects/{project}")
        if data is None:
            known = ", ".join(self.projects()) or "none"
            raise InboxError(f"Unknown project {project} (known projects: {known}).")
        return data

    def import_project(self, project: str, source: Path, branch: str = "master") -> Path:
        """Make `source` (a git repo) the review tree of `project`; reuse it if present."""
        repo = self.repo_path(project)
        if not (repo / "HEAD").exists():
            self.git_root.mkdir(parents=True, exist_ok=True)
            tmp = repo.with_suffix(".tmp")
            git(None, "clone", "--bare", "--quiet", str(source), str(tmp))
            tmp.rename(repo)
            log.info("Imported %s from %s", project, source)
        head = git(repo, "rev-parse", f"refs/heads/{branch}").strip()
        if not self.zk.exists(f"{ROOT}/projects/{project}"):
            self.zk.create(f"{ROOT}/projects/{project}", {"branch": branch, "path": str(repo)})
        log.info("Project %s branch %s is at %s", project, branch, head)
        return repo

    # Changes ------------------------------------------------------------

    def _change_path(self, number: int) -> str:
        return f"{ROOT}/changes/{number}"

    def get_change(self, number: int) -> dict:
        data = self.zk.get_or_none(self._change_path(number))
        if data is None:
            raise InboxError(f"There is no change {number}.")
        return data

    def list_changes(self) -> list[int]:
        return sorted(int(n) for n in self.zk.get_children(f"{ROOT}/changes"))

    def _emit(self, event: TriggerEvent) -> None:
        self.zk.create(f"{EVENT_QUEUE}/event-", event.to_dict(), sequence=True)
        log.info("[e: %s] %s for change %s,%s", event.id, event.type, event.change, event.patchset)

    def submit(
        self,
        path: Path | str,
        project: str,
        branch: str | None = None,
        change: int | None = None,
        owner: str | None = None,
    ) -> tuple[int, int]:
        """Store a series as a new change, or as a new patchset of `change`."""
        series = read_series(path)
        proj = self.get_project(project)
        branch = branch or proj["branch"]
        if change is not None:
            existing = self.get_change(change)
            if existing["project"] != project:
                raise InboxError(f"Change {change} belongs to project {existing['project']}.")
        else:
            seq = self.zk.create(f"{ROOT}/change-numbers/n-", None, sequence=True)
            change = int(seq.rsplit("-", 1)[1]) + 1
        return self._store_patchset(series, project, branch, change, owner or series.author)

    def _store_patchset(
        self, series: Series, project: str, branch: str, number: int, owner: str
    ) -> tuple[int, int]:
        repo = self.repo_path(project)
        blob = git(repo, "hash-object", "-w", "--stdin", input=series.mbox()).strip()
        path = self._change_path(number)
        while True:
            try:
                data, version = self.zk.get(path)
            except NoNodeError:
                data, version = None, None
            if data is None:
                data = {
                    "number": number,
                    "project": project,
                    "branch": branch,
                    "subject": series.subject,
                    "owner": owner,
                    "status": "NEW",
                    "patchsets": [],
                    "votes": [],
                    "comments": [],
                }
            ps = len(data["patchsets"]) + 1
            ref = f"refs/changes/{number % 100:02d}/{number}/{ps}"
            git(repo, "update-ref", ref, blob)
            data["subject"] = series.subject
            data["patchsets"].append(
                {
                    "number": ps,
                    "ref": ref,
                    "revision": blob,
                    "created": time.time(),
                    "patches": [p.subject for p in series.patches],
                }
            )
            try:
                if version is None:
                    self.zk.create(path, data)
                else:
                    self.zk.set(path, data, version=version)
                break
            except BadVersionError:
                continue
        self._emit(
            TriggerEvent(
                type="patchset-created",
                connection=self.name,
                project=project,
                branch=branch,
                change=number,
                patchset=ps,
            )
        )
        return number, ps

    def recheck(self, number: int, comment: str = "recheck") -> None:
        change = self.get_change(number)
        ps = len(change["patchsets"])
        self._update(
            number,
            lambda d: d["comments"].append(
                {"patchset": ps, "message": comment, "time": time.time()}
            ),
        )
        self._emit(
            TriggerEvent(
                type="comment-added",
                connection=self.name,
                project=change["project"],
                branch=change["branch"],
                change=number,
                patchset=ps,
                comment=comment,
            )
        )

    def _update(self, number: int, mutate) -> dict:
        path = self._change_path(number)
        while True:
            data, version = self.zk.get(path)
            mutate(data)
            try:
                self.zk.set(path, data, version=version)
                return data
            except BadVersionError:
                continue

    def get_series(self, project: str, change: int, patchset: int) -> bytes:
        ref = f"refs/changes/{change % 100:02d}/{change}/{patchset}"
        return git(self.repo_path(project), "cat-file", "blob", ref).encode()

    def latest_patchset(self, change: int) -> int:
        return len(self.get_change(change)["patchsets"])

    def review_ops(
        self, change: int, patchset: int, pipeline: str, value: int | None, message: str
    ) -> tuple[str, dict, int]:
        """The ZK write that records a vote, for the caller's transaction.

        Returned rather than applied so the scheduler can record the vote and
        drop the queue item in one transaction: a vote is given exactly once.
        """
        path = self._change_path(change)
        data, version = self.zk.get(path)
        data["votes"].append(
            {
                "patchset": patchset,
                "pipeline": pipeline,
                "value": value,
                "message": message,
                "time": time.time(),
            }
        )
        return path, data, version
