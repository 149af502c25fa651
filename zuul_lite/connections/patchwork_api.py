"""A small client of Patchwork's REST API (v1.2 and later), over urllib.

It knows the protocol and nothing of zuul-lite: token authentication
(`Authorization: Token <t>`), JSON bodies, pagination by the `Link` header
(`rel="next"`), and which failures are worth another try (5xx, timeouts,
refused connections) and which are not (4xx: a retry would get the same
answer). Every failure is a PatchworkError whose message is one sentence.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from zuul_lite.exceptions import ReviewSystemError

log = logging.getLogger("zuul_lite.connections.patchwork")

_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class PatchworkError(ReviewSystemError):
    """A request failed; `transient` when trying again may help."""

    def __init__(self, message: str, transient: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class PatchworkClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout

    def api_url(self, path: str, **query: Any) -> str:
        """`path` under the API base, with `query` (a list value repeats the key)."""
        url = urllib.parse.urljoin(self.url, path.lstrip("/"))
        pairs = [(k, v) for k, vs in query.items() if vs is not None for v in _as_list(vs)]
        return url + ("?" + urllib.parse.urlencode(pairs) if pairs else "")

    def request(
        self, method: str, url: str, body: dict | None = None, raw: bool = False
    ) -> tuple[Any, str]:
        """(decoded JSON, or bytes with `raw`; the Link header) of one request."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "*/*" if raw else "application/json")
        if self.token:
            req.add_header("Authorization", f"Token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                content, link = resp.read(), resp.headers.get("Link", "")
        except urllib.error.HTTPError as e:
            raise self._http_error(method, url, e) from None
        except TimeoutError:
            raise PatchworkError(f"{method} {url} timed out after {self.timeout:g}s.") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PatchworkError(f"{method} {url} failed: {reason}.") from None
        if raw:
            return content, link
        try:
            return json.loads(content), link
        except ValueError:
            raise PatchworkError(f"{method} {url} returned malformed JSON.") from None

    def _http_error(self, method: str, url: str, e: urllib.error.HTTPError) -> PatchworkError:
        if e.code in (401, 403):
            what = "rejected the token" if e.code == 401 else "refused the token this request"
            return PatchworkError(
                f"Patchwork {what} (HTTP {e.code} on {method} {url}): check token or "
                "token-file, and that its user maintains the project.",
                transient=False,
                status=e.code,
            )
        transient = e.code >= 500 or e.code == 429
        return PatchworkError(f"{method} {url} failed with HTTP {e.code}.", transient, e.code)

    def call(
        self,
        method: str,
        url: str,
        body: dict | None = None,
        raw: bool = False,
        attempts: int = 3,
        delay: float = 1.0,
    ) -> Any:
        """`request`, tried again after transient failures (delay doubling)."""
        attempt = 1
        while True:
            try:
                return self.request(method, url, body, raw)[0]
            except PatchworkError as e:
                if not e.transient or attempt >= attempts:
                    raise
                log.warning("%s (attempt %d of %d; retrying)", e, attempt, attempts)
                time.sleep(delay * 2 ** (attempt - 1))
                attempt += 1

    def pages(self, url: str) -> Iterator[list[dict]]:
        """Each page of a list, following `Link: <...>; rel="next"`."""
        while url:
            page, link = self.request("GET", url)
            if not isinstance(page, list):
                raise PatchworkError(f"GET {url} returned no list.")
            yield page
            match = _NEXT.search(link)
            url = match.group(1) if match else ""

    def get_all(self, url: str) -> list[dict]:
        return [entry for page in self.pages(url) for entry in page]


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]
