"""The Nodepool v3 layout in ZooKeeper: node requests, nodes, launchers, image builds.

Mixed into `nodepool_lite.zk.ZooKeeper`; it speaks only that class's generic
JSON API (create/get/set/delete/lock/watch), so kazoo stays in zk.py and this
module holds just the paths and the (de)serialisation of the model objects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nodepool_lite import exceptions as exc
from nodepool_lite.model import (
    BuildState,
    ImageBuild,
    ImageUpload,
    Node,
    NodeRequest,
    RequestState,
    UploadState,
)

if TYPE_CHECKING:
    from nodepool_lite.zk import Lock

log = logging.getLogger("nodepool_lite.zk")

REQUEST_ROOT = "/nodepool/requests"
REQUEST_LOCK_ROOT = "/nodepool/requests-lock"
NODE_ROOT = "/nodepool/nodes"
LAUNCHER_ROOT = "/nodepool/launchers"
IMAGE_ROOT = "/nodepool/images"
IMAGE_BUILD_REQUEST_ROOT = "/nodepool/image-build-requests"
DEFAULT_PRIORITY = "100"


def _refresh(obj: Any, fresh: Any) -> None:
    """Copy the stored fields of `fresh` into `obj`; the stored state is the
    truth, so this bypasses the transition check."""
    for name, value in fresh.to_dict().items():
        object.__setattr__(obj, name, type(obj).STATES(value) if name == "state" else value)


class NodepoolZK:
    """Nodepool verbs over the generic API of the class it is mixed into."""

    _launchers: dict[str, list[str]]

    # -- node requests ------------------------------------------------------

    def _request_path(self, request_id: str) -> str:
        return f"{REQUEST_ROOT}/{request_id}"

    def submit_node_request(
        self,
        req: NodeRequest,
        watcher: Callable[[NodeRequest | None], bool | None] | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> str:
        """Create the ephemeral request (it vanishes if the requestor dies) and
        optionally watch it: `watcher(refreshed request)`, `watcher(None)` once
        it is deleted; returning False stops the watch."""
        # A fresh request each time, even for an object submitted before.
        for name, value in (
            ("declined_by", []), ("declined_reasons", {}), ("nodes", []), ("reason", None),
        ):  # fmt: skip
            object.__setattr__(req, name, value)
        object.__setattr__(req, "state", RequestState.REQUESTED)
        path = self.create(
            f"{REQUEST_ROOT}/{priority}-", req.to_dict(), sequence=True, ephemeral=True
        )
        req.id = path.rsplit("/", 1)[1]
        if watcher is not None:
            request_id = req.id

            def on_data(data: dict | None, version: int | None) -> bool | None:
                if data is None:
                    watcher(None)
                    return False
                return watcher(NodeRequest.from_dict(data, id=request_id))

            self.watch_data(path, on_data)
        return req.id

    def get_node_request(self, request_id: str) -> NodeRequest | None:
        data = self.get_or_none(self._request_path(request_id))
        return None if data is None else NodeRequest.from_dict(data, id=request_id)

    def store_node_request(self, req: NodeRequest) -> None:
        if req.id is None:
            self.submit_node_request(req)
        else:
            self.set(self._request_path(req.id), req.to_dict())

    def fulfil_node_request(self, req: NodeRequest, nodes: list[Node]) -> None:
        """Store the fulfilled `req` and its `nodes` (allocated to it) in one
        transaction: one round trip, and never one without the other."""
        txn = self.transaction()
        for node in nodes:
            txn.set(self._node_path(node.id or ""), node.to_dict())
        txn.set(self._request_path(req.id or ""), req.to_dict())
        txn.commit()

    def delete_node_request(self, req: NodeRequest) -> None:
        if req.id is not None:
            self.delete(self._request_path(req.id))
            try:
                self.delete(f"{REQUEST_LOCK_ROOT}/{req.id}", recursive=True)
            except exc.ZKError:
                # A pool worker tried the lock meanwhile; it finds the request
                # gone, and the launcher's cleanup removes the empty lock dir.
                pass

    def lock_node_request(
        self, req: NodeRequest, blocking: bool = True, timeout: float | None = None
    ) -> None:
        """Lock and refresh `req`; NoNodeError if it vanished meanwhile."""
        lock = self.lock(f"{REQUEST_LOCK_ROOT}/{req.id}", blocking=blocking, timeout=timeout)
        lock.acquire()
        fresh = self.get_node_request(req.id or "")
        if fresh is None:
            lock.release()
            self.delete(f"{REQUEST_LOCK_ROOT}/{req.id}", recursive=True)
            raise exc.NoNodeError(f"Node request {req.id} no longer exists.")
        _refresh(req, fresh)
        req.lock = lock

    def unlock_node_request(self, req: NodeRequest) -> None:
        if req.lock is not None:
            req.lock.release()
            req.lock = None

    def node_request_ids(self) -> list[str]:
        return self.get_children(REQUEST_ROOT)

    def node_requests(self) -> list[NodeRequest]:
        """Every request in the order they are served (`<priority>-<sequence>`),
        read in about one round trip."""
        ids = sorted(self.node_request_ids())
        values = self.get_many([self._request_path(i) for i in ids])
        return [
            NodeRequest.from_dict(d, id=i)
            for i, d in zip(ids, values, strict=True)
            if isinstance(d, dict) and d
        ]

    def request_lock_ids(self) -> list[str]:
        """Lock dirs, for cleaning up those whose request is gone."""
        return self.get_children(REQUEST_LOCK_ROOT)

    def delete_request_lock(self, request_id: str) -> None:
        self.delete(f"{REQUEST_LOCK_ROOT}/{request_id}", recursive=True)

    # -- nodes --------------------------------------------------------------

    def _node_path(self, node_id: str) -> str:
        return f"{NODE_ROOT}/{node_id}"

    def get_node(self, node_id: str) -> Node | None:
        data = self.get_or_none(self._node_path(node_id))
        # A znode without data is a lock dir left behind by a deleted node.
        return Node.from_dict(data, id=node_id) if data else None

    def store_node(self, node: Node) -> str:
        """Create (new 10-digit id when node.id is None) or update; NoNodeError
        if the node was deleted."""
        if node.id is None:
            path = self.create(f"{NODE_ROOT}/", node.to_dict(), sequence=True)
            node.id = path.rsplit("/", 1)[1]
        else:
            # No create here: a node deleted meanwhile must not come back.
            self.set(self._node_path(node.id), node.to_dict())
        return node.id

    def lock_node(self, node: Node, blocking: bool = True, timeout: float | None = None) -> None:
        """Lock and refresh `node`; NoNodeError if it was deleted meanwhile."""
        path = self._node_path(node.id or "")
        # Its launcher locked a node as it created it, so the lock dir exists.
        lock = self.lock(f"{path}/lock", blocking=blocking, timeout=timeout, dir_exists=True)
        lock.acquire()
        fresh = self.get_node(node.id or "")
        if fresh is None:
            lock.release()
            # The lock recipe recreated the node path; remove that ghost.
            self.delete(path, recursive=True)
            raise exc.NoNodeError(f"Node {node.id} no longer exists.")
        _refresh(node, fresh)
        node.lock = lock

    def unlock_node(self, node: Node) -> None:
        if node.lock is not None:
            node.lock.release()
            node.lock = None

    def delete_node(self, node: Node) -> None:
        if node.id is not None:
            self.delete(self._node_path(node.id), recursive=True)

    def node_ids(self) -> list[str]:
        return self.get_children(NODE_ROOT)

    def nodes(self) -> list[Node]:
        """Every node, read in about one round trip (a pool worker's pass
        reads them all, on the path of every request)."""
        ids = self.node_ids()
        values = self.get_many([self._node_path(i) for i in ids])
        # A znode without data is a lock dir left behind by a deleted node.
        pairs = zip(ids, values, strict=True)
        return [Node.from_dict(d, id=i) for i, d in pairs if isinstance(d, dict) and d]

    # -- launchers ----------------------------------------------------------

    def register_launcher(self, name: str, labels: list[str]) -> None:
        """Ephemeral registration; re-created automatically after a session loss."""
        self._launchers[name] = list(labels)
        data = {"supported_labels": sorted(labels)}
        path = f"{LAUNCHER_ROOT}/{name}"
        try:
            self.create(path, data, ephemeral=True)
        except exc.NodeExistsError:
            self.set(path, data)

    def unregister_launcher(self, name: str) -> None:
        self._launchers.pop(name, None)
        self.delete(f"{LAUNCHER_ROOT}/{name}")

    def get_launchers(self) -> dict[str, list[str]]:
        """name -> labels it supports, for every live launcher."""
        out = {}
        for name in self.get_children(LAUNCHER_ROOT):
            data = self.get_or_none(f"{LAUNCHER_ROOT}/{name}")
            if data is not None:
                out[name] = list(data.get("supported_labels", []))
        return out

    def _reregister_launchers(self) -> None:
        for name, labels in list(self._launchers.items()):
            try:
                self.register_launcher(name, labels)
            except exc.ZKError:
                log.exception("Could not re-register launcher %s", name)

    # -- image builds -------------------------------------------------------

    def _builds_path(self, image: str) -> str:
        return f"{IMAGE_ROOT}/{image}/builds"

    def store_image_build(self, image_name: str, build: ImageBuild) -> str:
        """Create (new sequence id when build.id is None) or update; returns the id."""
        build.image = image_name
        if build.id is None:
            path = self.create(f"{self._builds_path(image_name)}/", build.to_dict(), sequence=True)
            build.id = path.rsplit("/", 1)[1]
        else:
            path = f"{self._builds_path(image_name)}/{build.id}"
            try:
                self.set(path, build.to_dict())
            except exc.NoNodeError:
                self.create(path, build.to_dict())
        return build.id

    def get_image_build(self, image_name: str, build_id: str) -> ImageBuild | None:
        data = self.get_or_none(f"{self._builds_path(image_name)}/{build_id}")
        if not data:
            return None
        build = ImageBuild.from_dict(data, id=build_id)
        build.image = image_name
        return build

    def get_image_builds(
        self, image_name: str, states: list[BuildState] | None = None
    ) -> list[ImageBuild]:
        """Oldest first."""
        builds = []
        for build_id in self.get_children(self._builds_path(image_name)):
            build = self.get_image_build(image_name, build_id)
            if build is not None and (states is None or build.state in states):
                builds.append(build)
        return builds

    def get_most_recent_image_build(
        self, image_name: str, state: BuildState = BuildState.READY
    ) -> ImageBuild | None:
        builds = self.get_image_builds(image_name, [state])
        return builds[-1] if builds else None

    def get_image_names(self) -> list[str]:
        return self.get_children(IMAGE_ROOT)

    def delete_image_build(self, image_name: str, build_id: str) -> None:
        self.delete(f"{self._builds_path(image_name)}/{build_id}", recursive=True)

    # -- image uploads ------------------------------------------------------

    def _uploads_path(self, image: str, build_id: str, provider: str) -> str:
        return f"{self._builds_path(image)}/{build_id}/providers/{provider}/images"

    def store_image_upload(self, upload: ImageUpload) -> str:
        """Create (new sequence id when upload.id is None) or update; returns the id."""
        root = self._uploads_path(upload.image, upload.build_id, upload.provider)
        if upload.id is None:
            path = self.create(f"{root}/", upload.to_dict(), sequence=True)
            upload.id = path.rsplit("/", 1)[1]
        else:
            self.set(f"{root}/{upload.id}", upload.to_dict())
        return upload.id

    def get_image_uploads(
        self, image: str, build_id: str, provider: str | None = None
    ) -> list[ImageUpload]:
        """Uploads of one build (to `provider`, or to every provider), oldest first."""
        providers_root = f"{self._builds_path(image)}/{build_id}/providers"
        uploads = []
        for name in [provider] if provider else self.get_children(providers_root):
            root = self._uploads_path(image, build_id, name)
            for upload_id in self.get_children(root):
                data = self.get_or_none(f"{root}/{upload_id}")
                if data:
                    uploads.append(ImageUpload.from_dict(data, id=upload_id))
        return uploads

    def get_most_recent_upload(self, image: str, provider: str) -> ImageUpload | None:
        """The ready upload to `provider` of the newest ready build that has one."""
        for build in reversed(self.get_image_builds(image, [BuildState.READY])):
            ready = [
                u
                for u in self.get_image_uploads(image, build.id or "", provider)
                if u.state == UploadState.READY
            ]
            if ready:
                return ready[-1]
        return None

    def delete_image_upload(self, upload: ImageUpload) -> None:
        root = self._uploads_path(upload.image, upload.build_id, upload.provider)
        self.delete(f"{root}/{upload.id}")

    def request_image_build(self, image_name: str) -> None:
        try:
            self.create(f"{IMAGE_BUILD_REQUEST_ROOT}/{image_name}", {"time": time.time()})
        except exc.NodeExistsError:
            pass

    def get_image_build_requests(self) -> list[str]:
        return self.get_children(IMAGE_BUILD_REQUEST_ROOT)

    def remove_image_build_request(self, image_name: str) -> None:
        self.delete(f"{IMAGE_BUILD_REQUEST_ROOT}/{image_name}")

    def lock_image(
        self,
        image_name: str,
        identifier: str = "",
        blocking: bool = True,
        timeout: float | None = None,
    ) -> Lock:
        """Acquired lock that one builder holds while it builds `image_name`."""
        lock = self.lock(f"{IMAGE_ROOT}/{image_name}/lock", identifier, blocking, timeout)
        lock.acquire()
        return lock
