"""The scheduler: one thread owns all pipeline state.

Every other thread (the ZooKeeper watches on the trigger queue and on build
results, the gear client, the merger) only posts an event and sets
`wake_event`; the run loop blocks on it, so nothing polls and the model
needs no locks. Trigger events wait in ZooKeeper until the items they create
are stored (one transaction), so an event is never lost nor enqueued twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import gear

from nodepool_lite.exceptions import NodeExistsError, NoNodeError, ZKError
from nodepool_lite.zk import ZooKeeper
from zuul_lite.config import ZuulConfig
from zuul_lite.connections.local import EVENT_QUEUE, LocalConnection
from zuul_lite.exceptions import ConfigError, ZuulLiteError
from zuul_lite.gearman import BuildClient, GearServer
from zuul_lite.layout import Layout, load_layout
from zuul_lite.manager import PipelineManager, build_path, item_path
from zuul_lite.manager.independent import IndependentPipelineManager
from zuul_lite.merger import Merger, MergeResult, MergerThread
from zuul_lite.model import Build, BuildState, QueueItem, TriggerEvent

log = logging.getLogger("zuul_lite.scheduler")

MANAGERS: dict[str, type[PipelineManager]] = {
    "independent": IndependentPipelineManager,
}


@dataclass(frozen=True)
class BuildCompleted:
    uuid: str
    result: dict


@dataclass(frozen=True)
class MergeCompleted:
    result: MergeResult


class Scheduler(threading.Thread):
    def __init__(self, config: ZuulConfig, zk: ZooKeeper) -> None:
        super().__init__(name="scheduler", daemon=True)
        self.config = config
        self.zk = zk
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()
        self.results: queue.Queue = queue.Queue()
        self.layout: Layout | None = None
        self.managers: dict[str, PipelineManager] = {}
        self.connections = {
            name: LocalConnection(name, zk, config.state_dir)
            for name, c in config.connections.items()
            if c["driver"] == "local"
        }
        self.merger = MergerThread(Merger(config.state_dir / "merger"), self._on_merged)
        self.gear_server: GearServer | None = None
        self.gearman = BuildClient(self._on_gear_complete)

    # Lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.reconfigure(initial=True)
        if self.config.gearman_start:
            self.gear_server = GearServer(
                port=self.config.gearman_port, host=self.config.gearman_listen
            )
            log.info(
                "Gearman server listening on %s:%s",
                self.config.gearman_listen,
                self.gear_server.port,
            )
        port = self.gear_server.port if self.gear_server else self.config.gearman_port
        self.gearman.addServer(self.config.gearman_server, port)
        self.gearman.waitForServer()
        self.merger.start()
        self.zk.ensure_path(EVENT_QUEUE)
        for manager in self.managers.values():
            manager.load()
        self._reconcile_builds()
        self.zk.watch_children(EVENT_QUEUE, lambda children: self.wake_event.set())
        super().start()

    @property
    def gearman_port(self) -> int:
        return self.gear_server.port if self.gear_server else self.config.gearman_port

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.merger.stop()
        self.gearman.shutdown()
        if self.gear_server is not None:
            self.gear_server.shutdown()

    def reconfigure(self, initial: bool = False) -> None:
        """Load the layout; on error keep the last good one (or fail at start)."""
        try:
            layout = load_layout(
                self.config.layout_path, self.config.jobs_dir, set(self.config.connections)
            )
        except ConfigError as e:
            if initial:
                raise
            log.error("Layout refused, keeping the running one: %s", e)
            return
        for name, pipeline in layout.pipelines.items():
            manager = self.managers.get(name)
            if manager is None:
                self.zk.ensure_path(item_path(name))
                self.managers[name] = MANAGERS[pipeline.manager](self, pipeline)
                if not initial:
                    self.managers[name].load()
            else:
                manager.pipeline = pipeline
        self.layout = layout
        log.info(
            "Layout loaded: pipelines %s, %d jobs", ", ".join(layout.pipelines), len(layout.jobs)
        )
        self.wake_event.set()

    def _reconcile_builds(self) -> None:
        """Builds stored `queued` by a previous scheduler: adopt their result if a
        launcher stored one, wait if a launcher runs them, otherwise start them
        again (their gearman job died with the old server). Results of builds no
        item knows any more (dequeued while running) are dropped."""
        known = set()
        for manager in self.managers.values():
            for item in manager.items.values():
                for build in item.builds.values():
                    known.add(build.uuid)
                    if build.state != BuildState.QUEUED:
                        continue
                    if self.zk.exists(build_path(build.uuid) + "/result") or self.zk.exists(
                        build_path(build.uuid) + "/running"
                    ):
                        log.info("Build %s is running or done on a launcher", build.uuid)
                    else:
                        log.info(
                            "Build %s was lost with the old scheduler; resubmitting", build.uuid
                        )
                        self.submit_build(item, build)
        for uuid in self.zk.get_children("/zuul/builds"):
            if uuid not in known and not self.zk.exists(build_path(uuid) + "/running"):
                self.zk.delete(build_path(uuid), recursive=True)

    # Threads post here ----------------------------------------------------

    def _post(self, event: object) -> None:
        self.results.put(event)
        self.wake_event.set()

    def _on_merged(self, result: MergeResult) -> None:
        self._post(MergeCompleted(result))

    def _on_gear_complete(self, uuid: str, result: dict) -> None:
        self._post(BuildCompleted(uuid, result))

    def watch_build_result(self, uuid: str) -> None:
        def on_result(data: dict | None, version: int | None) -> bool | None:
            if data is None:
                return None
            self._post(BuildCompleted(uuid, data))
            return False

        self.zk.watch_data(build_path(uuid) + "/result", on_result)

    # Gearman --------------------------------------------------------------

    def submit_build(self, item: QueueItem, build: Build) -> None:
        job = self.layout.jobs[build.job]
        deps = {
            d: str(self.config.log_root / item.builds[d].log_path)
            for d in job.dependencies
            if d in item.builds and item.builds[d].log_path
        }
        conn = self.connections[item.connection]
        args = {
            "uuid": build.uuid,
            "job": job.name,
            "node_type": job.node_type,
            "project": item.project,
            "branch": item.branch,
            "change": item.change,
            "patchset": item.patchset,
            "pipeline": item.pipeline,
            "git_ref": item.git_ref,
            "git_url": str(self.merger.merger.workspace(item.project)),
            "base_ref": item.base_sha,
            "vars": job.vars,
            "timeout": job.timeout,
            "playbooks": {"pre": job.pre_run, "run": job.run, "post": job.post_run},
            "artifacts": deps,
            "log_path": build.log_path,
            "subject": item.subject,
            "owner": item.owner,
            "review_repo": str(conn.repo_path(item.project)),
        }
        try:
            self.gearman.submit_build(args)
            log.info("[build: %s] submitted %s for %s", build.uuid, job.name, item.label)
        except gear.GearmanError as e:
            log.error("[build: %s] could not submit to gearman (%s); will retry", build.uuid, e)
            threading.Timer(5.0, self._post, args=(BuildCompleted(build.uuid, {}),)).start()

    # The loop -------------------------------------------------------------

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.wake_event.wait()
            self.wake_event.clear()
            if self.stop_event.is_set():
                return
            try:
                self._process_trigger_events()
                self._process_results()
                for manager in list(self.managers.values()):
                    manager.process()
            except (ZKError, ZuulLiteError):
                log.exception("Scheduler loop error; will retry on the next event")
                threading.Timer(2.0, self.wake_event.set).start()
            except Exception:
                log.exception("Unexpected scheduler error; will retry on the next event")
                threading.Timer(2.0, self.wake_event.set).start()

    def _process_trigger_events(self) -> None:
        for name in self.zk.get_children(EVENT_QUEUE):
            path = f"{EVENT_QUEUE}/{name}"
            data = self.zk.get_or_none(path)
            if data is None:
                continue
            event = TriggerEvent.from_dict(data)
            self._handle_event(path, event)

    def _handle_event(self, path: str, event: TriggerEvent) -> None:
        txn = self.zk.transaction()
        added: list[tuple[PipelineManager, QueueItem]] = []
        for manager in self.managers.values():
            if not manager.event_matches(event):
                continue
            try:
                item = manager.new_item(event)
            except ZuulLiteError as e:
                log.warning("[e: %s] ignored: %s", event.id, e)
                continue
            if item is not None:
                txn.create(item_path(manager.pipeline.name, item.uuid), item.to_dict())
                added.append((manager, item))
        txn.delete(path)
        try:
            txn.commit()
        except (NodeExistsError, NoNodeError):
            log.warning("[e: %s] event already handled", event.id)
            return
        for manager, item in added:
            manager.add_item(item)
        if not added:
            log.debug(
                "[e: %s] %s on %s,%s: no pipeline wants it",
                event.id,
                event.type,
                event.change,
                event.patchset,
            )

    def _find_build(self, uuid: str) -> tuple[PipelineManager, QueueItem, Build] | None:
        for manager in self.managers.values():
            for item in manager.items.values():
                for build in item.builds.values():
                    if build.uuid == uuid:
                        return manager, item, build
        return None

    def _process_results(self) -> None:
        while True:
            try:
                event = self.results.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, MergeCompleted):
                for manager in self.managers.values():
                    item = manager.items.get(event.result.item_uuid)
                    if item is not None:
                        manager.on_merged(item, event.result)
            elif isinstance(event, BuildCompleted):
                found = self._find_build(event.uuid)
                if found is None:
                    continue
                manager, item, build = found
                result = event.result
                if result.get("result") is None:
                    stored = self.zk.get_or_none(build_path(event.uuid) + "/result")
                    if stored is not None:
                        result = stored
                    elif self.zk.exists(build_path(event.uuid) + "/running"):
                        continue  # the launcher still runs it; its result will come
                manager.on_build_completed(item, build, result)


def status(zk: ZooKeeper) -> dict:
    """The pipelines' queues as the web and `zuul-lite status` show them."""
    out = {"pipelines": []}
    for pipeline in zk.get_children("/zuul/pipelines"):
        items = []
        for uuid in zk.get_children(item_path(pipeline)):
            data = zk.get_or_none(item_path(pipeline, uuid))
            if data is not None:
                items.append(data)
        items.sort(key=lambda i: i.get("enqueue_time", 0))
        out["pipelines"].append({"name": pipeline, "items": items})
    return out
