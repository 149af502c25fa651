"""A stand-in Patchwork on 127.0.0.1: the part of the REST API v1.2 and v1.3
(comments and their events) that the Patchwork connection uses, with
Patchwork's field names, pagination (`Link` header, `page`/`per_page`; events
have a fixed page size, as in Patchwork), token authentication (401 for a bad
token, 403 for a user who may not write) and events. A test adds series made
with `git format-patch`, moves patch states as a maintainer would, replies to
patches, and injects faults (`fail`)."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHECK_STATES = ("pending", "success", "warning", "fail")
PATCH_STATES = ("new", "under-review", "accepted", "rejected", "queued", "superseded")


class FakePatchwork:
    def __init__(
        self,
        project: str = "demo",
        token: str = "maintainer",
        page_size: int = 3,
        api_version: str = "1.2",
    ):
        self.project_name = project
        self.tokens = {token: {"id": 1, "username": "zuul", "maintainer": True}}
        self.page_size = page_size
        self.lock = threading.Lock()
        self.series: dict[int, dict] = {}
        self.patches: dict[int, dict] = {}
        self.events: list[dict] = []
        self.faults: list[dict] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self._ids = {
            k: itertools.count(1) for k in ("series", "patch", "event", "check", "comment")
        }
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api = f"{self.url}/api/{api_version}/"
        self.comments: dict[int, dict] = {}
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakePatchwork:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # What a test does -----------------------------------------------------

    def add_user(self, token: str, maintainer: bool) -> None:
        self.tokens[token] = {
            "id": len(self.tokens) + 1,
            "username": token,
            "maintainer": maintainer,
        }

    def add_series(
        self, name: str, patch_dir: Path, version: int = 1, cover: str | None = None
    ) -> int:
        """A complete series of the `git format-patch` files in `patch_dir`
        (with a cover letter whose body is `cover`, if given); posts the events
        Patchwork posts as its mails arrive."""
        files = sorted(Path(patch_dir).glob("*.patch"))
        with self.lock:
            sid = next(self._ids["series"])
            series = {"id": sid, "name": name, "version": version, "date": _now(), "patches": []}
            if cover is not None:
                series["cover"] = {"id": sid, "name": name, "content": cover, "date": _now()}
            self.series[sid] = series
            self._event("series-created", series=sid)
            for path in files:
                pid = next(self._ids["patch"])
                subject = re.search(r"^Subject: (.*)$", path.read_text(), re.M).group(1)
                self.patches[pid] = {
                    "id": pid,
                    "name": subject,
                    "date": _now(),
                    "mbox": path.read_bytes(),
                    "state": "new",
                    "series": sid,
                    "checks": [],
                }
                series["patches"].append(pid)
                self._event("patch-created", patch=pid)
            self._event("series-completed", series=sid)
        return sid

    def add_comment(self, content: str, patch: int | None = None, cover: int | None = None) -> int:
        """A reply on the list to a patch or to the cover letter of series `cover`."""
        with self.lock:
            cid = next(self._ids["comment"])
            self.comments[cid] = {
                "id": cid, "content": content, "date": _now(), "patch": patch, "cover": cover,
            }  # fmt: skip
            if patch is not None:
                self._event("patch-comment-created", patch=patch, comment=cid)
            else:
                self._event("cover-comment-created", cover=cover, comment=cid)
        return cid

    def set_state(self, patch: int, state: str) -> None:
        with self.lock:
            self._set_state(patch, state)

    def fail(self, path: str, status: int | str = 500, count: int = 1) -> None:
        """The next `count` requests whose path matches `path` (a regex) get
        `status`; "timeout" answers only after 3 s, "garbage" is a 200 that is
        not JSON."""
        with self.lock:
            self.faults.append({"path": path, "status": status, "count": count})

    def checks(self, patch: int) -> list[dict]:
        with self.lock:
            return [dict(c) for c in self.patches[patch]["checks"]]

    def latest_checks(self, patch: int) -> dict[str, str]:
        """context -> state of the newest check of each context (what Patchwork shows)."""
        return {c["context"]: c["state"] for c in self.checks(patch)}

    def series_patches(self, series: int) -> list[int]:
        with self.lock:
            return list(self.series[series]["patches"])

    def state_of(self, patch: int) -> str:
        with self.lock:
            return self.patches[patch]["state"]

    # Model ------------------------------------------------------------------

    def _event(self, category: str, **payload: Any) -> None:
        self.events.append(
            {"id": next(self._ids["event"]), "category": category, "date": _now(), **payload}
        )

    def _set_state(self, patch: int, state: str) -> None:
        old = self.patches[patch]["state"]
        self.patches[patch]["state"] = state
        self._event("patch-state-changed", patch=patch, previous_state=old, current_state=state)

    def _project(self) -> dict:
        return {
            "id": 1,
            "url": f"{self.api}projects/1/",
            "name": self.project_name,
            "link_name": self.project_name,
            "list_id": f"{self.project_name}.example.org",
            "list_email": f"{self.project_name}@example.org",
            "web_url": f"{self.url}/project/{self.project_name}/",
        }

    def _person(self) -> dict:
        return {"id": 1, "url": f"{self.api}people/1/", "name": "Dev", "email": "dev@example.com"}

    def _patch_embedded(self, pid: int) -> dict:
        p = self.patches[pid]
        return {
            "id": pid,
            "url": f"{self.api}patches/{pid}/",
            "web_url": f"{self.url}/project/{self.project_name}/patch/{pid}/",
            "msgid": f"<{pid}@example.com>",
            "list_archive_url": None,
            "date": p["date"],
            "name": p["name"],
            "mbox": f"{self.url}/patch/{pid}/mbox/",
        }

    def _series_embedded(self, sid: int) -> dict:
        s = self.series[sid]
        return {
            "id": sid,
            "url": f"{self.api}series/{sid}/",
            "web_url": f"{self.url}/project/{self.project_name}/list/?series={sid}",
            "date": s["date"],
            "name": s["name"],
            "version": s["version"],
            "mbox": f"{self.url}/series/{sid}/mbox/",
        }

    def _series_detail(self, sid: int) -> dict:
        s = self.series[sid]
        return {
            **self._series_embedded(sid),
            "project": self._project(),
            "submitter": self._person(),
            "total": len(s["patches"]),
            "received_total": len(s["patches"]),
            "received_all": True,
            "cover_letter": self._cover_embedded(sid) if "cover" in s else None,
            "patches": [self._patch_embedded(p) for p in s["patches"]],
        }

    def _cover_embedded(self, sid: int) -> dict:
        c = self.series[sid]["cover"]
        return {
            "id": c["id"],
            "url": f"{self.api}covers/{c['id']}/",
            "web_url": f"{self.url}/project/{self.project_name}/cover/{c['id']}/",
            "msgid": f"<cover{c['id']}@example.com>",
            "list_archive_url": None,
            "date": c["date"],
            "name": c["name"],
            "mbox": f"{self.url}/cover/{c['id']}/mbox/",
        }

    def _cover_detail(self, sid: int) -> dict:
        return {
            **self._cover_embedded(sid),
            "project": self._project(),
            "submitter": self._person(),
            "content": self.series[sid]["cover"]["content"],
            "headers": {},
            "series": [self._series_embedded(sid)],
            "comments": f"{self.api}covers/{sid}/comments/",
        }

    def _patch_detail(self, pid: int) -> dict:
        p = self.patches[pid]
        latest = {c["context"]: c["state"] for c in p["checks"]}.values()
        return {
            **self._patch_embedded(pid),
            "project": self._project(),
            "state": p["state"],
            "archived": False,
            "commit_ref": None,
            "submitter": self._person(),
            "delegate": None,
            "series": [self._series_embedded(p["series"])],
            "check": _combined(latest),
            "checks": f"{self.api}patches/{pid}/checks/",
            "tags": {},
        }

    def _comment_embedded(self, cid: int) -> dict:
        c = self.comments[cid]
        on = f"patches/{c['patch']}" if c["patch"] is not None else f"covers/{c['cover']}"
        return {
            "id": cid,
            "url": f"{self.api}{on}/comments/{cid}/",
            "web_url": f"{self.url}/comment/{cid}/",
            "msgid": f"<comment{cid}@example.com>",
            "list_archive_url": None,
            "date": c["date"],
            "name": "Re: the series",
        }

    def _comment_detail(self, cid: int) -> dict:
        return {
            **self._comment_embedded(cid),
            "subject": "Re: the series",
            "submitter": self._person(),
            "content": self.comments[cid]["content"],
            "headers": {},
            "addressed": None,
        }

    def _event_json(self, e: dict) -> dict:
        payload: dict[str, Any] = {}
        if "series" in e:
            payload["series"] = self._series_embedded(e["series"])
        if "patch" in e:
            payload["patch"] = self._patch_embedded(e["patch"])
        if "cover" in e:
            payload["cover"] = self._cover_embedded(e["cover"])
        if "comment" in e:
            payload["comment"] = self._comment_embedded(e["comment"])
        for key in ("previous_state", "current_state", "check"):
            if key in e:
                payload[key] = e[key]
        return {
            "id": e["id"],
            "category": e["category"],
            "project": self._project(),
            "date": e["date"],
            "actor": None,
            "payload": payload,
        }


def _now() -> str:
    time.sleep(0.000002)  # distinct dates, as a database clock gives
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


def _combined(states) -> str:
    states = set(states)
    for state in ("fail", "warning", "pending"):
        if state in states:
            return state
    return "success" if states else "pending"


def _handler(pw: FakePatchwork) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the test log has the client's side
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def _send(self, status: int, body: Any, headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            ctype = "text/plain" if isinstance(body, bytes) else "application/json"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parsed.query)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with pw.lock:
                status, out, headers = self._route(method, parsed.path, query, body)
            pw.log.append((method, parsed.path, status))
            if status == "timeout":
                time.sleep(3)
                status, out = 500, {"detail": "Server Error"}
            elif status == "garbage":
                status, out = 200, b"<html>Bad gateway</html>"
            self._send(status, out, headers)

        def _fault(self, path: str):
            for fault in pw.faults:
                if fault["count"] > 0 and re.search(fault["path"], path):
                    fault["count"] -= 1
                    return fault["status"]
            return None

        def _user(self) -> tuple[dict | None, tuple | None]:
            auth = self.headers.get("Authorization", "")
            if not auth:
                return None, None
            match = re.fullmatch(r"Token (\S+)", auth)
            user = pw.tokens.get(match.group(1)) if match else None
            if user is None:
                return None, (401, {"detail": "Invalid token."}, {"WWW-Authenticate": "Token"})
            return user, None

        def _route(self, method: str, path: str, query: dict, body: bytes):
            fault = self._fault(path)
            if fault is not None:
                return fault, {"detail": "injected"}, {}
            user, denied = self._user()
            if denied:
                return denied
            if method != "GET":
                if user is None:
                    return (
                        401,
                        {"detail": "Authentication credentials were not provided."},
                        {"WWW-Authenticate": "Token"},
                    )
                if not user["maintainer"]:
                    detail = "You do not have permission to perform this action."
                    return 403, {"detail": detail}, {}
            for pattern, func in self.ROUTES:
                match = re.fullmatch(pattern, path)
                if match and func.__name__.startswith(method.lower() + "_"):
                    return func(self, query, body, user, *(int(g) for g in match.groups()))
            return 404, {"detail": "Not found."}, {}

        def _page(self, path: str, query: dict, entries: list, fixed: bool = False):
            size = pw.page_size
            if not fixed and "per_page" in query:
                size = max(1, min(int(query["per_page"][0]), 100))
            page = int(query.get("page", ["1"])[0])
            start = (page - 1) * size
            links = []

            def link(n: int) -> str:
                q = {**query, "page": [str(n)]}
                return f"{pw.url}{path}?{urllib.parse.urlencode(q, doseq=True)}"

            if start + size < len(entries):
                links.append(f'<{link(page + 1)}>; rel="next"')
            if page > 1:
                links.append(f'<{link(page - 1)}>; rel="prev"')
            headers = {"Link": ", ".join(links)} if links else {}
            return 200, entries[start : start + size], headers

        @staticmethod
        def _since(query: dict, entries: list[dict]) -> list[dict]:
            if "since" in query:
                since = datetime.fromisoformat(query["since"][0])
                entries = [e for e in entries if datetime.fromisoformat(e["date"]) >= since]
            return entries

        @staticmethod
        def _ordered(query: dict, entries: list[dict], default: str) -> list[dict]:
            order = query.get("order", [default])[0]
            return sorted(
                entries, key=lambda e: (e["date"], e["id"]), reverse=order.startswith("-")
            )

        def _check_project(self, query: dict) -> tuple | None:
            if "project" in query and query["project"][0] not in (pw.project_name, "1"):
                return 400, {"project": ["Select a valid choice."]}, {}
            return None

        def get_events(self, query, body, user):
            bad = self._check_project(query)
            if bad:
                return bad
            events = pw.events
            if "/api/1.2/" in self.path:  # comment events exist from API 1.3 on
                events = [e for e in events if "comment" not in e]
            if "category" in query:
                events = [e for e in events if e["category"] == query["category"][0]]
            events = self._ordered(query, self._since(query, events), "-date")
            return self._page(
                urllib.parse.urlsplit(self.path).path,
                query,
                [pw._event_json(e) for e in events],
                True,
            )

        def get_series_list(self, query, body, user):
            bad = self._check_project(query)
            if bad:
                return bad
            series = self._ordered(query, self._since(query, list(pw.series.values())), "id")
            out = [pw._series_detail(s["id"]) for s in series]
            return self._page(urllib.parse.urlsplit(self.path).path, query, out)

        def get_series(self, query, body, user, sid):
            if sid not in pw.series:
                return 404, {"detail": "Not found."}, {}
            return 200, pw._series_detail(sid), {}

        def get_cover(self, query, body, user, cid):
            if "cover" not in pw.series.get(cid, {}):
                return 404, {"detail": "Not found."}, {}
            return 200, pw._cover_detail(cid), {}

        def get_patch_comment(self, query, body, user, pid, cid):
            if pw.comments.get(cid, {}).get("patch") != pid or "/api/1.2/" in self.path:
                return 404, {"detail": "Not found."}, {}
            return 200, pw._comment_detail(cid), {}

        def get_cover_comment(self, query, body, user, cover, cid):
            if pw.comments.get(cid, {}).get("cover") != cover or "/api/1.2/" in self.path:
                return 404, {"detail": "Not found."}, {}
            return 200, pw._comment_detail(cid), {}

        def get_series_mbox(self, query, body, user, sid):
            if sid not in pw.series:
                return 404, {"detail": "Not found."}, {}
            return 200, b"".join(pw.patches[p]["mbox"] for p in pw.series[sid]["patches"]), {}

        def get_patch_mbox(self, query, body, user, pid):
            if pid not in pw.patches:
                return 404, {"detail": "Not found."}, {}
            return 200, pw.patches[pid]["mbox"], {}

        def get_patches(self, query, body, user):
            bad = self._check_project(query)
            if bad:
                return bad
            patches = list(pw.patches.values())
            if "series" in query:
                patches = [p for p in patches if str(p["series"]) == query["series"][0]]
            out = [pw._patch_detail(p["id"]) for p in sorted(patches, key=lambda p: p["id"])]
            return self._page(urllib.parse.urlsplit(self.path).path, query, out)

        def get_patch(self, query, body, user, pid):
            if pid not in pw.patches:
                return 404, {"detail": "Not found."}, {}
            return 200, pw._patch_detail(pid), {}

        def patch_patch(self, query, body, user, pid):
            if pid not in pw.patches:
                return 404, {"detail": "Not found."}, {}
            state = json.loads(body or b"{}").get("state")
            if state is not None:
                if state not in PATCH_STATES:
                    return 400, {"state": [f"Select a valid choice. {state} is not one."]}, {}
                if state != pw.patches[pid]["state"]:
                    pw._set_state(pid, state)
            return 200, pw._patch_detail(pid), {}

        def get_checks(self, query, body, user, pid):
            if pid not in pw.patches:
                return 404, {"detail": "Not found."}, {}
            return self._page(
                urllib.parse.urlsplit(self.path).path, query, pw.patches[pid]["checks"]
            )

        def post_checks(self, query, body, user, pid):
            if pid not in pw.patches:
                return 404, {"detail": "Not found."}, {}
            data = json.loads(body or b"{}")
            if data.get("state") not in CHECK_STATES:
                return 400, {"state": ["A check must have a state."]}, {}
            if not re.fullmatch(r"[-a-zA-Z0-9_]+", data.get("context", "default")):
                return 400, {"context": ["Enter a valid slug."]}, {}
            cid = next(pw._ids["check"])
            check = {
                "id": cid,
                "url": f"{pw.api}patches/{pid}/checks/{cid}/",
                "user": {"id": user["id"], "url": f"{pw.api}users/{user['id']}/",
                         "username": user["username"], "first_name": "", "last_name": "",
                         "email": f"{user['username']}@example.com"},
                "date": _now(),
                "state": data["state"],
                "target_url": data.get("target_url"),
                "context": data.get("context", "default"),
                "description": data.get("description"),
            }  # fmt: skip
            pw.patches[pid]["checks"].append(check)
            pw._event("check-created", patch=pid, check=check)
            return 201, check, {}

        ROUTES = [
            (r"/api/1\.[23]/events/", get_events),
            (r"/api/1\.[23]/series/", get_series_list),
            (r"/api/1\.[23]/series/(\d+)/", get_series),
            (r"/api/1\.[23]/covers/(\d+)/", get_cover),
            (r"/api/1\.[23]/patches/(\d+)/comments/(\d+)/", get_patch_comment),
            (r"/api/1\.[23]/covers/(\d+)/comments/(\d+)/", get_cover_comment),
            (r"/series/(\d+)/mbox/", get_series_mbox),
            (r"/patch/(\d+)/mbox/", get_patch_mbox),
            (r"/api/1\.[23]/patches/", get_patches),
            (r"/api/1\.[23]/patches/(\d+)/", get_patch),
            (r"/api/1\.[23]/patches/(\d+)/", patch_patch),
            (r"/api/1\.[23]/patches/(\d+)/checks/", get_checks),
            (r"/api/1\.[23]/patches/(\d+)/checks/", post_checks),
        ]

    return Handler
