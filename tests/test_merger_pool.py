"""Merges on several workers (worktrees of one workspace), on real git repositories."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import pytest

from tests.harness import make_series, run_git
from tests.test_merger import Env, assert_not_published
from zuul_lite import merger as merger_mod
from zuul_lite.git import git, rev_parse
from zuul_lite.merger import Merger, MergeRequest, MergeResult, _SharedLock
from zuul_lite.merger_pool import MergerPool

TIMEOUT = 60


class PoolEnv(Env):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.results: queue.Queue[MergeResult] = queue.Queue()
        self.pool = MergerPool(self.merger, self.results.put, workers=2)

    def patches(self, *edits: tuple[str, str, str]) -> list[bytes]:
        """One mbox per commit of a series made on the project's initial commit."""
        self.count += 1
        out = make_series(self.src, self.tmp / f"series{self.count}", list(edits))
        return [p.read_bytes() for p in sorted(out.glob("*.patch"))]

    def independent(self, name: str, base: str | None = None) -> MergeRequest:
        """A change adding its own file: applies onto any state of the branch."""
        (patch,) = self.patches((f"{name}.txt", f"{name}\n", f"add {name}"))
        req = self.request((f"{name},1", patch), ref=f"refs/zuul/check/{name}")
        return MergeRequest(**{**req.__dict__, "base": base})

    def wait(self, count: int) -> dict[str, MergeResult]:
        got = [self.results.get(timeout=TIMEOUT) for _ in range(count)]
        by_ref = {r.ref: r for r in got}
        assert len(by_ref) == count
        return by_ref

    def show(self, rev: str, path: str) -> str:
        return git(self.ws, "show", f"{rev}:{path}")


@pytest.fixture
def env(tmp_path: Path):
    env = PoolEnv(tmp_path)
    yield env
    env.pool.stop()
    env.pool.join(TIMEOUT)
    assert not env.pool.is_alive()


