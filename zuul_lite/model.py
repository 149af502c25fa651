"""The scheduler's data model, in Zuul's shape.

A Pipeline holds ChangeQueues; a ChangeQueue holds QueueItems in order, each
pointing at the item ahead of it (the state it is tested on top of); an item
carries a change and one BuildSet per attempt (the merge state it was tested
on and its Builds). Items are stored in ZooKeeper (zuul_lite/state.py), so
every stored class round-trips through `to_dict()`/`from_dict()`; MODEL_API
versions that stored shape (doc/architecture.md has the changelog).
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

MODEL_API = 2


class Result(StrEnum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    TIMED_OUT = "TIMED_OUT"
    POST_FAILURE = "POST_FAILURE"
    NODE_FAILURE = "NODE_FAILURE"
    MERGE_CONFLICT = "MERGE_CONFLICT"
    RETRY_LIMIT = "RETRY_LIMIT"
    SKIPPED = "SKIPPED"
    ABORTED = "ABORTED"
    ERROR = "ERROR"  # our own fault: reported without a negative vote


class BuildState(StrEnum):
    WAITING = "waiting"  # dependencies not finished
    QUEUED = "queued"  # submitted to gearman (or about to be)
    COMPLETED = "completed"
    SKIPPED = "skipped"


class MergeState(StrEnum):
    PENDING = "pending"
    COMPLETE = "complete"
    CONFLICT = "conflict"


def new_uuid() -> str:
    return uuidlib.uuid4().hex


def _from_dict(cls: type, data: dict) -> Any:
    names = _field_names(cls)
    return cls(**{k: v for k, v in data.items() if k in names})


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    return names


def _to_dict(obj: Any) -> dict:
    """The fields of a flat dataclass (values: scalars, lists and dicts of
    scalars), lists and dicts copied one level: what `asdict` gives them,
    without its recursive deep copy, which cost most of a scheduler pass's
    CPU in a burst of items (each stored several times)."""
    out = {}
    for name in _field_names(type(obj)):
        value = getattr(obj, name)
        if isinstance(value, list):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[name] = value
    return out


@dataclass(slots=True)
class TriggerEvent:
    """What a connection saw happen in the review system."""

    type: str  # patchset-created, comment-added, change-approved, ref-updated
    connection: str
    project: str
    branch: str
    change: int  # 0 for ref-updated
    patchset: int
    comment: str = ""
    # ref-updated: the ref that moved ("refs/heads/<branch>") and where from and to.
    ref: str = ""
    oldrev: str = ""
    newrev: str = ""
    id: str = field(default_factory=new_uuid)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TriggerEvent:
        return _from_dict(cls, data)


@dataclass(slots=True)
class ManagementEvent:
    """An operator's request from the CLI: enqueue, dequeue or promote."""

    type: str
    pipeline: str
    change: int
    patchset: int | None = None
    id: str = field(default_factory=new_uuid)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ManagementEvent:
        return _from_dict(cls, data)


@dataclass(slots=True)
class EventFilter:
    """One trigger entry of a pipeline: which events it wants."""

    event: str
    comment: str | None = None
    ref: str | None = None  # matched at the start of event.ref, as Zuul does

    def matches(self, event: TriggerEvent) -> bool:
        if event.type != self.event:
            return False
        if self.ref is not None and re.match(self.ref, event.ref or "") is None:
            return False
        if self.comment is not None:
            return re.search(self.comment, event.comment or "", re.MULTILINE) is not None
        return True


@dataclass(slots=True)
class Change:
    """One patchset of a change in a review system, as a connection returns it;
    or, with `number` 0, a branch head (Zuul's Ref): the tree at `newrev`, which
    `ref` points at since it moved, tested as it is."""

    connection: str
    project: str
    branch: str
    number: int
    patchset: int
    subject: str = ""
    owner: str = ""
    status: str = "NEW"  # NEW, MERGED, ABANDONED
    latest_patchset: int = 0
    approved: bool = False
    url: str = ""
    depends_on: list[str] = field(default_factory=list)  # Depends-On footers, as written
    ref: str = ""  # a ref item's "refs/heads/<branch>"
    newrev: str = ""  # a ref item's commit

    @property
    def is_ref(self) -> bool:
        return self.number == 0

    @property
    def label(self) -> str:
        if self.is_ref:
            return f"{self.branch}@{self.newrev[:12]}"
        return f"{self.number},{self.patchset}"

    @property
    def is_current(self) -> bool:
        return not self.latest_patchset or self.patchset == self.latest_patchset

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Change:
        return _from_dict(cls, data)


