"""Every `/zuul` ZooKeeper path, and the verbs that read and write them.

No other module spells a `/zuul` path: the scheduler, the managers, the
connections, the launcher, the web and the CLI all come here. The layout
(doc/architecture.md):

```
/zuul/events/trigger/<seq>              TriggerEvent queue of the scheduler
/zuul/events/management/<seq>           operator requests (enqueue, dequeue, promote)
/zuul/pipelines/<p>/queues/<queue>      ChangeQueue: {"name", "items": [uuid, ...], window}
/zuul/pipelines/<p>/items/<uuid>        QueueItem with its current BuildSet and builds
/zuul/builds/<uuid>/running             ephemeral: the launcher running the build
/zuul/builds/<uuid>/result              BuildResult, stored before WORK_COMPLETE
/zuul/builds/<uuid>/early-failure       the build will fail (first failed task)
/zuul/reports/<item uuid>               a report under way (exactly-once reporting)
/zuul/flakes/<project>/<job>            a rerun-on-failure job's {"runs", "flips"}
/zuul/connections/<name>/cursor         where a connection's event stream stands
/zuul/connections/<name>/depends-on     change -> its Depends-On footers (Patchwork)
/zuul/local/...                         the local inbox's review data
/zuul/locks/<name>                      locks (one scheduler at a time)
```

Values are JSON objects; kazoo stays behind `nodepool_lite.zk`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from nodepool_lite.exceptions import BadVersionError, NodeExistsError, NoNodeError
from nodepool_lite.zk import Lock, Transaction, ZooKeeper
from zuul_lite.build_contract import BuildResult, ContractError

ROOT = "/zuul"
TRIGGER_EVENTS = f"{ROOT}/events/trigger"
MANAGEMENT_EVENTS = f"{ROOT}/events/management"
PIPELINES = f"{ROOT}/pipelines"
BUILDS = f"{ROOT}/builds"
REPORTS = f"{ROOT}/reports"
CONNECTIONS = f"{ROOT}/connections"
LOCAL = f"{ROOT}/local"
LOCKS = f"{ROOT}/locks"
AUTOHOLDS = f"{ROOT}/autohold"
FLAKES = f"{ROOT}/flakes"
FLAKE_RECENT = 200  # build uuids a flake counter remembers, so a retried count is not doubled


@dataclass(frozen=True, slots=True)
class FlakeCount:
    """How often a rerun-on-failure job of a project ended, and how often it
    failed and then passed on a fresh node."""

    project: str
    job: str
    runs: int
    flips: int
    # Per test (KTAP path) of the job: how many of its flips that test made.
    tests: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.flips / self.runs if self.runs else 0.0

    def test_rate(self, test: str) -> float:
        return self.tests.get(test, 0) / self.runs if self.runs else 0.0


class ZuulState:
    """The scheduler's ZooKeeper state, over the shared facade."""

    def __init__(self, zk: ZooKeeper) -> None:
        self.zk = zk

    def transaction(self) -> Transaction:
        return self.zk.transaction()

    def ensure_roots(self) -> None:
        """The parents that transactions create children under (no makepath there)."""
        for path in (TRIGGER_EVENTS, MANAGEMENT_EVENTS, BUILDS, REPORTS):
            self.zk.ensure_path(path)

    # Events ----------------------------------------------------------------

    def trigger_event_path(self, name: str) -> str:
        return f"{TRIGGER_EVENTS}/{name}"

    def put_trigger_event(self, data: dict) -> str:
        return self.zk.create(f"{TRIGGER_EVENTS}/event-", data, sequence=True)

    def add_trigger_event(self, txn: Transaction, data: dict) -> None:
        """Queue the event in `txn`, with the write that made it happen (so it
        is posted exactly when that write lands). Needs `ensure_roots`."""
        txn.create(f"{TRIGGER_EVENTS}/event-", data, sequence=True)

    def trigger_events(self) -> list[str]:
        return self.zk.get_children(TRIGGER_EVENTS)

    def watch_trigger_events(self, callback: Callable[[list[str]], Any]) -> None:
        self.zk.watch_children(TRIGGER_EVENTS, callback)

    def management_event_path(self, name: str) -> str:
        return f"{MANAGEMENT_EVENTS}/{name}"

    def put_management_event(self, data: dict) -> str:
        return self.zk.create(f"{MANAGEMENT_EVENTS}/event-", data, sequence=True)

    def management_events(self) -> list[str]:
        return self.zk.get_children(MANAGEMENT_EVENTS)

    def watch_management_events(self, callback: Callable[[list[str]], Any]) -> None:
        self.zk.watch_children(MANAGEMENT_EVENTS, callback)

    def get(self, path: str) -> dict | None:
        return self.zk.get_or_none(path)

    # Autohold requests ----------------------------------------------------

    def autohold_path(self, request_id: str) -> str:
        return f"{AUTOHOLDS}/{request_id}"

    def create_autohold(self, data: dict) -> str:
        """Store a new request; its id (the sequence node's name)."""
        return self.zk.create(f"{AUTOHOLDS}/", data, sequence=True).rsplit("/", 1)[1]

    def autohold_ids(self) -> list[str]:
        return sorted(self.zk.get_children(AUTOHOLDS))

    def get_autohold(self, request_id: str) -> tuple[dict, int] | None:
        """The request and its znode version (for a compare-and-set), or None."""
        try:
            return self.zk.get(self.autohold_path(request_id))
        except NoNodeError:
            return None

    # Pipelines, queues, items ---------------------------------------------

    def pipeline_names(self) -> list[str]:
        return self.zk.get_children(PIPELINES)

    def watch_pipelines(self, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback()` on any change of any pipeline's queues or items (the
        web's live status); returns the function that stops watching."""
        return self.zk.watch_tree(PIPELINES, callback)

    def watch_builds(self, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback()` on any change below the builds (a launcher's claim, a
        result); returns the function that stops watching."""
        return self.zk.watch_tree(BUILDS, callback)

    def ensure_pipeline(self, pipeline: str) -> None:
        self.zk.ensure_path(f"{PIPELINES}/{pipeline}/items")
        self.zk.ensure_path(f"{PIPELINES}/{pipeline}/queues")

    def watch_items(self, pipeline: str, callback: Callable[[list[str]], Any]) -> None:
        """Call `callback(item uuids)` now and whenever items enter or leave."""
        self.zk.watch_children(f"{PIPELINES}/{pipeline}/items", callback)

    def item_path(self, pipeline: str, uuid: str) -> str:
        return f"{PIPELINES}/{pipeline}/items/{uuid}"

    def queue_path(self, pipeline: str, queue: str) -> str:
        return f"{PIPELINES}/{pipeline}/queues/{queue}"

    def load_pipeline(self, pipeline: str) -> tuple[list[dict], dict[str, dict]]:
        """(queues as stored, items by uuid) of one pipeline."""
        queues = []
        for name in self.zk.get_children(f"{PIPELINES}/{pipeline}/queues"):
            data = self.zk.get_or_none(self.queue_path(pipeline, name))
            if data is not None:
                queues.append(data)
        items = {}
        for uuid in self.zk.get_children(f"{PIPELINES}/{pipeline}/items"):
            data = self.zk.get_or_none(self.item_path(pipeline, uuid))
            if data is not None:
                items[uuid] = data
        return queues, items

    def read_status(self) -> dict:
        """Every pipeline's queues with their items in queue order, for the web
        and `zuul-lite status` (which never import the scheduler)."""
        out: dict[str, Any] = {"pipelines": []}
        for pipeline in self.pipeline_names():
            queues, items = self.load_pipeline(pipeline)
            shown = []
            placed: set[str] = set()
            for queue in queues:
                members = [items[u] for u in queue.get("items", []) if u in items]
                placed.update(i["uuid"] for i in members)
                if members:
                    shown.append({**queue, "items": members})
            # An item stored without its queue (a crash between the two writes
            # is impossible: they share a transaction) would still be shown.
            stray = [i for u, i in items.items() if u not in placed]
            if stray:
                shown.append({"name": "(unqueued)", "items": stray})
            shown.sort(key=lambda q: min(i.get("enqueue_time", 0) for i in q["items"]))
            flat = [i for q in shown for i in q["items"]]
            out["pipelines"].append({"name": pipeline, "queues": shown, "items": flat})
        return out

    def ref_in_flight(self, project: str, newrev: str) -> bool:
        """Whether a ref-updated event for `newrev` of `project` waits in the
        trigger queue or an item of it is in a pipeline. The scheduler deletes
        the event in the transaction that stores its items, so once this is
        False the ref's items (if any pipeline took it) are done."""
        wanted = (project, newrev)
        names = self.trigger_events()
        for data in self.zk.get_many([self.trigger_event_path(n) for n in names]):
            if isinstance(data, dict) and data.get("type") == "ref-updated":
                if (data.get("project"), data.get("newrev")) == wanted:
                    return True
        for pipeline in self.pipeline_names():
            for item in self.load_pipeline(pipeline)[1].values():
                change = item.get("change", {})
                if change.get("number") == 0:
                    if (change.get("project"), change.get("newrev")) == wanted:
                        return True
        return False

    # Builds ----------------------------------------------------------------

    def build_uuids(self) -> list[str]:
        return self.zk.get_children(BUILDS)

    def build_result_path(self, uuid: str) -> str:
        return f"{BUILDS}/{uuid}/result"

    def build_running_path(self, uuid: str) -> str:
        return f"{BUILDS}/{uuid}/running"

    def build_early_failure_path(self, uuid: str) -> str:
        return f"{BUILDS}/{uuid}/early-failure"

    def claim_build(self, uuid: str, launcher: str, console: str | None = None) -> bool:
        """Mark a build as run by `launcher` (ephemeral: it vanishes with the
        launcher's session), with the host:port of its live console. False if
        another launcher already runs it."""
        data = {"launcher": launcher, **({"console": console} if console else {})}
        try:
            self.zk.create(self.build_running_path(uuid), data, ephemeral=True)
        except NodeExistsError:
            return False
        return True

    def build_console(self, uuid: str) -> str | None:
        """host:port of the live console of a running build; None if it is not running."""
        data = self.zk.get_or_none(self.build_running_path(uuid))
        return data.get("console") if isinstance(data, dict) else None

    def release_build(self, uuid: str) -> None:
        self.zk.delete(self.build_running_path(uuid))

    def build_running(self, uuid: str) -> bool:
        return self.zk.exists(self.build_running_path(uuid))

    def store_build_result(self, uuid: str, result: BuildResult) -> BuildResult:
        """Store the result unless one is there; return the one that counts."""
        try:
            self.zk.create(self.build_result_path(uuid), result.to_dict())
        except NodeExistsError:
            stored = self.get_build_result(uuid)
            if stored is not None:
                return stored
        return result

    def get_build_result(self, uuid: str) -> BuildResult | None:
        return self._build_result(self.zk.get_or_none(self.build_result_path(uuid)))

    def get_build_results(self, uuids: list[str]) -> list[BuildResult | None]:
        """Several results in about one round trip (None: not stored)."""
        return [
            self._build_result(data)
            for data in self.zk.get_many([self.build_result_path(u) for u in uuids])
        ]

    @staticmethod
    def _build_result(data: object) -> BuildResult | None:
        if data is None:
            return None
        try:
            if isinstance(data, ValueError):
                raise ContractError(f"not JSON ({data})")
            return BuildResult.from_dict(data)
        except ContractError as error:
            return BuildResult("FAILURE", summary=f"The launcher stored a bad result: {error}")

    def mark_early_failure(self, uuid: str, reason: str) -> None:
        try:
            self.zk.create(
                self.build_early_failure_path(uuid), {"reason": reason, "time": time.time()}
            )
        except NodeExistsError:
            pass

    def get_early_failure(self, uuid: str) -> dict | None:
        return self.zk.get_or_none(self.build_early_failure_path(uuid))

    def build_path(self, uuid: str) -> str:
        return f"{BUILDS}/{uuid}"

    def watch_build(
        self,
        uuid: str,
        callback: Callable[[list[str]], bool | None],
        notify_deleted: bool = True,
        exists: bool = False,
    ) -> None:
        """`callback(children)` of the build's znode (running, result,
        early-failure) now and on every change, and (`notify_deleted`)
        `callback([])` once if the build's znode is deleted (kazoo's
        ChildrenWatch ends silently then); it ends there or when the callback
        returns False. `exists`: the caller created the znode already."""
        path = f"{BUILDS}/{uuid}"
        done: list[bool] = []

        def on_children(children: list[str]) -> bool | None:
            if done:
                return False
            if callback(children) is False:
                done.append(True)
                return False
            return None

        def on_data(data: dict | None, version: int | None) -> bool | None:
            if done:
                return False
            if version is None:
                done.append(True)
                callback([])
                return False
            return None

        self.zk.watch_children(path, on_children, ensure=not exists)
        if notify_deleted:
            self.zk.watch_data(path, on_data)

    def delete_build(self, uuid: str) -> None:
        self.zk.delete(f"{BUILDS}/{uuid}", recursive=True)

    # Reports ---------------------------------------------------------------

    def report_path(self, item_uuid: str) -> str:
        return f"{REPORTS}/{item_uuid}"

    def get_report(self, item_uuid: str) -> dict | None:
        return self.zk.get_or_none(self.report_path(item_uuid))

    def report_uuids(self) -> list[str]:
        return self.zk.get_children(REPORTS)

    def delete_report(self, item_uuid: str) -> None:
        self.zk.delete(self.report_path(item_uuid))

    # Flake counters --------------------------------------------------------

    def flake_path(self, project: str, job: str) -> str:
        # A project name may hold slashes ("linux/net"): one znode per name.
        return f"{FLAKES}/{quote(project, safe='')}/{job}"

    def count_flake(
        self, project: str, job: str, build_uuid: str, flipped: bool, tests: Sequence[str] = ()
    ) -> None:
        """Count one run of `job` (a flip if it failed, then passed; `tests`
        the tests that flipped) with a compare-and-set; a build already
        counted is not counted again (the scheduler may take the same result
        twice across a restart)."""
        path = self.flake_path(project, job)
        while True:
            try:
                data, version = self.zk.get(path)
            except NoNodeError:
                data, version = {"runs": 0, "flips": 0, "recent": []}, None
            recent = list(data.get("recent", []))
            if build_uuid in recent:
                return
            per_test = dict(data.get("tests", {}))
            for test in tests if flipped else ():
                per_test[test] = per_test.get(test, 0) + 1
            new = {
                "runs": data.get("runs", 0) + 1,
                "flips": data.get("flips", 0) + int(flipped),
                "recent": [*recent, build_uuid][-FLAKE_RECENT:],
                "tests": per_test,
            }
            try:
                if version is None:
                    self.zk.create(path, new)
                else:
                    self.zk.set(path, new, version)
                return
            except (BadVersionError, NodeExistsError):
                continue  # another writer came first: read again

    def flake_counts(self) -> list[FlakeCount]:
        """Every counter, by project and job."""
        counts = []
        for project in self.zk.get_children(FLAKES):
            for job in self.zk.get_children(f"{FLAKES}/{project}"):
                data = self.zk.get_or_none(f"{FLAKES}/{project}/{job}") or {}
                counts.append(
                    FlakeCount(
                        unquote(project),
                        job,
                        data.get("runs", 0),
                        data.get("flips", 0),
                        dict(data.get("tests", {})),
                    )
                )
        return counts

    # Connections -----------------------------------------------------------

    def cursor_path(self, connection: str) -> str:
        return self.connection_path(connection, "cursor")

    def connection_path(self, connection: str, *parts: str) -> str:
        """What a connection keeps of its review system (cursor, Depends-On index)."""
        return "/".join([CONNECTIONS, connection, *parts])

    def get_cursor(self, connection: str) -> dict | None:
        return self.zk.get_or_none(self.cursor_path(connection))

    def set_cursor(self, connection: str, data: dict) -> None:
        path = self.cursor_path(connection)
        try:
            self.zk.create(path, data)
        except NodeExistsError:
            self.zk.set(path, data)

    def local_path(self, *parts: str | int) -> str:
        return "/".join([LOCAL, *(str(p) for p in parts)])

    # Locks -----------------------------------------------------------------

    def lock(self, name: str, identifier: str = "", timeout: float | None = None) -> Lock:
        return self.zk.lock(f"{LOCKS}/{name}", identifier, timeout=timeout)
