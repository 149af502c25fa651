"""Autohold: keep the node of a failed build for a developer to look at.

As Zuul's `autohold`: an operator asks that the next `count` failing builds
of a job (of a project, optionally of one change) keep their node. The
launcher that sees such a build fail claims one hold from the request (a
compare-and-set on its znode, so two launchers never take the last one) and
leaves the node in nodepool's `hold` state with the request's reason as its
comment, instead of giving it back to be destroyed. `nodepool list` shows
where it is; `nodepool delete` ends it.

A held node is still the throwaway node the build ran on: isolated as
before, never used for another build.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from nodepool_lite.exceptions import BadVersionError, NoNodeError
from zuul_lite.state import ZuulState

# Results of a build that failed on its own: worth a look. Not ABORTED,
# NODE_FAILURE and the like, where the node tells nothing about the change.
HOLD_RESULTS = frozenset({"FAILURE", "POST_FAILURE", "TIMED_OUT"})


@dataclass
class AutoholdRequest:
    project: str
    job: str
    reason: str
    count: int = 1
    change: int | None = None  # None: any change of the project
    nodes: list[str] = field(default_factory=list)  # held so far
    created: float = field(default_factory=time.time)
    id: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("id")
        return data

    @classmethod
    def from_dict(cls, data: dict, request_id: str) -> AutoholdRequest:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "id"}
        return cls(**known, id=request_id)

    def matches(self, project: str, job: str, change: int | None) -> bool:
        return (
            self.project == project
            and self.job == job
            and (self.change is None or self.change == change)
            and len(self.nodes) < self.count
        )

    def describe(self) -> str:
        which = f" change {self.change}" if self.change is not None else ""
        return (
            f"{self.id}: {self.project}{which} job {self.job}, "
            f"{len(self.nodes)}/{self.count} held ({', '.join(self.nodes) or 'none yet'}): "
            f"{self.reason}"
        )


def add(state: ZuulState, request: AutoholdRequest) -> AutoholdRequest:
    request.id = state.create_autohold(request.to_dict())
    return request


def requests(state: ZuulState) -> list[AutoholdRequest]:
    found = []
    for request_id in state.autohold_ids():
        stored = state.get_autohold(request_id)
        if stored is not None:
            found.append(AutoholdRequest.from_dict(stored[0], request_id))
    return found


def delete(state: ZuulState, request_id: str) -> bool:
    """False if there was no such request."""
    if not request_id.isdigit() or state.get_autohold(request_id) is None:
        return False
    state.zk.delete(state.autohold_path(request_id))
    return True


def claim(
    state: ZuulState, project: str, job: str, change: int | None, node_id: str
) -> AutoholdRequest | None:
    """Take one hold for `node_id` from the first request that matches and
    has holds left; None if none does. Safe against other launchers."""
    for request_id in state.autohold_ids():
        while True:
            stored = state.get_autohold(request_id)
            if stored is None:
                break
            data, version = stored
            request = AutoholdRequest.from_dict(data, request_id)
            if not request.matches(project, job, change):
                break
            request.nodes.append(node_id)
            try:
                state.zk.set(state.autohold_path(request_id), request.to_dict(), version)
            except BadVersionError:
                continue  # another launcher took one meanwhile: look again
            except NoNodeError:
                break
            return request
    return None
