"""The merger: applies the changes of a gate item with `git am` and publishes a ref.

A request lists the changes to apply in order: every change ahead of the item
in its queue, then the item's own. The merger fetches the branch head from the
review repository, applies each series with `git am --3way --keep-cr` and
publishes exactly that state at the request's ref, recording the commit at
which each change ends; a request with no changes publishes its base commit
as it is (a branch head under test). It works in its own non-bare clone per project
(`<state>/merger/<project>`), so the review tree is never touched; nodes fetch
the published `refs/zuul/...` from that clone (bind-mounted read-only).

Merges run in parallel, one per worktree: worker 0 uses the clone itself,
worker N a `git worktree` of it (`<project>.wtN`), which shares its refs and
objects, so every worker publishes into the repository the nodes fetch from
(zuul_lite/merger_pool.py runs the workers). Each worktree has its own HEAD,
index and `git am` state; fetching the branch head into the shared
`refs/remotes/origin/...` is serialised per project.

A series that does not apply is the change's fault (MERGE_CONFLICT); anything
else that goes wrong is ours (`internal=True`, the scheduler retries). A
workspace left broken by a killed or failed merger is repaired, or cloned
again keeping its published refs (its worktrees are made again), before the
next merge: under the project's exclusive lock, which no merge or `forget` on
that project holds meanwhile. One Merger owns its root: it assumes no other
process writes there (stale git locks are removed). `push` (the gate's merge
into the branch) does not wait for merges, only for a re-clone swapping the
workspace.
"""

from __future__ import annotations

import email.header
import email.parser
import email.utils
import io
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from zuul_lite.git import GitError, git, rev_parse
from zuul_lite.series import header_text, is_from_line, split_mbox

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
# A shared ref some other git process holds locked: busy, not broken.
_REF_LOCKED = re.compile(r"cannot lock ref|Unable to create '[^']*\.lock'|\.lock'?: File exists")
# Automatic gc is off in the workspaces (run by one worker, it would lock refs
# and HEADs the others are updating); it runs between merges every so often.
GC_EVERY = 200


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
    # What to apply onto instead of the branch head: the state the item ahead
    # was tested on (its ref, or its commit), so each gate item applies only
    # its own series (its changes ahead are in that commit already); or, with
    # no changes, a commit of the review repository to publish as it is (a
    # branch head under test), fetched if the workspace lacks it.
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


def _clean_subject(subject: str) -> str:
    """A mail's subject as `git am` makes it the commit's (cleanup_subject in
    git's mailinfo.c: leading "Re:", "[PATCH n/m]" groups and spaces go)."""
    while True:
        cleaned = re.sub(r"^(?:[ \t:]+|[Rr][Ee]:|\[[^\]]*\])", "", subject)
        if cleaned == subject:
            return " ".join(subject.split())
        subject = cleaned


def _patch_marks(series: bytes) -> list[tuple[int, str]] | None:
    """(author date, subject) of each patch of an mbox, in order (a cover
    letter has no patch and makes no commit); None when the mbox is not plain
    enough to tell. `git am` gives each commit those, which is how a batch of
    series applied at once is cut back into one head per series, checked
    commit by commit (see Merger.merge_chain)."""
    if not is_from_line(series.split(b"\n", 1)[0] + b"\n"):
        return None
    marks = []
    for raw in split_mbox(series):
        message = io.BytesIO(raw).readlines()
        has_patch = any(
            line.startswith(b"diff --git ")
            or (
                line.startswith(b"--- ")
                and message[i + 1 : i + 2] != []
                and message[i + 1].startswith(b"+++ ")
            )
            for i, line in enumerate(message)
        )
        if not has_patch:
            continue
        header = email.parser.BytesHeaderParser().parsebytes(raw)
        if header["Date"] is None or header["Subject"] is None:
            return None
        try:
            date = email.utils.parsedate_to_datetime(str(header["Date"]))
            subject = header_text(header, "Subject")
        except (TypeError, ValueError, LookupError):
            return None
        if date.tzinfo is None:
            return None
        marks.append((int(date.timestamp()), _clean_subject(subject)))
    return marks


