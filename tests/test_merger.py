"""The merger on real git repositories: ordered gate merges, conflicts, recovery, push."""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from pathlib import Path

import pytest

from tests.harness import make_project, make_series, run_git
from zuul_lite import merger as merger_mod
from zuul_lite.git import GitError, git, rev_parse
from zuul_lite.merger import MergeChange, Merger, MergeRequest, MergeResult
from zuul_lite.merger_pool import MergerPool


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = make_project(tmp)
        self.review = tmp / "demo.git"
        run_git(tmp, "clone", "-q", "--bare", str(self.src), str(self.review))
        self.base = run_git(self.review, "rev-parse", "master").strip()
        self.merger = Merger(tmp / "merger")
        self.ws = self.merger.workspace("demo")
        self.count = 0

    def series(self, *edits: tuple[str, str, str]) -> bytes:
        """An mbox of commits made on the project's initial commit."""
        self.count += 1
        out = make_series(self.src, self.tmp / f"series{self.count}", list(edits))
        return b"".join(p.read_bytes() for p in sorted(out.glob("*.patch")))

    def request(self, *changes: tuple[str, bytes], ref: str = "refs/zuul/gate/x") -> MergeRequest:
        return MergeRequest(
            item_uuid="item-" + ref.rsplit("/", 1)[-1],
            project="demo",
            branch="master",
            ref=ref,
            changes=[MergeChange(label, series) for label, series in changes],
            review_repo=self.review,
            event_id="ev1",
        )

    def advance_branch(self, name: str, content: str, subject: str) -> str:
        """Someone else merges a commit into the review repo's master."""
        (self.src / name).write_text(content)
        run_git(self.src, "commit", "-qam", subject)
        run_git(self.src, "push", "-q", str(self.review), "HEAD:master")
        return run_git(self.src, "rev-parse", "HEAD").strip()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def three_changes(env: Env) -> list[tuple[str, bytes]]:
    one = env.series(("README", "demo v1\n", "README: version 1"))
    # Applies only on top of 1,1: proves the order.
    two = env.series(
        ("README", "demo v1\n", "README: version 1"), ("README", "demo v2\n", "README: version 2")
    )
    two = two[two.index(b"From ", 1) :]  # just the second patch
    three = env.series(("hello.c", "int main(void) { return 3; }\n", "hello: return 3"))
    return [("1,1", one), ("2,1", two), ("3,1", three)]


def assert_not_published(env: Env, ref: str) -> None:
    with pytest.raises(GitError):
        rev_parse(env.ws, ref)


def test_changes_are_applied_in_order_and_published(env, caplog):
    caplog.set_level(logging.INFO, "zuul_lite.merger")
    result = env.merger.merge(env.request(*three_changes(env)))
    assert result.error is None and not result.internal and result.failed_change is None
    assert result.base_sha == env.base
    assert list(result.commits) == ["1,1", "2,1", "3,1"]
    assert result.head_sha == result.commits["3,1"] == rev_parse(env.ws, "refs/zuul/gate/x")
    assert result.ref == "refs/zuul/gate/x"
    log = git(env.ws, "log", "--format=%H %s", f"{env.base}..{result.head_sha}").splitlines()
    assert log == [
        f"{result.commits['3,1']} hello: return 3",
        f"{result.commits['2,1']} README: version 2",
        f"{result.commits['1,1']} README: version 1",
    ]
    assert git(env.ws, "show", f"{result.commits['1,1']}:README") == "demo v1\n"
    assert git(env.ws, "show", f"{result.commits['2,1']}:README") == "demo v2\n"
    assert "[e: ev1] Published refs/zuul/gate/x" in caplog.text


def test_own_series_that_does_not_apply(env):
    lone = env.series(("README", "demo project\n", "README: say more"))
    conflicting = env.series(("README", "something else\n", "README: version 2"))
    ahead = [("1,1", lone)]
    result = env.merger.merge(env.request(*ahead, ("2,1", conflicting)))
    assert result.failed_change == "2,1" and not result.internal
    assert result.error == (
        "Patch 1 ('README: version 2') does not apply to the branch head with change 1,1 "
        "applied: conflict in README."
    )
    assert result.commits == {"1,1": rev_parse(env.ws, "HEAD")}
    assert result.head_sha is None and result.ref == "refs/zuul/gate/x"
    assert_not_published(env, "refs/zuul/gate/x")
    # Alone on a branch that moved: today's wording.
    env.advance_branch("README", "moved on\n", "README: moved")
    result = env.merger.merge(env.request(("2,1", conflicting), ref="refs/zuul/gate/y"))
    assert result.error == (
        "Patch 1 ('README: version 2') does not apply to the branch head: conflict in README."
    )
    assert result.failed_change == "2,1" and not result.internal


