"""`zuul-lite` operator commands on the gate (issue point 9), and bad input:
each mistake exits 1 with one sentence on stderr and leaves the queues as
they were. A scheduler runs in this process; the stand-in launcher holds
builds (tests/harness.py)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    StandInLauncher,
    make_project,
    make_series,
    pipeline_status,
    queue_shape,
    settle,
    votes_in,
    wait_for_votes,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.cmd.client import main
from zuul_lite.exceptions import ConfigError
from zuul_lite.git import git
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState
from zuul_lite.web.app import create_app
from zuul_lite.web.server import WebServer


class Cli:
    def __init__(self, path, src, tmp, zk, sched, launcher, capsys) -> None:
        self.path, self.src, self.tmp = path, src, tmp
        self.zk, self.sched, self.launcher, self.capsys = zk, sched, launcher, capsys
        self.state = ZuulState(zk)

    def run(self, *argv: str) -> tuple[int, str, str]:
        """`zuul-lite -c <config> argv...`: (exit status, stdout, stderr)."""
        self.capsys.readouterr()
        rc = main(["-c", str(self.path), *argv])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *argv: str) -> str:
        rc, out, err = self.run(*argv)
        assert rc == 0, err
        self.settle()
        return out

    def submit(self, name: str) -> int:
        series = make_series(self.src, self.tmp / f"s-{name}", [(f"{name}.txt", name, name)])
        out = self.ok("submit", str(series), "--project", "demo")
        number = int(out.split()[1])
        wait_for_votes(self.zk, number, 1)  # check (noop)
        return number

    def settle(self) -> None:
        settle(self.sched, self.launcher)

    def status_lines(self) -> list[str]:
        return [ln.strip() for ln in self.ok("status").splitlines()]

    def gate_lines(self) -> list[str]:
        """`zuul-lite status` lines of the gate's items, in order."""
        lines = self.status_lines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("gate:"))
        return [ln for ln in lines[start + 1 :] if "on top of" in ln]

    def held(self) -> list[tuple[str, str]]:
        self.settle()
        return sorted(self.launcher.held_builds())

    def branch_log(self) -> list[str]:
        repo = self.tmp / "state" / "git" / "demo.git"
        return git(repo, "log", "--format=%s", "master").split("\n")[:-1]


@pytest.fixture
def cli(tmp_path, zk_hosts, capsys):
    path = write_config(tmp_path, zk_hosts, layout="gate.yaml")
    src = make_project(tmp_path)
    assert main(["-c", str(path), "import-project", "demo", str(src)]) == 0
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    sched = Scheduler(zconfig.load(path), zk)
    sched.start()
    launcher = StandInLauncher(zk, sched.gearman_port)
    launcher.hold = True
    launcher.start()
    yield Cli(path, src, tmp_path, zk, sched, launcher, capsys)
    launcher.stop()
    sched.stop()
    zk.disconnect()


def test_approve_and_status_show_the_gate_in_order(cli):
    a, b, c = (cli.submit(n) for n in "abc")
    for n in (a, b, c):
        assert cli.ok("approve", str(n)) == f"Change {n},1 approved.\n"
    assert [i["change"]["number"] for i in pipeline_status(cli.zk, "gate")] == [a, b, c]
    lines = cli.status_lines()
    assert "gate: 3 item(s)" in lines and "queue demo, window 20:" in lines
    assert cli.gate_lines() == [
        "1,1 a [running; on top of the branch head]",
        "2,1 b [running; on top of 1,1]",
        "3,1 c [running; on top of 2,1]",
    ]
    assert cli.held() == [
        ("build", "1,1"),
        ("build", "1,1 2,1"),
        ("build", "1,1 2,1 3,1"),
        ("lint", "1,1"),
        ("lint", "1,1 2,1"),
        ("lint", "1,1 2,1 3,1"),
    ]


