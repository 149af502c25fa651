"""The built-in local inbox: a review system kept in ZooKeeper plus bare git repos.

It plays the part Gerrit plays elsewhere: `zuul-lite submit` uploads a series
as a change (or a new patchset of one), `recheck` leaves a comment, `approve`
approves it for the gate; each of these posts a trigger event to the
scheduler's event queue, so the scheduler cannot tell the sources apart. The
series itself is stored in the project's bare repository as a blob under
`refs/changes/<nn>/<change>/<patchset>`; changes, patchsets, comments and
votes are JSON in ZooKeeper (zuul_lite/state.py owns the paths). A gate merge
pushes the tested commit to the project's branch and marks the change MERGED.
Whenever a branch moves (an import, a gate merge) it posts ref-updated in the
ZooKeeper transaction that records the branch's new head in the project's
znode, so each move is announced exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nodepool_lite.exceptions import BadVersionError, NodeExistsError, NoNodeError
from zuul_lite.connections import Connection, Report
from zuul_lite.connections.depends_index import DependsOnIndex
from zuul_lite.exceptions import InboxError
from zuul_lite.git import cat_blobs, git
from zuul_lite.model import Change, TriggerEvent
from zuul_lite.series import Series, read_series

if TYPE_CHECKING:
    from nodepool_lite.zk import Transaction
    from zuul_lite.merger import Merger

log = logging.getLogger("zuul_lite.connections.local")

NOT_PRELOADED = object()


class LocalConnection(Connection):
    driver = "local"
    reports_in_transaction = True

    def setup(self) -> None:
        self.zk = self.state.zk
        # Changes read ahead by `preloaded`: number -> (data, version), None
        # (no such change) or the ValueError of a znode that is not JSON.
        self._preloaded: dict[int, tuple[dict, int] | ValueError | None] = {}
        self.git_root = self.state_dir / "git"
        self.depends_index = DependsOnIndex(self.zk, self.state.local_path("depends-on"))
        if self.post_event is None:
            # A CLI process: events go straight to the scheduler's queue.
            self.post_event = lambda event: self.state.put_trigger_event(event.to_dict())

    # Projects -----------------------------------------------------------

    def repo_path(self, project: str) -> Path:
        return self.git_root / f"{project}.git"

    def branch_repo(self, project: str) -> str:
        return str(self.repo_path(project))

    def projects(self) -> list[str]:
        return self.zk.get_children(self.state.local_path("projects"))

    def get_project(self, project: str) -> dict:
        data = self.zk.get_or_none(self.state.local_path("projects", project))
        if data is None:
            known = ", ".join(self.projects()) or "none"
            raise InboxError(f"Unknown project {project} (known projects: {known}).")
        return data

    def import_project(self, project: str, source: Path, branch: str = "master") -> Path:
        """Make `source` (a git repo) the review tree of `project`; reuse it if present.

        A branch head not announced before (the first import, or a repository
        found at another head) posts ref-updated, once.
        """
        repo = self.repo_path(project)
        if not (repo / "HEAD").exists():
            self.git_root.mkdir(parents=True, exist_ok=True)
            tmp = repo.with_suffix(".tmp")
            git(None, "clone", "--bare", "--quiet", str(source), str(tmp))
            tmp.rename(repo)
            log.info("Imported %s from %s", project, source)
        head = git(repo, "rev-parse", f"refs/heads/{branch}").strip()
        self.state.ensure_roots()
        self.zk.ensure_path(self.state.local_path("projects"))
        while True:
            txn = self.state.transaction()
            event = self._announce_head(
                project, branch, head, txn, new={"branch": branch, "path": str(repo)}
            )
            if event is None:
                break
            try:
                txn.commit()
            except (BadVersionError, NodeExistsError):
                continue  # moved or imported meanwhile: look again
            self._log_event(event)
            break
        log.info("Project %s branch %s is at %s", project, branch, head)
        return repo

    def head(self, project: str, branch: str | None = None) -> str:
        """The commit `branch` (the project's own by default) is at."""
        branch = branch or self.get_project(project)["branch"]
        return git(self.repo_path(project), "rev-parse", f"refs/heads/{branch}").strip()

    def _announce_head(
        self, project: str, branch: str, head: str, txn: Transaction, new: dict | None = None
    ) -> TriggerEvent | None:
        """Add to `txn` what says `branch` of `project` is at `head` now: the
        head recorded in the project's znode (a versioned write: a concurrent
        move fails the transaction, which is then done again) and a
        ref-updated event. None, and nothing added, when that head was
        announced already. `new`: the project's znode if there is none yet."""
        path = self.state.local_path("projects", project)
        try:
            data, version = self.zk.get(path)
        except NoNodeError:
            if new is None:
                raise
            data, version = new, None
        heads = data.setdefault("heads", {})
        old = heads.get(branch, "")
        if old == head:
            return None
        heads[branch] = head
        if version is None:
            txn.create(path, data)
        else:
            txn.set(path, data, version)
        event = TriggerEvent(
            type="ref-updated",
            connection=self.name,
            project=project,
            branch=branch,
            change=0,
            patchset=0,
            ref=f"refs/heads/{branch}",
            oldrev=old,
            newrev=head,
        )
        self.state.add_trigger_event(txn, event.to_dict())
        return event

    # Changes ------------------------------------------------------------

    def change_path(self, number: int) -> str:
        return self.state.local_path("changes", number)

    @contextmanager
    def preloaded(self, numbers: Iterable[int]) -> Iterator[None]:
        """The changes in one pipelined read on entry; each is served once from
        it (a second read, e.g. after a refused versioned write, goes to
        ZooKeeper) and whatever is left is dropped on exit."""
        wanted = sorted(set(numbers))
        if len(wanted) < 2:
            yield
            return
        read = self.zk.get_many([self.change_path(n) for n in wanted], versions=True)
        self._preloaded = {n: found for n, found in zip(wanted, read, strict=True)}
        try:
            yield
        finally:
            self._preloaded = {}

    def _read_change(self, number: int) -> tuple[dict, int]:
        """(data, version) of a stored change; NoNodeError if there is none."""
        found = self._preloaded.pop(number, NOT_PRELOADED)
        if isinstance(found, tuple):
            return found
        if found is None:
            raise NoNodeError(self.change_path(number))
        return self.zk.get(self.change_path(number))  # not read ahead, or not JSON: say so

    def get_change_data(self, number: int) -> dict:
        """The stored change: patchsets, comments, votes (what `show` prints)."""
        try:
            return self._read_change(number)[0]
        except NoNodeError:
            raise InboxError(f"There is no change {number}.") from None

    def get_change(self, number: int, patchset: int | None = None) -> Change:
        data = self.get_change_data(number)
        latest = len(data["patchsets"])
        ps = patchset or latest
        if not 1 <= ps <= latest:
            raise InboxError(f"Change {number} has no patchset {ps}.")
        return Change(
            connection=self.name,
            project=data["project"],
            branch=data["branch"],
            number=number,
            patchset=ps,
            subject=data["subject"],
            owner=data["owner"],
            status=data["status"],
            latest_patchset=latest,
            approved=any(a.get("patchset") == latest for a in data.get("approvals", [])),
            depends_on=list(data["patchsets"][ps - 1].get("depends_on", [])),
        )

    def changes_depending_on(self, change: Change) -> list[Change]:
        """From the index of Depends-On footers, so no change is read in vain."""
        found = []
        for number in self.depends_index.naming(change.number, self.number_in):
            other = self.get_change(number)
            if other.status == "NEW" and any(
                (dep := self.find_change(ref)) is not None and dep.number == change.number
                for ref in other.depends_on
            ):
                found.append(other)
        return found

    def list_changes(self) -> list[int]:
        return sorted(int(n) for n in self.zk.get_children(self.state.local_path("changes")))

    def _emit_for(self, change: dict, kind: str, patchset: int, comment: str = "") -> None:
        self._emit(
            TriggerEvent(
                type=kind,
                connection=self.name,
                project=change["project"],
                branch=change["branch"],
                change=change["number"],
                patchset=patchset,
                comment=comment,
            )
        )

    def _emit(self, event: TriggerEvent) -> None:
        assert self.post_event is not None
        self.post_event(event)
        self._log_event(event)

    @staticmethod
    def _log_event(event: TriggerEvent) -> None:
        if event.type == "ref-updated":
            old = event.oldrev[:12] or "nothing"
            what = f"{event.ref} of {event.project}: {old} -> {event.newrev[:12]}"
        else:
            what = f"for change {event.change},{event.patchset}"
        log.info("[e: %s] %s %s", event.id, event.type, what)

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
            existing = self.get_change_data(change)
            if existing["status"] != "NEW":
                raise InboxError(
                    f"Change {change} is {existing['status']}: it takes no new patchset."
                )
            if existing["project"] != project:
                raise InboxError(f"Change {change} belongs to project {existing['project']}.")
        else:
            seq = self.zk.create(
                self.state.local_path("change-numbers", "n-"), None, sequence=True
            )
            change = int(seq.rsplit("-", 1)[1]) + 1
        return self._store_patchset(series, project, branch, change, owner or series.author)

    def _store_patchset(
        self, series: Series, project: str, branch: str, number: int, owner: str
    ) -> tuple[int, int]:
        repo = self.repo_path(project)
        blob = git(repo, "hash-object", "-w", "--stdin", input=series.mbox()).strip()
        path = self.change_path(number)
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
                    "approvals": [],
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
                    "depends_on": series.depends_on(),
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
        self.depends_index.set(number, series.depends_on())
        self._emit_for(data, "patchset-created", ps)
        return number, ps

    def recheck(self, number: int, comment: str = "recheck") -> None:
        self.comment(number, comment)

    def comment(self, number: int, comment: str) -> None:
        change = self.get_change_data(number)
        ps = len(change["patchsets"])
        self._update(
            number,
            lambda d: d["comments"].append(
                {"patchset": ps, "message": comment, "time": time.time()}
            ),
        )
        self._emit_for(change, "comment-added", ps, comment=comment)

    def approve(self, number: int) -> int:
        """Approve the latest patchset for the gate; returns that patchset."""
        change = self.get_change_data(number)
        if change["status"] != "NEW":
            raise InboxError(
                f"Change {number} is {change['status'].lower()}: only an open change "
                "can be approved."
            )
        ps = len(change["patchsets"])
        self._update(
            number,
            lambda d: d.setdefault("approvals", []).append({"patchset": ps, "time": time.time()}),
        )
        self._emit_for(change, "change-approved", ps)
        return ps

    def abandon(self, number: int) -> None:
        change = self.get_change_data(number)
        if change["status"] != "NEW":
            raise InboxError(f"Change {number} is {change['status'].lower()} already.")
        self._update(number, lambda d: d.update(status="ABANDONED"))
        self._emit_for(change, "change-abandoned", len(change["patchsets"]))

    def _update(self, number: int, mutate) -> dict:
        path = self.change_path(number)
        while True:
            data, version = self.zk.get(path)
            mutate(data)
            try:
                self.zk.set(path, data, version=version)
                return data
            except BadVersionError:
                continue

    def get_series(self, change: Change) -> bytes:
        series = self.get_series_many([change])[0]
        if isinstance(series, Exception):
            raise series
        return series

    def get_series_many(self, changes: list[Change]) -> list[bytes | Exception]:
        """Byte for byte, one git process per project."""
        found: dict[str, bytes | Exception] = {}
        for project in {c.project for c in changes}:
            ours = [c for c in changes if c.project == project]
            refs = [f"refs/changes/{c.number % 100:02d}/{c.number}/{c.patchset}" for c in ours]
            for change, blob in zip(ours, cat_blobs(self.repo_path(project), refs), strict=True):
                found[change.label] = blob or InboxError(
                    f"The series of change {change.label} is missing from {project}."
                )
        return [found[c.label] for c in changes]

    def latest_patchset(self, change: int) -> int:
        return len(self.get_change_data(change)["patchsets"])

    # Reporting and merging ----------------------------------------------

    @staticmethod
    def _vote(change: Change, report: Report) -> dict:
        return {
            "patchset": change.patchset,
            "pipeline": report.pipeline,
            "value": report.verified,
            "message": report.message,
            "time": time.time(),
            "report_id": report.id,
        }

    def report(self, change: Change, report: Report) -> None:
        def add(data: dict) -> None:
            if not any(v.get("report_id") == report.id for v in data["votes"]):
                data["votes"].append(self._vote(change, report))

        self._update(change.number, add)

    def report_ops(self, change: Change, report: Report, txn: Transaction) -> None:
        """The vote, as a versioned write of the change: if the change is
        written meanwhile (a comment), the transaction fails and is redone.
        A gate merge (pushed by `merge` before this) marks the change merged
        and announces the branch's new head in the same transaction: once,
        even when the merge is retried after a crash. The changes of a gate
        run reported in one transaction move the branch once, to the last
        one's commit: one ref-updated, as for one push."""
        path = self.change_path(change.number)
        data, version = self._read_change(change.number)
        if not any(v.get("report_id") == report.id for v in data["votes"]):
            data["votes"].append(self._vote(change, report))
        if report.merged_sha and data["status"] == "NEW":
            data.update(status="MERGED", merged_sha=report.merged_sha)
            log.info(
                "Change %s merged into %s at %s",
                change.label,
                change.branch,
                report.merged_sha[:12],
            )
            sha = report.merged_sha
            txn.add_last(
                (self.name, change.project, change.branch),
                lambda last: self._announce_head(change.project, change.branch, sha, last),
            )
        txn.set(path, data, version)

    def has_report(self, change: Change, report: Report) -> bool:
        votes = self.get_change_data(change.number)["votes"]
        return any(v.get("report_id") == report.id for v in votes)

    def merge(self, change: Change, sha: str, merger: Merger) -> str | None:
        return self.merge_many([change], [sha], merger)[0]

    def merge_many(
        self, changes: list[Change], shas: list[str], merger: Merger
    ) -> list[str | None]:
        """Every change is checked first (one round trip), then one push of
        the state of the last one still open lands them all: a change closed
        meanwhile, and those behind it, stay off the branch. The changes are
        marked merged by the vote's write (report_ops), in the transaction
        that removes the item: a push that lands twice is a no-op."""
        stored = self.zk.get_many([self.change_path(c.number) for c in changes])
        results: list[str | None] = []
        for change, sha, data in zip(changes, shas, stored, strict=True):
            if not isinstance(data, dict):
                refused: str | None = f"There is no change {change.number}."
            else:
                refused = self._merge_refused(change, data, sha)
            if refused:
                results.append(refused)
                break
            results.append(None)
        landed = len(results) - (1 if results[-1] else 0)
        if landed:
            head = changes[landed - 1]
            error = merger.push(
                head.project, shas[landed - 1], self.repo_path(head.project), head.branch
            )
            if error:
                return [error]
        return results

    @staticmethod
    def _merge_refused(change: Change, data: dict, sha: str) -> str | None:
        """Why the change cannot merge now; "" if it merged at `sha` already
        (a retry), None if it is open."""
        if data["status"] == "MERGED":
            return (
                ""
                if data.get("merged_sha") == sha
                else f"Change {change.number} is merged already."
            )
        if data["status"] != "NEW":
            return f"Change {change.number} was {data['status'].lower()} meanwhile."
        return None
