"""A Gerrit: events from `gerrit stream-events`, changes from `gerrit query`,
votes and submits with `gerrit review`, all over ssh (zuul_lite/connections/
gerrit_ssh.py); commits from Gerrit's git into a local mirror (gerrit_git.py).

Gerrit's own data lags its events, so each event is held `event-delay`
seconds before it is posted, as Zuul does. A comment that leaves the current
patchset with Code-Review+2 and Workflow+1 is also posted as change-approved
(the gate's trigger). After every (re)connect of the stream, open changes
whose current patchset has no Verified vote of ours are posted as
patchset-created again, so a restart or a dropped stream never silently skips
a patch. A report carries a line with its id, which `has_report` looks for in
the change's comments: that is how a report is made once even though Gerrit
is outside ZooKeeper.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import voluptuous as v

from zuul_lite.connections import Connection, Report
from zuul_lite.connections.gerrit_git import GitMirror, ssh_command
from zuul_lite.connections.gerrit_rest import GerritRest
from zuul_lite.connections.gerrit_ssh import (
    GerritError,
    GerritSsh,
    SshTarget,
    StreamWatcher,
    quote,
)
from zuul_lite.exceptions import ConfigError, ZuulLiteError
from zuul_lite.model import Change, TriggerEvent
from zuul_lite.series import depends_on

if TYPE_CHECKING:
    from zuul_lite.merger import Merger

log = logging.getLogger("zuul_lite.connections.gerrit")

SCHEMA = v.Schema(
    {
        v.Required("driver"): "gerrit",
        v.Required("server"): str,
        "port": v.All(int, v.Range(min=1, max=65535)),
        v.Required("user"): str,
        v.Required("sshkey"): str,
        "known-hosts": str,  # default: the user's ~/.ssh/known_hosts
        "git-url": str,  # default ssh://<user>@<server>:<port>/
        "baseurl": str,  # the web UI, for change links; default https://<server>
        "event-delay": v.All(v.Coerce(float), v.Range(min=0)),
        "keepalive": v.All(int, v.Range(min=0)),
        "projects": [str],  # what the resync looks at; default every open change
        # The Verified vote given with a submit, when Gerrit's submit rule needs one.
        "submit-verified": v.All(int, v.Range(min=-2, max=2)),
        # Votes and submits over REST instead of `gerrit review` (events and
        # queries stay on ssh): the server's URL and the account's HTTP password.
        "rest-url": str,
        "http-user": str,  # default: user
        "http-password": str,
    },
    extra=v.PREVENT_EXTRA,
)

# Stream events that concern a change and are posted as they are.
CHANGE_EVENTS = (
    "patchset-created",
    "comment-added",
    "change-merged",
    "change-abandoned",
    "change-restored",
)
ZERO_SHA = "0" * 40
RESYNC = "resync"  # queued after every (re)connect of the stream
REPORT_LINE = "zuul-lite-report: {}"
SERIES_CACHE = 256


def _validated(name: str, config: dict[str, Any]) -> dict[str, Any]:
    try:
        config = SCHEMA(config)
    except v.MultipleInvalid as e:
        err = e.errors[0]
        key = ".".join(str(p) for p in err.path) or "(top level)"
        raise ConfigError(f"Connection {name}: {key}: {err.error_message}.") from None
    if "rest-url" in config and "http-password" not in config:
        raise ConfigError(f"Connection {name}: http-password: required with rest-url.")
    return config


def _label(approvals: list[dict], label: str) -> list[int]:
    values = []
    for a in approvals or []:
        if isinstance(a, dict) and a.get("type") == label:
            try:
                values.append(int(a.get("value", 0)))
            except (TypeError, ValueError):
                continue
    return values


def is_approved(approvals: list[dict]) -> bool:
    """Code-Review+2 and Workflow+1, Gerrit's usual "ready to merge"."""
    return 2 in _label(approvals, "Code-Review") and any(
        x >= 1 for x in _label(approvals, "Workflow")
    )


def _parents(row: dict) -> list[str]:
    """The changes a change is stacked on (its git parents that are changes),
    as Depends-On values: the manager tests and merges them ahead of it."""
    found = []
    for parent in row.get("dependsOn") or []:
        if isinstance(parent, dict) and str(parent.get("number", "")).isdigit():
            found.append(str(parent["number"]))
    return found


def _person(account: Any) -> str:
    if not isinstance(account, dict):
        return ""
    name, email = account.get("name", ""), account.get("email", "")
    return f"{name} <{email}>" if name and email else name or email or account.get("username", "")