def test_promote_moves_a_change_to_the_head(cli):
    a, b, c = (cli.submit(n) for n in "abc")
    for n in (a, b, c):
        cli.ok("approve", str(n))
    assert cli.ok("promote", "--pipeline", "gate", str(c)) == (
        f"Change {c}: promote in gate requested.\n"
    )
    assert [i["change"]["number"] for i in pipeline_status(cli.zk, "gate")] == [c, a, b]
    assert cli.gate_lines() == [
        "3,1 c [running; on top of the branch head]",
        "1,1 a [running; on top of 3,1]",
        "2,1 b [running; on top of 1,1]",
    ]
    # Every build started over on the new order; the old ones were stopped.
    assert cli.held() == [
        ("build", "3,1"),
        ("build", "3,1 1,1"),
        ("build", "3,1 1,1 2,1"),
        ("lint", "3,1"),
        ("lint", "3,1 1,1"),
        ("lint", "3,1 1,1 2,1"),
    ]
    assert sorted(h["changes"] for h in cli.launcher.history if h["result"] == "ABORTED") == [
        "1,1",
        "1,1",
        "1,1 2,1",
        "1,1 2,1",
        "1,1 2,1 3,1",
        "1,1 2,1 3,1",
    ]
    cli.launcher.hold = False
    cli.launcher.release()
    wait_for_votes(cli.zk, b, 2)
    cli.settle()
    assert cli.branch_log() == ["b", "a", "c", "Initial commit"]
    assert [votes_in(cli.zk, n, "gate") for n in (a, b, c)] == [[1], [1], [1]]


def test_dequeue_takes_a_change_out_without_a_report(cli):
    a, b = cli.submit("a"), cli.submit("b")
    cli.ok("approve", str(a))
    cli.ok("approve", str(b))
    assert cli.ok("dequeue", "--pipeline", "gate", str(a)) == (
        f"Change {a}: dequeue in gate requested.\n"
    )
    assert cli.gate_lines() == ["2,1 b [running; on top of the branch head]"]
    assert cli.held() == [("build", "2,1"), ("lint", "2,1")]
    assert votes_in(cli.zk, a, "gate") == []
    cli.launcher.hold = False
    cli.launcher.release()
    wait_for_votes(cli.zk, b, 2)
    cli.settle()
    assert cli.branch_log() == ["b", "Initial commit"]
    assert votes_in(cli.zk, a, "gate") == []


def test_enqueue_runs_a_pipeline_without_a_trigger(cli):
    a = cli.submit("a")
    assert cli.ok("enqueue", "--pipeline", "check", str(a)) == (
        f"Change {a}: enqueue in check requested.\n"
    )
    votes = wait_for_votes(cli.zk, a, 2)
    assert [(v["pipeline"], v["value"]) for v in votes] == [("check", 1), ("check", 1)]
    # Into the gate without an approval: an operator's call.
    cli.ok("enqueue", "--pipeline", "gate", str(a))
    assert cli.gate_lines() == ["1,1 a [running; on top of the branch head]"]
    assert cli.held() == [("build", "1,1"), ("lint", "1,1")]


@pytest.fixture
def busy(cli):
    """Change 1 merged, 2 in the gate (builds held), 3 abandoned, 4 open."""
    merged, queued, abandoned, open_ = (cli.submit(n) for n in "abcd")
    cli.ok("approve", str(merged))
    cli.launcher.release(change=merged)
    wait_for_votes(cli.zk, merged, 2)
    cli.ok("approve", str(queued))
    cli.ok("abandon", str(abandoned))
    assert [merged, queued, abandoned, open_] == [1, 2, 3, 4]
    assert cli.state.read_status()["pipelines"]
    return cli


