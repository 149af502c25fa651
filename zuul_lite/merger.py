"""The merger: applies the changes of a gate item with `git am` and publishes a ref.

A request lists the changes to apply in order: every change ahead of the item
in its queue, then the item's own. The merger fetches the branch head from the
review repository, applies each series with `git am --3way --keep-cr` and
publishes exactly that state at the request's ref, recording the commit at
which each change ends. It works in its own non-bare clone per project
(`<state>/merger/<project>`), so the review tree is never touched; nodes fetch
the published `refs/zuul/...` from that clone (bind-mounted read-only).

A series that does not apply is the change's fault (MERGE_CONFLICT); anything
else that goes wrong is ours (`internal=True`, the scheduler retries). A
workspace left broken by a killed or failed merger is repaired, or cloned
again keeping its published refs, before the next merge. One Merger owns its
root: it assumes no other process writes there (stale git locks are removed).
Merges run one at a time; `push` (the gate's merge into the branch) does not
wait for a running merge, only for a re-clone swapping the workspace.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zuul_lite.git import GitError, git, rev_parse

log = logging.getLogger("zuul_lite.merger")

# Output of a failed `git am` that means the fault is ours, not the patch's.
_OUR_FAULT = re.compile(
    r"No space left|Input/output error|Permission denied|Read-only file system|"
    r"unable to (write|create)|index file corrupt|is corrupt|bad object|"
    r"Cannot allocate memory|[Oo]ut of memory|cannot lock ref|\.lock'?: File exists"
)
# ... and that means the series is at fault (conflict, not a patch at all).
_PATCH_FAULT = re.compile(
    r"Patch failed at|Patch is empty|Patch format detection failed|corrupt patch"
)


@dataclass(frozen=True)
class MergeChange:
    label: str  # "3,1" (change,patchset)
    series: bytes  # the mbox exactly as submitted


@dataclass(frozen=True)
class MergeRequest:
    item_uuid: str
    project: str
    branch: str
    ref: str  # the ref to publish
    changes: Sequence[MergeChange]  # the changes ahead in the queue, then the item's own
    review_repo: Path  # where the branch head comes from (a local repository)
    event_id: str = ""
    # A commit of the workspace to apply onto instead of the branch head: the
    # state the item ahead was tested on, so each gate item applies only its
    # own series (its changes ahead are in that commit already).
    base: str | None = None
    base_changes: Sequence[str] = ()  # labels of the changes `base` holds, for messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "changes", tuple(self.changes))


@dataclass(frozen=True)
class MergeResult:
    item_uuid: str
    base_sha: str | None = None
    head_sha: str | None = None
    ref: str | None = None  # the request's ref; published only when error is None
    error: str | None = None  # one sentence, for the report
    failed_change: str | None = None  # label of the change that does not apply
    internal: bool = False  # the error is the merger's fault: retry, never MERGE_CONFLICT
    commits: dict[str, str] = field(default_factory=dict)  # label -> head after that change


class _EventLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[e: {self.extra['event_id']}] {msg}", kwargs


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sentence(prefix: str, detail: str) -> str:
    return f"{prefix}: {_one_line(detail).rstrip('.')}."


def _internal_error(e: BaseException) -> str:
    return _sentence("Internal merger error, not caused by the change", f"{type(e).__name__}: {e}")


def _patch_at_fault(e: GitError) -> bool:
    """Whether `git am` failed because of the series rather than because of us."""
    return (
        e.returncode > 0
        and not _OUR_FAULT.search(e.output)
        and bool(_PATCH_FAULT.search(e.output))
    )


def _conflict(
    changes: Sequence[MergeChange],
    index: int,
    output: str,
    files: list[str],
    base_changes: Sequence[str] = (),
) -> str:
    """One sentence saying which patch of which change does not apply onto what."""
    ahead = [*base_changes, *(c.label for c in changes[:index])]
    where = "to the branch head"
    if ahead:
        where += f" with {'change' if len(ahead) == 1 else 'changes'} {' '.join(ahead)} applied"
    match = re.search(r"Patch failed at (\d+) (.*)", output)
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith("error: patch failed")), "")
    # Without a base blob to merge with, git only says "sha1 information is lacking (FILE)".
    files = files or re.findall(r"lacking or useless \((.+)\)", output)
    detail = detail.removeprefix("error: ") or (files and "conflict in " + ", ".join(files))
    if match:
        what = f"patch {int(match.group(1))} ('{match.group(2).strip()}')"
    else:
        what, detail = "the series", (lines or ["git am failed"])[0].rstrip(".")
    sentence = f"{what} does not apply {where}" + (f": {detail}." if detail else ".")
    if index == len(changes) - 1:
        return sentence[0].upper() + sentence[1:]
    return f"Change {changes[index].label} ahead in the queue: {sentence}"


def _resolve(repo: Path, rev: str) -> str:
    """The commit `rev` names, or "" when there is none."""
    return git(repo, "rev-parse", "--verify", "--quiet", rev, check=False).strip()


class Merger:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()  # one merge (or forget) at a time
        self._swap = threading.Lock()  # a push reads the workspace a re-clone replaces
        self._suspect: set[str] = set()
        # Projects whose workspace was checked since this merger started or its
        # last error: the checks cost a few git processes per merge otherwise.
        self._sound: set[str] = set()
        self._fetched: dict[str, str] = {}  # project/branch -> branch head last fetched
        # (project, ref, sha) the workspace is clean at, after the last merge:
        # a gate request chained on that ref needs no checkout.
        self._at: tuple[str, str, str] | None = None
        # Projects whose worktree holds no stray file (only a failed `git am`
        # leaves some): they need no `git clean` before a merge.
        self._clean: set[str] = set()

    def workspace(self, project: str) -> Path:
        return self.root / project

    def _sibling(self, project: str, suffix: str) -> Path:
        ws = self.workspace(project)
        return ws.with_name(ws.name + suffix)

    # -- keeping the workspace sound ---------------------------------------

    def _mark_suspect(self, project: str) -> None:
        self._at = None
        self._clean.discard(project)
        self._suspect.add(project)
        self._sound.discard(project)
        self._fetched = {k: v for k, v in self._fetched.items() if not k.startswith(project + "/")}
        try:  # survives a restart of the merger
            self._sibling(project, ".suspect").touch()
        except OSError:
            pass

    def _is_suspect(self, project: str) -> bool:
        return project in self._suspect or self._sibling(project, ".suspect").exists()

    def _ready_workspace(self, req: MergeRequest, elog: logging.LoggerAdapter) -> Path:
        """The project's workspace, repaired or cloned again if it is not sound."""
        ws, tmp, old = (self._sibling(req.project, s) for s in ("", ".tmp", ".old"))
        if tmp.exists():
            elog.warning("Removing %s left by an interrupted clone", tmp)
            shutil.rmtree(tmp)
        if old.exists():  # a re-clone was interrupted
            if ws.exists():
                shutil.rmtree(old)
            else:
                old.rename(ws)
        if self._is_suspect(req.project):
            elog.warning("Workspace %s may be damaged by an earlier error; cloning it again", ws)
            return self._reclone(req, elog)
        if req.project in self._sound:
            return ws
        gitdir = ws / ".git"
        if not gitdir.is_dir():
            return self._reclone(req, elog)
        for lock in [*gitdir.glob("*.lock"), *(gitdir / "refs").rglob("*.lock")]:
            elog.warning("Removing stale %s", lock)
            lock.unlink(missing_ok=True)
        for state in ("rebase-apply", "rebase-merge"):
            if (gitdir / state).exists():
                elog.warning("Workspace %s was left in the middle of `git am`; resetting it", ws)
                shutil.rmtree(gitdir / state)
        try:
            rev_parse(ws, "HEAD^{commit}")
        except GitError:
            try:  # a fresh clone whose HEAD names a branch that does not exist yet
                git(ws, "symbolic-ref", "--quiet", "HEAD")
            except GitError as e:
                elog.warning(
                    "Workspace %s is broken (%s); cloning it again", ws, _one_line(str(e))
                )
                return self._reclone(req, elog)
        git(ws, "config", "gc.autoDetach", "false")  # no gc left running behind our back
        self._sound.add(req.project)
        return ws

    def _reclone(self, req: MergeRequest, elog: logging.LoggerAdapter) -> Path:
        """Clone the project afresh next to the workspace, keep its published refs, swap."""
        self._at = None
        ws, tmp, old = (self._sibling(req.project, s) for s in ("", ".tmp", ".old"))
        ws.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        elog.info("Cloning %s into %s", req.review_repo, ws)
        git(None, "clone", "--quiet", "--no-checkout", str(req.review_repo), str(tmp))
        git(tmp, "config", "gc.autoDetach", "false")
        if (ws / ".git").is_dir():  # nodes may still fetch the refs of items in flight
            try:
                git(tmp, "fetch", "--quiet", "--no-tags", str(ws), "+refs/zuul/*:refs/zuul/*")
            except GitError as e:
                elog.warning("Published refs of %s are lost: %s", ws, _one_line(str(e)))
        with self._swap:
            if ws.exists():
                ws.rename(old)
            tmp.rename(ws)
        shutil.rmtree(old, ignore_errors=True)
        self._suspect.discard(req.project)
        self._sibling(req.project, ".suspect").unlink(missing_ok=True)
        self._sound.add(req.project)
        return ws

    # -- merging -----------------------------------------------------------

    def _branch_head(self, ws: Path, req: MergeRequest) -> str | None:
        """The branch head, fetched only when it moved; None if there is no such branch."""
        ref = f"refs/heads/{req.branch}"
        remote = f"refs/remotes/origin/{req.branch}"
        key = f"{req.project}/{req.branch}"
        if Path(req.review_repo).is_dir():  # a local repository: its head costs no fetch
            head = _resolve(Path(req.review_repo), f"{ref}^{{commit}}")
            if head and self._fetched.get(key) == head:
                return head
        try:
            git(ws, "fetch", "--quiet", "--no-tags", str(req.review_repo), f"+{ref}:{remote}")
        except GitError as e:
            if "couldn't find remote ref" in e.output:
                return None
            raise
        head = rev_parse(ws, f"{remote}^{{commit}}")
        self._fetched[key] = head
        return head

    def _checkout_base(self, ws: Path, req: MergeRequest) -> str | None:
        """Check the base out clean: the branch head, or `req.base`; None if the
        branch does not exist, "" if `req.base` is not there."""
        at, self._at = self._at, None
        if at is not None and req.base and at[0] == req.project and req.base in at[1:]:
            return at[2]  # the previous merge left the workspace exactly there
        if req.base:
            base = _resolve(ws, f"{req.base}^{{commit}}")
            if not base:
                return ""
        else:
            base = self._branch_head(ws, req)
            if base is None:
                return None
        git(ws, "checkout", "--quiet", "--force", "--detach", base)
        if req.project not in self._clean:
            git(ws, "clean", "-qfdx")
            self._clean.add(req.project)
        return base

    def merge(self, req: MergeRequest) -> MergeResult:
        """Never raises: a failure that is not the changes' becomes internal=True."""
        elog = _EventLog(log, {"event_id": req.event_id})
        with self._lock:
            try:
                return self._merge(req, elog)
            except Exception as e:
                elog.exception("Merger error for %s", req.ref)
                self._mark_suspect(req.project)
                error = _internal_error(e)
                return MergeResult(req.item_uuid, ref=req.ref, error=error, internal=True)

    def _merge(self, req: MergeRequest, elog: logging.LoggerAdapter) -> MergeResult:
        ws = self._ready_workspace(req, elog)
        try:
            base = self._checkout_base(ws, req)
        except GitError as e:
            elog.warning("Preparing %s failed (%s); cloning it again", ws, _one_line(str(e)))
            ws = self._reclone(req, elog)
            base = self._checkout_base(ws, req)
        if base is None:
            error = f"Branch '{req.branch}' does not exist in project {req.project}."
            elog.info("Merge of %s failed: %s", req.ref, error)
            return MergeResult(req.item_uuid, ref=req.ref, error=error)
        if base == "":
            # The state of the changes ahead was not published (their merge
            # failed): this request is moot, the scheduler re-bases the item.
            ahead = req.base_changes[-1] if req.base_changes else None
            error = f"The state of the changes ahead ({' '.join(req.base_changes)}) is not there."
            elog.info("Merge of %s skipped: %s", req.ref, error)
            return MergeResult(req.item_uuid, ref=req.ref, error=error, failed_change=ahead)
        commits: dict[str, str] = {}
        head = base
        for index, change in enumerate(req.changes):
            before = head
            try:
                # The committer date is the author's, so the same series on the
                # same base is the same commit in every build set: a gate item
                # tested on top of another stays a fast-forward of its merge.
                git(
                    ws,
                    "am",
                    "--quiet",
                    "--3way",
                    "--keep-cr",
                    "--committer-date-is-author-date",
                    "--empty=drop",  # a cover letter ("[PATCH 0/N]") is not a commit
                    input=change.series,
                )
            except GitError as e:
                files = git(ws, "diff", "--name-only", "--diff-filter=U", check=False).split()
                git(ws, "am", "--abort", check=False)
                self._clean.discard(req.project)
                if not _patch_at_fault(e):
                    raise
                error = _conflict(req.changes, index, e.output, files, req.base_changes)
                elog.info("Merge of %s failed: %s", req.ref, error)
                return MergeResult(
                    req.item_uuid, base, None, req.ref, error, change.label, commits=commits
                )
            head = commits[change.label] = rev_parse(ws, "HEAD")
            if head == before:
                error = _conflict(
                    req.changes, index, "the series holds no patch", [], req.base_changes
                )
                elog.info("Merge of %s failed: %s", req.ref, error)
                del commits[change.label]
                return MergeResult(
                    req.item_uuid, base, None, req.ref, error, change.label, commits=commits
                )
        git(ws, "update-ref", req.ref, head)
        self._at = (req.project, req.ref, head)
        elog.info("Published %s = %s: %s on %s", req.ref, head[:12], " ".join(commits), base[:12])
        return MergeResult(req.item_uuid, base, head, req.ref, commits=commits)

    def forget(self, project: str, ref: str) -> None:
        """Drop a published ref once its item is reported, so refs do not pile up."""
        with self._lock:
            git(self.workspace(project), "update-ref", "-d", ref, check=False)

    # -- gate merge --------------------------------------------------------

    @staticmethod
    def _landed(review_repo: Path, head: str, sha: str) -> bool:
        try:  # also true when head == sha
            git(review_repo, "merge-base", "--is-ancestor", sha, head)
            return True
        except GitError:
            return False

    def push(self, project: str, sha: str, review_repo: Path, branch: str) -> str | None:
        """Fast-forward `branch` of the (bare, local) review repo to the tested `sha`.

        None once the branch contains `sha` (also when an earlier push landed it),
        else one sentence saying why it was not merged.
        """
        with self._swap:  # not self._lock: a push need not wait for a merge
            try:
                return self._push(project, sha, Path(review_repo), branch)
            except Exception as e:
                log.exception("Pushing %s to %s of %s failed", sha, branch, project)
                where = f"Pushing {sha[:12]} to '{branch}' of {project} failed"
                return _sentence(where, f"{type(e).__name__}: {e}")

    def _push(self, project: str, sha: str, review_repo: Path, branch: str) -> str | None:
        ref = f"refs/heads/{branch}"
        head = git(review_repo, "rev-parse", "--verify", "--quiet", ref, check=False).strip()
        if not re.fullmatch(r"[0-9a-f]{40,64}", head):
            return f"Branch '{branch}' does not exist in project {project}."
        if head == sha or self._landed(review_repo, head, sha):
            log.info("%s is already on %s of %s", sha[:12], branch, project)
            return None
        try:
            git(self.workspace(project), "push", "--quiet", str(review_repo), f"{sha}:{ref}")
        except GitError as e:
            now = rev_parse(review_repo, ref)
            if self._landed(review_repo, now, sha):
                return None
            if now != head or re.search(r"non-fast-forward|fetch first", e.output):
                error = (
                    f"Not merged: branch '{branch}' of {project} moved to {now[:12]} while the "
                    f"change was tested, so {sha[:12]} (the tested state) is not a fast-forward "
                    "of it."
                )
            else:
                error = _sentence(
                    f"Pushing {sha[:12]} to '{branch}' of {project} failed", e.output
                )
            log.warning("%s", error)
            return error
        log.info("Pushed %s to %s of %s", sha[:12], branch, project)
        return None