class GerritConnection(Connection):
    driver = "gerrit"

    @classmethod
    def validate_config(cls, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return _validated(name, config)

    def setup(self) -> None:
        config = self.config
        self.user = config["user"]
        self.server = config["server"]
        port = config.get("port", 29418)
        known_hosts = Path(config["known-hosts"]) if "known-hosts" in config else None
        self.target = SshTarget(
            server=self.server,
            port=port,
            user=self.user,
            key=Path(config["sshkey"]),
            known_hosts=known_hosts,
            keepalive=config.get("keepalive", 60),
        )
        self.ssh = GerritSsh(self.target)
        self.mirror = GitMirror(
            self.state_dir / "gerrit" / self.name,
            config.get("git-url", f"ssh://{self.user}@{self.server}:{port}/"),
            ssh_command(self.target.key, known_hosts),
        )
        self.baseurl = config.get("baseurl", f"https://{self.server}").rstrip("/")
        self.event_delay = config.get("event-delay", 10.0)
        self.projects = config.get("projects", [])
        self.submit_verified = config.get("submit-verified")
        self.rest: GerritRest | None = None
        if "rest-url" in config:
            self.rest = GerritRest(
                config["rest-url"], config.get("http-user", self.user), config["http-password"]
            )
        self._events: queue.Queue[tuple[float, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._series: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self.watcher = StreamWatcher(
            self.target, self._queue, lambda: self._queue(RESYNC), self.name
        )
        self._connector = threading.Thread(
            target=self._run_connector, name=f"gerrit-events-{self.name}", daemon=True
        )

    # Events ---------------------------------------------------------------

    def start(self) -> None:
        self._connector.start()
        self.watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self.watcher.stop()
        self._events.put((0.0, None))
        self.ssh.close()

    def _queue(self, data: Any) -> None:
        self._events.put((time.monotonic(), data))

    def _run_connector(self) -> None:
        """Hold each stream event `event-delay` seconds (Gerrit's queries lag
        its events), then post it; one that fails is logged and dropped."""
        while not self._stop.is_set():
            received, data = self._events.get()
            if data is None:
                continue
            try:
                if data == RESYNC:
                    self.resync()
                    continue
                if self._stop.wait(max(0.0, received + self.event_delay - time.monotonic())):
                    return
                for event in self.events_for(data):
                    self._post(event)
            except ZuulLiteError as error:  # Gerrit away or refusing: the next resync makes up
                log.warning("%s dropped: %s", "Resync" if data == RESYNC else "Event", error)
            except Exception:
                log.exception("Gerrit event %s dropped", str(data)[:200])

    def _post(self, event: TriggerEvent) -> None:
        assert self.post_event is not None
        self.post_event(event)
        if event.type == "ref-updated":
            old = event.oldrev[:12] or "nothing"
            what = f"{event.ref} of {event.project}: {old} -> {event.newrev[:12]}"
        else:
            what = f"for change {event.change},{event.patchset} of {event.project}"
        log.info("[e: %s] %s %s", event.id, event.type, what)

    def events_for(self, data: dict) -> list[TriggerEvent]:
        """The trigger events one stream event makes (none for types we do not use)."""
        kind = data.get("type")
        if kind == "ref-updated":
            return self._ref_updated(data.get("refUpdate"))
        if kind not in CHANGE_EVENTS:
            log.debug("Skipped a Gerrit event of type %r", kind)
            return []
        change = data.get("change") if isinstance(data.get("change"), dict) else {}
        patchset = data.get("patchSet") if isinstance(data.get("patchSet"), dict) else {}
        try:
            number = int(change["number"])
            ps = int(patchset.get("number", 0))  # 0: the latest
            project, branch = str(change["project"]), str(change["branch"])
        except (KeyError, TypeError, ValueError):
            log.warning("Skipped a %s event without change number, project or branch", kind)
            return []
        comment = data.get("comment") if isinstance(data.get("comment"), str) else ""
        events = [
            TriggerEvent(
                type=kind,
                connection=self.name,
                project=project,
                branch=branch,
                change=number,
                patchset=ps,
                comment=comment,
            )
        ]
        if kind == "comment-added" and self._votes_changed(data.get("approvals")):
            try:
                current = self.get_change(number)
            except ZuulLiteError as error:
                log.warning("[e: %s] Approval of %s not checked: %s", events[0].id, number, error)
                return events
            if current.approved and ps in (0, current.latest_patchset):
                events.append(
                    TriggerEvent(
                        type="change-approved",
                        connection=self.name,
                        project=project,
                        branch=branch,
                        change=number,
                        patchset=current.latest_patchset,
                        comment=comment,
                    )
                )
        return events

    @staticmethod
    def _votes_changed(approvals: Any) -> bool:
        """Whether a comment moved Code-Review or Workflow. Since Gerrit 2.13
        a comment lists all the author's votes and marks the moved ones with
        oldValue; before, it listed only the moved ones."""
        if not isinstance(approvals, list):
            return False
        ours = [a for a in approvals if isinstance(a, dict)]
        marked = any("oldValue" in a for a in ours)
        return any(
            a.get("type") in ("Code-Review", "Workflow") and ("oldValue" in a or not marked)
            for a in ours
        )

    def _ref_updated(self, update: Any) -> list[TriggerEvent]:
        if not isinstance(update, dict) or not update.get("project") or not update.get("newRev"):
            log.warning("Skipped a ref-updated event without project or newRev")
            return []
        name = str(update.get("refName", ""))
        if name.startswith("refs/heads/"):
            branch = name[len("refs/heads/") :]
        elif name and not name.startswith("refs/"):
            branch = name  # Gerrit before 2.14 gives a branch's short name
        else:
            log.debug("Skipped ref-updated of %s (not a branch)", name)
            return []
        newrev = str(update["newRev"])
        if newrev == ZERO_SHA:
            log.debug("Skipped ref-updated of %s: the branch was deleted", name)
            return []
        project = str(update["project"])
        if self.mirror.exists(project):  # else made when first needed
            try:
                self.mirror.fetch(project)  # the merger tests newrev from the mirror
            except ZuulLiteError as error:
                log.warning("%s", error)
        oldrev = str(update.get("oldRev") or "")
        return [
            TriggerEvent(
                type="ref-updated",
                connection=self.name,
                project=project,
                branch=branch,
                change=0,
                patchset=0,
                ref=f"refs/heads/{branch}",
                oldrev="" if oldrev == ZERO_SHA else oldrev,
                newrev=newrev,
            )
        ]

    def resync(self) -> None:
        """Post what the stream may have missed: every open change whose current
        patchset has no Verified vote of ours (as patchset-created, and, if it is
        approved, as change-approved)."""
        queries = [f"status:open project:{p}" for p in self.projects] or ["status:open"]
        found = 0
        for query in queries:
            for row in self.ssh.query(query, "--current-patch-set"):
                current = row.get("currentPatchSet") or {}
                approvals = current.get("approvals") or []
                if any(
                    isinstance(a, dict)
                    and a.get("type") == "Verified"
                    and (a.get("by") or {}).get("username") == self.user
                    for a in approvals
                ):
                    continue
                try:
                    number, ps = int(row["number"]), int(current["number"])
                    project, branch = row["project"], row["branch"]
                except (KeyError, TypeError, ValueError):
                    continue
                kinds = ["patchset-created"] + (
                    ["change-approved"] if is_approved(approvals) else []
                )
                for kind in kinds:
                    event = TriggerEvent(
                        type=kind,
                        connection=self.name,
                        project=project,
                        branch=branch,
                        change=number,
                        patchset=ps,
                    )
                    log.info(
                        "[e: %s] Resync: change %s,%s has no vote of ours", event.id, number, ps
                    )
                    self._post(event)
                found += 1
        log.info("Resync with %s: %d open change(s) without our vote", self.server, found)

    # Changes --------------------------------------------------------------

    def _query_change(self, number: int, *options: str) -> dict:
        try:
            rows = self.ssh.query(f"change:{number}", *options)
        except ValueError:
            raise ZuulLiteError(
                f"Gerrit {self.name} sent a malformed answer about change {number}."
            ) from None
        for row in rows:
            if str(row.get("number")) == str(number):
                return row
        raise ZuulLiteError(f"There is no change {number} on Gerrit {self.name}.")

    def get_change(self, number: int, patchset: int | None = None) -> Change:
        row = self._query_change(
            number, "--current-patch-set", "--all-approvals", "--commit-message", "--dependencies"
        )
        current = row.get("currentPatchSet") or {}
        latest = int(current.get("number", 0))
        ps = patchset or latest
        known = {int(p.get("number", 0)) for p in row.get("patchSets") or []} | {latest}
        if ps not in known:
            raise ZuulLiteError(f"Change {number} has no patchset {ps} on Gerrit {self.name}.")
        return Change(
            connection=self.name,
            project=row.get("project", ""),
            branch=row.get("branch", ""),
            number=number,
            patchset=ps,
            subject=row.get("subject", ""),
            owner=_person(row.get("owner")),
            status=row.get("status", "NEW"),
            latest_patchset=latest,
            approved=is_approved(current.get("approvals") or []),
            url=row.get("url") or f"{self.baseurl}/{number}",
            depends_on=_parents(row) + depends_on(row.get("commitMessage", "")),
        )

    def changes_depending_on(self, change: Change) -> list[Change]:
        """Open changes stacked on this one (its git children in Gerrit)."""
        row = self._query_change(change.number, "--dependencies")
        found = []
        for child in row.get("neededBy") or []:
            try:
                other = self.get_change(int(child["number"]))
            except (ZuulLiteError, KeyError, TypeError, ValueError):
                continue
            if other.status == "NEW" and str(change.number) in other.depends_on:
                found.append(other)
        return found

    def find_change(self, ref: str) -> Change | None:
        """Also a Change-Id (Zuul 2.5's Depends-On: I0123...): its open change."""
        if re.fullmatch(r"I[0-9a-f]{40}", ref.strip()):
            try:
                rows = self.ssh.query(f"change:{ref.strip()}")
                rows.sort(key=lambda r: r.get("status") != "NEW")
                return self.get_change(int(rows[0]["number"])) if rows else None
            except (ZuulLiteError, ValueError, KeyError, TypeError):
                return None
        return super().find_change(ref)

    def get_series(self, change: Change) -> bytes:
        key = (change.project, change.number, change.patchset)
        if key not in self._series:
            self._series[key] = self.mirror.series(change.project, change.number, change.patchset)
            while len(self._series) > SERIES_CACHE:
                self._series.popitem(last=False)
        return self._series[key]

    def branch_repo(self, project: str) -> str:
        if not self.mirror.exists(project):
            self.mirror.fetch(project)
        return str(self.mirror.path(project))

    # Reporting and merging ------------------------------------------------

    def _review(
        self,
        change: Change,
        message: str | None,
        verified: int | None,
        submit: bool,
        done: Callable[[], bool],
    ) -> None:
        """One `gerrit review` (or its REST calls): a message, a Verified vote, a submit."""
        if self.rest is not None:
            path = self.rest.revision_path(change.project, change.number, change.patchset)
            body: dict[str, Any] = {"tag": "autogenerated:zuul-lite"}
            if message is not None:
                body["message"] = message
            if verified is not None:
                body["labels"] = {"Verified": verified}
            if len(body) > 1:
                self.rest.post(f"{path}/review", body, done=done if not submit else None)
            if submit:
                self.rest.post(f"{path}/submit", {}, done=done)
            return
        options = ["--project", change.project]
        if message is not None:
            options += ["--message", message]
        if verified is not None:
            options += ["--label", f"Verified={verified:+d}"]
        if submit:
            options.append("--submit")
        command = f"gerrit review {quote(*options)} {change.number},{change.patchset}"
        self.ssh.run(command, done=done)

    def report(self, change: Change, report: Report) -> None:
        message = f"{report.message}\n\n{REPORT_LINE.format(report.id)}"
        self._review(
            change, message, report.verified, False, lambda: self.has_report(change, report)
        )
        log.info("Reported %s to %s (report %s)", change.label, self.server, report.id)

    def has_report(self, change: Change, report: Report) -> bool:
        line = REPORT_LINE.format(report.id)
        row = self._query_change(change.number, "--comments")
        return any(
            isinstance(c, dict) and line in str(c.get("message", ""))
            for c in row.get("comments") or []
        )

    def _status(self, number: int) -> str:
        return str(self._query_change(number).get("status", ""))

    def merge(self, change: Change, sha: str, merger: Merger) -> str | None:
        """Submit on Gerrit (which merges with the project's own strategy)."""
        status = self._status(change.number)
        if status == "MERGED":
            return None
        if status != "NEW":
            return f"Change {change.number} was {status.lower()} meanwhile."
        try:
            self._review(
                change,
                None,
                self.submit_verified,
                True,
                lambda: self._status(change.number) == "MERGED",
            )
        except GerritError as error:
            if self._status(change.number) == "MERGED":
                return None
            return str(error).rstrip(".") + "."
        log.info("Submitted %s on %s", change.label, self.server)
        return None
