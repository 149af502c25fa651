"""Build history pages and API: /builds, /buildsets, /build/<uuid>, and
/api/builds, /api/buildsets, /api/build/<uuid>, /api/buildset/<uuid>.

The scheduler writes the history (zuul_lite/history/); the web only reads
it, so these pages work while the scheduler is down, and a database that
cannot be read is a 503 with one sentence (the app's handler), never a trace.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from zuul_lite.history.db import MAX_LIMIT, Filters, HistoryDB
from zuul_lite.web import buildlog, status


class HistoryQuery:
    """The filters every list takes, from the query string."""

    def __init__(
        self,
        project: str | None = None,
        pipeline: str | None = None,
        job: str | None = None,
        result: str | None = None,
        change: Annotated[int | None, Query(ge=0)] = None,
        patchset: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        skip: Annotated[int, Query(ge=0)] = 0,
    ) -> None:
        self.filters = Filters(
            project=project or None,
            pipeline=pipeline or None,
            job=job or None,
            result=(result or "").upper() or None,
            change=change,
            patchset=patchset,
        )
        self.limit = limit
        self.skip = skip

    def args(self) -> dict[str, Any]:
        """The filters set, for the pages' forms."""
        return {k: v for k, v in asdict(self.filters).items() if v is not None}


def make_router(history: HistoryDB, log_root: Path, templates: Jinja2Templates) -> APIRouter:
    router = APIRouter()

    def get_build(uuid: str) -> dict[str, Any]:
        build = history.build(uuid)
        if build is None:
            raise HTTPException(404, f"There is no build {uuid} in the history.")
        return build

    def get_buildset(uuid: str) -> dict[str, Any]:
        found = history.buildset(uuid)
        if found is None:
            raise HTTPException(404, f"There is no build set {uuid} in the history.")
        return found

    @router.get("/api/builds")
    def api_builds(q: Annotated[HistoryQuery, Depends()]) -> list[dict[str, Any]]:
        """Finished builds, newest first, filtered by project, pipeline, job,
        result, change and patchset."""
        return history.builds(q.filters, q.limit, q.skip)

    @router.get("/api/buildsets")
    def api_buildsets(q: Annotated[HistoryQuery, Depends()]) -> list[dict[str, Any]]:
        return history.buildsets(q.filters, q.limit, q.skip)

    @router.get("/api/build/{uuid}")
    def api_build(uuid: str) -> dict[str, Any]:
        return get_build(uuid)

    @router.get("/api/buildset/{uuid}")
    def api_buildset(uuid: str) -> dict[str, Any]:
        return get_buildset(uuid)

    @router.get("/api/time-to-vote")
    def api_time_to_vote(pipeline: str | None = None) -> dict[str, Any]:
        """Seconds from enqueue to report over the last day: p50 and p95."""
        return status.time_to_vote(history, pipeline or None)

    @router.get("/builds", response_class=HTMLResponse, include_in_schema=False)
    def builds_page(request: Request, q: Annotated[HistoryQuery, Depends()]) -> Response:
        rows = history.builds(q.filters, q.limit, q.skip)
        context = {"builds": rows, "filters": q.args(), "limit": q.limit, "skip": q.skip}
        return templates.TemplateResponse(request, "builds.html", context)

    @router.get("/buildsets", response_class=HTMLResponse, include_in_schema=False)
    def buildsets_page(request: Request, q: Annotated[HistoryQuery, Depends()]) -> Response:
        rows = history.buildsets(q.filters, q.limit, q.skip)
        context = {"buildsets": rows, "filters": q.args(), "limit": q.limit, "skip": q.skip}
        return templates.TemplateResponse(request, "buildsets.html", context)

    @router.get("/buildset/{uuid}", response_class=HTMLResponse, include_in_schema=False)
    def buildset_page(request: Request, uuid: str) -> Response:
        return templates.TemplateResponse(
            request, "buildset.html", {"buildset": get_buildset(uuid)}
        )

    @router.get("/build/{uuid}", response_class=HTMLResponse, include_in_schema=False)
    def build_page(request: Request, uuid: str) -> Response:
        build = get_build(uuid)
        directory = buildlog.build_dir(log_root, build.get("log_path"))
        context: dict[str, Any] = {"build": build, "errors": [], "tree": [], "reproduce": None}
        if directory is not None:
            context.update(
                errors=buildlog.first_errors(log_root, directory),
                tree=buildlog.tree(log_root, directory),
                reproduce=buildlog.reproduce_command(log_root, directory),
            )
        return templates.TemplateResponse(request, "build.html", context)

    @router.get("/build/{uuid}/output", response_class=HTMLResponse, include_in_schema=False)
    def build_output(request: Request, uuid: str) -> Response:
        """job-output.txt with a line anchor (#L<n>) on each line and error lines marked."""
        build = get_build(uuid)
        directory = buildlog.build_dir(log_root, build.get("log_path"))
        lines, capped = buildlog.read_output(log_root, directory) if directory else ([], False)
        if not lines:
            raise HTTPException(404, f"Build {uuid} has no {buildlog.JOB_OUTPUT}.")
        return templates.TemplateResponse(
            request, "output.html", {"build": build, "lines": lines, "capped": capped}
        )

    return router
