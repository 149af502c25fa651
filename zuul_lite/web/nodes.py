"""`/api/nodes` and `/api/images`: what nodepool keeps in ZooKeeper, read
through the `nodepool_lite.zk` facade (as `nodepool list` and
`nodepool dib-image-list` read it), so the web needs no nodepool process."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from nodepool_lite.zk import ZooKeeper


def make_router(zk: ZooKeeper) -> APIRouter:
    router = APIRouter()

    @router.get("/api/nodes")
    def api_nodes() -> list[dict[str, Any]]:
        """Every node with its state, label (`type`), provider and build it serves."""
        nodes = sorted(zk.nodes(), key=lambda n: n.id or "")
        return [{**node.to_dict(), "id": node.id} for node in nodes]

    @router.get("/api/images")
    def api_images() -> list[dict[str, Any]]:
        """Every image with its builds (oldest first), each with its uploads."""
        images = []
        for name in sorted(zk.get_image_names()):
            builds = []
            for build in zk.get_image_builds(name):
                uploads = [
                    {**upload.to_dict(), "id": upload.id}
                    for upload in zk.get_image_uploads(name, build.id or "")
                ]
                builds.append({**build.to_dict(), "id": build.id, "uploads": uploads})
            images.append({"name": name, "builds": builds})
        return images

    return router