class MergerThread(threading.Thread):
    """Serves merge requests in order and hands each result to `on_result`; never dies."""

    def __init__(self, merger: Merger, on_result: Callable[[MergeResult], None]) -> None:
        super().__init__(name="merger", daemon=True)
        self.merger = merger
        self.on_result = on_result
        self.requests: queue.Queue[MergeRequest | tuple[str, str] | None] = queue.Queue()

    def submit(self, req: MergeRequest) -> None:
        self.requests.put(req)

    def forget(self, project: str, ref: str) -> None:
        """Drop a published ref, on this thread: the caller never waits on a merge."""
        self.requests.put((project, ref))

    def stop(self) -> None:
        self.requests.put(None)

    def run(self) -> None:
        while True:
            req = self.requests.get()
            if req is None:
                return
            if isinstance(req, tuple):
                try:
                    self.merger.forget(*req)
                except Exception:
                    log.exception("Could not drop %s of %s", req[1], req[0])
                continue
            try:
                result = self.merger.merge(req)
            except Exception as e:  # merge() catches everything; this is the last net
                log.exception("[e: %s] Merger error for %s", req.event_id, req.ref)
                error = _internal_error(e)
                result = MergeResult(req.item_uuid, ref=req.ref, error=error, internal=True)
            try:
                self.on_result(result)
            except Exception:
                log.exception("[e: %s] Handing over the merge result failed", req.event_id)
