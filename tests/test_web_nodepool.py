"""The web's nodepool views (/nodes, /images and their JSON) against a real
ZooKeeper holding what nodepool's launcher and builder write, served by the
real uvicorn server on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx

from nodepool_lite.model import BuildState, ImageBuild, ImageUpload, Node, NodeState, UploadState
from nodepool_lite.zk import ZooKeeper


def image_build(zk: ZooKeeper, tmp_path: Path, log: Path | None) -> ImageBuild:
    build = ImageBuild(
        state=BuildState.READY,
        builder="b1",
        formats=["tar", "qcow2"],
        log_path=str(log) if log else None,
    )
    zk.store_image_build("kernel-ci-debian", build)
    return build


def test_nodes_and_images_with_their_uploads(zk, web, tmp_path):
    node = Node(type="kernel-debian", provider="local", pool="main", state=NodeState.READY,
                image_build="kernel-ci-debian-0000000001", comment="<b>held</b>")  # fmt: skip
    zk.store_node(node)
    log = tmp_path / "kernel-ci-debian-1" / "build.log"
    log.parent.mkdir()
    log.write_text("dib-run-parts Running /tmp/in_target.d/install.d/60-zuul-user\n")
    build = image_build(zk, tmp_path, log)
    zk.store_image_upload(ImageUpload(image="kernel-ci-debian", build_id=build.id,
                                      provider="cloud", state=UploadState.FAILED,
                                      reason="Glance refused the image."))  # fmt: skip

    nodes = httpx.get(f"{web.url}/api/nodes").json()
    assert [(n["id"], n["label"], n["provider"], n["state"]) for n in nodes] == [
        (node.id, "kernel-debian", "local", "ready")
    ]
    images = httpx.get(f"{web.url}/api/images").json()
    assert images[0]["build"] == f"kernel-ci-debian-{build.id}"
    assert images[0]["uploads"][0]["reason"] == "Glance refused the image."
    got = httpx.get(web.url + images[0]["log_url"])
    assert got.status_code == 200 and "60-zuul-user" in got.text

    page = httpx.get(f"{web.url}/nodes").text
    assert "kernel-debian" in page and "&lt;b&gt;held&lt;/b&gt;" in page  # escaped
    page = httpx.get(f"{web.url}/images").text
    assert f"kernel-ci-debian-{build.id}" in page and "cloud: failed" in page


def test_image_log_is_only_a_recorded_build_log(zk, web, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    other = image_build(zk, tmp_path, secret)  # a record naming another file
    link = tmp_path / "link" / "build.log"
    link.parent.mkdir()
    link.symlink_to(secret)
    linked = image_build(zk, tmp_path, link)
    for path in (
        f"/api/image/kernel-ci-debian/{other.id}/log",
        f"/api/image/kernel-ci-debian/{linked.id}/log",
        "/api/image/kernel-ci-debian/9999999999/log",
        "/api/image/..%2f..%2fetc/passwd/log",
        "/api/image/kernel-ci-debian/%00/log",
    ):
        reply = httpx.get(web.url + path)
        assert reply.status_code == 404, path
        assert "top secret" not in reply.text and "Traceback" not in reply.text
