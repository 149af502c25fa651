"""The build history through the real uvicorn server on loopback: the JSON
API and its filters, the build page with its log tree, and bad input (unknown
uuids, paths that try to leave the log root) answered with a 404, never a
file outside the root, a 500 or a traceback."""

from __future__ import annotations

import http.client
from pathlib import Path

import httpx
import pytest

from nodepool_lite.zk import ZooKeeper
from tests.test_history import make_item
from zuul_lite.history.db import HistoryDB
from zuul_lite.history.records import item_record
from zuul_lite.web.app import create_app
from zuul_lite.web.server import WebServer

OUTPUT = (
    "2026-12-03 06:00:00.000001 | TASK [make]\n"
    "2026-12-03 06:00:01.000001 | fs/foo.c:12:3: error: 'x' undeclared <script>\n"
    "2026-12-03 06:00:02.000001 | make: *** [Makefile:1: all] Error 2\n"
    "2026-12-03 06:00:03.000001 | fatal: [node]: FAILED! => {}\n"
)


@pytest.fixture
def site(tmp_path: Path, zk: ZooKeeper):
    """Two reported items in the history, the logs of one failed build
    (with a symlink pointing out of the root), and the server on a free port."""
    (tmp_path / "secret.txt").write_text("top secret\n")
    history = HistoryDB(f"sqlite:///{tmp_path / 'history.sqlite'}")
    history.upgrade()
    failed = make_item(1, {"lint": "SUCCESS", "build": "FAILURE"})
    history.record(item_record(failed, "FAILURE"))
    history.record(item_record(make_item(2, {"lint": "SUCCESS"}, "gate"), "SUCCESS", merged=True))
    root = tmp_path / "logs"
    build = failed.buildset.builds["build"]
    logs = root / build.log_path
    (logs / "_ansible").mkdir(parents=True)
    (logs / "console").mkdir()
    (logs / "job-output.txt").write_text(OUTPUT)
    (logs / "_ansible" / "inventory.yaml").write_text("all: {}\n")
    (logs / "console" / "serial.log").write_text("Linux version 6.1\n")
    (logs / "reproduce.sh").write_text("make -j2 W=1 fs/foo.o\n")
    (logs / "leak").symlink_to(tmp_path / "secret.txt")
    (logs / "leakdir").symlink_to(tmp_path)
    server = WebServer(create_app(zk, root, history=history), port=0)
    server.start()
    yield server, build.uuid, failed.buildset.uuid
    server.stop()
    history.dispose()


def raw_get(server: WebServer, path: str) -> tuple[int, str]:
    """GET with the path exactly as written: http.client cleans nothing up."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_builds_api_and_its_filters(site):
    server, uuid, buildset = site
    url = server.url
    everything = httpx.get(f"{url}/api/builds").json()
    assert [(b["change"], b["job_name"]) for b in everything] == [
        (2, "lint"), (1, "build"), (1, "lint")
    ]  # fmt: skip
    assert [b["change"] for b in httpx.get(f"{url}/api/builds?pipeline=gate").json()] == [2]
    assert [b["uuid"] for b in httpx.get(f"{url}/api/builds?result=failure").json()] == [uuid]
    assert len(httpx.get(f"{url}/api/builds?job=lint&project=demo").json()) == 2
    assert len(httpx.get(f"{url}/api/builds?change=1&limit=1").json()) == 1
    assert httpx.get(f"{url}/api/builds?project=nope").json() == []
    build = httpx.get(f"{url}/api/build/{uuid}").json()
    assert build["job_name"] == "build" and build["buildset"]["uuid"] == buildset
    assert build["log_url"] == "http://logs/1/1/check/build/"
    sets = httpx.get(f"{url}/api/buildsets?result=SUCCESS").json()
    assert [(s["change"], s["merged"]) for s in sets] == [(2, True)]
    one = httpx.get(f"{url}/api/buildset/{buildset}").json()
    assert [b["job_name"] for b in one["builds"]] == ["lint", "build"]
    assert httpx.get(f"{url}/api/time-to-vote").json()["count"] == 2


def test_pages_link_builds_to_their_logs(site):
    server, uuid, buildset = site
    page = httpx.get(f"{server.url}/builds?job=build").text
    assert f'href="/build/{uuid}"' in page and 'href="http://logs/1/1/check/build/"' in page
    page = httpx.get(f"{server.url}/buildsets?change=1").text
    assert f'href="/buildset/{buildset}"' in page
    page = httpx.get(f"{server.url}/build/{uuid}").text
    # The first error lines, linked to their anchors, escaped.
    assert f'<a href="/build/{uuid}/output#L2">2</a>' in page
    assert "undeclared &lt;script&gt;" in page and "<script>" not in page.split("</header>")[1]
    assert f'<a href="/build/{uuid}/output#L1">' not in page
    assert "make -j2 W=1 fs/foo.o" in page  # the reproduce command
    for name in ("_ansible/", "inventory.yaml", "console/", "serial.log", "job-output.txt"):
        assert f">{name}</a>" in page
    assert "leak" not in page  # symlinks out of the root are not listed
    output = httpx.get(f"{server.url}/build/{uuid}/output").text
    assert '<span id="L2" class="error"><a href="#L2">2</a>' in output
    assert '<span id="L1"><a href="#L1">1</a>' in output


def test_bad_input_is_a_404_never_a_file_outside_the_root(site):
    server, uuid, _ = site
    for path in (
        "/api/build/0123456789abcdef",
        "/api/build/..%2f..%2fetc%2fpasswd",
        "/api/buildset/nope",
        "/build/nope",
        "/build/nope/output",
        "/logs/../secret.txt",
        "/logs/%2e%2e/secret.txt",
        "/logs/%2E%2E/%2e%2e/secret.txt",
        "/logs/1/1/check/build/x/../../../../../../secret.txt",
        "/logs/1/1/check/build/x/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
        "/logs/1/1/check/build/x/job-output.txt%00.png",
        "/logs/%00",
        "/logs/1/1/check/build/x/leak",
        "/logs/1/1/check/build/x/leakdir/secret.txt",
    ):
        status, body = raw_get(server, path)
        assert status == 404, (path, status)
        assert "top secret" not in body and "Traceback" not in body
    status, body = raw_get(server, "/api/build/0123456789abcdef")
    assert body == '{"detail":"There is no build 0123456789abcdef in the history."}'
    status, body = raw_get(server, "/api/builds?change=abc")
    assert status == 422 and "Traceback" not in body


def test_unreadable_history_is_503_with_one_sentence(tmp_path, zk: ZooKeeper):
    never_migrated = HistoryDB(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    server = WebServer(create_app(zk, tmp_path, history=never_migrated), port=0)
    server.start()
    try:
        response = httpx.get(f"{server.url}/api/builds")
        assert response.status_code == 503
        assert "cannot be read" in response.json()["detail"]
        assert "Traceback" not in response.text and "SELECT" not in response.text
        assert httpx.get(f"{server.url}/builds").status_code == 503
    finally:
        server.stop()
