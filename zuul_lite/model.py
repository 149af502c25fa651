"""The scheduler's data model: events, jobs, builds and queue items.

Queue items and their builds are stored in ZooKeeper as JSON (see
doc/architecture.md), so every class here round-trips through
`to_dict()`/`from_dict()`. MODEL_API versions that stored shape.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

MODEL_API = 1


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


class BuildState(StrEnum):
    WAITING = "waiting"  # dependencies not finished
    QUEUED = "queued"  # submitted to gearman (or about to be)
    COMPLETED = "completed"
    SKIPPED = "skipped"


class ItemState(StrEnum):
    MERGING = "merging"
    RUNNING = "running"
    REPORTING = "reporting"


def new_uuid() -> str:
    return uuidlib.uuid4().hex


@dataclass(slots=True)
class TriggerEvent:
    """What a connection saw happen in the review system."""

    type: str  # patchset-created, comment-added, change-approved
    connection: str
    project: str
    branch: str
    change: int
    patchset: int
    comment: str = ""
    id: str = field(default_factory=new_uuid)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TriggerEvent:
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


@dataclass(slots=True)
class EventFilter:
    """One trigger entry of a pipeline: which events it wants."""

    event: str
    comment: str | None = None

    def matches(self, event: TriggerEvent) -> bool:
        if event.type != self.event:
            return False
        if self.comment is not None:
            return re.search(self.comment, event.comment or "", re.MULTILINE) is not None
        return True


@dataclass(slots=True)
class Job:
    """A job definition from jobs/*.yaml."""

    name: str
    node_type: str
    run: list[str]
    pre_run: list[str] = field(default_factory=list)
    post_run: list[str] = field(default_factory=list)
    timeout: int = 1800
    dependencies: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(slots=True)
class Build:
    """One run of one job for one queue item."""

    job: str
    node_type: str
    uuid: str = field(default_factory=new_uuid)
    state: str = BuildState.WAITING
    result: str | None = None
    log_url: str | None = None
    log_path: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    elapsed: float | None = None
    summary: str = ""
    attempts: int = 0
    index: int = 0  # the job's place in the project's list: the order votes show

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Build:
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


@dataclass(slots=True)
class QueueItem:
    """A change (one patchset) in a pipeline, with one build per job."""

    pipeline: str
    connection: str
    project: str
    branch: str
    change: int
    patchset: int
    subject: str = ""
    owner: str = ""
    event_id: str = ""
    uuid: str = field(default_factory=new_uuid)
    enqueue_time: float = field(default_factory=time.time)
    state: str = ItemState.MERGING
    git_ref: str | None = None
    base_sha: str | None = None
    merge_error: str | None = None
    builds: dict[str, Build] = field(default_factory=dict)
    version: int = -1  # znode version; not stored

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__slots__ if k not in ("builds", "version")}
        data["builds"] = {name: b.to_dict() for name, b in self.builds.items()}
        data["model_api"] = MODEL_API
        return data

    @classmethod
    def from_dict(cls, data: dict, version: int = -1) -> QueueItem:
        kwargs = {k: data[k] for k in cls.__slots__ if k in data and k != "builds"}
        item = cls(**kwargs)
        item.builds = {n: Build.from_dict(b) for n, b in data.get("builds", {}).items()}
        item.version = version
        return item

    @property
    def label(self) -> str:
        return f"{self.change},{self.patchset}"

    def ordered_builds(self) -> list[Build]:
        """Builds in layout order (ZooKeeper's JSON keeps keys sorted by name)."""
        return sorted(self.builds.values(), key=lambda b: b.index)

    def finished(self) -> bool:
        return all(
            b.state in (BuildState.COMPLETED, BuildState.SKIPPED) for b in self.builds.values()
        )

    def succeeded(self) -> bool:
        return self.merge_error is None and all(
            b.result == Result.SUCCESS for b in self.builds.values()
        )
