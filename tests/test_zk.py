"""nodepool_lite.zk against a real ZooKeeper (one chroot per test)."""

from __future__ import annotations

import threading
import time

import pytest

from nodepool_lite import exceptions as exc
from nodepool_lite.model import (
    BuildState,
    ImageBuild,
    ImageUpload,
    Node,
    NodeRequest,
    NodeState,
    RequestState,
    UploadState,
)
from nodepool_lite.zk import ZooKeeper


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_chroot_is_created(zk_hosts):
    client = ZooKeeper(zk_hosts)
    client.connect()
    try:
        assert client.connected
        assert client.create("/a", {"x": 1}) == "/a"
    finally:
        client.disconnect()
    assert not client.connected


def test_generic_crud(zk):
    assert zk.create("/x/y", {"a": 1}) == "/x/y"
    assert zk.get("/x/y") == ({"a": 1}, 0)
    assert zk.set("/x/y", {"a": 2}, version=0) == 1
    with pytest.raises(exc.BadVersionError):
        zk.set("/x/y", {"a": 3}, version=0)
    with pytest.raises(exc.NodeExistsError):
        zk.create("/x/y")
    with pytest.raises(exc.NoNodeError):
        zk.get("/missing")
    with pytest.raises(exc.NoNodeError):
        zk.set("/missing", {})
    assert zk.get_or_none("/missing") is None
    assert zk.get_children("/missing") == []
    assert zk.exists("/x") and zk.get_children("/x") == ["y"]
    zk.create("/x/z")
    assert zk.get("/x/z") == ({}, 0)
    seq = zk.create("/q/item-", {"n": 1}, sequence=True)
    assert seq.startswith("/q/item-") and len(seq) == len("/q/item-") + 10
    zk.delete("/x", recursive=True)
    zk.delete("/x")  # missing is fine
    assert not zk.exists("/x")
    zk.ensure_path("/e/f")
    assert zk.exists("/e/f")
    with pytest.raises(exc.ZKError):
        zk.delete("/e")  # not empty


def test_ephemeral_goes_with_session(zk, zk_hosts):
    other = ZooKeeper(zk_hosts)
    other.connect()
    other.create("/eph", {"a": 1}, ephemeral=True)
    assert zk.exists("/eph")
    other.disconnect()
    assert not zk.exists("/eph")


def test_watches(zk):
    children: list[list[str]] = []
    data: list[tuple] = []
    zk.watch_children("/w", lambda c: children.append(c))
    zk.watch_data("/w/a", lambda d, v: data.append((d, v)))
    zk.create("/w/a", {"k": 1})
    wait_for(lambda: children[-1] == ["a"] and data[-1] == ({"k": 1}, 0))
    zk.set("/w/a", {"k": 2})
    wait_for(lambda: data[-1] == ({"k": 2}, 1))
    zk.delete("/w/a")
    wait_for(lambda: children[-1] == [] and data[-1] == (None, None))
    assert children[0] == [] and data[0] == (None, None)
    stopped: list[list[str]] = []
    zk.watch_children("/s", lambda c: stopped.append(c) or False)
    zk.create("/s/a")
    time.sleep(0.2)
    assert stopped == [[]]


def test_lock(zk, zk_hosts):
    other = ZooKeeper(zk_hosts)
    other.connect()
    try:
        with zk.lock("/locks/a", identifier="me") as held:
            assert held.is_acquired
            with pytest.raises(exc.LockError):
                other.lock("/locks/a", blocking=False).acquire()
            with pytest.raises(exc.LockError):
                other.lock("/locks/a", timeout=0.2).acquire()
        lock = other.lock("/locks/a", blocking=False)
        lock.acquire()
        lock.release()
    finally:
        other.disconnect()


def test_transaction(zk):
    zk.create("/t/a", {"v": 1})
    tx = zk.transaction()
    tx.create("/t/b", {"v": 2})
    tx.check("/t/a", 0)
    tx.set("/t/a", {"v": 3}, version=0)
    tx.commit()
    assert zk.get("/t/a") == ({"v": 3}, 1)
    tx = zk.transaction()
    tx.create("/t/c", {"v": 4})
    tx.delete("/t/b", version=7)
    with pytest.raises(exc.ZKError):
        tx.commit()
    assert not zk.exists("/t/c") and zk.exists("/t/b")


def test_connection_listener(zk_hosts):
    states: list[str] = []
    client = ZooKeeper(zk_hosts)
    client.add_connection_listener(states.append)
    client.connect()
    client.disconnect()
    assert states[0] == "CONNECTED" and "LOST" in states


def test_model_transitions():
    node = Node(type="x")
    assert node.state is NodeState.BUILDING
    before = node.state_time
    time.sleep(0.01)
    node.state = "ready"
    assert node.state is NodeState.READY and node.state_time > before
    node.state = NodeState.IN_USE
    node.state = NodeState.USED
    with pytest.raises(exc.InvalidStateError):
        node.state = NodeState.READY
    req = NodeRequest(node_types=["a"], state=RequestState.FAILED)
    with pytest.raises(exc.InvalidStateError):
        req.state = RequestState.FULFILLED
    copy = Node.from_dict({**node.to_dict(), "unknown": 1}, id="0000000001")
    assert copy.to_dict() == {**node.to_dict(), "id": "0000000001"}
    assert "lock" not in node.to_dict()


