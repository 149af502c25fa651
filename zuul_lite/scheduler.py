"""The scheduler: one thread owns all pipeline state.

Every other thread (ZooKeeper watches on the event queues and on builds, the
gear client, the merger, timers, the SIGHUP handler) only posts an event and
sets `wake_event`; the run loop blocks on it, so nothing polls and the model
needs no locks. Trigger events wait in ZooKeeper until the items they create
are stored (one transaction), so an event is never lost nor enqueued twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import gear

from nodepool_lite.exceptions import NodeExistsError, NoNodeError, ZKError
from nodepool_lite.tls import gear_args
from nodepool_lite.zk import Transaction, ZooKeeper
from zuul_lite.baseline_store import BaselineStore
from zuul_lite.build_contract import BuildRequest, BuildResult
from zuul_lite.config import ZuulConfig
from zuul_lite.connections import make_connections
from zuul_lite.dispatcher import Dispatcher
from zuul_lite.exceptions import ConfigError, EnqueueRefused, ReviewSystemError, ZuulLiteError
from zuul_lite.gearman import BuildClient, GearServer
from zuul_lite.gitserver import GitServer
from zuul_lite.history.db import HistoryDB
from zuul_lite.layout import Layout, load_layout
from zuul_lite.manager import PipelineManager
from zuul_lite.manager.dependent import DependentPipelineManager
from zuul_lite.manager.independent import IndependentPipelineManager
from zuul_lite.merger import Merger, MergeResult
from zuul_lite.merger_pool import MergerPool
from zuul_lite.metrics import SchedulerMetrics
from zuul_lite.model import Build, Change, ManagementEvent, QueueItem, TriggerEvent
from zuul_lite.state import ZuulState

log = logging.getLogger("zuul_lite.scheduler")

MANAGERS: dict[str, type[PipelineManager]] = {
    "independent": IndependentPipelineManager,
    "dependent": DependentPipelineManager,
}
MAX_PASSES = 20  # process() passes per wake-up; each pass is cheap when nothing changes
EVENT_RETRY_MAX = 300.0  # seconds between tries of an event whose review system is away


@dataclass(frozen=True)
class BuildCompleted:
    uuid: str
    result: BuildResult | None = None  # read by the watch; None: the loop reads it


@dataclass(frozen=True)
class BuildLost:
    uuid: str
    why: str


@dataclass(frozen=True)
class BuildEarlyFailure:
    uuid: str
    reason: str


@dataclass(frozen=True)
class MergeCompleted:
    result: MergeResult


@dataclass(frozen=True)
class Reconfigure:
    pass


@dataclass(frozen=True)
class Callback:
    func: Callable[[], None]


@dataclass
class _TriggerBatch:
    """Trigger events planned into one transaction, not committed yet."""

    txn: Transaction
    # (znode name, data as read, the event, whether it enqueued anything)
    events: list[tuple[str, dict, TriggerEvent, bool]] = field(default_factory=list)
    planned: list[tuple[PipelineManager, list[QueueItem]]] = field(default_factory=list)


def _ref_change(event: TriggerEvent) -> Change:
    """A branch that moved, as the item a pipeline tests: its new head, as it is."""
    return Change(
        connection=event.connection,
        project=event.project,
        branch=event.branch,
        number=0,
        patchset=0,
        ref=event.ref,
        newrev=event.newrev,
    )


class Scheduler(threading.Thread):
    def __init__(self, config: ZuulConfig, zk: ZooKeeper) -> None:
        super().__init__(name="scheduler", daemon=True)
        self.config = config
        self.zk = zk
        self.state = ZuulState(zk)
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()
        self.idle = threading.Event()  # the loop waits for work (tests settle on it)
        self.events: queue.Queue = queue.Queue()
        self.layout: Layout | None = None
        self.managers: dict[str, PipelineManager] = {}
        self.connections = make_connections(
            config.connections, self.state, config.state_dir, self._post_trigger
        )
        self.merger = MergerPool(
            Merger(config.state_dir / "merger"), self._on_merged, workers=config.merger_workers
        )
        # Launchers fetch the changes under test from here (git_url of a build).
        self.git_server = GitServer(self.merger.merger.root, config.git_listen, config.git_port)
        self.gear_server: GearServer | None = None
        self.gearman = BuildClient(self._on_gear_failed)
        # Every reported item's build set and builds (zuul_lite/history/).
        self.history = HistoryDB(config.dburi)
        self.baselines = BaselineStore(self.history)
        self.metrics = SchedulerMetrics()
        self.metrics_server = (
            config.metrics.server(self.metrics.registry) if config.metrics else None
        )
        self.dispatcher = Dispatcher()
        # Gate merges (pushes, submits) run here, so builds of other items go
        # out meanwhile; one thread keeps the merges of a branch in order.
        self.landing = Dispatcher("landing")
        self._watched: set[str] = set()
        self._triggers = threading.Event()
        self._janitor: queue.Queue[str | None] = queue.Queue()
        self._manages = threading.Event()
        self._queued: dict[int, list[str]] = {}  # id(flag) -> the names its watch saw last
        # Trigger events a review system could not be asked about: (attempts, not before).
        self._event_retries: dict[str, tuple[int, float]] = {}

    # Lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._load_layout(initial=True)
        self.history.upgrade()
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.git_server.start()
        if self.config.gearman_start:
            self.gear_server = GearServer(
                port=self.config.gearman_port,
                host=self.config.gearman_listen,
                tls=self.config.gearman_server_tls,
            )
            log.info(
                "Gearman server listening on %s:%s",
                self.config.gearman_listen,
                self.gear_server.port,
            )
        self.gearman.addServer(
            self.config.gearman_server, self.gearman_port, **gear_args(self.config.gearman_tls)
        )
        self.gearman.waitForServer()
        self.state.ensure_roots()
        self.merger.start()
        self.dispatcher.start()
        self.landing.start()
        threading.Thread(target=self._clean_up, name="janitor", daemon=True).start()
        for manager in self.managers.values():
            manager.load()
        self._reconcile_builds()
        self.state.watch_trigger_events(lambda names: self._queue_changed(self._triggers, names))
        self.state.watch_management_events(lambda names: self._queue_changed(self._manages, names))
        for conn in self.connections.values():
            conn.start()
        super().start()

    @property
    def gearman_port(self) -> int:
        return self.gear_server.port if self.gear_server else self.config.gearman_port

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()
        for conn in self.connections.values():
            conn.stop()
        self.merger.stop()
        self.dispatcher.stop()
        self.landing.stop()
        self._janitor.put(None)
        self.gearman.shutdown()
        if self.gear_server is not None:
            self.gear_server.shutdown()
        self.git_server.stop()
        self.history.dispose()
        if self.metrics_server is not None:
            self.metrics_server.stop()

    def reconfigure(self) -> None:
        """Safe from any thread (SIGHUP): the loop reloads the layout."""
        self._post(Reconfigure())

    def _load_layout(self, initial: bool = False) -> None:
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
        self.layout = layout
        for name, pipeline in layout.pipelines.items():
            manager = self.managers.get(name)
            if manager is not None and manager.pipeline.manager == pipeline.manager:
                pipeline.queues = manager.pipeline.queues
                manager.pipeline = pipeline
                continue
            if manager is not None:
                log.error(
                    "Pipeline %s cannot change from %s to %s while running; keeping %s",
                    name,
                    manager.pipeline.manager,
                    pipeline.manager,
                    manager.pipeline.manager,
                )
                continue
            self.state.ensure_pipeline(name)
            self.managers[name] = MANAGERS[pipeline.manager](self, pipeline)
            if not initial:
                self.managers[name].load()
        for name, manager in self.managers.items():
            if name not in layout.pipelines:
                # Removed from the layout: its items finish, nothing new enters.
                manager.pipeline.triggers = {}
        log.info(
            "Layout loaded: pipelines %s, %d jobs", ", ".join(layout.pipelines), len(layout.jobs)
        )
        self.wake_event.set()

    def _all_builds(self):
        for manager in self.managers.values():
            for item in manager.pipeline.all_items():
                for build in item.buildset.builds.values():
                    yield manager, item, build

    def _reconcile_builds(self) -> None:
        """Builds stored `queued` by a previous scheduler: watch them; a stored
        result or a launcher still running them is found by the watch, a lost
        one (its gearman job died with the old server) is started again.
        Results of builds no item knows any more are dropped."""
        known = set()
        for manager, item, build in self._all_builds():
            known.add(build.uuid)
            if build.state != "queued":
                continue
            if self.state.get_build_result(build.uuid) or self.state.build_running(build.uuid):
                log.info("[build: %s] running or done on a launcher", build.uuid)
                self.watch_build(build.uuid)
            else:
                log.info("[build: %s] lost with the old scheduler; resubmitting", build.uuid)
                self.watch_build(build.uuid)
                self.submit_build(manager.build_request(item, build))
        for uuid in self.state.build_uuids():
            if uuid not in known and not self.state.build_running(uuid):
                self.state.delete_build(uuid)

    # Threads post here ----------------------------------------------------

    def _post(self, event: object) -> None:
        self.events.put(event)
        self.wake_event.set()

    def _queue_changed(self, flag: threading.Event, names: list[str]) -> None:
        """An event queue in ZooKeeper changed: its watch gives the names it
        holds now, which the next pass handles."""
        self._queued[id(flag)] = names
        flag.set()
        self.wake_event.set()

    def _post_trigger(self, event: TriggerEvent) -> None:
        """The event queue of the scheduler, for connections' watcher threads."""
        self.state.put_trigger_event(event.to_dict())

    def _on_merged(self, result: MergeResult) -> None:
        self._post(MergeCompleted(result))

    def _on_gear_failed(self, uuid: str, why: str) -> None:
        self._post(BuildLost(uuid, why))

    def post_callback(self, func: Callable[[], None]) -> None:
        """Run `func` on the scheduler thread (from any thread)."""
        self._post(Callback(func))

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        """Run `func` on the scheduler thread after `delay` seconds."""
        timer = threading.Timer(delay, self.post_callback, args=(func,))
        timer.daemon = True
        timer.start()

    def watch_build(self, uuid: str, created: bool = False) -> None:
        """One children watch per build: a result, an early failure, or the
        launcher's `running` claim vanishing without a result (a launcher that
        died) each post one event. `created`: its znode was just created."""
        if uuid in self._watched:
            return
        self._watched.add(uuid)
        seen: dict[str, bool] = {}

        def on_children(children: list[str]) -> bool | None:
            if uuid not in self._watched:
                return False
            if "result" in children:
                # The loop reads the results of a wake-up's builds at once.
                self._post(BuildCompleted(uuid))
                return False
            if "early-failure" in children and not seen.get("early"):
                seen["early"] = True
                data = self.state.get_early_failure(uuid) or {}
                self._post(BuildEarlyFailure(uuid, data.get("reason", "a task failed")))
            if "running" in children:
                seen["running"] = True
            elif seen.get("running"):
                self._post(BuildLost(uuid, "the launcher running it went away"))
                return False
            return None

        self.dispatcher.post(
            lambda: self.state.watch_build(uuid, on_children, notify_deleted=False, exists=created)
        )

    def delete_build_later(self, uuid: str) -> None:
        """Clean a build's znodes up off the scheduler thread: nothing waits on it."""
        self._janitor.put(uuid)

    def cleaning_up(self) -> bool:
        """Whether a finished build's znodes are still to be deleted."""
        return self._janitor.unfinished_tasks > 0

    def _clean_up(self) -> None:
        while True:
            uuid = self._janitor.get()
            try:
                if uuid is None:
                    return
                self.state.delete_build(uuid)
            except ZKError as error:
                log.warning("[build: %s] not cleaned up (%s); the next start does it", uuid, error)
            finally:
                self._janitor.task_done()

    # Gearman --------------------------------------------------------------

    def submit_build(self, request: BuildRequest) -> None:
        """Hand the build to gearman off this thread (see zuul_lite/dispatcher.py)."""
        self.dispatcher.post(lambda: self._submit(request))

    def _submit(self, request: BuildRequest) -> None:
        try:
            self.gearman.submit_build(request)
        except gear.GearmanError as e:
            log.error(
                "[e: %s] [build: %s] could not submit to gearman (%s); will retry",
                request.event_id,
                request.uuid,
                e,
            )
            self.call_later(5.0, lambda: self._resubmit(request))

    def _resubmit(self, request: BuildRequest) -> None:
        found = self._find_build(request.uuid)
        if found is not None and found[2].state == "queued":
            self.submit_build(request)

    def cancel_build(self, uuid: str) -> None:
        """Stop it; its watch stays, so its late result is cleaned up."""
        self.dispatcher.post(lambda: self.gearman.cancel_build(uuid))

    # The loop -------------------------------------------------------------

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.idle.set()
            self.wake_event.wait()
            self.idle.clear()
            self.wake_event.clear()
            if self.stop_event.is_set():
                return
            try:
                self._process_management_events()
                self._process_trigger_events()
                self._process_events()
                for _ in range(MAX_PASSES):
                    changed = False
                    for manager in list(self.managers.values()):
                        changed = manager.process() or changed
                    if not changed:
                        break
                for manager in self.managers.values():
                    manager.flush()
                    self.metrics.pipeline_state(manager.pipeline)
            except Exception:
                if self.stop_event.is_set():
                    return  # stopping: ZooKeeper may be gone already
                # ZooKeeper away, most likely: everything is in ZK, so retry.
                log.exception("Scheduler loop error; retrying in 2 s")
                self.call_later(2.0, lambda: None)

    def _pending(
        self, flag: threading.Event, path: Callable[[str], str]
    ) -> list[tuple[str, object]]:
        """(name, data) of the events in a ZooKeeper queue whose watch fired
        since the last pass, read at once (data None: handled meanwhile)."""
        if not flag.is_set():
            return []
        flag.clear()
        names = self._queued.get(id(flag), [])
        try:
            return list(zip(names, self.zk.get_many([path(n) for n in names]), strict=True))
        except ZKError:
            flag.set()
            raise

    def _process_trigger_events(self) -> None:
        """Every queued trigger event at once: their items and the events'
        deletions go to ZooKeeper in one transaction (a burst of events
        costs about one write), planned one behind the other as if each
        had been handled alone."""
        waiting: set[str] = set()  # connections whose review system did not answer
        batch = _TriggerBatch(self.state.transaction())
        try:
            pending = self._pending(self._triggers, self.state.trigger_event_path)
            wanted = [
                (data.get("connection"), data.get("change"))
                for _, data in pending
                if isinstance(data, dict)
            ]
            with self.preloaded_changes(wanted):
                for name, data in pending:
                    batch = self._take_trigger(name, data, batch, waiting)
            self._commit_triggers(batch)
        except BaseException:
            self._discard_triggers(batch)
            self._triggers.set()  # what was not committed stays queued
            raise

    @contextmanager
    def preloaded_changes(self, changes: Iterable[tuple[object, object]]) -> Iterator[None]:
        """Each connection reads its changes of (connection, number) ahead,
        together (Connection.preloaded); anything malformed is left to the
        one-by-one read, which says what is wrong with it."""
        by_connection: dict[str, set[int]] = {}
        for name, number in changes:
            if isinstance(name, str) and name in self.connections and type(number) is int:
                by_connection.setdefault(name, set()).add(number)
        with ExitStack() as stack:
            for name, numbers in by_connection.items():
                stack.enter_context(self.connections[name].preloaded(numbers))
            yield

    def _take_trigger(
        self, name: str, data: object, batch: _TriggerBatch, waiting: set[str]
    ) -> _TriggerBatch:
        """Plan one event into `batch`; returns the batch to go on with (a new
        one when this event had to wait for the last to be committed)."""
        path = self.state.trigger_event_path(name)
        event_id = name
        event = None
        try:
            if data is None:
                return batch
            if isinstance(data, ValueError):
                raise data
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            event_id = data.get("id", name)
            event = TriggerEvent.from_dict(data)
            _, not_before = self._event_retries.get(name, (0, 0.0))
            if event.connection in waiting or time.monotonic() < not_before:
                waiting.add(event.connection)  # its events stay in order
                return batch
            if event.change and any(
                m.has_planned(event.change) or m.find_items(event.change)
                for m in self.managers.values()
            ):
                # What it does to items of its change (drop an older patchset,
                # refuse a second approval) needs the items before it stored.
                self._commit_triggers(batch)
                batch = _TriggerBatch(self.state.transaction())
            self._plan_trigger(name, path, event, data, batch)
        except ZKError:
            self._triggers.set()  # ZooKeeper away: the event stays queued
            raise
        except ReviewSystemError as error:
            # Not the event's fault: it stays queued, and so do the ones
            # after it from the same review system, until it answers.
            assert event is not None
            waiting.add(event.connection)
            self._retry_event_later(name, event_id, error)
        except (TypeError, KeyError, ValueError) as error:
            log.error("Dropped malformed trigger event %s: %s", name, error)
            self.zk.delete(path)
        except ZuulLiteError as error:
            log.warning("[e: %s] dropped: %s", event_id, error)
            self.zk.delete(path)
        except Exception as error:  # one bad event never stops the others
            log.exception("[e: %s] dropped: it raised %r", event_id, error)
            self.zk.delete(path)
        return batch

    def _retry_event_later(self, name: str, event_id: str, error: ReviewSystemError) -> None:
        attempts = self._event_retries.get(name, (0, 0.0))[0] + 1
        delay = min(2.0 * 2 ** (attempts - 1), EVENT_RETRY_MAX)
        self._event_retries[name] = (attempts, time.monotonic() + delay)
        log.warning(
            "[e: %s] not handled yet (attempt %d): %s Trying again in %.0f s.",
            event_id, attempts, str(error).rstrip(".") + ".", delay,
        )  # fmt: skip

        def again() -> None:
            self._triggers.set()
            self.wake_event.set()

        self.call_later(delay, again)

    def _plan_trigger(
        self, name: str, path: str, event: TriggerEvent, data: dict, batch: _TriggerBatch
    ) -> None:
        """Plan the items the event enqueues, in a transaction of its own that
        joins the batch only whole: an event that raises adds nothing."""
        conn = self.connections.get(event.connection)
        if conn is None:
            raise ZuulLiteError(f"no connection named {event.connection}")
        if event.type in ("patchset-created", "change-abandoned"):
            self._drop_outdated(event)
        if event.type == "ref-updated" and not event.newrev.strip("0"):
            raise ZuulLiteError(f"{event.ref} of {event.project} was deleted: nothing to build")
        wanted = [m for m in self.managers.values() if m.event_matches(event)]
        txn = self.state.transaction()
        planned: list[tuple[PipelineManager, list[QueueItem]]] = []
        try:
            if wanted:
                change = (
                    _ref_change(event)
                    if event.type == "ref-updated"
                    else conn.get_change(event.change, event.patchset)
                )
                for manager in wanted:
                    try:
                        planned.append((manager, manager.plan(change, event.id, txn)))
                    except EnqueueRefused as refused:
                        log.info(
                            "[e: %s] not enqueued in %s: %s",
                            event.id,
                            manager.pipeline.name,
                            refused,
                        )
                        if refused.report:
                            manager.reporter.report_refusal(change, str(refused), event.id)
        except BaseException:
            for manager, items in planned:
                manager.unplan(items)
            raise
        txn.delete(path)
        batch.txn.extend(txn)
        batch.events.append((name, data, event, bool(planned)))
        batch.planned.extend(planned)

    def _discard_triggers(self, batch: _TriggerBatch) -> None:
        for manager, items in batch.planned:
            manager.unplan(items)
        batch.planned.clear()
        batch.events.clear()

    def _commit_triggers(self, batch: _TriggerBatch) -> None:
        """Store the batch's items and delete its events; then enqueue them."""
        if not batch.events:
            return
        try:
            batch.txn.commit()
        except (NodeExistsError, NoNodeError):
            events = list(batch.events)
            self._discard_triggers(batch)
            if len(events) == 1:
                log.warning("[e: %s] event already handled", events[0][2].id)
                return
            # One of them was (an event handled already): each on its own.
            for name, data, _, _ in events:
                self._commit_triggers(
                    self._take_trigger(name, data, _TriggerBatch(self.state.transaction()), set())
                )
            return
        planned, batch.planned = batch.planned, []
        for manager, items in planned:
            manager.enqueue(items, hooks=False)
        for manager, items in planned:
            manager.on_enqueued(items[-1])
        for name, _, event, enqueued in batch.events:
            self.metrics.events.labels(event.connection, event.type).inc()
            self._event_retries.pop(name, None)
            if not enqueued:
                what = (
                    f"{event.ref} at {event.newrev[:12]}"
                    if event.type == "ref-updated"
                    else f"{event.change},{event.patchset}"
                )
                log.debug("[e: %s] %s on %s: enqueued nowhere", event.id, event.type, what)
        batch.events.clear()

    def _drop_outdated(self, event: TriggerEvent) -> None:
        """A new patchset or an abandoned change: older items of it go."""
        for manager in self.managers.values():
            for item in manager.find_items(event.change):
                if event.type == "change-abandoned":
                    manager.dequeue(item, "the change was abandoned")
                elif item.change.patchset < event.patchset and manager.changes_merge:
                    manager.dequeue(item, f"superseded by patchset {event.patchset}")

    def _process_management_events(self) -> None:
        for name, data in self._pending(self._manages, self.state.management_event_path):
            path = self.state.management_event_path(name)
            try:
                if data is None:
                    continue
                if isinstance(data, ValueError):
                    raise data
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._handle_management(ManagementEvent.from_dict(data))
            except ZKError:
                self._manages.set()
                raise
            except (TypeError, KeyError, ValueError, ZuulLiteError) as error:
                log.error("Dropped management event %s: %s", name, error)
            except Exception as error:
                log.exception("Dropped management event %s: it raised %r", name, error)
            self.zk.delete(path)

    def _handle_management(self, event: ManagementEvent) -> None:
        manager = self.managers.get(event.pipeline)
        if manager is None:
            raise ZuulLiteError(f"no pipeline {event.pipeline}")
        if event.type == "dequeue":
            for item in manager.find_items(event.change):
                manager.dequeue(item, "dequeued by an operator")
        elif event.type == "promote":
            items = manager.find_items(event.change)
            if items and isinstance(manager, DependentPipelineManager):
                manager.promote(items[0])
        elif event.type == "enqueue":
            change = self.connections[manager.pipeline.source].get_change(
                event.change, event.patchset
            )
            txn = self.state.transaction()
            items = manager.plan(change, event.id, txn)
            txn.commit()
            manager.enqueue(items)

    def _find_build(self, uuid: str) -> tuple[PipelineManager, QueueItem, Build] | None:
        for manager, item, build in self._all_builds():
            if build.uuid == uuid:
                return manager, item, build
        return None

    def _process_events(self) -> None:
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        unread = [e.uuid for e in events if isinstance(e, BuildCompleted) and e.result is None]
        try:
            results = dict(zip(unread, self.state.get_build_results(unread), strict=True))
        except ZKError:
            self._requeue(events)
            raise
        for i, event in enumerate(events):
            if isinstance(event, BuildCompleted) and event.result is None:
                event = BuildCompleted(event.uuid, results[event.uuid])
            try:
                self._process_event(event)
            except ZKError:
                self._requeue(events[i:])  # this one too: ZooKeeper was away
                raise
            except Exception:
                self._requeue(events[i + 1 :])
                raise

    def _requeue(self, events: list[object]) -> None:
        for event in events:
            self.events.put(event)

    def _process_event(self, event: object) -> None:
        if isinstance(event, Reconfigure):
            self._load_layout()
        elif isinstance(event, Callback):
            event.func()
        elif isinstance(event, MergeCompleted):
            for manager in self.managers.values():
                for item in manager.pipeline.all_items():
                    if item.uuid == event.result.item_uuid:
                        manager.on_merged(item, event.result)
        else:
            self._process_build_event(event)

    def _process_build_event(self, event: BuildCompleted | BuildLost | BuildEarlyFailure) -> None:
        found = self._find_build(event.uuid)
        if found is None:
            # A build of a reset build set or a removed item: clean up. With a
            # result the launcher is done, even if its `running` claim is still
            # there (it goes a moment after the result, and this watch has ended).
            if not isinstance(event, BuildEarlyFailure):
                self._watched.discard(event.uuid)
                if isinstance(event, BuildCompleted) or not self.state.build_running(event.uuid):
                    self.delete_build_later(event.uuid)
            return
        manager, item, build = found
        if isinstance(event, BuildEarlyFailure):
            manager.on_early_failure(item, build, event.reason)
            return
        result = getattr(event, "result", None) or self.state.get_build_result(event.uuid)
        if result is not None:
            self._watched.discard(event.uuid)
            manager.on_build_completed(item, build, result)
        elif isinstance(event, BuildLost) and not self.state.build_running(event.uuid):
            self._watched.discard(event.uuid)
            manager.on_build_lost(item, build, event.why)
