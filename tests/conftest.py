"""Real engines for the tests: a ZooKeeper server per session, a chroot per test,
a gear server per test; and the node images, built while the other tests run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nodepool_lite.zkserver import ZooKeeperServer, free_port


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory) -> ZooKeeperServer:
    """A real ZooKeeper on loopback; fsync off because tests throw the data away."""
    root = tmp_path_factory.mktemp("zk")
    server = ZooKeeperServer(Path(root), port=free_port(), force_sync=False)
    server.start()
    yield server
    server.stop()


def _images_of(item: pytest.Item) -> list[str]:
    return [name for mark in item.iter_markers("node_image") for name in mark.args]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that boot nodes from the real images run last (in their order):
    on a cold machine the images build (`_prebuilt_node_images`) while every
    other test runs, instead of in front of them."""
    items.sort(key=lambda item: bool(_images_of(item)))


@pytest.fixture(scope="session", autouse=True)
def _prebuilt_node_images(request, tmp_path_factory):
    """Start building the node images the session's tests need, in a process
    of their own (tests/images.py), niced so the tests keep their pace; the
    tests that need an image wait for it on the image cache's lock. Warm, it
    only checks the cache. Its output is in <basetemp>/prebuild.log."""
    images = sorted({name for item in request.session.items for name in _images_of(item)})
    if not images or os.geteuid() != 0:
        yield
        return
    zookeeper = request.getfixturevalue("zookeeper")
    root = tmp_path_factory.mktemp("prebuild")
    with open(root / "prebuild.log", "w") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "tests.images",
             f"{zookeeper.hosts}/prebuild", str(root), *images],
            cwd=Path(__file__).resolve().parents[1],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    yield
    if proc.poll() is None:  # a partial run ended before the build: cancel it
        proc.terminate()
        proc.wait(timeout=120)


@pytest.fixture
def zk_hosts(zookeeper) -> str:
    """Connection string with a random chroot so tests never see each other's data."""
    return f"{zookeeper.hosts}/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def zk(zk_hosts):
    from nodepool_lite.zk import ZooKeeper

    client = ZooKeeper(zk_hosts)
    client.connect()
    yield client
    client.disconnect()


@pytest.fixture
def gear_server():
    from zuul_lite.gearman import GearServer

    server = GearServer(port=0, host="127.0.0.1")
    yield server
    server.shutdown()


@pytest.fixture
def web(zk, tmp_path: Path):
    """The web app on the real uvicorn server, a free loopback port, logs under tmp."""
    from zuul_lite.web.app import create_app
    from zuul_lite.web.server import WebServer

    server = WebServer(create_app(zk, tmp_path / "logs"), port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _quiet_kazoo():
    logging.getLogger("kazoo").setLevel(logging.INFO)
    yield
