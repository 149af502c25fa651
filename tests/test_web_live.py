"""Through the real uvicorn server on loopback: the live status stream
(server-sent events: the status at once, then again on each change in
ZooKeeper, waiting and running builds told apart, job estimates and time to
vote from the history) and the nodes and images API."""

from __future__ import annotations

import json
import time

import httpx

from nodepool_lite.zk import ZooKeeper
from tests.test_history import make_item
from tests.test_web import queue_item, store_item
from zuul_lite.history.db import HistoryDB
from zuul_lite.history.records import item_record
from zuul_lite.state import ZuulState
from zuul_lite.web.app import create_app
from zuul_lite.web.server import WebServer


def events(response: httpx.Response):
    """The JSON data of each event of the stream, skipping comments and retry."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def first_where(stream, holds):
    """The first event that `holds`: one write in ZooKeeper (an item, then its
    queue) may come as more than one event. The stream's read timeout ends a wait
    for one that never comes."""
    return next(data for data in stream if holds(data))


def builds_of(data: dict) -> dict:
    items = data["pipelines"][0]["items"]
    return items[0]["buildset"]["builds"] if items else {}


def test_stream_sends_the_status_and_each_change(tmp_path, zk: ZooKeeper):
    history = HistoryDB(f"sqlite:///{tmp_path / 'history.sqlite'}")
    history.upgrade()
    done = make_item(1, {"kernel-build": "SUCCESS"})
    history.record(item_record(done, "SUCCESS"))
    ZuulState(zk).ensure_pipeline("check")
    server = WebServer(create_app(zk, tmp_path, history=history), port=0)
    server.start()
    try:
        with httpx.stream("GET", f"{server.url}/api/status/stream", timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = events(response)
            first = next(stream)
            assert [p["name"] for p in first["pipelines"]] == ["check"]
            assert first["pipelines"][0]["items"] == []
            assert first["time_to_vote"]["count"] == 1
            store_item(zk, "check", queue_item("c1", 3, time.time()))
            second = first_where(stream, lambda data: "kernel-build" in builds_of(data))
            assert len(second["pipelines"][0]["items"]) == 1
            build = builds_of(second)["kernel-build"]
            # Submitted, not claimed by a launcher: waiting in Gearman.
            assert (build["state"], build["running"]) == ("queued", False)
            assert second["estimates"] == {"kernel-build": 10.0}
            zk.create(ZuulState(zk).build_running_path("b-c1"), {"launcher": "l1"})
            first_where(stream, lambda data: builds_of(data)["kernel-build"]["running"])
    finally:
        server.stop()