def blocking_am(monkeypatch, when):
    """Make `git am` wait, while `when(repo)` holds, until the returned event is set;
    the other returned event is set once such an `am` started."""
    started, release = threading.Event(), threading.Event()
    real_git = merger_mod.git

    def git_(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") is not None and when(repo):
            started.set()
            assert release.wait(TIMEOUT)
        return real_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", git_)
    return started, release


def test_independent_merges_run_in_parallel_and_publish(env, monkeypatch):
    # Both workers must be inside `git am` at once, or the barrier breaks.
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    real_git = merger_mod.git
    lock, waited = threading.Lock(), []

    def git_(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") is not None:
            with lock:
                first = len(waited) < 2 and not waited.append(Path(repo).name)
            if first:
                barrier.wait()
        return real_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", git_)
    names = [f"f{i}" for i in range(8)]
    env.pool.start()
    for name in names:
        env.pool.submit(env.independent(name))
    results = env.wait(len(names))
    assert sorted(waited) == ["demo", "demo.wt1"]  # the workspace and a worktree of it
    for name in names:
        result = results[f"refs/zuul/check/{name}"]
        assert result.error is None and result.base_sha == env.base
        assert rev_parse(env.ws, result.ref) == result.head_sha == result.commits[f"{name},1"]
        assert rev_parse(env.ws, f"{result.head_sha}^") == env.base
        assert env.show(result.head_sha, f"{name}.txt") == f"{name}\n"
        others = git(env.ws, "ls-tree", "--name-only", result.head_sha).split()
        assert sorted(others) == sorted(["README", "hello.c", f"{name}.txt"])
    # The worktree shares the workspace's refs: nodes fetch everything from one place.
    listed = git(env.ws, "worktree", "list", "--porcelain")
    assert f"worktree {env.merger.worktree('demo', 1)}" in listed


def test_gate_chain_lands_in_order_among_independent_requests(env, monkeypatch):
    steps = env.patches(*[("README", f"demo v{i}\n", f"README: version {i}") for i in range(1, 6)])
    chain: list[MergeRequest] = []
    for i, patch in enumerate(steps):
        req = env.request((f"{i + 1},1", patch), ref=f"refs/zuul/gate/{i + 1}")
        if chain:  # onto the state of the item ahead, before its merge ran
            labels = [f"{j},1" for j in range(1, i + 1)]
            req = MergeRequest(**{**req.__dict__, "base": chain[-1].ref, "base_changes": labels})
        chain.append(req)
    others = [env.independent(f"x{i}") for i in range(10)]
    # The head of the chain is held in `git am` until some other request is done:
    # one queued on the other worker would have run before it.
    started, release = threading.Event(), threading.Event()
    real_git = merger_mod.git

    def git_(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") == steps[0]:
            started.set()
            assert release.wait(TIMEOUT)
        return real_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", git_)
    env.pool.start()
    env.pool.submit(chain[0])
    assert started.wait(TIMEOUT)
    for i, req in enumerate(chain[1:]):
        env.pool.submit(req)
        env.pool.submit(others[2 * i])
        env.pool.submit(others[2 * i + 1])
    env.pool.submit(others[8])
    env.pool.submit(others[9])
    first = env.results.get(timeout=TIMEOUT)
    release.set()
    results = {first.ref: first, **env.wait(len(chain) + len(others) - 1)}
    previous = env.base
    for i, req in enumerate(chain, start=1):
        result = results[req.ref]
        assert result.error is None, result.error
        assert result.base_sha == previous and list(result.commits) == [f"{i},1"]
        assert rev_parse(env.ws, req.ref) == result.head_sha
        assert env.show(result.head_sha, "README") == f"demo v{i}\n"
        assert rev_parse(env.ws, f"{result.head_sha}^") == previous
        previous = result.head_sha
    for req in others:
        assert results[req.ref].error is None and results[req.ref].base_sha == env.base


def test_fetches_while_the_branch_moves_never_reclone(env, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "zuul_lite.merger")
    real_git = merger_mod.git
    lock, fetching, overlaps = threading.Lock(), [0], []

    def git_(repo, *args, **kwargs):
        if args[:1] != ("fetch",):
            return real_git(repo, *args, **kwargs)
        with lock:
            fetching[0] += 1
            overlaps.append(fetching[0])
        try:
            return real_git(repo, *args, **kwargs)
        finally:
            with lock:
                fetching[0] -= 1

    monkeypatch.setattr(merger_mod, "git", git_)
    env.pool.start()
    for round_ in range(6):
        head = env.advance_branch(
            "hello.c", f"int main(void) {{ return {round_ + 1}; }}\n", "move"
        )
        reqs = [env.independent(f"r{round_}-{i}") for i in range(4)]
        for req in reqs:
            env.pool.submit(req)
        results = env.wait(len(reqs))
        for req in reqs:
            assert results[req.ref].error is None, results[req.ref].error
            assert results[req.ref].base_sha == head
    assert overlaps and max(overlaps) == 1  # one fetch into refs/remotes/origin at a time
    assert caplog.text.count("Cloning") == 1  # the first merge's, only
    assert "cloning it again" not in caplog.text and "again" not in caplog.text
    assert not env.ws.with_name("demo.suspect").exists()


def test_internal_error_on_one_worker_reclones_after_the_other_finished(env, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "zuul_lite.merger")
    a, b = env.independent("a"), env.independent("b")
    env.pool.submit(a)  # worker 0 (queued before the start: one each)
    env.pool.submit(b)  # worker 1
    env.pool.start()
    first = env.wait(2)
    assert all(r.error is None for r in first.values())
    wt1 = env.merger.worktree("demo", 1)
    assert (wt1 / ".git").is_file()

    order: list[str] = []
    real_apply, real_reclone = Merger._apply, Merger._reclone
    real_exclusive = _SharedLock.exclusive
    exclusive_asked = threading.Event()

    def apply_(self, req, *args):
        if req.ref.endswith("/boom"):
            order.append(threading.current_thread().name)
            raise RuntimeError("disk on fire")
        result = real_apply(self, req, *args)
        order.append(f"applied {req.ref.rsplit('/', 1)[-1]}")
        return result

    def reclone(self, *args):
        order.append("reclone")
        return real_reclone(self, *args)

    def exclusive(self):
        exclusive_asked.set()
        return real_exclusive(self)

    monkeypatch.setattr(Merger, "_apply", apply_)
    monkeypatch.setattr(Merger, "_reclone", reclone)
    monkeypatch.setattr(_SharedLock, "exclusive", exclusive)
    # Worker 0 is held in `git am` while worker 1 fails and must clone again.
    started, release = blocking_am(monkeypatch, lambda repo: Path(repo) == env.ws)
    env.pool.submit(env.independent("c", base=a.ref))  # after a: worker 0
    assert started.wait(TIMEOUT)
    boom = MergeRequest(**{**env.independent("boom").__dict__, "base": b.ref})
    env.pool.submit(boom)  # after b: worker 1
    env.pool.submit(env.independent("d", base=b.ref))  # worker 1, after the error
    assert exclusive_asked.wait(TIMEOUT)
    assert "reclone" not in order  # a merge on the project is still running
    release.set()
    results = env.wait(3)
    assert results[boom.ref].internal and "disk on fire" in results[boom.ref].error
    assert results["refs/zuul/check/c"].error is None
    assert results["refs/zuul/check/d"].error is None
    assert order == ["merger-1", "applied c", "reclone", "applied d"]
    assert caplog.text.count("cloning it again") == 1
    # The published refs survived the clone, the worktree was made again.
    for result in [*first.values(), results["refs/zuul/check/c"], results["refs/zuul/check/d"]]:
        assert rev_parse(env.ws, result.ref) == result.head_sha
    assert not env.ws.with_name("demo.suspect").exists()
    assert not env.ws.with_name("demo.old").exists()
    # Both workers keep merging, in the fresh workspace and a fresh worktree.
    more = [env.independent(f"e{i}") for i in range(4)]
    for req in more:
        env.pool.submit(req)
    results = env.wait(len(more))
    assert all(results[req.ref].error is None for req in more)
    assert (wt1 / ".git").is_file()
    listed = git(env.ws, "worktree", "list", "--porcelain")
    assert f"worktree {wt1}" in listed and "prunable" not in listed


def test_forget_does_not_wait_and_follows_the_merge(env, monkeypatch):
    started, release = blocking_am(monkeypatch, lambda repo: True)
    env.pool.start()
    held, req = env.independent("held"), env.independent("gone")
    env.pool.submit(held)
    assert started.wait(TIMEOUT)
    env.pool.submit(req)
    env.pool.forget("demo", req.ref)  # both workers busy or queued: returns at once
    env.pool.forget("demo", held.ref)
    release.set()
    results = env.wait(2)
    assert results[req.ref].error is None and results[held.ref].error is None
    env.pool.stop()
    env.pool.join(TIMEOUT)
    # Each forget ran after the merge publishing its ref.
    assert git(env.ws, "for-each-ref", "refs/zuul/").strip() == ""


def test_requests_of_a_restarted_merger_use_existing_worktrees(env, caplog):
    for name in ("a", "b", "c"):  # queued before the start: both workers merge
        env.pool.submit(env.independent(name))
    env.pool.start()
    env.wait(3)
    env.pool.stop()
    env.pool.join(TIMEOUT)
    wt1 = env.merger.worktree("demo", 1)
    # A merger killed in the middle of `git am` in the worktree.
    gitdir = Path(git(wt1, "rev-parse", "--absolute-git-dir").strip())
    (gitdir / "rebase-apply").mkdir(exist_ok=True)
    (gitdir / "index.lock").write_text("")
    caplog.set_level(logging.INFO, "zuul_lite.merger")
    caplog.clear()
    env.pool = MergerPool(Merger(env.merger.root), env.results.put, workers=2)
    env.pool.start()
    reqs = [env.independent(f"n{i}") for i in range(4)]
    for req in reqs:
        env.pool.submit(req)
    results = env.wait(len(reqs))
    assert all(results[req.ref].error is None for req in reqs)
    assert not (gitdir / "rebase-apply").exists() and not (gitdir / "index.lock").exists()
    assert "Cloning" not in caplog.text
    run_git(wt1, "status", "--porcelain")


def test_one_worker_pool_serves_in_order(env):
    pool = MergerPool(env.merger, env.results.put, workers=1)
    pool.start()
    reqs = [env.independent(f"o{i}") for i in range(3)]
    for req in reqs:
        pool.submit(req)
    got = [env.results.get(timeout=TIMEOUT).ref for _ in reqs]
    pool.stop()
    pool.join(TIMEOUT)
    assert got == [req.ref for req in reqs]
    assert not env.merger.worktree("demo", 1).exists()
    with pytest.raises(ValueError):
        MergerPool(env.merger, env.results.put, workers=0)


def test_gc_runs_between_merges_with_no_merge_running(env, monkeypatch):
    monkeypatch.setattr(merger_mod, "GC_EVERY", 3)
    real_git, lock = merger_mod.git, threading.Lock()
    running, events = [0], []

    def git_(repo, *args, **kwargs):
        is_gc = "gc" in args[:3]
        with lock:
            events.append(("gc", running[0]) if is_gc else ("git", 0))
            running[0] += not is_gc
        try:
            return real_git(repo, *args, **kwargs)
        finally:
            with lock:
                running[0] -= not is_gc

    monkeypatch.setattr(merger_mod, "git", git_)
    env.pool.start()
    reqs = [env.independent(f"g{i}") for i in range(10)]
    for req in reqs:
        env.pool.submit(req)
    results = env.wait(len(reqs))
    assert all(results[req.ref].error is None for req in reqs)
    gcs = [other for kind, other in events if kind == "gc"]
    assert len(gcs) >= 2 and set(gcs) == {0}  # no other git of the merger meanwhile
    assert git(env.ws, "config", "gc.auto").strip() == "0"  # never behind a merge's back


COVER = (
    b"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
    b"From: A U Thor <author@example.com>\n"
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\n"
    b"Subject: [PATCH 0/2] two steps at once\n\n"
    b"The cover letter: no patch, no commit.\n\n-- \n2.39.2\n\n"
)


def chained(env: PoolEnv, series: list[tuple[str, bytes]]) -> list[MergeRequest]:
    """Gate requests, each onto the ref the one before publishes."""
    chain: list[MergeRequest] = []
    for label, mbox in series:
        req = env.request((label, mbox), ref=f"refs/zuul/gate/{label.split(',')[0]}")
        if chain:
            ahead = [c.label for r in chain for c in r.changes]
            req = MergeRequest(**{**req.__dict__, "base": chain[-1].ref, "base_changes": ahead})
        chain.append(req)
    return chain


def test_chained_requests_queued_behind_each_other_take_one_am(env, monkeypatch, tmp_path):
    steps = env.patches(*[("README", f"demo v{i}\n", f"README: version {i}") for i in range(1, 7)])
    # Change 3 is a two-patch series with a cover letter.
    series = [("1,1", steps[0]), ("2,1", steps[1]), ("3,1", COVER + steps[2] + steps[3])]
    series += [("4,1", steps[4]), ("5,1", steps[5])]
    chain = chained(env, series)
    started, release = blocking_am(monkeypatch, lambda repo: True)
    ams = []
    held_git = merger_mod.git

    def counting_git(repo, *args, **kwargs):
        if args[:1] == ("am",) and kwargs.get("input") is not None:
            ams.append(args)
        return held_git(repo, *args, **kwargs)

    monkeypatch.setattr(merger_mod, "git", counting_git)
    env.pool.start()
    env.pool.submit(chain[0])
    assert started.wait(TIMEOUT)
    for req in chain[1:]:  # queued while the head of the queue merges
        env.pool.submit(req)
    release.set()
    results = env.wait(len(chain))
    assert len(ams) == 2  # the first alone, the four behind it at once
    # The same commits as merging them one at a time: nodes test the same state.
    alone = Merger(tmp_path / "alone")
    previous, versions = env.base, [1, 2, 4, 5, 6]
    for req, version in zip(chain, versions, strict=True):
        result = results[req.ref]
        assert result.error is None, result.error
        assert result.base_sha == previous and list(result.commits) == [req.changes[0].label]
        assert rev_parse(env.ws, req.ref) == result.head_sha
        assert env.show(result.head_sha, "README") == f"demo v{version}\n"
        assert alone.merge(req).head_sha == result.head_sha
        previous = result.head_sha
    assert (
        rev_parse(env.ws, f"{results[chain[2].ref].head_sha}~2") == results[chain[1].ref].head_sha
    )


def test_a_batch_that_does_not_apply_is_merged_one_at_a_time(env, monkeypatch):
    steps = env.patches(*[("README", f"demo v{i}\n", f"README: version {i}") for i in range(1, 4)])
    (stale,) = env.patches(("README", "another README\n", "README: rewrite"))
    chain = chained(env, [("1,1", steps[0]), ("2,1", steps[1]), ("3,1", stale), ("4,1", steps[2])])
    started, release = blocking_am(monkeypatch, lambda repo: True)
    env.pool.start()
    env.pool.submit(chain[0])
    assert started.wait(TIMEOUT)
    for req in chain[1:]:
        env.pool.submit(req)
    release.set()
    results = env.wait(len(chain))
    assert results[chain[0].ref].error is None and results[chain[1].ref].error is None
    assert rev_parse(env.ws, chain[1].ref) == results[chain[1].ref].head_sha
    third = results[chain[2].ref]
    assert third.failed_change == "3,1" and not third.internal
    assert third.error.startswith("Patch 1 ('README: rewrite') does not apply"), third.error
    # Behind it: the state it was to be tested on is not there; the scheduler re-bases it.
    fourth = results[chain[3].ref]
    assert fourth.failed_change == "3,1" and fourth.head_sha is None
    assert git(env.ws, "rev-parse", "--verify", "--quiet", chain[2].ref, check=False) == ""


def test_requests_on_the_branch_head_are_merged_in_one_run(env, caplog):
    """Independent requests queued together (a burst of check items) are
    served in one run of a worker, each on the branch head alone; one that
    does not apply fails alone, with its conflict."""
    caplog.set_level(logging.INFO, logger="zuul_lite.merger")
    assert env.merger.merge(env.independent("warm")).error is None  # the clone
    pool = MergerPool(env.merger, env.results.put, workers=1)
    reqs = [env.independent(name) for name in ("a", "b", "c")]
    v1, v2 = env.patches(
        ("README", "demo v1\n", "README: version 1"), ("README", "demo v2\n", "README: version 2")
    )
    (other,) = env.patches(("README", "something else\n", "README: other"))
    # Applies only on top of version 1: does not apply on the branch head.
    reqs.insert(1, env.request(("v2,1", v2), ref="refs/zuul/check/v2"))
    # Applies on the branch head; it would not on top of a request before
    # it that changed README: each is applied onto the branch head alone.
    reqs.insert(2, env.request(("v1,1", v1), ref="refs/zuul/check/v1"))
    reqs.append(env.request(("other,1", other), ref="refs/zuul/check/other"))
    pool.submit_many(reqs)
    pool.start()
    try:
        results = env.wait(len(reqs))
    finally:
        pool.stop()
        pool.join(TIMEOUT)
    failed = results.pop("refs/zuul/check/v2")
    assert failed.failed_change == "v2,1" and not failed.internal
    assert "does not apply to the branch head: conflict in README" in failed.error
    assert_not_published(env, "refs/zuul/check/v2")
    for ref, result in results.items():
        assert result.error is None, result.error
        assert result.base_sha == env.base and rev_parse(env.ws, f"{result.head_sha}^") == env.base
        assert rev_parse(env.ws, ref) == result.head_sha
    assert env.show(results["refs/zuul/check/other"].head_sha, "README") == "something else\n"
    at_once = [
        r.getMessage() for r in caplog.records if "on the branch head at once" in r.getMessage()
    ]
    assert len(at_once) == len(results) and all(
        "(6 on the branch head at once)" in m for m in at_once
    )