@dataclass(slots=True)
class Job:
    """A job definition from jobs/*.yaml."""

    name: str
    node_type: str | None  # None: no node (noop)
    run: list[str]
    pre_run: list[str] = field(default_factory=list)
    post_run: list[str] = field(default_factory=list)
    timeout: int = 1800
    dependencies: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    failure_output: list[str] = field(default_factory=list)
    description: str = ""
    # Writes caches shared with other builds: runs only on trusted trees (merged
    # branch heads, in a trusted pipeline), never on a change under review.
    trusted: bool = False
    # A FAILURE is run once more on a fresh node before it counts (a flaky test).
    rerun_on_failure: bool = False
    # False: the launcher gives the node the change's commits (refs/zuul/change)
    # but leaves its work tree as the image has it (doc/jobs.md, "checkout").
    checkout: bool = True

    @property
    def noop(self) -> bool:
        return self.name == "noop"


@dataclass(slots=True)
class Build:
    """One run of one job for one build set."""

    job: str
    node_type: str | None
    uuid: str = field(default_factory=new_uuid)
    state: str = BuildState.WAITING
    result: str | None = None
    log_url: str | None = None
    log_path: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    elapsed: float | None = None
    summary: str = ""
    attempts: int = 0  # how many uuids this job has had in this build set
    early_failure: bool = False  # the launcher said it will fail
    index: int = 0  # the job's place in the project's list: the order votes show
    # Set when a rerun-on-failure job failed and runs once more under a new
    # uuid: how the first run ended, where its logs are, and its uuid.
    first_result: str | None = None
    first_log_url: str | None = None
    rerun_of: str | None = None
    first_failed_tests: list[str] = field(default_factory=list)  # its findings' failures
    flaky_tests: list[str] = field(default_factory=list)  # of those, the ones that then passed
    # Failures the job did not count because the base commit has them too
    # (baseline.Findings.note), said on the job's line of the report.
    note: str = ""

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Build:
        return _from_dict(cls, data)

    @property
    def done(self) -> bool:
        return self.state in (BuildState.COMPLETED, BuildState.SKIPPED)

    @property
    def failed(self) -> bool:
        return self.early_failure or (self.done and self.result != Result.SUCCESS)

    @property
    def flaky(self) -> bool:
        """It failed, then passed on a fresh node: it counts as passed."""
        return self.first_result is not None and self.result == Result.SUCCESS


