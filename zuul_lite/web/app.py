"""The zuul-lite web application: status page, change pages, JSON API and log browser.

`create_app` only wires routes to a ZooKeeper facade and a log root; serving
it (a thread in the scheduler, or `zuul-lite web` on its own) is `server.py`'s job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from nodepool_lite.exceptions import ZKError
from nodepool_lite.zk import ZooKeeper
from zuul_lite import config as zconfig
from zuul_lite.history.db import HistoryDB, HistoryError
from zuul_lite.state import ZuulState
from zuul_lite.web import console, live, logs, nodepool, operator, status
from zuul_lite.web import history as history_pages
from zuul_lite.web.templating import make_templates

log = logging.getLogger("zuul_lite.web")

HERE = Path(__file__).parent


def _not_found(request: Request, exc: StarletteHTTPException) -> Response:
    """Every 404 is one sentence: JSON under /api/, plain text elsewhere."""
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":  # the router's generic miss
        detail = f"Nothing is served at {request.url.path}."
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)
    return PlainTextResponse(str(detail), exc.status_code, headers=exc.headers)


def _zk_unavailable(request: Request, exc: Exception) -> Response:
    """A ZooKeeper outage is the server's state, not a bug: 503 with the facade's sentence."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, 503)


def _history_unavailable(request: Request, exc: Exception) -> Response:
    """The history database away: 503 with its sentence (no statement, no trace)."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": str(exc)}, 503)
    return PlainTextResponse(str(exc), 503)


def create_app(
    zk: ZooKeeper,
    log_root: Path,
    local_changes: bool = True,
    cfg: zconfig.ZuulConfig | None = None,
    history: HistoryDB | None = None,
) -> FastAPI:
    """Build the app; `local_changes` adds the local inbox pages and API, `cfg`
    the operator actions (which answer only to its admin token), `history`
    the build history pages and API (the scheduler writes it).

    Gerrit and Patchwork users read votes in their review system, so the change
    pages exist only when the built-in local inbox is the source of changes.
    """
    app = FastAPI(title="zuul-lite", docs_url="/api/docs", redoc_url=None)
    templates = make_templates(local_changes, history is not None)
    app.add_exception_handler(StarletteHTTPException, _not_found)
    app.add_exception_handler(ZKError, _zk_unavailable)
    app.add_exception_handler(HistoryError, _history_unavailable)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(logs.make_router(Path(log_root), templates))
    app.include_router(console.make_router(ZuulState(zk), templates))
    app.include_router(nodepool.make_router(zk, templates))
    app.state.status_feed = live.StatusFeed(
        ZuulState(zk), read=lambda: status.read_status(zk, history)
    )
    app.include_router(live.make_router(app.state.status_feed))
    if cfg is not None:
        app.include_router(operator.make_router(ZuulState(zk), cfg))
    if history is not None:
        app.include_router(history_pages.make_router(history, Path(log_root), templates))

    @app.get("/health")
    def health() -> JSONResponse:
        """Ready when connected to ZooKeeper, since every page but /logs/ reads it."""
        if not zk.connected:
            return JSONResponse({"status": "Not connected to ZooKeeper."}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return status.read_status(zk, history)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "status.html")

    if local_changes:
        _add_change_routes(app, zk, templates)
    log.debug("Web app ready: log root %s, local changes %s", log_root, local_changes)
    return app


def _add_change_routes(app: FastAPI, zk: ZooKeeper, templates: Jinja2Templates) -> None:
    """The local inbox: a list of changes and one page per change with its votes."""

    def get_change(number: int) -> dict[str, Any]:
        change = status.read_change(zk, number)
        if change is None:
            raise HTTPException(404, f"There is no change {number} in the local inbox.")
        return change

    @app.get("/api/changes")
    def api_changes() -> list[dict[str, Any]]:
        return status.read_changes(zk)

    @app.get("/api/change/{number}")
    def api_change(number: int) -> dict[str, Any]:
        return get_change(number)

    @app.get("/changes", response_class=HTMLResponse, include_in_schema=False)
    def changes_page(request: Request) -> Response:
        return templates.TemplateResponse(
            request, "changes.html", {"changes": status.read_changes(zk)}
        )

    @app.get("/change/{number}", response_class=HTMLResponse, include_in_schema=False)
    def change_page(request: Request, number: int) -> Response:
        return templates.TemplateResponse(request, "change.html", {"change": get_change(number)})