NO_PIPELINE = "There is no pipeline nope (pipelines: check, gate)."
BAD_INPUT = [
    (["approve", "99"], "There is no change 99."),
    (["approve", "3"], "Change 3 is abandoned: only an open change can be approved."),
    (["approve", "1"], "Change 1 is merged: only an open change can be approved."),
    (["promote", "--pipeline", "gate", "4"], "Change 4 is not in gate."),
    (["promote", "--pipeline", "gate", "99"], "Change 99 is not in gate."),
    (["promote", "--pipeline", "check", "2"], "Change 2 is not in check."),
    (["dequeue", "--pipeline", "gate", "4"], "Change 4 is not in gate."),
    (["dequeue", "--pipeline", "gate", "1"], "Change 1 is not in gate."),
    (
        ["promote", "--pipeline", "nope", "2"],
        "There is no pipeline nope (pipelines: check, gate).",
    ),
    (
        ["dequeue", "--pipeline", "nope", "2"],
        "There is no pipeline nope (pipelines: check, gate).",
    ),
    (
        ["enqueue", "--pipeline", "nope", "4"],
        "There is no pipeline nope (pipelines: check, gate).",
    ),
    (["enqueue", "--pipeline", "gate", "2"], "Change 2,1 is already in gate."),
    (["enqueue", "--pipeline", "gate", "1"], "Change 1 is merged."),
    (["enqueue", "--pipeline", "gate", "3"], "Change 3 is abandoned."),
    (["enqueue", "--pipeline", "check", "99"], "There is no change 99."),
    (["enqueue", "--pipeline", "check", "--patchset", "7", "4"], "Change 4 has no patchset 7."),
    (["abandon", "1"], "Change 1 is merged already."),
]


@pytest.mark.parametrize("argv,sentence", BAD_INPUT, ids=["-".join(argv) for argv, _ in BAD_INPUT])
def test_bad_input_is_one_sentence_and_changes_nothing(busy, argv, sentence):
    before = {p: queue_shape(busy.zk, p) for p in ("check", "gate")}
    held = busy.held()
    votes = {n: busy.state.zk.get(busy.state.local_path("changes", n))[0]["votes"] for n in (1, 2)}
    rc, out, err = busy.run(*argv)
    assert (rc, out) == (1, "")
    assert err == f"zuul-lite: {sentence}\n"
    busy.settle()
    assert busy.state.management_events() == [] and busy.state.trigger_events() == []
    assert {p: queue_shape(busy.zk, p) for p in ("check", "gate")} == before
    assert busy.held() == held
    for n, v in votes.items():
        assert busy.state.zk.get(busy.state.local_path("changes", n))[0]["votes"] == v


TOKEN = "s3cret-operator-token"


@pytest.fixture
def web(cli):
    """The web server with operator actions on (the token set in its config)."""
    cfg = dataclasses.replace(zconfig.load(cli.path), web_admin_token=TOKEN)
    server = WebServer(create_app(cli.zk, cli.tmp / "logs", cfg=cfg), port=0)
    server.start()
    yield server
    server.stop()


def post(web, action: str, change: int, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{web.url}/api/pipeline/gate/{action}", json={"change": change}, headers=headers
    )


def test_web_promote_and_dequeue_with_the_admin_token(cli, web):
    a, b, c = (cli.submit(n) for n in "abc")
    for n in (a, b, c):
        cli.ok("approve", str(n))
    reply = post(web, "promote", c)
    assert (reply.status_code, reply.json()) == (
        202,
        {"detail": "Change 3: promote in gate requested."},
    )
    cli.settle()
    reply = post(web, "dequeue", a)
    assert reply.status_code == 202
    cli.settle()
    assert cli.gate_lines() == [
        "3,1 c [running; on top of the branch head]",
        "2,1 b [running; on top of 3,1]",
    ]


