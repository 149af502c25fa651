"""Pipeline managers: the whole life of a queue item, from event to vote.

Only the scheduler thread calls into a manager. Each state change of an item
is written to ZooKeeper before it is acted upon (a build is stored `queued`
before it is submitted to Gearman; a vote is recorded in the same
transaction that removes the item), so a scheduler killed at any line
restarts into a state it can finish from, and every change gets exactly one
vote.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from nodepool_lite.exceptions import BadVersionError
from zuul_lite.layout import Pipeline
from zuul_lite.merger import MergeRequest, MergeResult
from zuul_lite.model import Build, BuildState, ItemState, QueueItem, Result, TriggerEvent
from zuul_lite.reporter import format_report, vote_value

if TYPE_CHECKING:
    from zuul_lite.scheduler import Scheduler

MAX_ATTEMPTS = 3


def item_path(pipeline: str, uuid: str = "") -> str:
    return f"/zuul/pipelines/{pipeline}/items" + (f"/{uuid}" if uuid else "")


def build_path(uuid: str) -> str:
    return f"/zuul/builds/{uuid}"


class PipelineManager:
    """Shared lifecycle; subclasses decide how items relate to each other."""

    changes_merge = False

    def __init__(self, sched: Scheduler, pipeline: Pipeline) -> None:
        self.sched = sched
        self.pipeline = pipeline
        self.items: dict[str, QueueItem] = {}
        self.log = logging.getLogger(f"zuul_lite.manager.{pipeline.name}")
        self._merges_requested: set[str] = set()
        self._watched: set[str] = set()

    # Events -------------------------------------------------------------

    def event_matches(self, event: TriggerEvent) -> bool:
        return any(f.matches(event) for f in self.pipeline.triggers.get(event.connection, []))

    def new_item(self, event: TriggerEvent) -> QueueItem | None:
        """The item an event adds, or None (already queued, no jobs)."""
        layout = self.sched.layout
        jobs = layout.jobs_for(event.project, self.pipeline.name)
        if not jobs:
            self.log.debug(
                "[e: %s] project %s has no %s jobs", event.id, event.project, self.pipeline.name
            )
            return None
        for item in self.items.values():
            if item.change == event.change and item.patchset == event.patchset:
                self.log.info(
                    "[e: %s] change %s,%s is already in %s",
                    event.id,
                    event.change,
                    event.patchset,
                    self.pipeline.name,
                )
                return None
        conn = self.sched.connections[self.pipeline.source]
        change = conn.get_change(event.change)
        item = QueueItem(
            pipeline=self.pipeline.name,
            connection=self.pipeline.source,
            project=event.project,
            branch=event.branch,
            change=event.change,
            patchset=event.patchset,
            subject=change["subject"],
            owner=change["owner"],
            event_id=event.id,
        )
        for index, job in enumerate(jobs):
            item.builds[job.name] = Build(job=job.name, node_type=job.node_type, index=index)
        return item

    def superseded_by(self, item: QueueItem) -> list[QueueItem]:
        """Items a new item replaces (older patchsets of the same change)."""
        return [
            i
            for i in self.items.values()
            if i.change == item.change and i.patchset < item.patchset
        ]

    def add_item(self, item: QueueItem) -> None:
        self.items[item.uuid] = item
        self.log.info(
            "[e: %s] enqueued change %s as item %s", item.event_id, item.label, item.uuid
        )

    def dequeue(self, item: QueueItem, why: str) -> None:
        """Drop an item without a vote (superseded); cancel what it runs."""
        for build in item.builds.values():
            if build.state == BuildState.QUEUED:
                self.sched.gearman.cancel_build(build.uuid)
        self.sched.zk.delete(item_path(self.pipeline.name, item.uuid))
        self._forget(item)
        self.log.info("Dequeued %s: %s", item.label, why)

    # Persistence --------------------------------------------------------

    def save(self, item: QueueItem) -> None:
        self.sched.zk.set(item_path(self.pipeline.name, item.uuid), item.to_dict())

    def load(self) -> None:
        """Adopt the items a previous scheduler left in ZooKeeper."""
        zk = self.sched.zk
        for uuid in zk.get_children(item_path(self.pipeline.name)):
            data = zk.get_or_none(item_path(self.pipeline.name, uuid))
            if data is not None:
                item = QueueItem.from_dict(data)
                self.items[item.uuid] = item
                self.log.info("Resumed item %s (change %s, %s)", uuid, item.label, item.state)

    # Processing ---------------------------------------------------------

    def process(self) -> None:
        for item in sorted(self.items.values(), key=lambda i: i.enqueue_time):
            self.process_item(item)

    def process_item(self, item: QueueItem) -> None:
        if item.state == ItemState.MERGING:
            self._request_merge(item)
        elif item.state == ItemState.RUNNING:
            self._run_builds(item)
            if item.finished():
                item.state = ItemState.REPORTING
                self.save(item)
        if item.state == ItemState.REPORTING:
            self.report(item)

    def _request_merge(self, item: QueueItem) -> None:
        if item.uuid in self._merges_requested:
            return
        conn = self.sched.connections[item.connection]
        self._merges_requested.add(item.uuid)
        self.sched.merger.submit(
            MergeRequest(
                item_uuid=item.uuid,
                project=item.project,
                branch=item.branch,
                ref=f"refs/zuul/{item.pipeline}/{item.change}/{item.patchset}/{item.uuid}",
                series=conn.get_series(item.project, item.change, item.patchset),
                review_repo=conn.repo_path(item.project),
            )
        )

    def on_merged(self, item: QueueItem, result: MergeResult) -> None:
        self._merges_requested.discard(item.uuid)
        item.base_sha = result.base_sha
        if result.error:
            item.merge_error = result.error
            for build in item.builds.values():
                build.state, build.result = BuildState.SKIPPED, Result.SKIPPED
            item.state = ItemState.REPORTING
        else:
            item.git_ref = result.ref
            item.state = ItemState.RUNNING
        self.save(item)

    def _dependency_failed(self, item: QueueItem, build: Build) -> str | None:
        job = self.sched.layout.jobs.get(build.job)
        for dep in job.dependencies if job else []:
            dep_build = item.builds.get(dep)
            if (
                dep_build
                and dep_build.state in (BuildState.COMPLETED, BuildState.SKIPPED)
                and dep_build.result != Result.SUCCESS
            ):
                return dep
        return None

    def _ready(self, item: QueueItem, build: Build) -> bool:
        job = self.sched.layout.jobs.get(build.job)
        return all(
            item.builds[d].result == Result.SUCCESS
            for d in (job.dependencies if job else [])
            if d in item.builds
        )

    def _run_builds(self, item: QueueItem) -> None:
        for build in item.builds.values():
            if build.state == BuildState.WAITING:
                dep = self._dependency_failed(item, build)
                if dep:
                    build.state, build.result = BuildState.SKIPPED, Result.SKIPPED
                    build.summary = f"Not run: {dep} did not succeed."
                    self.save(item)
                elif self._ready(item, build):
                    self._launch(item, build)
            elif build.state == BuildState.QUEUED:
                self._watch(item, build)

    def _launch(self, item: QueueItem, build: Build) -> None:
        if build.job not in self.sched.layout.jobs:
            build.state, build.result = BuildState.COMPLETED, Result.FAILURE
            build.summary = f"Job {build.job} is no longer defined in the layout."
            self.save(item)
            return
        build.state = BuildState.QUEUED
        build.attempts += 1
        build.start_time = time.time()
        build.log_path = f"{item.change}/{item.patchset}/{item.pipeline}/{build.job}/{build.uuid}"
        self.save(item)
        self._watch(item, build)
        self.sched.submit_build(item, build)

    def _watch(self, item: QueueItem, build: Build) -> None:
        if build.uuid not in self._watched:
            self._watched.add(build.uuid)
            self.sched.watch_build_result(build.uuid)

    def on_build_completed(self, item: QueueItem, build: Build, result: dict) -> None:
        if build.state != BuildState.QUEUED:
            return  # a second copy of a result we already have
        if result.get("result") is None:
            if build.attempts < MAX_ATTEMPTS:
                self.log.warning(
                    "Build %s of %s was lost; starting it again", build.uuid, item.label
                )
                self._watched.discard(build.uuid)
                build.state = BuildState.WAITING
                self.save(item)
                return
            result = {**result, "result": Result.RETRY_LIMIT}
        build.state = BuildState.COMPLETED
        build.result = result["result"]
        build.log_url = result.get("log_url")
        build.summary = result.get("summary") or ""
        build.end_time = time.time()
        build.elapsed = result.get("elapsed")
        if build.elapsed is None and build.start_time:
            build.elapsed = build.end_time - build.start_time
        self.log.info("Build %s (%s) of %s: %s", build.uuid, build.job, item.label, build.result)
        self.save(item)

    # Reporting ----------------------------------------------------------

    def report(self, item: QueueItem) -> None:
        conn = self.sched.connections[item.connection]
        message = format_report(self.pipeline, item)
        value = vote_value(self.pipeline, item.connection, item)
        while True:
            path, data, version = conn.review_ops(
                item.change, item.patchset, self.pipeline.name, value, message
            )
            txn = self.sched.zk.transaction()
            txn.set(path, data, version)
            txn.delete(item_path(self.pipeline.name, item.uuid))
            try:
                txn.commit()
                break
            except BadVersionError:
                continue  # a comment landed meanwhile; vote on the fresh change
        self.log.info("Reported change %s: vote %s", item.label, value)
        self._forget(item)

    def _forget(self, item: QueueItem) -> None:
        self.items.pop(item.uuid, None)
        self._merges_requested.discard(item.uuid)
        for build in item.builds.values():
            self._watched.discard(build.uuid)
            self.sched.zk.delete(build_path(build.uuid), recursive=True)
        if item.git_ref:
            self.sched.merger.merger.forget(item.project, item.git_ref)
