"""Gerrit's REST API, for sites that take votes and submits over HTTP only:
`POST /a/changes/<project>~<number>/revisions/<patchset>/review` and
`.../submit`, with the account's HTTP password (basic auth).

Transport errors and 5xx answers are retried with backoff; before a retry
the caller's `done` says whether the lost attempt took effect. Gerrit
prefixes JSON with `)]}'` against XSSI, which is dropped.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from zuul_lite.connections.gerrit_ssh import GerritError

log = logging.getLogger("zuul_lite.connections.gerrit")

XSSI_PREFIX = b")]}'"


class GerritRest:
    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def revision_path(self, project: str, number: int, patchset: int) -> str:
        change = f"{urllib.parse.quote(project, safe='')}~{number}"
        return f"/a/changes/{change}/revisions/{patchset}"

    def _post_once(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json; charset=UTF-8",
                "Accept": "application/json",
                "Authorization": self.auth,
            },
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            data = response.read()
        data = data.removeprefix(XSSI_PREFIX).strip()
        return json.loads(data) if data else None

    def post(self, path: str, body: dict, done: Callable[[], bool] | None = None) -> Any:
        """POST `body`; a 4xx answer raises GerritError with Gerrit's first line."""
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            if attempt > 1 and done is not None and done():
                return None
            try:
                return self._post_once(path, body)
            except urllib.error.HTTPError as error:
                text = error.read().decode("utf-8", "replace").strip()
                first = (text.splitlines() or [error.reason])[0]
                if error.code < 500:
                    raise GerritError(
                        f"Gerrit refused POST {path} ({error.code}): {first}"
                    ) from None
                why = f"{error.code} {first}"
            except (urllib.error.URLError, OSError, ValueError) as error:
                why = str(getattr(error, "reason", error))
            if attempt == self.retries:
                raise GerritError(f"Gerrit at {self.url} did not take POST {path} ({why}).")
            log.warning("POST %s failed (%s); retry %d in %.1f s", path, why, attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")