def test_web_refuses_operator_actions_without_the_token(busy, web):
    before = queue_shape(busy.zk, "gate")
    for token, status in ((None, 401), ("wrong-token-wrong-token", 401)):
        reply = post(web, "dequeue", 2, token)
        assert reply.status_code == status
        assert reply.json()["detail"].startswith("Operator actions need the admin token")
    read_only = WebServer(
        create_app(busy.zk, busy.tmp / "logs", cfg=zconfig.load(busy.path)), port=0
    )
    read_only.start()
    try:
        reply = post(read_only, "dequeue", 2)
        assert reply.status_code == 403
        assert "Operator actions are off" in reply.json()["detail"]
    finally:
        read_only.stop()
    # Bad input with the token: the CLI's sentence, and nothing changes.
    assert post(web, "promote", 4).json() == {"detail": "Change 4 is not in gate."}
    reply = httpx.post(f"{web.url}/api/pipeline/nope/dequeue", json={"change": 2},
                       headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert (reply.status_code, reply.json()["detail"]) == (400, NO_PIPELINE)
    assert (
        post(web, "explode", 2).json()["detail"].startswith("There is no operator action explode")
    )
    busy.settle()
    assert busy.state.management_events() == []
    assert queue_shape(busy.zk, "gate") == before


def test_admin_token_file_must_be_readable_and_long(tmp_path, zk_hosts):
    path = write_config(tmp_path, zk_hosts)
    data = yaml.safe_load(path.read_text())
    data["web"]["admin-token-file"] = "token"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"web/admin-token-file: No such file or directory"):
        zconfig.load(path)
    (tmp_path / "token").write_text("short\n")
    with pytest.raises(ConfigError, match=r"holds fewer than 16 characters"):
        zconfig.load(path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert zconfig.load(path).web_admin_token == TOKEN


def test_autohold_from_the_cli_and_the_web(cli, web):
    out = cli.ok("autohold", "--project", "demo", "--job", "build", "--reason", "dev: oops")
    assert out == "Autohold 0000000000 added: the next 1 failing build build(s) keep their node.\n"
    assert cli.ok("autohold-list") == (
        "0000000000: demo job build, 0/1 held (none yet): dev: oops\n"
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"project": "demo", "job": "lint", "change": 2, "count": 2, "reason": "ci: flaky?"}
    assert httpx.post(f"{web.url}/api/autohold", json=body).status_code == 401
    reply = httpx.post(f"{web.url}/api/autohold", json=body, headers=auth)
    assert reply.status_code == 202
    listed = httpx.get(f"{web.url}/api/autohold").json()
    assert [(r["id"], r["job"], r["change"], r["count"]) for r in listed] == [
        ("0000000000", "build", None, 1),
        ("0000000001", "lint", 2, 2),
    ]
    reply = httpx.delete(f"{web.url}/api/autohold/0000000001", headers=auth)
    assert reply.json()["detail"].startswith("Autohold 0000000001 deleted")
    assert cli.ok("autohold-delete", "0000000000").startswith("Autohold 0000000000 deleted")
    assert cli.ok("autohold-list") == "No autohold requests.\n"


AUTOHOLD_BAD_INPUT = [
    (["--project", "nope", "--job", "build", "--reason", "r"],
     "There is no project nope in the layout (projects: demo)."),
    (["--project", "demo", "--job", "nope", "--reason", "r"],
     "There is no job nope with a node in the layout."),
    (["--project", "demo", "--job", "build", "--reason", " "],
     "An autohold needs a reason (who wants the node, and why)."),
    (["--project", "demo", "--job", "build", "--reason", "r", "--count", "0"],
     "An autohold count must be between 1 and 100, not 0."),
]  # fmt: skip


@pytest.mark.parametrize("argv,sentence", AUTOHOLD_BAD_INPUT)
def test_bad_autohold_is_one_sentence(cli, argv, sentence):
    assert cli.run("autohold", *argv) == (1, "", f"zuul-lite: {sentence}\n")
    assert cli.run("autohold-delete", "0000000042") == (
        1, "", "zuul-lite: There is no autohold request 0000000042.\n"
    )  # fmt: skip
    assert cli.ok("autohold-list") == "No autohold requests.\n"
