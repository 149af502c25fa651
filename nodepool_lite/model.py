"""The objects nodepool keeps in ZooKeeper: nodes, node requests, image builds
and their uploads to providers.

Each is a dataclass with `to_dict()`/`from_dict()` for the JSON stored in
ZooKeeper. States are `str` Enums with their allowed transitions beside them,
and assigning `state` checks the transition (Nodepool's VALID_STATES, one step
stricter) so a bug that would resurrect a used node fails loudly at the
assignment instead of booting a job on a dirty node.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar

from nodepool_lite.exceptions import InvalidStateError


class NodeState(StrEnum):
    BUILDING = "building"
    READY = "ready"
    IN_USE = "in-use"
    USED = "used"
    HOLD = "hold"
    DELETING = "deleting"
    FAILED = "failed"


class RequestState(StrEnum):
    REQUESTED = "requested"
    PENDING = "pending"
    FULFILLED = "fulfilled"
    FAILED = "failed"


class BuildState(StrEnum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class UploadState(StrEnum):
    UPLOADING = "uploading"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


_N = NodeState
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    _N.BUILDING: frozenset({_N.READY, _N.FAILED, _N.DELETING}),
    _N.READY: frozenset({_N.IN_USE, _N.USED, _N.HOLD, _N.DELETING, _N.FAILED}),
    _N.IN_USE: frozenset({_N.USED, _N.HOLD, _N.DELETING, _N.FAILED}),
    _N.USED: frozenset({_N.HOLD, _N.DELETING}),
    _N.HOLD: frozenset({_N.USED, _N.DELETING}),
    _N.DELETING: frozenset(),
    _N.FAILED: frozenset({_N.DELETING}),
}

_R = RequestState
REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    # Fulfilled at once when ready nodes (min-ready's spares) cover it.
    _R.REQUESTED: frozenset({_R.PENDING, _R.FULFILLED, _R.FAILED}),
    # A pool worker that cannot serve a request hands it back (`requested`).
    _R.PENDING: frozenset({_R.REQUESTED, _R.FULFILLED, _R.FAILED}),
    _R.FULFILLED: frozenset(),
    _R.FAILED: frozenset(),
}

_B = BuildState
BUILD_TRANSITIONS: dict[BuildState, frozenset[BuildState]] = {
    _B.BUILDING: frozenset({_B.READY, _B.FAILED, _B.DELETING}),
    _B.READY: frozenset({_B.DELETING}),
    _B.FAILED: frozenset({_B.DELETING}),
    _B.DELETING: frozenset(),
}


_U = UploadState
UPLOAD_TRANSITIONS: dict[UploadState, frozenset[UploadState]] = {
    _U.UPLOADING: frozenset({_U.READY, _U.FAILED, _U.DELETING}),
    _U.READY: frozenset({_U.DELETING}),
    _U.FAILED: frozenset({_U.DELETING}),
    _U.DELETING: frozenset(),
}


def _local(**kwargs: Any) -> Any:
    """A field that lives only in this process (lock handles), never in ZooKeeper."""
    return field(metadata={"zk": False}, repr=False, compare=False, **kwargs)


class _Stored:
    """Shared behaviour: checked state changes and JSON (de)serialisation."""

    STATES: ClassVar[type[Enum]]
    TRANSITIONS: ClassVar[dict[Any, frozenset[Any]]]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            value = self.STATES(value)
            old = self.__dict__.get("state")
            if old is not None and value != old:
                if value not in self.TRANSITIONS[old]:
                    raise InvalidStateError(
                        f"{type(self).__name__} {getattr(self, 'id', None)}: "
                        f"{old.value} -> {value.value} is not allowed."
                    )
                object.__setattr__(self, "state_time", time.time())
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("zk", True):
                value = getattr(self, f.name)
                out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], id: str | None = None) -> Any:
        """Build from stored JSON; unknown keys (newer writers) are ignored."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("zk", True)}  # type: ignore[arg-type]
        kwargs = {k: v for k, v in data.items() if k in names}
        if id is not None:
            kwargs["id"] = id
        return cls(**kwargs)


@dataclass(eq=False)
class Node(_Stored):
    """One throwaway machine, used by exactly one build and then destroyed."""

    STATES: ClassVar[type[Enum]] = NodeState
    TRANSITIONS: ClassVar[dict[Any, frozenset[Any]]] = NODE_TRANSITIONS

    id: str | None = None
    state: NodeState = NodeState.BUILDING
    type: str = ""  # the label
    provider: str = ""
    pool: str = ""
    launcher: str = ""
    interface_ip: str | None = None
    connection_port: int = 22
    username: str = "zuul"
    host_keys: list[str] = field(default_factory=list)
    allocated_to: str | None = None
    image_build: str | None = None  # "<image>-<build id>"
    external_id: str | None = None
    created_time: float = field(default_factory=time.time)
    state_time: float = field(default_factory=time.time)
    hold_job: str | None = None
    comment: str | None = None
    console_log: str | None = None  # where a driver saved the node's serial console
    lock: Any = _local(default=None)


@dataclass(eq=False)
class NodeRequest(_Stored):
    """A requestor's ask for one node per entry of `node_types`."""

    STATES: ClassVar[type[Enum]] = RequestState
    TRANSITIONS: ClassVar[dict[Any, frozenset[Any]]] = REQUEST_TRANSITIONS

    id: str | None = None
    state: RequestState = RequestState.REQUESTED
    node_types: list[str] = field(default_factory=list)
    requestor: str = ""
    declined_by: list[str] = field(default_factory=list)
    # "<provider>/<pool>" -> why that pool declined; joined into `reason`
    # when every pool that could serve the request has declined it.
    declined_reasons: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    state_time: float = field(default_factory=time.time)
    reason: str | None = None
    lock: Any = _local(default=None)


@dataclass(eq=False)
class ImageBuild(_Stored):
    """One diskimage-builder run; `path` holds its output and `rootfs/`."""

    STATES: ClassVar[type[Enum]] = BuildState
    TRANSITIONS: ClassVar[dict[Any, frozenset[Any]]] = BUILD_TRANSITIONS

    id: str | None = None
    state: BuildState = BuildState.BUILDING
    image: str = ""
    builder: str = ""
    formats: list[str] = field(default_factory=list)
    path: str | None = None
    created_time: float = field(default_factory=time.time)
    state_time: float = field(default_factory=time.time)
    elements: list[str] = field(default_factory=list)
    log_path: str | None = None


@dataclass(eq=False)
class ImageUpload(_Stored):
    """One image build uploaded to one provider (a Glance image for openstack)."""

    STATES: ClassVar[type[Enum]] = UploadState
    TRANSITIONS: ClassVar[dict[Any, frozenset[Any]]] = UPLOAD_TRANSITIONS

    id: str | None = None
    state: UploadState = UploadState.UPLOADING
    image: str = ""
    build_id: str = ""
    provider: str = ""
    external_id: str | None = None  # the provider's image id
    external_name: str | None = None
    reason: str | None = None  # why it failed
    created_time: float = field(default_factory=time.time)
    state_time: float = field(default_factory=time.time)
