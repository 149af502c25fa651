"""Workers serving merge requests in parallel, each in its own worktree of the Merger.

Each worker has a FIFO queue. A request chained on another (`base` is the ref
the merge of the item ahead publishes) goes to the worker that merge went to,
behind it, so the ref is there when it runs (and the worktree is still at that
state, which spares the checkout); so does a `forget` of a ref, and a request
publishing a ref whose merge is still queued. Anything else goes to the worker
with the fewest requests waiting. A worker takes the chained requests queued
right behind the one it starts as one batch (Merger.merge_chain), and the
refs to drop queued right behind one as one `update-ref`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from zuul_lite.merger import Merger, MergeRequest, MergeResult, _internal_error

log = logging.getLogger("zuul_lite.merger")

# Refs whose merge is done, remembered (oldest dropped first) to send what is
# chained on them to the same worker: only spares a checkout by then.
_REMEMBERED = 4096
# At most this many chained requests are merged in one `git am`.
MAX_CHAIN = 50
_NOTHING = object()  # no request carried over from the last look at the queue


def _on_head(req: MergeRequest) -> bool:
    """Series to apply onto the branch head as it is (an item tested alone)."""
    return req.base is None and bool(req.changes)


def _same_branch(a: MergeRequest, b: MergeRequest) -> bool:
    return (a.branch, str(a.review_repo)) == (b.branch, str(b.review_repo))


class MergerPool:
    """Serves merge requests on `workers` threads and hands each result to
    `on_result` (called from a worker thread); never dies."""

    def __init__(
        self, merger: Merger, on_result: Callable[[MergeResult], None], workers: int = 2
    ) -> None:
        if workers < 1:
            raise ValueError(f"a merger pool needs at least one worker, not {workers}")
        self.merger = merger
        self.on_result = on_result
        self._queues: list[queue.Queue[MergeRequest | tuple[str, str] | None]] = [
            queue.Queue() for _ in range(workers)
        ]
        self._lock = threading.Lock()
        self._load = [0] * workers  # requests queued or running, per worker
        self._pending: dict[tuple[str, str], list[int]] = {}  # (project, ref) -> [worker, count]
        self._done: OrderedDict[tuple[str, str], int] = OrderedDict()  # (project, ref) -> worker
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"merger-{i}", daemon=True)
            for i in range(workers)
        ]

    @property
    def workers(self) -> int:
        return len(self._threads)

    def _worker_of(self, project: str, ref: str) -> int | None:
        pending = self._pending.get((project, ref))
        return pending[0] if pending else self._done.get((project, ref))

    def _put(self, worker: int, item: MergeRequest | tuple[str, str]) -> None:
        self._load[worker] += 1
        self._queues[worker].put(item)

    def _least_loaded(self) -> int:
        return min(range(self.workers), key=self._load.__getitem__)

    def submit(self, req: MergeRequest) -> None:
        self.submit_many([req])

    def submit_many(self, reqs: list[MergeRequest]) -> None:
        """Submit requests together: a worker that wakes on the first finds the
        ones chained on it already queued (it drains under the same lock), so
        a gate queue approved at once is merged in one run."""
        with self._lock:
            for req in reqs:
                worker = self._worker_of(req.project, req.ref)
                if worker is None and req.base and req.base.startswith("refs/"):
                    worker = self._worker_of(req.project, req.base)
                if worker is None:
                    worker = self._least_loaded()
                key = (req.project, req.ref)
                self._done.pop(key, None)
                self._pending.setdefault(key, [worker, 0])[1] += 1
                self._put(worker, req)

    def forget(self, project: str, ref: str) -> None:
        """Drop a published ref, on a worker (after its merge): the caller never waits."""
        with self._lock:
            worker = self._worker_of(project, ref)
            self._done.pop((project, ref), None)
            self._put(self._least_loaded() if worker is None else worker, (project, ref))

    def _finished(self, worker: int, item: MergeRequest | tuple[str, str]) -> None:
        with self._lock:
            self._load[worker] -= 1
            if not isinstance(item, MergeRequest):
                return
            key = (item.project, item.ref)
            pending = self._pending[key]
            pending[1] -= 1
            if not pending[1]:
                del self._pending[key]
                self._done[key] = worker
                while len(self._done) > _REMEMBERED:
                    self._done.popitem(last=False)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Each worker stops once the requests queued before are served."""
        for q in self._queues:
            q.put(None)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(left)

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, worker: int) -> None:
        self.merger.use_worktree(worker)
        requests = self._queues[worker]
        carried = _NOTHING
        while True:
            item, carried = (requests.get() if carried is _NOTHING else carried), _NOTHING
            if item is None:
                return
            if not isinstance(item, MergeRequest):
                # The refs to drop queued right behind it go with it.
                forgets = [item]
                with self._lock:
                    while True:
                        try:
                            nxt = requests.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(nxt, tuple) and nxt[0] == item[0]:
                            forgets.append(nxt)
                        else:
                            carried = nxt
                            break
                try:
                    self._forget(item[0], [ref for _, ref in forgets])
                finally:
                    for forget in forgets:
                        self._finished(worker, forget)
                continue
            # The requests queued right behind it, each chained on the one
            # before (a gate queue filling up), are merged together; so are
            # requests each on the branch head (check items of a burst).
            chain = [item]
            on_head = False
            with self._lock:  # a submit_many under way finishes queuing first
                while len(chain) < MAX_CHAIN:
                    try:
                        nxt = requests.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(nxt, MergeRequest) or nxt.project != item.project:
                        carried = nxt
                        break
                    chained = nxt.base == chain[-1].ref
                    beside = _on_head(item) and _on_head(nxt) and _same_branch(item, nxt)
                    if len(chain) == 1:
                        on_head = beside and not chained
                    if not (beside if on_head else chained):
                        carried = nxt
                        break
                    chain.append(nxt)
            try:
                self._serve(chain, on_head)
            finally:
                for req in chain:
                    self._finished(worker, req)

    def _forget(self, project: str, refs: list[str]) -> None:
        try:
            self.merger.forget(project, *refs)
        except Exception:
            log.exception("Could not drop %s of %s", " ".join(refs), project)

    def _serve(self, chain: list[MergeRequest], on_head: bool = False) -> None:
        try:
            if on_head:
                results = self.merger.merge_on_head(chain)
            else:
                results = self.merger.merge_chain(chain)
        except Exception as e:  # the merger catches everything; this is the last net
            log.exception("[e: %s] Merger error for %s", chain[0].event_id, chain[0].ref)
            error = _internal_error(e)
            results = [
                MergeResult(req.item_uuid, ref=req.ref, error=error, internal=True)
                for req in chain
            ]
        for req, result in zip(chain, results, strict=True):
            try:
                self.on_result(result)
            except Exception:
                log.exception("[e: %s] Handing over the merge result failed", req.event_id)
