"""Connections to review systems: the driver interface and the registry.

A connection is one review system (the local inbox, a Gerrit, a Patchwork).
It is a *source* of trigger events, which it hands to `post_event` (the
scheduler's event queue, which belongs to the scheduler: in ZooKeeper, so an
event posted by a CLI or a watcher thread survives a scheduler restart), and
the place changes come from (`get_change`, `get_series`), votes go to
(`report`) and gate merges happen (`merge`). Pipelines name reporters per
connection, as Zuul layouts do.

Reports must reach the review system exactly once even though it is outside
ZooKeeper: the manager records a report before it is made, and on restart
asks `has_report` before making it again.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from zuul_lite.exceptions import ConfigError, ZuulLiteError
from zuul_lite.model import Change, TriggerEvent
from zuul_lite.state import ZuulState

if TYPE_CHECKING:
    from nodepool_lite.zk import Transaction
    from zuul_lite.merger import Merger

PostEvent = Callable[[TriggerEvent], None]


@dataclass(frozen=True, slots=True)
class BuildReport:
    """How one job ended, for review systems that show jobs one by one (checks)."""

    job: str
    result: str | None
    log_url: str | None = None
    elapsed: float | None = None
    summary: str = ""
    note: str = ""  # failures not counted: "already failing on base 1a2b3c4d5e6f: ..."


@dataclass(frozen=True, slots=True)
class Report:
    """One report on one patchset: `id` makes it recognisable on a retry."""

    id: str
    pipeline: str
    message: str
    verified: int | None = None
    # The commit the change merged at, when the report is the gate's: a review
    # system in ZooKeeper marks the change merged in the report's own write.
    merged_sha: str | None = None
    builds: tuple[BuildReport, ...] = ()
    # Why the change was not tested, or tested but not merged (one sentence).
    reason: str = ""


class Connection(abc.ABC):
    """The driver interface every review system implements."""

    driver: ClassVar[str]
    # The review system lives in ZooKeeper: report_ops() adds the vote to the
    # transaction that removes the item (the local inbox).
    reports_in_transaction: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        state: ZuulState,
        state_dir: Path,
        post_event: PostEvent | None = None,
    ) -> None:
        self.name = name
        self.config = self.validate_config(name, config)
        self.state = state
        self.state_dir = Path(state_dir)
        self.post_event = post_event
        self.setup()

    def setup(self) -> None:  # noqa: B027 (a hook: a driver with nothing more to set up)
        """The driver's own attributes, from `self.config` (validated)."""

    @classmethod
    def validate_config(cls, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """The connection's settings, checked; ConfigError with one sentence
        naming the key. Called when zuul.yaml is loaded, so `validate-config`
        and every daemon refuse a bad connection before anything starts."""
        return config

    def start(self) -> None:  # noqa: B027 (a hook: the local inbox has nothing to watch)
        """Start watching the review system (threads that call `post_event`)."""

    def stop(self) -> None:  # noqa: B027
        """Stop watching."""

    @contextmanager
    def preloaded(self, numbers: Iterable[int]) -> Iterator[None]:
        """Within: the scheduler is about to read these changes one by one (a
        wake-up's trigger events, a pass's reports). A review system that can
        read several at once does so on entry and serves each first read
        from that; by default nothing is read ahead."""
        yield

    def on_build_started(self, change: Change, pipeline: str, job: str, log_url: str) -> None:  # noqa: B027
        """A build of the change was submitted (a review system may show it as pending)."""

    def on_dequeued(self, change: Change, pipeline: str, jobs: list[str], why: str) -> None:  # noqa: B027
        """The change left the pipeline without a report (an operator, a new
        patchset) while `jobs` had started: what showed them pending says why."""

    @abc.abstractmethod
    def get_change(self, number: int, patchset: int | None = None) -> Change:
        """The change (its latest patchset when `patchset` is None); raises
        a ZuulLiteError with one sentence when there is no such change."""

    def number_in(self, ref: str) -> int | None:
        """The change number a Depends-On value names: a number, or a URL
        ending in one; None if it names none."""
        match = re.fullmatch(r"(?:.*/)?(\d+)/?", ref.strip())
        return int(match.group(1)) if match else None

    def find_change(self, ref: str) -> Change | None:
        """The change a Depends-On footer names, or None when there is no such change."""
        number = self.number_in(ref)
        if number is None:
            return None
        try:
            return self.get_change(number)
        except ZuulLiteError:
            return None

    def changes_depending_on(self, change: Change) -> list[Change]:
        """Open changes whose Depends-On names `change` (for the gate, which
        enqueues approved ones behind it)."""
        return []

    @abc.abstractmethod
    def get_series(self, change: Change) -> bytes:
        """The patch series of that patchset, byte for byte as submitted."""

    def get_series_many(self, changes: list[Change]) -> list[bytes | Exception]:
        """The series of several changes (a gate pass asks for many at once),
        each or the error reading it raised, so one unreadable series fails
        only its change; a review system that can read them together
        overrides it."""
        found: list[bytes | Exception] = []
        for change in changes:
            try:
                found.append(self.get_series(change))
            except Exception as error:
                found.append(error)
        return found

    @abc.abstractmethod
    def branch_repo(self, project: str) -> str:
        """Where the merger fetches the project's branches from (a path or URL)."""

    @abc.abstractmethod
    def report(self, change: Change, report: Report) -> None:
        """Leave the vote and message on the change."""

    def report_ops(self, change: Change, report: Report, txn: Transaction) -> None:
        """Add the writes of `report` to `txn` (only with reports_in_transaction)."""
        raise NotImplementedError

    @abc.abstractmethod
    def has_report(self, change: Change, report: Report) -> bool:
        """Whether `report` already reached the change (a retry after a crash)."""

    @abc.abstractmethod
    def merge(self, change: Change, sha: str, merger: Merger) -> str | None:
        """Merge the change as tested (commit `sha` of the merger's workspace); None on
        success, or one sentence saying why it did not merge. Must succeed
        again when the change already merged at `sha` (a retry)."""

    def merge_many(
        self, changes: list[Change], shas: list[str], merger: Merger
    ) -> list[str | None]:
        """Merge changes of one branch in order, each as tested (`shas[i]`,
        the state that holds changes[:i+1]): like `merge` for each, up to the
        first that does not merge (its sentence ends the list). A review
        system that can land them all at once (one push) overrides it."""
        results: list[str | None] = []
        for change, sha in zip(changes, shas, strict=True):
            results.append(self.merge(change, sha, merger))
            if results[-1]:
                break
        return results


def _drivers() -> dict[str, type[Connection]]:
    from zuul_lite.connections.gerrit import GerritConnection
    from zuul_lite.connections.local import LocalConnection
    from zuul_lite.connections.patchwork import PatchworkConnection

    return {cls.driver: cls for cls in (LocalConnection, GerritConnection, PatchworkConnection)}


def validate_connection(name: str, config: dict[str, Any]) -> None:
    """Check one `connections:` entry with its driver's own schema."""
    _drivers()[config["driver"]].validate_config(name, config)


def driver_names() -> list[str]:
    return sorted(_drivers())


def make_connection(
    name: str,
    config: dict[str, Any],
    state: ZuulState,
    state_dir: Path,
    post_event: PostEvent | None = None,
) -> Connection:
    cls = _drivers().get(config.get("driver", ""))
    if cls is None:
        raise ConfigError(
            f"Connection {name}: unknown driver {config.get('driver')!r} "
            f"(known: {', '.join(driver_names())})."
        )
    return cls(name, config, state, state_dir, post_event)


def make_connections(
    configs: dict[str, dict[str, Any]],
    state: ZuulState,
    state_dir: Path,
    post_event: PostEvent | None = None,
) -> dict[str, Connection]:
    return {
        name: make_connection(name, cfg, state, state_dir, post_event)
        for name, cfg in configs.items()
    }
