"""The web: log browser, status and change API/pages against a real ZooKeeper,
and the real uvicorn server on a loopback port."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import free_port
from zuul_lite.state import ZuulState
from zuul_lite.web.app import create_app
from zuul_lite.web.server import WebServer
from zuul_lite.web.templating import linkify

BUILD = "3/1/check/kernel-build/5f0c"


@pytest.fixture
def log_root(tmp_path: Path) -> Path:
    """A build's log directory as the launcher leaves it, plus a secret outside the root."""
    (tmp_path / "secret.txt").write_text("top secret\n")
    root = tmp_path / "logs"
    build = root / BUILD
    (build / "_ansible").mkdir(parents=True)
    (build / "artifacts").mkdir()
    (build / "console").mkdir()
    (build / "job-output.txt").write_text("2026-11-26 01:00:00 | make -j2\n<b>not html</b>\n")
    (build / "job-output.json").write_text(json.dumps([{"play": "run"}]))
    (build / "_ansible" / "inventory.yaml").write_text("all:\n  hosts: {node: {}}\n")
    (build / "_ansible" / "ansible.cfg").write_text("[defaults]\nforks = 1\n")
    (build / "artifacts" / ".config").write_text("CONFIG_64BIT=y\n")
    (build / "artifacts" / "bzImage").write_bytes(b"MZ\x00\x01\x02" * 1000)
    (build / "console" / "serial").write_text("Linux version 6.12\nzuul-boot-ok\n")
    (build / "outside").symlink_to(tmp_path / "secret.txt")
    return root


@pytest.fixture
def client(zk: ZooKeeper, log_root: Path) -> TestClient:
    return TestClient(create_app(zk, log_root))


def queue_item(uuid: str, change: int, enqueue_time: float, **build: object) -> dict:
    """A queue item in the shape of doc/architecture.md, with one kernel-build build."""
    return {
        "uuid": uuid, "pipeline": "check", "queue": f"q-{uuid}", "event_id": "e1",
        "change": {"connection": "local", "project": "linux", "branch": "master",
                   "number": change, "patchset": 1, "subject": f"Fix {change}", "owner": "dev"},
        "enqueue_time": enqueue_time, "live": True, "active": True, "item_ahead": None,
        "buildset": {
            "uuid": "bs-" + uuid, "attempt": 1, "changes": [f"{change},1"],
            "merge_state": "complete", "merge_error": None, "base_sha": "abc",
            "git_ref": f"refs/zuul/check/{change}/1/{uuid}",
            "builds": {"kernel-build": {
                "uuid": "b-" + uuid, "job": "kernel-build", "node_type": "kernel-debian",
                "state": "queued", "result": None, "log_url": None, "start_time": 100.0,
                "end_time": None, "elapsed": None, "summary": "", **build}}},
    }  # fmt: skip


def store_item(zk: ZooKeeper, pipeline: str, item: dict) -> None:
    state = ZuulState(zk)
    zk.create(state.item_path(pipeline, item["uuid"]), {**item, "pipeline": pipeline})
    zk.create(
        state.queue_path(pipeline, item["queue"]),
        {"name": item["queue"], "dynamic": True, "window": 0, "items": [item["uuid"]]},
    )


LOCAL_CHANGE = {
    "number": 7, "project": "linux", "branch": "master",
    "subject": "mm: fix <leak>", "owner": "dev", "status": "NEW",
    "patchsets": [
        {"number": 1, "ref": "refs/changes/07/7/1", "revision": "aaa", "created": 1764100000.0},
        {"number": 2, "ref": "refs/changes/07/7/2", "revision": "bbb", "created": 1764100100.0,
         "patches": ["mm: add helper", "mm: fix <leak>"]},
    ],
    "votes": [
        {"patchset": 1, "pipeline": "check", "value": -1, "time": 1764100050.0,
         "message": "Build failed.\n\n- kernel-build http://x/logs/7/1/ : FAILURE"},
        {"patchset": 2, "pipeline": "check", "value": 1, "time": 1764100200.0,
         "message": "Build succeeded.\n\n- kernel-build http://x/logs/7/2/ : SUCCESS"},
        {"patchset": 2, "pipeline": "gate", "value": None, "time": 1764100300.0,
         "message": "Merged."},
    ],
    "comments": [{"patchset": 2, "message": "recheck", "time": 1764100150.0}],
}  # fmt: skip


# -- log browser --------------------------------------------------------------


