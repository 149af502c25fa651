"""Nodepool's state for operators: nodes (`/nodes`) and image builds with
their uploads (`/images`), read from the same ZooKeeper the launchers and the
builder write, so the web needs no nodepool daemon to answer.

A build's log is served only from the path its builder recorded, and only a
file named build.log: the record is ours (ZooKeeper lets in only our
certificates), but the web still refuses to be a way to read other files.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from nodepool_lite.zk import ZooKeeper

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def read_nodes(zk: ZooKeeper) -> list[dict[str, Any]]:
    now = time.time()
    rows = [
        {
            "id": n.id,
            "label": n.type,
            "provider": n.provider,
            "pool": n.pool,
            "launcher": n.launcher,
            "state": n.state.value,
            "age": now - n.created_time,
            "state_age": now - n.state_time,
            "image_build": n.image_build,
            "allocated_to": n.allocated_to,
            "comment": n.comment,
        }
        for n in zk.nodes()
    ]
    return sorted(rows, key=lambda row: row["id"] or "")


def read_images(zk: ZooKeeper) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    for name in sorted(zk.get_image_names()):
        for b in reversed(zk.get_image_builds(name)):  # newest first
            uploads = [
                {
                    "id": u.id,
                    "provider": u.provider,
                    "state": u.state.value,
                    "external_name": u.external_name,
                    "external_id": u.external_id,
                    "age": now - u.state_time,
                    "reason": u.reason,
                }
                for u in zk.get_image_uploads(name, b.id or "")
            ]
            rows.append(
                {
                    "image": name,
                    "id": b.id,
                    "build": f"{name}-{b.id}",
                    "state": b.state.value,
                    "builder": b.builder,
                    "formats": b.formats,
                    "elements": b.elements,
                    "age": now - b.created_time,
                    "state_age": now - b.state_time,
                    "log_url": f"/api/image/{name}/{b.id}/log" if b.log_path else None,
                    "uploads": uploads,
                }
            )
    return rows


def make_router(zk: ZooKeeper, templates: Jinja2Templates) -> APIRouter:
    router = APIRouter()

    @router.get("/api/nodes")
    def api_nodes() -> list[dict[str, Any]]:
        return read_nodes(zk)

    @router.get("/api/images")
    def api_images() -> list[dict[str, Any]]:
        return read_images(zk)

    @router.get("/api/image/{image}/{build_id}/log")
    def image_log(image: str, build_id: str) -> Response:
        if not (NAME.fullmatch(image) and NAME.fullmatch(build_id)):
            raise HTTPException(404, f"There is no image build {image[:64]}-{build_id[:64]}.")
        build = zk.get_image_build(image, build_id)
        if build is None:
            raise HTTPException(404, f"There is no image build {image}-{build_id}.")
        path = Path(build.log_path) if build.log_path else None
        if path is None or path.name != "build.log" or not path.is_file() or path.is_symlink():
            raise HTTPException(
                404, f"The log of image build {image}-{build_id} is not on this host."
            )
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    @router.get("/nodes", response_class=HTMLResponse, include_in_schema=False)
    def nodes_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "nodes.html", {"nodes": read_nodes(zk)})

    @router.get("/images", response_class=HTMLResponse, include_in_schema=False)
    def images_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "images.html", {"images": read_images(zk)})

    return router