def test_change_ahead_that_does_not_apply(env):
    changes = three_changes(env)
    env.advance_branch("README", "moved on\n", "README: moved")
    result = env.merger.merge(env.request(*changes))
    assert result.failed_change == "1,1" and not result.internal
    assert result.error.startswith(
        "Change 1,1 ahead in the queue: patch 1 ('README: version 1') does not apply to the "
        "branch head"
    )
    assert result.commits == {}
    # The second of three conflicts with the first.
    (env.tmp / "second").mkdir()
    fresh = Env(env.tmp / "second")
    one = fresh.series(("README", "demo v1\n", "README: version 1"))
    two = fresh.series(("README", "other\n", "README: other"))
    three = fresh.series(("hello.c", "x\n", "hello: x"))
    result = fresh.merger.merge(fresh.request(("1,1", one), ("2,1", two), ("3,1", three)))
    assert result.failed_change == "2,1"
    assert result.error.startswith(
        "Change 2,1 ahead in the queue: patch 1 ('README: other') does not apply to the branch "
        "head with change 1,1 applied"
    )
    assert list(result.commits) == ["1,1"]
    assert_not_published(fresh, "refs/zuul/gate/x")


def test_not_a_patch_is_the_changes_fault(env):
    result = env.merger.merge(env.request(("1,1", b"this is not a patch\n")))
    assert result.failed_change == "1,1" and not result.internal
    assert result.error.startswith("The series does not apply to the branch head")


def test_missing_branch(env):
    req = env.request(("1,1", env.series(("README", "x\n", "x"))))
    req = MergeRequest(**{**req.__dict__, "branch": "nope"})
    result = env.merger.merge(req)
    assert result.error == "Branch 'nope' does not exist in project demo."
    assert not result.internal and result.failed_change is None


def test_branch_head_is_published_as_it_is(env):
    """A ref item (post): no changes, its commit as the base; a commit the
    workspace has not seen yet is fetched from the review repository."""
    first = env.merger.merge(env.request(("1,1", env.series(("README", "x\n", "x")))))
    assert first.error is None  # the workspace exists now
    head = env.advance_branch("README", "merged\n", "README: merged meanwhile")
    assert "commit" not in git(env.ws, "cat-file", "-t", head, check=False)
    req = MergeRequest(**{**env.request(ref="refs/zuul/post/0/0/a").__dict__, "base": head})
    result = env.merger.merge(req)
    assert result.error is None and not result.internal, result.error
    assert (result.base_sha, result.head_sha, result.commits) == (head, head, {})
    assert rev_parse(env.ws, "refs/zuul/post/0/0/a") == head
    missing = MergeRequest(**{**req.__dict__, "base": "1" * 40, "ref": "refs/zuul/post/0/0/b"})
    result = env.merger.merge(missing)
    assert result.error == f"Commit {'1' * 40} is not in project demo."
    assert not result.internal and result.failed_change is None
    assert_not_published(env, "refs/zuul/post/0/0/b")


def test_leftover_clone_is_removed(env):
    tmp = env.ws.with_name("demo.tmp")
    run_git(env.tmp, "init", "-q", str(tmp))  # a clone killed halfway
    (tmp / "junk").write_text("half a pack")
    result = env.merger.merge(env.request(*three_changes(env)))
    assert result.error is None
    assert not tmp.exists()
    assert (env.ws / ".git").is_dir()


def test_workspace_left_mid_am_with_a_lock_recovers(env):
    changes = three_changes(env)
    first = env.merger.merge(env.request(*changes[:1], ref="refs/zuul/gate/a"))
    assert first.error is None
    # A merger killed in the middle of `git am`: conflict state, index.lock left.
    run_git(env.ws, "checkout", "-q", "--detach", env.base)
    with pytest.raises(GitError):
        git(env.ws, "am", "--3way", input=changes[1][1])
    assert (env.ws / ".git" / "rebase-apply").exists()
    (env.ws / ".git" / "index.lock").write_text("")
    (env.ws / ".git" / "refs" / "zuul").mkdir(exist_ok=True)
    (env.ws / ".git" / "refs" / "zuul" / "x.lock").write_text("")
    result = env.merger.merge(env.request(*changes, ref="refs/zuul/gate/b"))
    assert result.error is None, result.error
    assert list(result.commits) == ["1,1", "2,1", "3,1"]
    assert not (env.ws / ".git" / "rebase-apply").exists()
    assert not (env.ws / ".git" / "index.lock").exists()
    # Repaired in place: the earlier item's ref is still there.
    assert rev_parse(env.ws, "refs/zuul/gate/a") == first.head_sha


