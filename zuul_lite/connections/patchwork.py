"""A Patchwork project as a review system (REST API v1.2 and later).

A Patchwork *series* is a change: its number is the series id, its patchset
the series version, and its bytes the series mbox exactly as Patchwork serves
it. A poller thread (zuul_lite/connections/patchwork_events.py) turns
`series-completed` events into patchset-created (check) and a series whose
patches all reached the configured gate state into change-approved (gate).
Reports are checks on every patch of the series, one per job (context = the
job name, pending while it runs); a gate merge pushes the tested commit to
the configured branch and moves the patches to the accepted state.

Exactly once: each check carries `[zuul-lite <pipeline> <digest>]` in its
description, the digest naming the report, so a report repeated after a crash
posts only the checks still missing and `has_report` can tell.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import voluptuous as v

from zuul_lite.connections import BuildReport, Connection, Report
from zuul_lite.connections.depends_index import DependsOnIndex
from zuul_lite.connections.patchwork_api import PatchworkClient, PatchworkError
from zuul_lite.connections.patchwork_events import EventPoller
from zuul_lite.exceptions import ConfigError, ZuulLiteError
from zuul_lite.model import Change, Result
from zuul_lite.reporter import format_duration, headline
from zuul_lite.series import depends_on, split_mbox

if TYPE_CHECKING:
    from zuul_lite.merger import Merger

log = logging.getLogger("zuul_lite.connections.patchwork")

MBOX_CACHE = 16  # complete series mboxes kept in memory
CONTEXT = "zuul-lite"  # the check of an item no job could test
MARK = "[zuul-lite"  # starts the tag in the description of every check we post
CHECK_STATES = {
    Result.SUCCESS: "success",
    Result.ERROR: "warning",  # our fault, not the series'
    Result.ABORTED: "warning",
}

SCHEMA = v.Schema(
    {
        v.Required("driver"): "patchwork",
        v.Required("url"): v.All(str, v.Match(r"^https?://", msg="expected an http(s) URL")),
        v.Required("project"): str,
        v.Exclusive("token", "token", msg="give token or token-file, not both"): str,
        v.Exclusive("token-file", "token", msg="give token or token-file, not both"): str,
        "poll-interval": v.All(v.Coerce(float), v.Range(min=0.01)),
        "timeout": v.All(v.Coerce(float), v.Range(min=0.1)),
        v.Required("git"): str,
        "branch": str,
        "gate-state": str,
        "accepted-state": str,
    }
)


def _validate(name: str, config: dict) -> dict:
    """The connection's config; ConfigError naming the bad key in one sentence."""
    try:
        cfg = SCHEMA(config)
    except v.MultipleInvalid as e:
        error = e.errors[0]
        # voluptuous names an exclusion group "<group>"; ours is the key "token".
        key = ".".join(str(p).strip("<>") for p in error.path)
        raise ConfigError(f"Connection {name}: {key}: {error.error_message}.") from None
    if "token" not in cfg and "token-file" not in cfg:
        raise ConfigError(f"Connection {name}: token: give token or token-file.")
    return cfg