@dataclass(slots=True)
class BuildSet:
    """One attempt at testing an item: the merge state and the builds on it."""

    uuid: str = field(default_factory=new_uuid)
    attempt: int = 1
    changes: list[str] = field(default_factory=list)  # labels applied, in order
    merge_state: str = MergeState.PENDING
    merge_error: str | None = None
    base_sha: str | None = None
    head_sha: str | None = None
    git_ref: str | None = None
    builds: dict[str, Build] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = _to_dict(self)
        data["builds"] = {name: b.to_dict() for name, b in self.builds.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BuildSet:
        bs = _from_dict(cls, {k: v for k, v in data.items() if k != "builds"})
        bs.builds = {n: Build.from_dict(b) for n, b in data.get("builds", {}).items()}
        return bs

    def ordered_builds(self) -> list[Build]:
        """Builds in layout order (ZooKeeper's JSON keeps keys sorted by name)."""
        return sorted(self.builds.values(), key=lambda b: b.index)

    @property
    def merged(self) -> bool:
        return self.merge_state == MergeState.COMPLETE

    def all_done(self) -> bool:
        return all(b.done for b in self.builds.values())

    def any_failed(self) -> bool:
        return any(b.failed for b in self.builds.values())

    def succeeded(self) -> bool:
        return self.merged and all(b.result == Result.SUCCESS for b in self.builds.values())


@dataclass(eq=False)
class QueueItem:
    """A change in a pipeline's queue, tested on top of the item ahead.

    `item_ahead` and `items_behind` are live references rebuilt from the
    stored `item_ahead` uuid when a pipeline is loaded.
    """

    pipeline: str
    queue: str
    change: Change
    event_id: str = ""
    uuid: str = field(default_factory=new_uuid)
    enqueue_time: float = field(default_factory=time.time)
    live: bool = True
    active: bool = False  # inside the queue's window
    buildset: BuildSet = field(default_factory=BuildSet)
    error: str | None = None  # set when the item is reported because we failed
    failure: str | None = None  # reported as failing without its jobs (a lost dependency)
    quiet: bool = False  # dequeued by an operator: no report
    item_ahead: QueueItem | None = field(default=None, repr=False)
    items_behind: list[QueueItem] = field(default_factory=list, repr=False)
    ahead_uuid: str | None = None  # item_ahead as loaded, until linked

    def to_dict(self) -> dict:
        return {
            "model_api": MODEL_API,
            "uuid": self.uuid,
            "pipeline": self.pipeline,
            "queue": self.queue,
            "change": self.change.to_dict(),
            "event_id": self.event_id,
            "enqueue_time": self.enqueue_time,
            "live": self.live,
            "active": self.active,
            "buildset": self.buildset.to_dict(),
            "error": self.error,
            "failure": self.failure,
            "quiet": self.quiet,
            "item_ahead": self.item_ahead.uuid if self.item_ahead else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QueueItem:
        return cls(
            pipeline=data["pipeline"],
            queue=data["queue"],
            change=Change.from_dict(data["change"]),
            event_id=data.get("event_id", ""),
            uuid=data["uuid"],
            enqueue_time=data.get("enqueue_time", 0.0),
            live=data.get("live", True),
            active=data.get("active", False),
            buildset=BuildSet.from_dict(data.get("buildset", {})),
            error=data.get("error"),
            failure=data.get("failure"),
            quiet=data.get("quiet", False),
            ahead_uuid=data.get("item_ahead"),
        )

    @property
    def label(self) -> str:
        return self.change.label

    def changes_ahead(self) -> list[QueueItem]:
        """The live items this one is tested on top of, nearest last."""
        chain = []
        ahead = self.item_ahead
        while ahead is not None:
            chain.append(ahead)
            ahead = ahead.item_ahead
        return list(reversed(chain))


@dataclass(eq=False)
class ChangeQueue:
    """Items in order; each tested on top of its item ahead. The window is
    Zuul's: how many items at the head may run jobs at once."""

    pipeline: str
    name: str
    window: int = 0  # 0: unlimited
    window_floor: int = 3
    window_increase_type: str = "linear"
    window_increase_factor: int = 1
    window_decrease_type: str = "exponential"
    window_decrease_factor: int = 2
    dynamic: bool = False  # an independent pipeline's one-item queue
    items: list[QueueItem] = field(default_factory=list)
    stored: bool = False  # its znode exists

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "window": self.window,
            "dynamic": self.dynamic,
            "items": [i.uuid for i in self.items],
        }

    def enqueue(self, item: QueueItem) -> None:
        item.queue = self.name
        if self.items:
            item.item_ahead = self.items[-1]
            self.items[-1].items_behind.append(item)
        self.items.append(item)

    @staticmethod
    def _detach(item: QueueItem) -> list[QueueItem]:
        """Unlink `item`; the items behind it move up to its item ahead."""
        moved = list(item.items_behind)
        if item.item_ahead is not None:
            item.item_ahead.items_behind.remove(item)
            item.item_ahead.items_behind.extend(moved)
        for behind in moved:
            behind.item_ahead = item.item_ahead
        item.item_ahead = None
        item.items_behind = []
        return moved

    def dequeue(self, item: QueueItem) -> list[QueueItem]:
        """Remove an item; those behind it move up to its item ahead.
        Returns the items whose item ahead changed."""
        moved = self._detach(item)
        self.items.remove(item)
        return moved

    def move(self, item: QueueItem, ahead: QueueItem | None) -> list[QueueItem]:
        """Re-base `item` onto `ahead` (Zuul's moveItem). The order of the
        list stays; only what it is tested on changes. Returns the items whose
        item ahead changed (the item and the ones that were behind it)."""
        if item.item_ahead is ahead:
            return []
        moved = self._detach(item)
        item.item_ahead = ahead
        if ahead is not None:
            ahead.items_behind.append(item)
        return [item, *moved]

    def is_actionable(self, item: QueueItem) -> bool:
        if not self.window:
            return True
        return self.items.index(item) < self.window

    def increase_window(self) -> None:
        if not self.window:
            return
        if self.window_increase_type == "exponential":
            self.window *= self.window_increase_factor
        else:
            self.window += self.window_increase_factor

    def decrease_window(self) -> None:
        if not self.window:
            return
        if self.window_decrease_type == "exponential":
            self.window = max(self.window_floor, self.window // self.window_decrease_factor)
        else:
            self.window = max(self.window_floor, self.window - self.window_decrease_factor)


@dataclass(eq=False)
class Pipeline:
    """A pipeline as the scheduler runs it: its settings from the layout and
    its queues. The layout builds the settings; the queues carry over when a
    new layout replaces them."""

    name: str
    manager: str
    source: str
    triggers: dict[str, list[EventFilter]] = field(default_factory=dict)
    success: dict[str, dict] = field(default_factory=dict)
    failure: dict[str, dict] = field(default_factory=dict)
    merge_failure: dict[str, dict] = field(default_factory=dict)
    description: str = ""
    window: int = 20
    window_floor: int = 3
    window_increase_type: str = "linear"
    window_increase_factor: int = 1
    window_decrease_type: str = "exponential"
    window_decrease_factor: int = 2
    queues: list[ChangeQueue] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        """Only merged trees enter it: every trigger is a branch moving."""
        filters = [f for fs in self.triggers.values() for f in fs]
        return bool(filters) and all(f.event == "ref-updated" for f in filters)

    def all_items(self) -> list[QueueItem]:
        return [item for queue in self.queues for item in queue.items]

    def get_queue(self, name: str) -> ChangeQueue | None:
        return next((q for q in self.queues if q.name == name), None)
