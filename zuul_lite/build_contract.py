"""The build contract: what the scheduler sends to `launcher:execute` and what
comes back. One typed structure, shared by the scheduler and the launcher, so
neither side invents keys the other does not read (doc/architecture.md).

The request carries the trigger event id, so one grep for `[e: <id>]` follows
a patch from its event through the launcher's log to the vote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


class ContractError(ValueError):
    """Arguments or a result that do not fit the contract: one sentence."""


@dataclass(slots=True)
class BuildRequest:
    """The JSON arguments of one `launcher:execute` gearman job."""

    uuid: str
    job: str
    node_type: str
    log_path: str
    project: str = ""
    branch: str = ""
    change: int = 0
    patchset: int = 0
    pipeline: str = ""
    event_id: str = ""
    git_ref: str | None = None
    git_url: str = ""
    base_ref: str | None = None
    # Every change the tested state holds, in the order they were applied
    # (items ahead in a gate queue, then this one): "3,1 5,2".
    changes: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    timeout: int = 1800
    playbooks: dict[str, list[str]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    # Regexes over the job's output: a match tells the scheduler the build
    # fails before it ends (Zuul's failure-output).
    failure_output: list[str] = field(default_factory=list)
    subject: str = ""
    owner: str = ""
    review_repo: str = ""
    # A branch head under test (change and patchset 0): the ref that moved
    # ("refs/heads/<branch>") and the commit it moved to, which base_ref names too.
    ref: str = ""
    newrev: str = ""
    # What a trusted build of this job found on base_ref (baseline.Baseline as
    # a dict), for the job to compare with; None: none is recorded.
    baseline: dict[str, Any] | None = None
    # The job's `checkout`: False, the node's work tree is not moved to the change.
    checkout: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BuildRequest:
        if not isinstance(data, dict):
            raise ContractError("the build arguments are not a JSON object.")
        missing = [f.name for f in fields(cls) if f.name in _REQUIRED and not data.get(f.name)]
        if missing:
            raise ContractError(f"the build arguments miss {', '.join(missing)}.")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as error:
            raise ContractError(f"the build arguments do not fit: {error}.") from None


_REQUIRED = ("uuid", "job", "node_type", "log_path")


@dataclass(slots=True)
class BuildResult:
    """What a launcher stores in ZooKeeper (and sends with WORK_COMPLETE).

    `result` is one of model.Result; `summary` quotes the first error lines;
    `findings` is what the job found (baseline.Findings as a dict), if it says.
    """

    result: str
    log_url: str | None = None
    elapsed: float | None = None
    summary: str = ""
    findings: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BuildResult:
        if not isinstance(data, dict) or not isinstance(data.get("result"), str):
            raise ContractError("the build result has no result.")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