def _one_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class PatchworkConnection(Connection):
    driver = "patchwork"

    @classmethod
    def validate_config(cls, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return _validate(name, config)

    def setup(self) -> None:
        cfg = self.config
        self.project = cfg["project"]
        self.repo = Path(cfg["git"])
        self.branch = cfg.get("branch", "master")
        self.gate_state = cfg.get("gate-state", "under-review")
        self.accepted_state = cfg.get("accepted-state", "accepted")
        self.poll_interval = cfg.get("poll-interval", 60.0)
        self._token_file = cfg.get("token-file")
        self.client = PatchworkClient(cfg["url"], cfg.get("token", ""), cfg.get("timeout", 30.0))
        self._patches: dict[int, list[int]] = {}  # series id -> patch ids (fixed once complete)
        self._mboxes: dict[tuple[int, int], bytes] = {}  # (series, version) -> mbox, oldest first
        self.depends_index = DependsOnIndex(
            self.state.zk, self.state.connection_path(self.name, "depends-on")
        )
        self._sender = _PendingChecks(self)
        self.poller = EventPoller(self)

    @property
    def api_version(self) -> tuple[int, int]:
        """The REST API version the URL names ("/api/1.3/"); the newest one for "/api/"."""
        match = re.search(r"/api/(\d+)\.(\d+)/?$", self.client.url)
        return (int(match.group(1)), int(match.group(2))) if match else (99, 0)

    def start(self) -> None:
        if self._token_file:
            try:
                self.client.token = Path(self._token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"Connection {self.name}: token-file: cannot read {self._token_file} "
                    f"({e.strerror})."
                ) from None
        self._sender.start()
        self.poller.start()

    def stop(self) -> None:
        self.poller.stop()
        self._sender.stop()

    # Changes ------------------------------------------------------------

    def branch_repo(self, project: str) -> str:
        return str(self.repo)

    def get_series_data(self, number: int) -> dict:
        try:
            series = self.client.call("GET", self.client.api_url(f"series/{number}/"))
        except PatchworkError as e:
            if e.status == 404:
                raise ZuulLiteError(f"There is no series {number} in Patchwork.") from None
            raise
        link = (series.get("project") or {}).get("link_name")
        if link != self.project:
            raise ZuulLiteError(
                f"Series {number} belongs to Patchwork project {link}, not {self.project}."
            )
        return series

    def patch_states(self, number: int) -> dict[int, str]:
        """Patch id -> state slug of every patch of the series."""
        url = self.client.api_url("patches/", project=self.project, series=number, per_page=100)
        return {p["id"]: p["state"] for p in self.client.get_all(url)}

    def get_change(self, number: int, patchset: int | None = None) -> Change:
        series = self.get_series_data(number)
        version = series.get("version") or 1
        if patchset not in (None, version):
            raise ZuulLiteError(f"Series {number} is version {version}, not {patchset}.")
        states = self.patch_states(number)
        if series.get("received_all"):
            self._patches[number] = [p["id"] for p in series.get("patches", [])]
        values = set(states.values())
        submitter = series.get("submitter") or {}
        return Change(
            connection=self.name,
            project=self.project,
            branch=self.branch,
            number=number,
            patchset=version,
            subject=series.get("name") or f"series {number}",
            owner=f"{submitter.get('name') or ''} <{submitter.get('email', '')}>".strip(),
            status="MERGED" if values == {self.accepted_state} else "NEW",
            latest_patchset=version,
            approved=values == {self.gate_state},
            url=series.get("web_url") or series.get("url", ""),
            depends_on=self._depends_on(series),
        )

    def number_in(self, ref: str) -> int | None:
        """A series id, its API URL (".../series/7/") or its list URL ("...?series=7")."""
        match = re.fullmatch(r"(?:.*(?:/series/|[?&]series=))?(\d+)/?", ref.strip())
        return int(match.group(1)) if match else None

    def _depends_on(self, series: dict) -> list[str]:
        """Depends-On footers of the cover letter and every commit message of a
        complete series (a partial one is read again when it completes), kept
        in the index the gate looks waiting series up in."""
        if not series.get("received_all"):
            return []
        number = series["id"]
        texts = []
        cover = series.get("cover_letter") or {}
        try:
            if cover.get("url"):
                texts.append(self.client.call("GET", cover["url"]).get("content") or "")
            mbox = self._mbox(number, series)
        except PatchworkError as error:
            # The merger downloads it again and says so on the series if it must.
            log.warning("Depends-On of series %s not read: %s", number, error)
            return []
        texts += [m.decode("utf-8", "replace").split("\n---\n", 1)[0] for m in split_mbox(mbox)]
        found: list[str] = []
        for text in texts:
            found += [d for d in depends_on(text) if d not in found]
        self.depends_index.set(number, found)
        return found

    def changes_depending_on(self, change: Change) -> list[Change]:
        found = []
        for number in self.depends_index.naming(change.number, self.number_in):
            try:
                other = self.get_change(number)
            except ZuulLiteError as error:
                log.warning("Series %s, which depends on %s: %s", number, change.number, error)
                continue
            if other.status == "NEW" and any(
                self.number_in(ref) == change.number for ref in other.depends_on
            ):
                found.append(other)
        return found

    def patch_ids(self, number: int) -> list[int]:
        if number not in self._patches:
            series = self.get_series_data(number)
            self._patches[number] = [p["id"] for p in series.get("patches", [])]
        return self._patches[number]

    def get_series(self, change: Change) -> bytes:
        return self._mbox(change.number, self.get_series_data(change.number))

    def _mbox(self, number: int, series: dict) -> bytes:
        """The series mbox; a complete series never changes, so the last few
        are kept (read for Depends-On, then by the merger)."""
        version = series.get("version") or 1
        cached = self._mboxes.get((number, version))
        if cached is not None:
            return cached
        try:
            data = self.client.call("GET", series["mbox"], raw=True, attempts=3, delay=0.5)
        except PatchworkError as e:
            raise PatchworkError(
                f"The mbox of series {number} could not be downloaded from Patchwork "
                f"({str(e).rstrip('.')}).",
                transient=False,
            ) from None
        if series.get("received_all"):
            self._mboxes[(number, version)] = data
            while len(self._mboxes) > MBOX_CACHE:
                self._mboxes.pop(next(iter(self._mboxes)))
        return data

    # Checks -------------------------------------------------------------

    def checks_of(self, patch: int) -> list[dict]:
        return self.client.get_all(self.client.api_url(f"patches/{patch}/checks/", per_page=100))

    def has_checks(self, patch: int) -> bool:
        """Whether the patch carries any check of ours (pending ones too)."""
        return any(MARK in (c.get("description") or "") for c in self.checks_of(patch))

    def post_check(self, patch: int, check: dict, attempts: int = 3) -> None:
        self.client.call(
            "POST", self.client.api_url(f"patches/{patch}/checks/"), check, attempts=attempts
        )

    def on_build_started(self, change: Change, pipeline: str, job: str, log_url: str) -> None:
        """A pending check per patch, sent off the scheduler's thread."""
        check = {
            "state": "pending",
            "context": job,
            "target_url": log_url,
            "description": f"running in {pipeline} {MARK} {pipeline}]",
        }
        self._sender.add(change.number, check)

    def on_dequeued(self, change: Change, pipeline: str, jobs: list[str], why: str) -> None:
        """A warning per job that showed pending, sent after its pending check."""
        for job in jobs:
            check = {
                "state": "warning",
                "context": job,
                "description": _one_line(f"Not finished in {pipeline}: {why}.")
                + f" {MARK} {pipeline}]",
            }
            self._sender.add(change.number, check)

    @staticmethod
    def _tag(report: Report) -> str:
        digest = hashlib.sha256(report.id.encode()).hexdigest()[:16]
        return f"{MARK} {report.pipeline} {digest}]"

    def report_checks(self, report: Report) -> list[dict]:
        """The checks `report` leaves on each patch: one per job that ran, and
        one `zuul-lite` fail when the series could not be tested (or no job
        said anything), so a report is never silent."""
        tag = self._tag(report)
        ran = [b for b in report.builds if b.result not in (None, Result.SKIPPED)]
        checks = [self._job_check(b, tag) for b in ran]
        if report.reason or not checks:
            passed = not report.reason and (report.verified or 0) > 0
            text = report.reason or report.message.split("\n\n", 1)[-1]
            checks.append(
                {
                    "state": "success" if passed else "fail",
                    "context": CONTEXT,
                    "description": f"{_one_line(text)} {tag}",
                }
            )
        return checks

    @staticmethod
    def _job_check(build: BuildReport, tag: str) -> dict:
        took = f" in {format_duration(build.elapsed)}" if build.elapsed is not None else ""
        text = headline(build.summary) or build.note
        why = f": {_one_line(text, 120)}" if text else ""
        check = {
            "state": CHECK_STATES.get(build.result, "fail"),
            "context": build.job,
            "description": f"{build.result}{took}{why} {tag}",
        }
        if build.log_url:
            check["target_url"] = build.log_url
        return check

    def _missing(self, patch: int, checks: list[dict], tag: str) -> list[dict]:
        made = {
            (c.get("context"), c.get("state"))
            for c in self.checks_of(patch)
            if tag in (c.get("description") or "")
        }
        return [c for c in checks if (c["context"], c["state"]) not in made]

    def report(self, change: Change, report: Report) -> None:
        self._sender.discard(change.number)  # a late pending would hide the result
        checks, tag = self.report_checks(report), self._tag(report)
        for patch in self.patch_ids(change.number):
            for check in self._missing(patch, checks, tag):
                self.post_check(patch, check)
        log.info(
            "Reported %s to Patchwork: %d check(s) on each of %d patch(es)",
            change.label,
            len(checks),
            len(self.patch_ids(change.number)),
        )

    def has_report(self, change: Change, report: Report) -> bool:
        checks, tag = self.report_checks(report), self._tag(report)
        return not any(self._missing(p, checks, tag) for p in self.patch_ids(change.number))

    # Merging ------------------------------------------------------------

    def merge(self, change: Change, sha: str, merger: Merger) -> str | None:
        error = merger.push(change.project, sha, self.repo, self.branch)
        if error:
            return error
        for patch, state in self.patch_states(change.number).items():
            if state == self.accepted_state:
                continue
            try:
                self.client.call(
                    "PATCH",
                    self.client.api_url(f"patches/{patch}/"),
                    {"state": self.accepted_state},
                    attempts=5,
                )
            except PatchworkError as e:
                # The series is on the branch: that is the merge; the state only says so.
                log.error(
                    "Series %s merged, but patch %s is not marked %s: %s",
                    change.label,
                    patch,
                    self.accepted_state,
                    e,
                )
        log.info("Series %s merged at %s; patches %s", change.label, sha[:12], self.accepted_state)
        return None


class _PendingChecks(threading.Thread):
    """Sends pending checks in order, off the scheduler's thread; a report
    first drops the ones of its series not sent yet (`discard`)."""

    def __init__(self, conn: PatchworkConnection) -> None:
        super().__init__(name=f"patchwork-pending-{conn.name}", daemon=True)
        self.conn = conn
        self.queue: deque[tuple[int, dict]] = deque()
        self.sending: int | None = None
        self.cond = threading.Condition()
        self.running = True

    def add(self, series: int, check: dict) -> None:
        with self.cond:
            self.queue.append((series, check))
            self.cond.notify_all()

    def discard(self, series: int) -> None:
        with self.cond:
            self.queue = deque(e for e in self.queue if e[0] != series)
            self.cond.wait_for(lambda: self.sending != series)

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or not self.running)
                if not self.running:
                    return
                series, check = self.queue.popleft()
                self.sending = series
            try:
                for patch in self.conn.patch_ids(series):
                    self.conn.post_check(patch, check, attempts=1)
            except Exception as e:  # pending is a courtesy: the result follows anyway
                log.warning(
                    "Pending check %s on series %s not sent: %s", check["context"], series, e
                )
            finally:
                with self.cond:
                    self.sending = None
                    self.cond.notify_all()