def test_node_request_roundtrip(zk):
    seen: list[NodeRequest | None] = []
    event = threading.Event()

    def watcher(req):
        seen.append(req)
        if req is None:
            event.set()

    req = NodeRequest(node_types=["label-a"], requestor="test")
    request_id = zk.submit_node_request(req, watcher)
    assert request_id.startswith("100-") and req.id == request_id
    assert zk.node_request_ids() == [request_id]
    fetched = zk.get_node_request(request_id)
    assert fetched.node_types == ["label-a"] and fetched.state is RequestState.REQUESTED

    zk.lock_node_request(fetched)
    fetched.state = RequestState.PENDING
    zk.store_node_request(fetched)
    zk.unlock_node_request(fetched)
    wait_for(lambda: seen and seen[-1] is not None and seen[-1].state is RequestState.PENDING)
    zk.delete_node_request(req)
    assert event.wait(5)
    assert zk.get_node_request(request_id) is None
    with pytest.raises(exc.NoNodeError):
        zk.lock_node_request(req)


def test_nodes(zk, zk_hosts):
    node = Node(type="label-a", provider="p", pool="main")
    node_id = zk.store_node(node)
    assert len(node_id) == 10 and node.id == node_id
    node.state = NodeState.READY
    zk.store_node(node)
    assert zk.get_node(node_id).state is NodeState.READY
    assert zk.node_ids() == [node_id] and [n.id for n in zk.nodes()] == [node_id]

    other = ZooKeeper(zk_hosts)
    other.connect()
    try:
        zk.lock_node(node)
        copy = other.get_node(node_id)
        with pytest.raises(exc.LockError):
            other.lock_node(copy, blocking=False)
        zk.delete_node(node)
        zk.unlock_node(node)
        assert zk.get_node(node_id) is None
        with pytest.raises(exc.NoNodeError):
            other.lock_node(copy)
        assert zk.node_ids() == []
    finally:
        other.disconnect()


def test_launchers(zk, zk_hosts):
    other = ZooKeeper(zk_hosts)
    other.connect()
    other.register_launcher("l1", ["a", "b"])
    other.register_launcher("l1", ["a"])
    assert zk.get_launchers() == {"l1": ["a"]}
    other.disconnect()
    assert zk.get_launchers() == {}


def test_image_builds(zk):
    build = ImageBuild(builder="b1", formats=["tar"], elements=["debian-minimal"])
    build_id = zk.store_image_build("img", build)
    assert len(build_id) == 10 and build.id == build_id
    build.state = BuildState.READY
    build.path = "/tmp/img-" + build_id
    zk.store_image_build("img", build)
    second = ImageBuild(builder="b1")
    zk.store_image_build("img", second)
    assert [b.id for b in zk.get_image_builds("img")] == [build_id, second.id]
    assert zk.get_most_recent_image_build("img").id == build_id
    assert zk.get_image_build("img", build_id).path == build.path
    assert zk.get_image_names() == ["img"]
    zk.delete_image_build("img", build_id)
    assert zk.get_image_build("img", build_id) is None

    zk.request_image_build("img")
    zk.request_image_build("img")
    assert zk.get_image_build_requests() == ["img"]
    zk.remove_image_build_request("img")
    assert zk.get_image_build_requests() == []
    lock = zk.lock_image("img", "b1")
    assert lock.is_acquired
    lock.release()


def test_tree_watch_sees_any_depth(zk):
    changes = threading.Event()
    stop = zk.watch_tree("/images/img", changes.set)  # not there yet
    changes.clear()
    zk.create("/images/img/builds/0000000001/providers/p/images/0000000000", {"s": 1})
    assert changes.wait(10)
    changes.clear()
    zk.set("/images/img/builds/0000000001/providers/p/images/0000000000", {"s": 2})
    assert changes.wait(10)
    stop()


def test_image_uploads(zk):
    build = ImageBuild(state=BuildState.READY)
    zk.store_image_build("img", build)
    upload = ImageUpload(image="img", build_id=build.id, provider="cloud")
    zk.store_image_upload(upload)
    assert zk.get_most_recent_upload("img", "cloud") is None  # still uploading
    upload.state = UploadState.READY
    upload.external_id = "glance-id"
    zk.store_image_upload(upload)
    other = ImageUpload(image="img", build_id=build.id, provider="other")
    zk.store_image_upload(other)
    assert [u.provider for u in zk.get_image_uploads("img", build.id)] == ["cloud", "other"]
    assert zk.get_most_recent_upload("img", "cloud").external_id == "glance-id"
    assert zk.exists(f"/nodepool/images/img/builds/{build.id}/providers/cloud/images/{upload.id}")
    zk.delete_image_upload(upload)
    assert zk.get_image_uploads("img", build.id, "cloud") == []
