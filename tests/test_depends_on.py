"""Depends-On footers: check tests a change on top of what it needs; the gate
enqueues what it needs or waits for it; a cycle or a missing change gets one
sentence. Real ZooKeeper, gear, git and merger; a stand-in launcher."""

from __future__ import annotations

import pytest

from tests.harness import make_series, wait_for_votes
from tests.test_gate import Gate, gate  # noqa: F401 (the fixture)


def change_with(g: Gate, name: str, footer: str = "", cover: str = "") -> int:
    out = make_series(
        g.src,
        g.tmp / f"series-{name}",
        [(f"{name}.txt", f"{name}\n", f"{name}: add" + (f"\n\n{footer}" if footer else ""))],
    )
    if cover:
        (out / "0000-cover-letter.patch").write_text(
            "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            "From: Dev <dev@example.com>\n"
            f"Subject: [PATCH 0/1] {name}: the series\n\n{cover}\n"
        )
    number, _ = g.local.submit(out, "demo")
    return number


def check_votes(g: Gate, number: int) -> list[dict]:
    return [v for v in g.local.get_change_data(number)["votes"] if v["pipeline"] == "check"]


@pytest.fixture
def check(gate: Gate) -> Gate:  # noqa: F811
    """The gate fixture's check pipeline runs `noop`; these tests hold nothing."""
    gate.launcher.hold = False
    return gate


def test_check_tests_on_top_of_dependencies(check: Gate) -> None:
    a = change_with(check, "a")
    b = change_with(check, "b", footer=f"Depends-On: {a}")
    wait_for_votes(check.zk, b)
    vote = check_votes(check, b)[0]
    assert vote["value"] == 1
    assert "Tested on top of 1,1." in vote["message"]
    assert len(check_votes(check, a)) == 1  # its own item, not the non-live one


def test_cover_letter_url_and_missing_change(check: Gate) -> None:
    a = change_with(check, "a")
    url = f"{check.cfg.web_url}/change/{a}"
    b = change_with(check, "b", cover=f"Please apply.\n\nDepends-On: {url}")
    assert "Tested on top of 1,1." in wait_for_votes(check.zk, b)[0]["message"]
    c = change_with(check, "c", footer="Depends-On: 99")
    vote = wait_for_votes(check.zk, c)[0]
    assert vote["value"] == -1
    assert "Change 3 says Depends-On: 99, which names no change." in vote["message"]


def test_cycle_is_one_sentence(check: Gate) -> None:
    a = change_with(check, "a", footer="Depends-On: 2")  # 2 does not exist yet
    b = change_with(check, "b", footer="Depends-On: 1")
    vote = wait_for_votes(check.zk, b)[0]
    assert vote["value"] == -1 and "Depends-On cycle: 2 -> 1 -> 2." in vote["message"]
    first = wait_for_votes(check.zk, a)[0]
    assert "Change 1 says Depends-On: 2, which names no change." in first["message"]
    check.local.recheck(a)  # now 2 exists: the cycle is named from 1's side
    again = wait_for_votes(check.zk, a, count=2)[1]
    assert again["value"] == -1 and "Depends-On cycle: 1 -> 2 -> 1." in again["message"]


def test_gate_waits_then_enqueues_behind(gate: Gate) -> None:  # noqa: F811
    a = change_with(gate, "a")
    b = change_with(gate, "b", footer=f"Depends-On: {a}")
    gate.approve(b)  # a is not approved: b waits
    assert [i for i in gate.sched.state.read_status()["pipelines"][1]["items"]] == []
    gate.approve(a)  # a enters, and b behind it
    assert gate.running() == [
        ("build", "1,1"),
        ("build", "1,1 2,1"),
        ("lint", "1,1"),
        ("lint", "1,1 2,1"),
    ]
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, b, count=2)
    assert gate.branch_log() == ["b: add", "a: add", "Initial commit"]


def test_gate_enqueues_approved_dependency_ahead(gate: Gate) -> None:  # noqa: F811
    a = change_with(gate, "a")
    b = change_with(gate, "b", footer=f"Depends-On: {a}")
    gate.local.approve(a)
    gate.local.approve(b)
    assert ("build", "1,1 2,1") in gate.running()


def test_gate_dependency_fails_so_does_the_change(gate: Gate) -> None:  # noqa: F811
    a = change_with(gate, "a")
    b = change_with(gate, "b", footer=f"Depends-On: {a}")
    gate.launcher.results = {f"build:{a}": "FAILURE"}
    gate.approve(a, b)
    gate.release("build", change=a)
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, b, count=2)
    assert gate.gate_votes(a) == [-1]
    assert gate.gate_votes(b) == [-1]
    message = gate.local.get_change_data(b)["votes"][-1]["message"]
    assert "depends on change 1, which is neither merged nor ahead of it" in message
    assert gate.branch_log() == ["Initial commit"]
