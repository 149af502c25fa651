"""The log browser: the launcher's log tree served read-only under `/logs/`.

Every log URL in a vote points here, so each directory gets an index page and
each file opens in the browser when it is text. The tree holds output of code
from the change under test, so nothing outside the log root is ever served and
nothing is served as HTML (a log must not run script on the status page's origin).
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISDIR
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

log = logging.getLogger("zuul_lite.web")

TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

# Suffixes the launcher writes that are text even when sniffing would doubt it
# (a console log with a stray control byte is still a log).
TEXT_SUFFIXES = frozenset(
    {".txt", ".log", ".yaml", ".yml", ".cfg", ".json", ".config", ".conf", ".ini",
     ".diff", ".patch", ".sh", ".ktap", ".xml", ".md", ".csv", ".out"}
)  # fmt: skip
SNIFF_BYTES = 8192

# Browsers must not guess a type: a `.txt` full of HTML stays text.
NO_SNIFF = {"X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of a directory index, already formatted for the template."""

    name: str
    href: str
    is_dir: bool
    size: str
    mtime: str


def resolve(log_root: Path, rel: str) -> Path | None:
    """Map a URL path below /logs/ to an existing path inside `log_root`.

    Returns None for anything that does not exist or lands outside the root,
    whether by `..`, an absolute path or a symlink pointing out of the tree:
    resolving first and comparing afterwards catches all three. A NUL byte
    (which the OS would refuse) is None too.
    """
    root = log_root.resolve()
    try:
        target = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, unreadable, a loop, a NUL
        return None
    return target if target.is_relative_to(root) else None


def _suffix(name: str) -> str:
    """The last dotted part, so that the dotfile `.config` counts as `.config`."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot >= 0 else ""


def _looks_like_text(path: Path) -> bool:
    """UTF-8 without NUL bytes in the first few KiB: serial logs and scripts, not bzImage."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        # final=False: the read may have cut a multi-byte character in half.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def media_type(path: Path) -> str:
    """text/plain for anything readable (so it opens in a browser), else octet-stream."""
    if _suffix(path.name) in TEXT_SUFFIXES or _looks_like_text(path):
        return TEXT
    return BINARY


def _human_size(size: int) -> str:
    value, unit = float(size), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def list_directory(log_root: Path, directory: Path) -> list[Entry]:
    """Directories first, then files, each sorted by name, as the template shows them.

    Entries that `resolve` refuses (dangling, or symlinks out of the root) are
    left out, so every row's link opens.
    """
    root = log_root.resolve()
    entries = []
    for child in directory.iterdir():
        target = resolve(log_root, str(child.relative_to(root)))
        try:
            info = target.stat() if target else None
        except FileNotFoundError:  # removed since iterdir()
            info = None
        if info is None:
            continue
        is_dir = S_ISDIR(info.st_mode)
        slash = "/" if is_dir else ""
        entries.append(
            Entry(
                name=child.name + slash,
                href=quote(child.name) + slash,
                is_dir=is_dir,
                size="-" if is_dir else _human_size(info.st_size),
                mtime=datetime.fromtimestamp(info.st_mtime, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    entries.sort(key=lambda entry: (not entry.is_dir, entry.name))
    return entries


def _breadcrumbs(rel: str) -> list[tuple[str, str]]:
    """(label, href) for each ancestor of the listed directory, starting at /logs/."""
    crumbs = [("logs", "/logs/")]
    href = "/logs/"
    for part in [p for p in rel.split("/") if p]:
        href += quote(part) + "/"
        crumbs.append((part, href))
    return crumbs


def _not_found(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"There is no log file or directory at {request.url.path}.", 404)


def make_router(log_root: Path, templates: Jinja2Templates) -> APIRouter:
    """Routes for /logs/, bound to one log root."""
    router = APIRouter(include_in_schema=False)

    @router.get("/logs")
    def logs_root() -> RedirectResponse:
        return RedirectResponse("/logs/")

    # HEAD too, so `curl -I` and link checkers work on log URLs.
    @router.api_route("/logs/{rel:path}", methods=["GET", "HEAD"])
    def logs(request: Request, rel: str) -> Response:
        target = resolve(log_root, rel)
        if target is None:
            log.debug("Log path %r not found or outside %s", rel, log_root)
            return _not_found(request)
        if target.is_dir():
            if not request.url.path.endswith("/"):
                # Relative links in the index only work below a trailing slash.
                return RedirectResponse(quote(request.url.path) + "/")
            return templates.TemplateResponse(
                request,
                "listing.html",
                {
                    "crumbs": _breadcrumbs(rel),
                    "entries": list_directory(log_root, target),
                    "top": not rel,
                },
                headers=NO_SNIFF,
            )
        return FileResponse(target, media_type=media_type(target), headers=NO_SNIFF)

    return router