@pytest.mark.parametrize("damage", ["head", "objects", "not-a-repo", "interrupted-swap"])
def test_broken_workspace_is_cloned_again(env, damage):
    changes = three_changes(env)
    assert env.merger.merge(env.request(*changes[:1], ref="refs/zuul/gate/a")).error is None
    gitdir = env.ws / ".git"
    if damage == "head":
        (gitdir / "HEAD").write_text("0123456789012345678901234567890123456789\n")
    elif damage == "objects":
        shutil.rmtree(gitdir / "objects")
        (gitdir / "objects").mkdir()
    elif damage == "not-a-repo":
        shutil.rmtree(gitdir)
    else:  # killed between moving the old workspace aside and putting the new one in place
        env.ws.rename(env.ws.with_name("demo.old"))
    result = env.merger.merge(env.request(*changes, ref="refs/zuul/gate/b"))
    assert result.error is None, result.error
    assert rev_parse(env.ws, "refs/zuul/gate/b") == result.head_sha
    assert not env.ws.with_name("demo.old").exists()


def test_unexpected_error_is_internal_and_next_merge_works(env, monkeypatch, caplog):
    changes = three_changes(env)
    first = env.merger.merge(env.request(*changes[:1], ref="refs/zuul/gate/a"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Merger, "_checkout_base", boom)
    result = env.merger.merge(env.request(*changes, ref="refs/zuul/gate/b"))
    assert result.internal and result.failed_change is None and result.head_sha is None
    assert result.ref == "refs/zuul/gate/b"  # which request this answers
    assert result.error == (
        "Internal merger error, not caused by the change: RuntimeError: disk on fire."
    )
    assert caplog.text.count("Traceback") == 1
    assert env.ws.with_name("demo.suspect").exists()
    monkeypatch.undo()
    # A fresh merger (a restarted scheduler) still knows the workspace is suspect.
    merger = Merger(env.merger.root)
    caplog.clear()
    caplog.set_level(logging.INFO, "zuul_lite.merger")
    result = merger.merge(env.request(*changes, ref="refs/zuul/gate/b"))
    assert result.error is None and list(result.commits) == ["1,1", "2,1", "3,1"]
    assert "cloning it again" in caplog.text
    assert not env.ws.with_name("demo.suspect").exists()
    # The clone kept the ref published for the item ahead.
    assert rev_parse(env.ws, "refs/zuul/gate/a") == first.head_sha


def test_git_failing_for_our_reasons_is_internal(env, monkeypatch):
    real_git = merger_mod.git

    def full_disk(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") is not None:
            raise GitError(list(args), 128, "error: unable to write file: No space left on device")
        return real_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", full_disk)
    result = env.merger.merge(env.request(*three_changes(env)))
    assert result.internal and result.failed_change is None
    assert "No space left on device" in result.error


def test_merger_thread_survives_exceptions(env, monkeypatch):
    changes = three_changes(env)
    results: queue.Queue[MergeResult] = queue.Queue()
    calls = []
    real_merge = Merger.merge

    def flaky_merge(self, req):
        calls.append(req.ref)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return real_merge(self, req)

    def on_result(result):
        results.put(result)
        if len(calls) == 2:
            raise ValueError("the scheduler choked")

    monkeypatch.setattr(Merger, "merge", flaky_merge)
    thread = MergerPool(env.merger, on_result, workers=1)
    thread.start()
    for name in ("a", "b", "c"):
        thread.submit(env.request(*changes, ref=f"refs/zuul/gate/{name}"))
    got = [results.get(timeout=60) for _ in range(3)]
    thread.stop()
    thread.join(timeout=60)
    assert got[0].internal and "RuntimeError: unexpected" in got[0].error
    assert got[1].error is None and got[2].error is None
    assert got[2].head_sha == rev_parse(env.ws, "refs/zuul/gate/c")


def test_push_fast_forward_and_idempotent(env):
    changes = three_changes(env)
    result = env.merger.merge(env.request(*changes[:2], ref="refs/zuul/gate/a"))
    assert env.merger.push("demo", result.head_sha, env.review, "master") is None
    assert run_git(env.review, "rev-parse", "master").strip() == result.head_sha
    # A scheduler killed after the push pushes again: nothing to do.
    assert env.merger.push("demo", result.head_sha, env.review, "master") is None
    # ... even once the next item landed on top.
    nxt = env.merger.merge(env.request(changes[2], ref="refs/zuul/gate/b"))
    assert nxt.base_sha == result.head_sha  # the merged branch is the new base
    assert env.merger.push("demo", nxt.head_sha, env.review, "master") is None
    assert env.merger.push("demo", result.head_sha, env.review, "master") is None
    assert run_git(env.review, "rev-parse", "master").strip() == nxt.head_sha


def test_push_when_branch_moved(env):
    result = env.merger.merge(env.request(*three_changes(env)))
    moved = env.advance_branch("hello.c", "int main(void) { return 9; }\n", "hello: 9")
    error = env.merger.push("demo", result.head_sha, env.review, "master")
    assert error == (
        f"Not merged: branch 'master' of demo moved to {moved[:12]} while the change was "
        f"tested, so {result.head_sha[:12]} (the tested state) is not a fast-forward of it."
    )
    assert run_git(env.review, "rev-parse", "master").strip() == moved


def test_push_failures_are_one_sentence(env):
    result = env.merger.merge(env.request(*three_changes(env)))
    error = env.merger.push("demo", result.head_sha, env.review, "nope")
    assert error == "Branch 'nope' does not exist in project demo."
    error = env.merger.push("demo", "f" * 40, env.review, "master")
    assert error.startswith(f"Pushing {'f' * 12} to 'master' of demo failed: ")
    assert "\n" not in error and error.endswith(".")


def test_series_missing_its_first_patch(env):
    """The scheduler's MERGE_CONFLICT case: patch 2 of a series submitted alone."""
    series = env.series(
        ("README", "demo project\n", "README: say more"),
        ("README", "demo project, version 2\n", "README: version 2"),
    )
    second = series[series.index(b"From ", 1) :]
    result = env.merger.merge(env.request(("7,1", second)))
    assert result.error == (
        "Patch 1 ('README: version 2') does not apply to the branch head: conflict in README."
    )
    assert result.failed_change == "7,1" and not result.internal


def test_push_does_not_wait_for_a_merge(env, monkeypatch):
    """The scheduler pushes while a merger worker is busy with the next item."""
    changes = three_changes(env)
    result = env.merger.merge(env.request(*changes))
    holding, done = threading.Event(), threading.Event()
    real_git = merger_mod.git

    def slow_am(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") is not None:
            holding.set()
            done.wait(60)
        return real_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", slow_am)
    thread = threading.Thread(
        target=env.merger.merge, args=(env.request(changes[0], ref="refs/zuul/gate/busy"),)
    )
    thread.start()
    assert holding.wait(60)
    try:
        assert env.merger.push("demo", result.head_sha, env.review, "master") is None
    finally:
        done.set()
        thread.join(60)


def test_push_links_loose_objects_or_pushes_packed_ones(env):
    """A landing hard-links the merge's loose objects into the local review
    repository and moves the branch by compare-and-set; objects a gc packed
    go by `git push`. Either way the review repository is whole."""
    changes = three_changes(env)
    first = env.merger.merge(env.request(changes[0], ref="refs/zuul/gate/a"))
    assert env.merger.push("demo", first.head_sha, env.review, "master") is None
    tree = run_git(env.review, "rev-parse", f"{first.head_sha}^{{tree}}").strip()
    assert (env.review / "objects" / tree[:2] / tree[2:]).stat().st_nlink == 2  # linked
    nxt = env.merger.merge(env.request(changes[1], ref="refs/zuul/gate/b"))
    run_git(env.ws, "gc", "--quiet", "--prune=now")  # its objects are packed now
    assert env.merger.push("demo", nxt.head_sha, env.review, "master") is None
    assert run_git(env.review, "rev-parse", "master").strip() == nxt.head_sha
    run_git(env.review, "fsck", "--strict", "--no-dangling")