# Not `git maintenance run --auto` after every am (a process each): the
# merger collects garbage itself (GC_EVERY). Set for workspaces made before
# `_configure` said so too.
_NO_AUTO_MAINTENANCE = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "maintenance.auto",
    "GIT_CONFIG_VALUE_0": "false",
}


def _am(tree: Path, mbox: bytes) -> None:
    """Apply an mbox onto the checked-out commit of `tree`, one commit a patch."""
    # The committer date is the author's, so the same series on the same base
    # is the same commit in every build set: a gate item tested on top of
    # another stays a fast-forward of its merge.
    git(
        tree,
        "am",
        "--quiet",
        "--3way",
        "--keep-cr",
        "--committer-date-is-author-date",
        "--empty=drop",  # a cover letter ("[PATCH 0/N]") is not a commit
        input=mbox,
        env=_NO_AUTO_MAINTENANCE,
    )


class _Busy(Exception):
    """A shared ref stayed locked by another git process: retry later, not a damaged workspace."""


def _detached_head(tree: Path) -> str:
    """The commit a checkout with a detached HEAD (as every merge leaves it)
    is at, read from its HEAD file: one git process less per change applied.
    Anything else there is asked of git."""
    gitdir = tree / ".git"
    if gitdir.is_file():  # a worktree: "gitdir: <its directory in the workspace>"
        gitdir = tree / gitdir.read_text().split(":", 1)[1].strip()  # absolute, or relative
    try:
        head = (gitdir / "HEAD").read_text().strip()
    except OSError:
        head = ""
    return head if re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", head) else rev_parse(tree, "HEAD")


def _log_published(reqs: Sequence[MergeRequest], results: list[MergeResult], how: str) -> None:
    for req, result in zip(reqs, results, strict=True):
        if result.error is None:
            _EventLog(log, {"event_id": req.event_id}).info(
                "Published %s = %s: %s on %s (%s)",
                req.ref,
                result.head_sha[:12],
                " ".join(result.commits),
                result.base_sha[:12],
                how,
            )


def _git_ref_update(repo: Path, *args: str, input: bytes | None = None) -> str:
    """git, retried while a ref it updates is locked by another process."""
    for delay in (0.05, 0.1, 0.2, 0.4, None):
        try:
            return git(repo, *args, input=input)
        except GitError as e:
            if not _REF_LOCKED.search(e.output):
                raise
            if delay is None:
                raise _Busy(str(e)) from e
            time.sleep(delay)
    raise AssertionError("unreachable")


class _SharedLock:
    """Many holders of `shared()` or one of `exclusive()`; a waiting exclusive goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Tree:
    """One worktree of a project's workspace and what is known of its state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()  # one merge at a time in it
        # (ref, sha) the worktree is clean at after its last merge: a gate
        # request chained on that ref needs no checkout.
        self.at: tuple[str, str] | None = None
        # No stray file in it (only a failed `git am` leaves some): no `git clean`.
        self.clean = False


class _Project:
    def __init__(self) -> None:
        # Merges and forgets hold it shared; checking, repairing, re-cloning
        # and gc hold it exclusive.
        self.lock = _SharedLock()
        self.fetch = threading.Lock()  # fetches into the shared refs/remotes/origin/*
        self.fetched: dict[str, str] = {}  # branch -> head last fetched (under `fetch`)
        # Checked since this merger started or its last error: the checks cost
        # a few git processes per merge otherwise.
        self.sound = False
        self.suspect = False  # to be cloned again
        self.merges = 0  # published since the last gc
        self.trees: dict[int, _Tree] = {}