def test_directory_listing_links_every_entry(client: TestClient) -> None:
    response = client.get(f"/logs/{BUILD}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for href in ('"_ansible/"', '"artifacts/"', '"console/"', '"job-output.txt"', '"../"'):
        assert f"href={href}" in response.text
    assert "Modified (UTC)" in response.text
    assert "outside" not in response.text  # a symlink out of the root is not listed
    ansible = client.get(f"/logs/{BUILD}/_ansible/")
    assert 'href="inventory.yaml"' in ansible.text and 'href="ansible.cfg"' in ansible.text
    top = client.get("/logs/")
    assert 'href="3/"' in top.text and 'href="../"' not in top.text


def test_directory_without_slash_redirects(client: TestClient) -> None:
    response = client.get(f"/logs/{BUILD}", follow_redirects=False)
    assert response.status_code in (301, 302, 307, 308)
    assert response.headers["location"] == f"/logs/{BUILD}/"
    assert client.get("/logs", follow_redirects=False).headers["location"] == "/logs/"


@pytest.mark.parametrize(
    "name",
    ["job-output.txt", "job-output.json", "_ansible/inventory.yaml", "_ansible/ansible.cfg",
     "artifacts/.config", "console/serial"],
)  # fmt: skip
def test_text_files_open_in_browser(client: TestClient, log_root: Path, name: str) -> None:
    response = client.get(f"/logs/{BUILD}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (log_root / BUILD / name).read_bytes()
    head = client.head(f"/logs/{BUILD}/{name}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_binary_files_download(client: TestClient) -> None:
    response = client.get(f"/logs/{BUILD}/artifacts/bzImage")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content.startswith(b"MZ\x00")


@pytest.mark.parametrize(
    "path",
    ["/logs/%2e%2e/secret.txt", "/logs/..%2fsecret.txt", "/logs/3/%2e%2e/%2e%2e/secret.txt",
     "/logs//secret.txt", f"/logs/{BUILD}/outside"],
)  # fmt: skip
def test_no_path_traversal(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "top secret" not in response.text


def test_absolute_path_stays_inside(client: TestClient, tmp_path: Path) -> None:
    response = client.get(f"/logs/{tmp_path}/secret.txt")
    assert response.status_code == 404


def test_missing_log_is_one_sentence(client: TestClient) -> None:
    response = client.get("/logs/9/9/check/nope/")
    assert response.status_code == 404
    assert response.text == "There is no log file or directory at /logs/9/9/check/nope/."


# -- status -------------------------------------------------------------------


def test_status_without_pipelines(client: TestClient) -> None:
    response = client.get("/api/status")
    assert response.status_code == 200
    assert response.json()["pipelines"] == []


def test_status_lists_items_oldest_first(client: TestClient, zk: ZooKeeper) -> None:
    store_item(zk, "gate", queue_item("g1", 5, 300.0))
    store_item(zk, "check", queue_item("c2", 4, 200.0))
    store_item(
        zk, "check",
        queue_item("c1", 3, 100.0, state="completed", result="SUCCESS",
                   log_url="http://127.0.0.1:9000/logs/3/1/check/kernel-build/b-c1/",
                   end_time=160.0, elapsed=60.0),
    )  # fmt: skip
    status = client.get("/api/status").json()
    assert status["now"] > 0
    assert [p["name"] for p in status["pipelines"]] == ["check", "gate"]
    check = status["pipelines"][0]["items"]
    assert [item["uuid"] for item in check] == ["c1", "c2"]
    build = check[0]["buildset"]["builds"]["kernel-build"]
    assert (build["state"], build["result"], build["elapsed"]) == ("completed", "SUCCESS", 60.0)
    assert build["log_url"].endswith("/logs/3/1/check/kernel-build/b-c1/")
    assert check[1]["buildset"]["builds"]["kernel-build"]["state"] == "queued"


def test_status_page_and_script(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert '<script src="/static/status.js">' in page.text
    assert 'data-local-changes="true"' in page.text
    script = client.get("/static/status.js")
    assert script.status_code == 200
    assert "/api/status" in script.text and "textContent" in script.text


def test_health(client: TestClient, zk_hosts: str, log_root: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    other = ZooKeeper(zk_hosts)
    other.connect()
    other.disconnect()
    response = TestClient(create_app(other, log_root)).get("/health")
    assert response.status_code == 503


def test_unknown_page_is_one_sentence(client: TestClient) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.text == "Nothing is served at /nowhere."


# -- local changes ------------------------------------------------------------


def test_changes_api(client: TestClient, zk: ZooKeeper) -> None:
    assert client.get("/api/changes").json() == []
    state = ZuulState(zk)
    zk.create(state.local_path("changes", 7), LOCAL_CHANGE)
    zk.create(state.local_path("changes", 8), {**LOCAL_CHANGE, "number": 8, "votes": []})
    changes = client.get("/api/changes").json()
    assert [c["number"] for c in changes] == [8, 7]
    assert changes[1]["patchset"] == 2
    assert changes[1]["votes"] == {"check": 1, "gate": None}
    assert client.get("/api/change/7").json() == LOCAL_CHANGE
    missing = client.get("/api/change/99")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "There is no change 99 in the local inbox."}


def test_change_page_shows_votes_preformatted(client: TestClient, zk: ZooKeeper) -> None:
    zk.create(ZuulState(zk).local_path("changes", 7), LOCAL_CHANGE)
    page = client.get("/change/7")
    assert page.status_code == 200
    assert "mm: fix &lt;leak&gt;" in page.text
    assert (
        '<pre>Build failed.\n\n- kernel-build <a href="http://x/logs/7/1/">http://x/logs/7/1/</a>'
        " : FAILURE</pre>" in page.text
    )
    assert '<span class="negative">-1</span> <b>check</b> on patchset 1' in page.text
    assert '<span class="positive">+1</span> <b>check</b> on patchset 2' in page.text
    assert " <b>gate</b> on patchset 2" in page.text and "<pre>Merged.</pre>" in page.text
    assert "mm: add helper<br>mm: fix &lt;leak&gt;" in page.text
    assert "<pre>recheck</pre>" in page.text
    assert "2025-11-25 19:47:30 UTC" in page.text
    listing = client.get("/changes")
    assert 'href="/change/7"' in listing.text
    assert 'check <span class="positive">+1</span>' in listing.text
    assert client.get("/change/99").text == "There is no change 99 in the local inbox."


def test_local_changes_off(zk: ZooKeeper, log_root: Path) -> None:
    client = TestClient(create_app(zk, log_root, local_changes=False))
    assert client.get("/api/changes").status_code == 404
    assert client.get("/change/7").status_code == 404
    assert 'data-local-changes="false"' in client.get("/").text


def test_linkify_escapes_text_and_links_urls() -> None:
    html = linkify('<img> see https://h/logs/1/?a=1&b="2" (http://h/x).')
    assert html == (
        '&lt;img&gt; see <a href="https://h/logs/1/?a=1&amp;b=">https://h/logs/1/?a=1&amp;b=</a>'
        '&#34;2&#34; (<a href="http://h/x">http://h/x</a>).'
    )


# -- the real server ----------------------------------------------------------


def test_real_server_serves_logs(zk: ZooKeeper, log_root: Path) -> None:
    server = WebServer(create_app(zk, log_root), port=0)
    server.start()
    try:
        assert server.port != 0
        response = httpx.get(f"{server.url}/logs/{BUILD}/job-output.txt")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert "make -j2" in response.text
        # http.client sends the path as written: no client-side `..` clean-up.
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("GET", "/logs/../secret.txt")
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_real_server_port_in_use(zk: ZooKeeper, log_root: Path) -> None:
    first = WebServer(create_app(zk, log_root), port=free_port())
    first.start()
    try:
        with pytest.raises(OSError, match="Cannot listen on 127.0.0.1"):
            WebServer(create_app(zk, log_root), port=first.port).start()
    finally:
        first.stop()


def test_status_stream_sends_the_status_then_each_change(zk: ZooKeeper, web) -> None:
    """The live status page's feed: the whole status at once, then again when
    a pipeline changes in ZooKeeper, with no polling by the browser."""
    with httpx.stream("GET", f"{web.url}/api/status/stream", timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = (
            json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")
        )
        assert next(events)["pipelines"] == []
        store_item(zk, "check", queue_item("u1", 3, 100.0))
        while not (status := next(events))["pipelines"]:
            pass  # the tree watch may fire for the pipeline node before its item
        assert [i["change"]["number"] for i in status["pipelines"][0]["items"]] == [3]
        item = queue_item("u1", 3, 100.0, result="FAILURE", state="completed")
        zk.set(ZuulState(zk).item_path("check", "u1"), {**item, "pipeline": "check"})
        while (build := next(events)["pipelines"][0]["items"][0]["buildset"]["builds"])[
            "kernel-build"
        ]["result"] is None:
            pass
        assert build["kernel-build"]["result"] == "FAILURE"
