"""The Patchwork connection's poller: Patchwork events become trigger events.

The events API filters on one category at a time, so each category is read on
its own, oldest first (`order=date`), page by page along the `Link` header,
and has its own cursor: the date of the last event seen and the ids seen at
that date (`since` includes that date). The trigger events a page yields and
the cursor that passes that page are one ZooKeeper transaction: a scheduler
killed at any point neither misses nor repeats an event.

Resync, for what the event stream no longer holds (Patchwork prunes old
events; a long outage): at start and after a failed poll, every complete
series since the cursor that carries no check of ours and that this process
has not posted yet gets a patchset-created. A series it posts may come again
through its event only after a restart, and a pipeline refuses a change it
already holds.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from typing import TYPE_CHECKING

from nodepool_lite.exceptions import BadVersionError, NodeExistsError, NoNodeError, ZKError
from zuul_lite.connections.patchwork_api import PatchworkError
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.model import TriggerEvent

if TYPE_CHECKING:
    from zuul_lite.connections.patchwork import PatchworkConnection

log = logging.getLogger("zuul_lite.connections.patchwork")

CATEGORIES = ("series-completed", "patch-state-changed")
# Comments became events in REST API 1.3 (Patchwork 3.1): "recheck" on a patch
# or on the cover letter becomes a comment-added of its series.
COMMENT_CATEGORIES = ("patch-comment-created", "cover-comment-created")
MAX_BACKOFF = 300.0


class EventPoller(threading.Thread):
    def __init__(self, conn: PatchworkConnection) -> None:
        super().__init__(name=f"patchwork-{conn.name}", daemon=True)
        self.conn = conn
        self.state = conn.state
        self.path = self.state.cursor_path(conn.name)
        self.stop_event = threading.Event()
        self.cursor: dict | None = None
        self.version = 0  # of the cursor's znode, for the versioned write
        self.posted: set[int] = set()  # series this process posted patchset-created for
        self.rounds = 0  # polls that went through (tests wait on it)
        self.categories = CATEGORIES + (COMMENT_CATEGORIES if conn.api_version >= (1, 3) else ())

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        failures = 0
        resync = True
        while not self.stop_event.is_set():
            try:
                if self.cursor is None:
                    self._load_cursor()
                if resync:
                    self._resync()
                    resync = False
                for category in self.categories:
                    self._poll(category)
            except BadVersionError:
                # Another poller (a second scheduler) moved the cursor first and
                # posted those events; read the cursor again.
                log.warning(
                    "Cursor of connection %s moved meanwhile; re-reading it", self.conn.name
                )
                self.cursor = None
                continue
            except Exception as error:  # the poller must outlive any failure
                failures += 1
                resync, self.cursor = True, None
                delay = min(self.conn.poll_interval * 2 ** min(failures, 12), MAX_BACKOFF)
                if isinstance(error, ZuulLiteError | ZKError):
                    log.error(
                        "Polling Patchwork project %s failed (%s); retrying in %gs",
                        self.conn.project,
                        error,
                        delay,
                    )
                else:
                    log.exception("Polling Patchwork project %s raised", self.conn.project)
                self.stop_event.wait(delay)
                continue
            if failures:
                log.info("Polling Patchwork works again after %d failure(s)", failures)
            failures = 0
            self.rounds += 1
            self.stop_event.wait(self.conn.poll_interval)

    # The cursor ---------------------------------------------------------

    def _load_cursor(self) -> None:
        """The stored cursor; on a first start, one past the newest events, so
        the project's history is not tested."""
        self.state.zk.ensure_path(posixpath.dirname(self.path))
        try:
            self.cursor, self.version = self.state.zk.get(self.path)
            self._add_categories()
            return
        except NoNodeError:
            pass
        cursor = {"categories": {c: self._newest(c) for c in self.categories}}
        try:
            self.state.zk.create(self.path, cursor)
        except NodeExistsError:
            self.cursor, self.version = self.state.zk.get(self.path)
            return
        self.cursor, self.version = cursor, 0
        log.info(
            "Patchwork project %s: no cursor yet; starting after its newest events",
            self.conn.project,
        )

    def _add_categories(self) -> None:
        """A category this version polls that the stored cursor lacks (a newer
        API, an upgrade) starts after its newest events, as a first start does."""
        missing = [c for c in self.categories if c not in self.cursor["categories"]]
        if not missing:
            return
        cursor = {
            "categories": {**self.cursor["categories"], **{c: self._newest(c) for c in missing}}
        }
        self.state.zk.set(self.path, cursor, version=self.version)
        self.cursor, self.version = cursor, self.version + 1

    def _newest(self, category: str) -> dict:
        client = self.conn.client
        url = client.api_url(
            "events/", project=self.conn.project, category=category, order="-date"
        )
        page, _ = client.request("GET", url)
        if not page:
            return {"date": "", "ids": []}
        date = page[0]["date"]
        return {"date": date, "ids": [e["id"] for e in page if e["date"] == date]}

    @staticmethod
    def _seen(cur: dict, event: dict) -> bool:
        return event["date"] < cur["date"] or (
            event["date"] == cur["date"] and event["id"] in cur["ids"]
        )

    @staticmethod
    def _advance(cur: dict, event: dict) -> dict:
        if event["date"] == cur["date"]:
            return {"date": cur["date"], "ids": [*cur["ids"], event["id"]]}
        return {"date": event["date"], "ids": [event["id"]]}

    def _commit(self, category: str, cur: dict, events: list[TriggerEvent]) -> None:
        """The trigger events and the cursor past them, in one transaction."""
        cursor = {"categories": {**self.cursor["categories"], category: cur}}
        txn = self.state.transaction()
        for event in events:
            self.state.add_trigger_event(txn, event.to_dict())
        txn.set(self.path, cursor, self.version)
        txn.commit()
        self.cursor, self.version = cursor, self.version + 1

    # Polling --------------------------------------------------------------

    def _poll(self, category: str) -> None:
        client = self.conn.client
        cur = self.cursor["categories"][category]
        url = client.api_url(
            "events/",
            project=self.conn.project,
            category=category,
            order="date",
            since=cur["date"] or None,
        )
        for page in client.pages(url):
            events = []
            for entry in page:
                if self._seen(cur, entry):
                    continue
                events.extend(self._translate(category, entry))
                cur = self._advance(cur, entry)
            if cur is self.cursor["categories"][category]:
                continue  # nothing new on this page
            self._commit(category, cur, events)
            for event in events:
                if event.type == "patchset-created":
                    self.posted.add(event.change)
                log.info(
                    "[e: %s] %s for series %s,%s",
                    event.id,
                    event.type,
                    event.change,
                    event.patchset,
                )

    def _event(self, kind: str, series: int, version: int) -> TriggerEvent:
        return TriggerEvent(
            type=kind,
            connection=self.conn.name,
            project=self.conn.project,
            branch=self.conn.branch,
            change=series,
            patchset=version,
        )

    def _translate(self, category: str, entry: dict) -> list[TriggerEvent]:
        """The trigger events of one Patchwork event; a malformed one or one
        about another project's series is skipped with a log line."""
        try:
            payload = entry["payload"]
            if category in COMMENT_CATEGORIES:
                return self._comment_events(payload)
            if category == "series-completed":
                series = payload["series"]
                if series["id"] in self.posted:
                    return []
                return [self._event("patchset-created", series["id"], series.get("version") or 1)]
            if payload.get("current_state") != self.conn.gate_state:
                return []
            client = self.conn.client
            patch = client.call("GET", client.api_url(f"patches/{payload['patch']['id']}/"))
            out = []
            for series in patch.get("series") or []:
                change = self.conn.get_change(series["id"])
                if change.approved:
                    out.append(self._event("change-approved", change.number, change.patchset))
            return out
        except PatchworkError:
            raise  # Patchwork away: this page is read again
        except (KeyError, TypeError, ZuulLiteError) as error:
            log.warning("Skipped Patchwork event %s (%s): %r", entry.get("id"), category, error)
            return []

    def _comment_events(self, payload: dict) -> list[TriggerEvent]:
        """A comment on a patch or a cover letter: comment-added for each of
        its series, with the comment's text for the pipelines' regexes."""
        client = self.conn.client
        comment = client.call("GET", payload["comment"]["url"])
        subject = payload.get("patch") or payload["cover"]
        detail = client.call("GET", subject["url"])
        out = []
        for series in detail.get("series") or []:
            event = self._event("comment-added", series["id"], series.get("version") or 1)
            event.comment = comment.get("content") or ""
            out.append(event)
        return out

    def _resync(self) -> None:
        cur = self.cursor["categories"]["series-completed"]
        if not cur["date"]:
            return  # a first start: nothing to catch up on
        client = self.conn.client
        url = client.api_url("series/", project=self.conn.project, since=cur["date"], order="date")
        for series in client.get_all(url):
            patches = series.get("patches") or []
            if series["id"] in self.posted or not series.get("received_all") or not patches:
                continue
            if self.conn.has_checks(patches[0]["id"]):
                continue
            event = self._event("patchset-created", series["id"], series.get("version") or 1)
            self.state.put_trigger_event(event.to_dict())
            self.posted.add(series["id"])
            log.info(
                "[e: %s] patchset-created for series %s,%s (resync: no check of ours yet)",
                event.id,
                event.change,
                event.patchset,
            )