class Merger:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._swap = threading.Lock()  # a push reads the workspace a re-clone replaces
        self._projects: dict[str, _Project] = {}
        self._projects_lock = threading.Lock()
        self._local = threading.local()  # the worktree this thread merges in

    def workspace(self, project: str) -> Path:
        return self.root / project

    def worktree(self, project: str, worker: int) -> Path:
        """Where `worker` merges: the workspace itself for worker 0."""
        return self._sibling(project, f".wt{worker}") if worker else self.workspace(project)

    def use_worktree(self, worker: int) -> None:
        """Merges called from this thread from now on run in worktree `worker`."""
        self._local.worker = worker

    def _sibling(self, project: str, suffix: str) -> Path:
        ws = self.workspace(project)
        return ws.with_name(ws.name + suffix)

    def _project(self, project: str) -> _Project:
        with self._projects_lock:
            return self._projects.setdefault(project, _Project())

    def _tree(self, project: str, proj: _Project, worker: int) -> _Tree:
        with self._projects_lock:
            tree = proj.trees.get(worker)
            if tree is None:
                tree = proj.trees[worker] = _Tree(self.worktree(project, worker))
            return tree

    def _worktree_dirs(self, project: str) -> list[Path]:
        ws = self.workspace(project)
        return [
            p for p in ws.parent.glob(ws.name + ".wt*") if p.name[len(ws.name) + 3 :].isdigit()
        ]

    # -- keeping the workspace sound (_check, _reclone, _gc: under the exclusive lock) --

    def _mark_suspect(self, project: str) -> None:
        proj = self._project(project)
        proj.suspect, proj.sound = True, False
        try:  # survives a restart of the merger
            self._sibling(project, ".suspect").touch()
        except OSError:
            pass

    def _forget_state(self, proj: _Project) -> None:
        proj.fetched.clear()
        for tree in proj.trees.values():
            tree.at, tree.clean = None, False

    def _check(self, req: MergeRequest, proj: _Project, elog: logging.LoggerAdapter) -> None:
        """Repair the project's workspace and worktrees, or clone it again."""
        self._forget_state(proj)
        ws, tmp, old = (self._sibling(req.project, s) for s in ("", ".tmp", ".old"))
        if tmp.exists():
            elog.warning("Removing %s left by an interrupted clone", tmp)
            shutil.rmtree(tmp)
        if old.exists():  # a re-clone was interrupted
            if ws.exists():
                shutil.rmtree(old)
            else:
                old.rename(ws)
        if proj.suspect or self._sibling(req.project, ".suspect").exists():
            elog.warning("Workspace %s may be damaged by an earlier error; cloning it again", ws)
            return self._reclone(req, proj, elog)
        gitdir = ws / ".git"
        if not gitdir.is_dir():
            return self._reclone(req, proj, elog)
        own = [gitdir, *(gitdir / "worktrees").glob("*")]  # each worktree's HEAD, index, am
        for lock in [
            *(p for d in own for p in d.glob("*.lock")),
            *(gitdir / "refs").rglob("*.lock"),
        ]:
            elog.warning("Removing stale %s", lock)
            lock.unlink(missing_ok=True)
        for state in (d / s for d in own for s in ("rebase-apply", "rebase-merge")):
            if state.exists():
                elog.warning(
                    "A worktree of %s was left in the middle of `git am`; resetting it", ws
                )
                shutil.rmtree(state)
        try:
            rev_parse(ws, "HEAD^{commit}")
        except GitError:
            try:  # a fresh clone whose HEAD names a branch that does not exist yet
                git(ws, "symbolic-ref", "--quiet", "HEAD")
            except GitError as e:
                elog.warning(
                    "Workspace %s is broken (%s); cloning it again", ws, _one_line(str(e))
                )
                return self._reclone(req, proj, elog)
        for path in self._worktree_dirs(req.project):
            if not self._worktree_ok(ws, path):
                elog.warning("Worktree %s is broken; making it again", path)
                shutil.rmtree(path)
        self._configure(ws)
        proj.sound = True

    @staticmethod
    def _worktree_ok(ws: Path, path: Path) -> bool:
        dotgit = path / ".git"
        if not dotgit.is_file():  # else git would look for a repository further up
            return False
        try:
            common = git(path, "rev-parse", "--path-format=absolute", "--git-common-dir")
            rev_parse(path, "HEAD^{commit}")
        except GitError:
            return False
        return Path(common.strip()).resolve() == (ws / ".git").resolve()

    @staticmethod
    def _configure(ws: Path) -> None:
        git(ws, "config", "gc.autoDetach", "false")  # no gc left running behind our back
        git(ws, "config", "gc.auto", "0")  # see GC_EVERY
        git(ws, "config", "maintenance.auto", "false")  # nor after each fetch or commit
        git(ws, "worktree", "prune")  # forget worktrees whose directory is gone

    def _reclone(self, req: MergeRequest, proj: _Project, elog: logging.LoggerAdapter) -> None:
        """Clone the project afresh next to the workspace, keep its published refs, swap."""
        self._forget_state(proj)
        ws, tmp, old = (self._sibling(req.project, s) for s in ("", ".tmp", ".old"))
        ws.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        elog.info("Cloning %s into %s", req.review_repo, ws)
        git(None, "clone", "--quiet", "--no-checkout", str(req.review_repo), str(tmp))
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
        for path in self._worktree_dirs(req.project):  # worktrees of the old clone
            shutil.rmtree(path)
        self._configure(ws)
        proj.suspect, proj.sound, proj.merges = False, True, 0
        self._sibling(req.project, ".suspect").unlink(missing_ok=True)

    def _gc(self, project: str, proj: _Project, elog: logging.LoggerAdapter) -> None:
        proj.merges = 0
        elog.debug("Running git gc --auto in %s", self.workspace(project))
        git(self.workspace(project), "-c", "gc.auto=6700", "gc", "--auto", "--quiet")

    # -- merging -----------------------------------------------------------

    def _branch_head(self, ws: Path, req: MergeRequest, proj: _Project) -> str | None:
        """The branch head, fetched only when it moved; None if there is no such branch."""
        ref = f"refs/heads/{req.branch}"
        remote = f"refs/remotes/origin/{req.branch}"
        with proj.fetch:  # refs/remotes/origin/* are shared by the worktrees
            if Path(req.review_repo).is_dir():  # a local repository: its head costs no fetch
                head = _resolve(Path(req.review_repo), f"{ref}^{{commit}}")
                if head and proj.fetched.get(req.branch) == head:
                    return head
            try:
                _git_ref_update(
                    ws, "fetch", "--quiet", "--no-tags", str(req.review_repo), f"+{ref}:{remote}"
                )
            except GitError as e:
                if "couldn't find remote ref" in e.output:
                    return None
                raise
            head = proj.fetched[req.branch] = rev_parse(ws, f"{remote}^{{commit}}")
            return head

    def _fetch_commit(self, ws: Path, req: MergeRequest, proj: _Project) -> str:
        """Commit `req.base` from the review repository; "" if it has no such commit."""
        with proj.fetch:
            try:
                _git_ref_update(
                    ws,
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",  # published at the request's ref at once
                    str(req.review_repo),
                    req.base,
                )
            except GitError as e:
                if "not our ref" in e.output or "couldn't find remote ref" in e.output:
                    return ""
                raise
        return _resolve(ws, f"{req.base}^{{commit}}")

    def _checkout_base(self, tree: _Tree, req: MergeRequest, proj: _Project) -> str | None:
        """Check the base out clean in `tree`: the branch head, or `req.base`; None if
        the branch does not exist, "" if `req.base` is not there."""
        at, tree.at = tree.at, None
        if at is not None and req.base and req.base in at:
            return at[1]  # the previous merge left the worktree exactly there
        ws = self.workspace(req.project)  # refs are the same in every worktree
        if req.base:
            base = _resolve(ws, f"{req.base}^{{commit}}")
            if not base and not req.changes:
                base = self._fetch_commit(ws, req, proj)
            if not base:
                return ""
        else:
            base = self._branch_head(ws, req, proj)
            if base is None:
                return None
        if not (tree.path / ".git").exists():  # made on first use, or again after a re-clone
            git(ws, "worktree", "add", "--quiet", "--detach", str(tree.path), base)
            tree.clean = True
            return base
        git(tree.path, "checkout", "--quiet", "--force", "--detach", base)
        if not tree.clean:
            git(tree.path, "clean", "-qfdx")
            tree.clean = True
        return base

    def merge(self, req: MergeRequest) -> MergeResult:
        """Never raises: a failure that is not the changes' becomes internal=True.

        Runs in the worktree of this thread's worker (see `use_worktree`), 0 by default.
        """
        elog = _EventLog(log, {"event_id": req.event_id})
        proj = self._project(req.project)
        tree = self._tree(req.project, proj, getattr(self._local, "worker", 0))
        with tree.lock:
            try:
                return self._merge(req, proj, tree, elog)
            except _Busy as e:  # not damage: the next merge checks the project (stale locks)
                elog.warning("Merge of %s: %s", req.ref, e)
                proj.sound = False
                error = _internal_error(e)
            except Exception as e:
                elog.exception("Merger error for %s", req.ref)
                self._mark_suspect(req.project)
                error = _internal_error(e)
            return MergeResult(req.item_uuid, ref=req.ref, error=error, internal=True)

    def _merge(
        self, req: MergeRequest, proj: _Project, tree: _Tree, elog: logging.LoggerAdapter
    ) -> MergeResult:
        retried = False
        while True:
            if not proj.sound or proj.suspect or proj.merges >= GC_EVERY:
                with proj.lock.exclusive():  # no merge or forget of the project runs
                    if not proj.sound or proj.suspect:
                        self._check(req, proj, elog)
                    if proj.merges >= GC_EVERY:
                        self._gc(req.project, proj, elog)
            with proj.lock.shared():
                try:
                    base = self._checkout_base(tree, req, proj)
                except GitError as e:
                    if retried:
                        raise
                    elog.warning("Preparing %s failed: %s", tree.path, _one_line(str(e)))
                    self._mark_suspect(req.project)
                    retried = True
                    continue
                return self._apply(req, proj, tree, base, elog)

    def _apply(
        self,
        req: MergeRequest,
        proj: _Project,
        tree: _Tree,
        base: str | None,
        elog: logging.LoggerAdapter,
        publish: bool = True,
    ) -> MergeResult:
        """Apply the request's series onto `base`, checked out in `tree`;
        `publish` False: the caller publishes the ref (several at once)."""
        if base is None:
            error = f"Branch '{req.branch}' does not exist in project {req.project}."
            elog.info("Merge of %s failed: %s", req.ref, error)
            return MergeResult(req.item_uuid, ref=req.ref, error=error)
        if base == "" and not req.changes:
            error = f"Commit {req.base} is not in project {req.project}."
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
                _am(tree.path, change.series)
            except GitError as e:
                files = git(tree.path, "diff", "--name-only", "--diff-filter=U", check=False)
                git(tree.path, "am", "--abort", check=False)
                tree.clean = False
                if not _patch_at_fault(e):
                    raise
                error = _conflict(req.changes, index, e.output, files.split(), req.base_changes)
                elog.info("Merge of %s failed: %s", req.ref, error)
                return MergeResult(
                    req.item_uuid, base, None, req.ref, error, change.label, commits=commits
                )
            head = commits[change.label] = _detached_head(tree.path)
            if head == before:
                error = _conflict(
                    req.changes, index, "the series holds no patch", [], req.base_changes
                )
                elog.info("Merge of %s failed: %s", req.ref, error)
                del commits[change.label]
                return MergeResult(
                    req.item_uuid, base, None, req.ref, error, change.label, commits=commits
                )
        proj.merges += 1
        if not publish:
            return MergeResult(req.item_uuid, base, head, req.ref, commits=commits)
        _git_ref_update(tree.path, "update-ref", req.ref, head)
        tree.at = (req.ref, head)
        if commits:
            elog.info(
                "Published %s = %s: %s on %s", req.ref, head[:12], " ".join(commits), base[:12]
            )
        else:
            elog.info("Published %s = %s as it is", req.ref, head[:12])
        return MergeResult(req.item_uuid, base, head, req.ref, commits=commits)

    def merge_chain(self, reqs: Sequence[MergeRequest]) -> list[MergeResult]:
        """Serve requests each chained on the one before it (its `base` is the
        ref the previous one publishes), as a gate queue asks for them: all
        their series in one `git am`, which costs about what one series costs
        (git's start-up is most of an am). Unless that is a clean run whose
        commits are cut back into one head per change for certain, they are
        merged one at a time, which also says which change does not apply."""
        if len(reqs) > 1:
            results = self._merge_batch(reqs)
            if results is not None:
                return results
        return [self.merge(req) for req in reqs]

    def _merge_batch(self, reqs: Sequence[MergeRequest]) -> list[MergeResult] | None:
        elog = _EventLog(log, {"event_id": reqs[0].event_id})
        changes = [c for r in reqs for c in r.changes]
        marks = [_patch_marks(c.series) for c in changes]
        if not all(marks):
            return None  # a series with no patch, or one we cannot cut: one at a time
        return self._batched(
            reqs,
            "at once",
            lambda tree, proj, base: self._apply_batch(reqs, marks, tree, proj, base, elog),
        )

    def _batched(
        self,
        reqs: Sequence[MergeRequest],
        how: str,
        serve: Callable[[_Tree, _Project, str], list[MergeResult] | None],
    ) -> list[MergeResult] | None:
        """`serve(tree, project, base)` with this worker's tree checked out at
        the first request's base, under the tree's and the project's locks;
        None (one at a time, then) when the workspace needs a check or a gc
        first, when the base is not there, or when anything raises."""
        first = reqs[0]
        proj = self._project(first.project)
        tree = self._tree(first.project, proj, getattr(self._local, "worker", 0))
        with tree.lock:
            if not proj.sound or proj.suspect or proj.merges >= GC_EVERY:
                return None  # repaired or collected on the one-at-a-time path first
            try:
                with proj.lock.shared():
                    base = self._checkout_base(tree, first, proj)
                    if not base:
                        return None
                    return serve(tree, proj, base)
            except Exception as e:
                _EventLog(log, {"event_id": first.event_id}).warning(
                    "Merging %d requests %s failed: %s", len(reqs), how, _one_line(str(e))
                )
                tree.at, tree.clean = None, False
                return None

    def _apply_batch(
        self,
        reqs: Sequence[MergeRequest],
        marks: list[list[tuple[int, str]]],
        tree: _Tree,
        proj: _Project,
        base: str,
        elog: logging.LoggerAdapter,
    ) -> list[MergeResult] | None:
        stream = b"".join(
            s if s.endswith(b"\n") else s + b"\n"
            for s in (c.series for r in reqs for c in r.changes)
        )
        try:
            _am(tree.path, stream)
        except GitError:
            git(tree.path, "am", "--abort", check=False)
            tree.clean = False
            return None  # one at a time says which change does not apply
        made = [
            line.split(" ", 2)
            for line in git(
                tree.path, "log", "--reverse", "--format=%H %at %s", f"{base}..HEAD"
            ).splitlines()
        ]
        if [(int(at), " ".join(subject.split())) for _, at, subject in made] != [
            m for per_change in marks for m in per_change
        ]:
            elog.info(
                "A batch of %d merges did not apply as its patches say; one at a time", len(reqs)
            )
            return None  # the worktree is checked out again (tree.at is None)
        results, updates, head, index, made_iter = [], [], base, 0, iter(made)
        for req in reqs:
            before, commits = head, {}
            for change in req.changes:
                for _ in marks[index]:
                    head = next(made_iter)[0]
                commits[change.label] = head
                index += 1
            updates.append(f"update {req.ref} {head}\n")
            results.append(MergeResult(req.item_uuid, before, head, req.ref, commits=commits))
        _git_ref_update(tree.path, "update-ref", "--stdin", input="".join(updates).encode())
        tree.at = (reqs[-1].ref, head)
        proj.merges += len(reqs)
        _log_published(reqs, results, f"{len(reqs)} merged at once")
        return results

    def merge_on_head(self, reqs: Sequence[MergeRequest]) -> list[MergeResult]:
        """Serve independent requests on the same branch head (check items,
        each tested on its own) in one run: the head is resolved once, each
        request's series applied onto it in turn, and their refs published
        by one `update-ref`. A workspace that needs a check, or an error that
        is not a change's, sends them one at a time (which says whose it is),
        each failing alone."""
        if len(reqs) > 1:
            results = self._merge_on_head(reqs)
            if results is not None:
                return results
        results = []
        for req in reqs:
            try:
                results.append(self.merge(req))
            except Exception as e:  # merge() catches everything; a net for each request
                _EventLog(log, {"event_id": req.event_id}).exception(
                    "Merger error for %s", req.ref
                )
                results.append(
                    MergeResult(
                        req.item_uuid, ref=req.ref, error=_internal_error(e), internal=True
                    )
                )
        return results

    def _merge_on_head(self, reqs: Sequence[MergeRequest]) -> list[MergeResult] | None:
        results = self._batched(reqs, "on the branch head", partial(self._apply_on_head, reqs))
        if results is not None:
            _log_published(reqs, results, f"{len(reqs)} on the branch head at once")
        return results

    def _apply_on_head(
        self, reqs: Sequence[MergeRequest], tree: _Tree, proj: _Project, base: str
    ) -> list[MergeResult]:
        results = []
        for index, req in enumerate(reqs):
            if index:
                git(tree.path, "checkout", "--quiet", "--force", "--detach", base)
                if not tree.clean:
                    git(tree.path, "clean", "-qfdx")
                    tree.clean = True
            elog = _EventLog(log, {"event_id": req.event_id})
            results.append(self._apply(req, proj, tree, base, elog, publish=False))
        updates = "".join(f"update {r.ref} {r.head_sha}\n" for r in results if r.error is None)
        if updates:
            _git_ref_update(tree.path, "update-ref", "--stdin", input=updates.encode())
        tree.at = None
        return results

    def forget(self, project: str, *refs: str) -> None:
        """Drop published refs once their items are reported, so refs do not
        pile up: one git process for all of them (a missing one is no error)."""
        with self._project(project).lock.shared():
            drop = "".join(f"delete {ref}\n" for ref in refs).encode()
            git(self.workspace(project), "update-ref", "--stdin", input=drop, check=False)

    # -- gate merge --------------------------------------------------------

    @staticmethod
    def _landed(review_repo: Path, head: str, sha: str) -> bool:
        try:  # also true when head == sha
            git(review_repo, "merge-base", "--is-ancestor", sha, head)
            return True
        except GitError:
            return False

    @staticmethod
    def _link_objects(ws: Path, sha: str, head: str, review_repo: Path) -> bool:
        """Put the objects `sha` adds to `head` into the (local) review
        repository as `git clone --local` does: hard links to the loose
        objects the merge wrote. A local `git push` starts seven processes
        (receive-pack, pack-objects, unpack-objects, connectivity checks, a
        gc --auto) in ~50 ms on a quiet machine, most of the landing of a
        gate run; this takes a merge-base and a rev-list, and the caller's
        compare-and-set update-ref. False (a push then) when `sha` is not a
        fast-forward of `head`, an object is not loose here (packed by a
        gc), the review repository is not a plain one, or a link cannot be
        made (another file system); objects linked before that are harmless."""
        src, dst = ws / ".git" / "objects", Path(review_repo) / "objects"
        if not src.is_dir() or not dst.is_dir():
            return False
        if not Merger._landed(ws, sha, head):
            return False  # not a fast-forward (update-ref would take it; push says why not)
        listed = git(ws, "rev-list", "--objects", sha, "--not", head, check=False)
        oids = [line[:64].split(" ", 1)[0] for line in listed.splitlines()]
        if not oids or not all(re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", o) for o in oids):
            return False  # an error message, or nothing to add (an odd request: push says)
        for oid in oids:
            target = dst / oid[:2] / oid[2:]
            if target.exists():
                continue
            try:
                target.parent.mkdir(exist_ok=True)
                os.link(src / oid[:2] / oid[2:], target)
            except FileExistsError:
                continue
            except OSError:
                return False
        return True

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
        # One git process when an earlier push landed it (the items behind the
        # first of a gate run that merges together).
        if self._landed(review_repo, ref, sha):
            log.info("%s is already on %s of %s", sha[:12], branch, project)
            return None
        head = git(review_repo, "rev-parse", "--verify", "--quiet", ref, check=False).strip()
        if not re.fullmatch(r"[0-9a-f]{40,64}", head):
            return f"Branch '{branch}' does not exist in project {project}."
        try:
            if self._link_objects(self.workspace(project), sha, head, review_repo):
                # Compare-and-set: refused if the branch moved since `head`.
                git(review_repo, "update-ref", ref, sha, head)
            else:
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
