"""`zuul-lite` user commands: one sentence and exit 1 for every bad input."""

from __future__ import annotations

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.harness import REPO_ROOT, make_project, make_series, write_config
from zuul_lite import config as zconfig
from zuul_lite.cmd.client import main
from zuul_lite.state import ZuulState


@pytest.fixture
def cli(tmp_path, zk_hosts):
    path = write_config(tmp_path, zk_hosts)
    src = make_project(tmp_path)
    assert main(["-c", str(path), "import-project", "demo", str(src)]) == 0
    return path, src, tmp_path


def test_submit_show_recheck(cli, capsys):
    path, src, tmp = cli
    series = make_series(src, tmp / "s", [("README", "more\n", "README: more")])
    assert main(["-c", str(path), "submit", str(series), "--project", "demo"]) == 0
    assert "Change 1 patchset 1 submitted to demo." in capsys.readouterr().out
    assert (
        main(["-c", str(path), "submit", str(series), "--project", "demo", "--change", "1"]) == 0
    )
    assert "Change 1 patchset 2" in capsys.readouterr().out
    assert main(["-c", str(path), "show", "1"]) == 0
    out = capsys.readouterr().out
    assert "Change 1: README: more" in out and "patchset 2: 1 patch(es)" in out
    assert main(["-c", str(path), "recheck", "1"]) == 0
    cfg = zconfig.load(path)
    zk = ZooKeeper(cfg.zk_hosts)
    zk.connect()
    state = ZuulState(zk)
    events = [state.get(state.trigger_event_path(n)) for n in state.trigger_events()]
    zk.disconnect()
    assert [e["type"] for e in events] == [
        "ref-updated",  # the import: a branch head the post pipeline may build
        "patchset-created",
        "patchset-created",
        "comment-added",
    ]


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("empty-dir", "holds no patches."),
        ("no-diff", "holds no diff."),
        ("not-mail", "is neither an mbox nor a patch email."),
        ("missing", "does not exist."),
    ],
)
def test_submit_bad_input(cli, capsys, setup, expected):
    path, src, tmp = cli
    target = tmp / setup
    if setup == "empty-dir":
        target.mkdir()
    elif setup == "no-diff":
        target.write_text("From abc Mon Sep 17 00:00:00 2001\nSubject: [PATCH] x\n\nhello\n")
    elif setup == "not-mail":
        target.write_text("just some text\n")
    assert main(["-c", str(path), "submit", str(target), "--project", "demo"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zuul-lite: ") and err.strip().endswith(expected)
    assert len(err.strip().splitlines()) == 1


def test_unknown_project_and_change(cli, capsys):
    path, src, tmp = cli
    series = make_series(src, tmp / "s", [("README", "more\n", "README: more")])
    assert main(["-c", str(path), "submit", str(series), "--project", "nope"]) == 1
    assert "Unknown project nope (known projects: demo)." in capsys.readouterr().err
    assert main(["-c", str(path), "show", "42"]) == 1
    assert "There is no change 42." in capsys.readouterr().err


def test_validate_config(cli, capsys, tmp_path):
    path, *_ = cli
    assert main(["-c", str(path), "validate-config"]) == 0
    assert "OK (1 pipelines, 5 jobs, 1 projects)" in capsys.readouterr().out
    text = path.read_text().replace("demo.yaml", "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["-c", str(bad), "validate-config"]) == 1
    assert "missing.yaml: cannot read it" in capsys.readouterr().err
    # A connection is checked with its driver's own schema, before anything starts.
    data = yaml.safe_load(path.read_text())
    data["connections"]["pw"] = {"driver": "patchwork", "url": "ftp://x", "project": "p"}
    bad.write_text(yaml.safe_dump(data))
    assert main(["-c", str(bad), "validate-config"]) == 1
    assert f"{bad}: Connection pw: url: expected an http(s) URL." in capsys.readouterr().err


@pytest.mark.parametrize("name", ["patchwork", "gerrit"])
def test_example_connections_in_etc_are_valid(cli, capsys, tmp_path, name):
    """The commented-out examples of etc/zuul.yaml, as an operator uncomments them."""
    path, *_ = cli
    lines = (REPO_ROOT / "etc" / "zuul.yaml").read_text().splitlines()
    start = lines.index(f"  # {name}:")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  #   "):
            break
        block.append(line)
    example = yaml.safe_load("\n".join(ln.replace("  # ", "", 1) for ln in block))
    data = yaml.safe_load(path.read_text())
    data["connections"].update(example)
    path.write_text(yaml.safe_dump(data))
    assert main(["-c", str(path), "validate-config"]) == 0, capsys.readouterr().err
