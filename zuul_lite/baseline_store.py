"""The scheduler's side of baselines (zuul_lite/baseline.py): record what
trusted builds of branch heads found, and give a change's build the baseline
of its base commit."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from zuul_lite.baseline import Baseline, Findings, FindingsError
from zuul_lite.build_contract import BuildResult
from zuul_lite.history.db import HistoryDB, HistoryError
from zuul_lite.model import Build, Pipeline, QueueItem, Result

log = logging.getLogger("zuul_lite.baseline")


# Commits whose baselines are kept in memory: every check item of a burst is
# on the same branch head, and each gate item on the state of the one ahead.
CACHED_COMMITS = 256


class BaselineStore:
    """Only the scheduler records baselines (here), so what it read of a
    commit stays true until it records one on that commit itself."""

    def __init__(self, history: HistoryDB) -> None:
        self.history = history
        self._known: OrderedDict[tuple[str, str], dict[str, Baseline]] = OrderedDict()

    def on_result(
        self, pipeline: Pipeline, item: QueueItem, build: Build, result: BuildResult
    ) -> str:
        """Take a finished build's findings: recorded as the baseline of its
        commit if a trusted pipeline built a branch head; returns the note
        the report adds to its line (failures the job did not count)."""
        if result.findings is None:
            return ""
        try:
            findings = Findings.from_dict(result.findings)
        except FindingsError as error:
            log.warning("[build: %s] findings ignored: %s", build.uuid, error)
            return ""
        c = item.change
        trusted = pipeline.trusted and c.is_ref and c.newrev
        if trusted and result.result in (Result.SUCCESS, Result.FAILURE) and not findings.empty:
            baseline = Baseline(
                c.project, c.newrev, build.job, build.uuid, result.log_url or "", findings
            )
            self._known.pop((c.project, c.newrev), None)
            try:
                self.history.record_baseline(baseline)
                log.info(
                    "[build: %s] recorded as the baseline of %s on %s",
                    build.uuid, build.job, c.newrev[:12],
                )  # fmt: skip
            except HistoryError as error:
                # Only costs later builds on this commit their own base run.
                log.warning("[build: %s] %s", build.uuid, error)
        return findings.note()

    def for_build(self, item: QueueItem, build: Build) -> dict[str, Any] | None:
        """The baseline a change's build compares with: the one of the commit
        its series was applied to, for the same job; None for a branch head
        or when none is recorded (the job then runs the base itself)."""
        base = item.buildset.base_sha
        if item.change.is_ref or not base:
            return None
        key = (item.change.project, base)
        known = self._known.get(key)
        if known is None:
            try:
                known = self.history.commit_baselines(*key)
            except HistoryError as error:
                log.warning("[build: %s] no baseline: %s", build.uuid, error)
                return None
            self._known[key] = known
            if len(self._known) > CACHED_COMMITS:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(key)
        found = known.get(build.job)
        return found.to_dict() if found is not None else None
