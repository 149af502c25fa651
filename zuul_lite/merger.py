"""The merger: applies a series with `git am` onto the branch head and publishes a ref.

It works in its own non-bare clone per project (`<state>/merger/<project>`),
so the review tree is never touched. Nodes fetch the published
`refs/zuul/...` from that clone (bind-mounted read-only into them). Requests
are served one at a time by a thread that posts the outcome back to the
scheduler; the scheduler loop never waits on git.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zuul_lite.git import GitError, git, rev_parse

log = logging.getLogger("zuul_lite.merger")


@dataclass(frozen=True)
class MergeRequest:
    item_uuid: str
    project: str
    branch: str
    ref: str  # the ref to publish
    series: bytes  # mbox
    review_repo: Path  # where the branch head comes from


@dataclass(frozen=True)
class MergeResult:
    item_uuid: str
    base_sha: str | None = None
    head_sha: str | None = None
    ref: str | None = None
    error: str | None = None


def _failed_patch(output: str) -> str:
    match = re.search(r"Patch failed at (\d+) (.*)", output)
    detail = next(
        (
            ln.strip()
            for ln in output.splitlines()
            if ln.startswith("error:") and "patch failed" in ln
        ),
        "",
    )
    if match:
        n, subject = int(match.group(1)), match.group(2).strip()
        msg = f"Patch {n} ('{subject}') does not apply to the branch head"
        return f"{msg}: {detail.removeprefix('error: ')}." if detail else msg + "."
    return "The series does not apply: " + (output.strip().splitlines() or ["git am failed"])[-1]


class Merger:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def workspace(self, project: str) -> Path:
        return self.root / project

    def _ensure_workspace(self, project: str, review_repo: Path) -> Path:
        ws = self.workspace(project)
        if not (ws / ".git").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = ws.with_name(ws.name + ".tmp")
            git(None, "clone", "--quiet", "--no-checkout", str(review_repo), str(tmp))
            tmp.rename(ws)
        return ws

    def merge(self, req: MergeRequest) -> MergeResult:
        ws = self._ensure_workspace(req.project, req.review_repo)
        git(ws, "fetch", "--quiet", "origin", "+refs/heads/*:refs/remotes/origin/*")
        base = rev_parse(ws, f"refs/remotes/origin/{req.branch}")
        git(ws, "am", "--abort", check=False)
        git(ws, "checkout", "--quiet", "--force", "--detach", base)
        git(ws, "clean", "-qfdx")
        try:
            git(ws, "am", "--quiet", "--3way", "--keep-cr", input=req.series)
        except GitError as e:
            git(ws, "am", "--abort", check=False)
            error = _failed_patch(e.output)
            log.info("Merge of %s failed: %s", req.ref, error)
            return MergeResult(req.item_uuid, base_sha=base, error=error)
        head = rev_parse(ws, "HEAD")
        git(ws, "update-ref", req.ref, head)
        log.info("Published %s = %s on %s", req.ref, head[:12], base[:12])
        return MergeResult(req.item_uuid, base_sha=base, head_sha=head, ref=req.ref)

    def forget(self, project: str, ref: str) -> None:
        """Drop a published ref once its item is reported, so refs do not pile up."""
        git(self.workspace(project), "update-ref", "-d", ref, check=False)


class MergerThread(threading.Thread):
    """Serves merge requests in order and hands each result to `on_result`."""

    def __init__(self, merger: Merger, on_result: Callable[[MergeResult], None]) -> None:
        super().__init__(name="merger", daemon=True)
        self.merger = merger
        self.on_result = on_result
        self.requests: queue.Queue[MergeRequest | None] = queue.Queue()

    def submit(self, req: MergeRequest) -> None:
        self.requests.put(req)

    def stop(self) -> None:
        self.requests.put(None)

    def run(self) -> None:
        while True:
            req = self.requests.get()
            if req is None:
                return
            try:
                result = self.merger.merge(req)
            except GitError as e:
                log.exception("Merger error for %s", req.ref)
                result = MergeResult(req.item_uuid, error=f"The merger failed: {e}")
            self.on_result(result)
