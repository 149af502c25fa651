"""Real engines for the tests: a ZooKeeper server per session, a chroot per test,
a gear server per test."""

from __future__ import annotations

import logging
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
