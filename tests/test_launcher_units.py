"""Launcher pieces that need no engines: summary, playbook files, publishing, config,
log prefixes, failure-output matching."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
import yaml

from launcher import logs
from launcher.buildlog import build_log
from launcher.config import ConfigError, load
from launcher.earlyfailure import EarlyFailure
from launcher.gitcache import FetchedChange, GitCache
from launcher.jobdir import JobDir
from launcher.playbooks import (
    NodeAddress,
    PlaybookError,
    known_hosts_lines,
    resolve_playbooks,
    write_ansible_dir,
)
from zuul_lite.build_contract import BuildRequest


class UnsafeText(str):
    """A string vars.yaml tagged `!unsafe`."""


class VarsLoader(yaml.SafeLoader):
    """Reads vars.yaml as ansible does, `!unsafe` strings as UnsafeText."""


VarsLoader.add_constructor(
    "!unsafe", lambda loader, node: UnsafeText(loader.construct_scalar(node))
)


def strings(value) -> list[str]:
    """Every string value in nested dicts and lists (keys aside)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def request(**fields) -> BuildRequest:
    return BuildRequest(**{"uuid": "abc", "job": "j", "node_type": "n", "log_path": "l", **fields})


def record(playbook: str, tasks: list[dict]) -> dict:
    return {"playbook": playbook, "phase": "run", "plays": [{"name": "p", "tasks": tasks}]}


def task(name: str, **result) -> dict:
    return {"name": name, "hosts": {"node": result}}


def test_summary_quotes_first_error_lines_of_the_failed_task():
    stderr = "\n".join(
        ["  CC      kernel/fork.o"]
        + [f"kernel/fork.c:{n}:5: error: 'x{n}' undeclared" for n in range(1, 15)]
    )
    records = [
        record("setup.yaml", [task("Clone", status="ok", stdout="error: not me")]),
        record(
            "run-0.yaml",
            [
                task(
                    "Build",
                    status="failed",
                    rc=2,
                    stderr=stderr,
                    stdout="make[1]: *** [kernel/fork.o] Error 1",
                    msg="non-zero return code",
                ),
                task("Later", status="failed", stderr="error: not me either"),
            ],
        ),
    ]
    summary = logs.extract_summary(records).splitlines()
    assert summary[0] == "Task 'Build' failed in run-0.yaml:"
    assert summary[1] == "kernel/fork.c:1:5: error: 'x1' undeclared"
    assert len(summary) == logs.SUMMARY_LINES


def test_summary_quotes_checkpatch_errors():
    stdout = (
        "WARNING: line length of 120 exceeds 100 columns\n"
        "ERROR: trailing whitespace\n#12: FILE: kernel/fork.c:42:\n"
        "total: 1 errors, 1 warnings, 10 lines checked\n"
    )
    records = [record("run-0.yaml", [task("checkpatch", status="failed", stdout=stdout)])]
    assert logs.extract_summary(records).splitlines()[1:] == ["ERROR: trailing whitespace"]


def test_summary_without_error_lines_quotes_the_tail_and_loop_items():
    item = {"status": "failed", "failed": True, "stdout": "\n".join(f"l{n}" for n in range(20))}
    records = [record("run-0.yaml", [task("Loop", status="failed", results=[item])])]
    lines = logs.extract_summary(records).splitlines()
    assert lines[-1] == "l19" and len(lines) == logs.SUMMARY_LINES


def test_summary_ends_with_the_reproduce_line():
    stdout = "\n".join(
        [*(f"kernel/f{n}.c:1:1: error: e{n}" for n in range(20)), "reproduce: sh reproduce.sh"]
    )
    records = [record("run-0.yaml", [task("Build", status="failed", stdout=stdout)])]
    lines = logs.extract_summary(records).splitlines()
    assert len(lines) == logs.SUMMARY_LINES
    assert lines[1] == "kernel/f0.c:1:1: error: e0"
    assert lines[-1] == "reproduce: sh reproduce.sh"


def test_summary_quotes_the_lines_indented_under_an_error():
    """A failed KTAP test's log lines and a failed boot's last console lines
    come with them; gcc's source excerpts do not (file:line says where)."""
    gcc = "kernel/panic.c:407:58: error: 'panic_timout' undeclared"
    excerpt = ["  407 |   pr_emerg(panic_timout);", "      |            ^~~~~~~~~~~~"]
    ktap = [
        "FAIL tiny.tiny_add_test",
        "    # tiny_add_test: EXPECTATION FAILED at lib/tiny_kunit.c:11",
        "    Expected tiny_add(1, 1) == 2, but",
        "2 tests: 1 pass, 1 fail",
    ]
    boot = "ERROR: the kernel did not boot; the console's last lines:"
    console = [f"    [    1.{n}] line {n}" for n in range(9)]
    reproduce = "reproduce: sh artifacts/reproduce.sh <your clone> (base 1a2b)"
    stdout = "\n".join([gcc, *excerpt, *ktap, boot, *console, reproduce])
    records = [record("run-0.yaml", [task("Test", status="failed", stdout=stdout)])]
    assert logs.extract_summary(records, limit=20).splitlines()[1:] == [
        gcc,
        *ktap,
        boot,
        *console[: logs.CONTEXT_LINES],
        reproduce,
    ]


def test_summary_is_empty_when_nothing_failed_or_failure_was_ignored():
    records = [
        record(
            "run-0.yaml",
            [task("t", status="ok"), task("u", status="ignored", failed=True, stderr="x")],
        )
    ]
    assert logs.extract_summary(records) == ""


def test_known_hosts_uses_bracketed_form_for_other_ports():
    node = NodeAddress("127.0.0.1", 2222, "zuul", ["ssh-ed25519 AAAA", ""])
    assert known_hosts_lines(node) == ["[127.0.0.1]:2222 ssh-ed25519 AAAA"]
    node.port = 22
    assert known_hosts_lines(node) == ["127.0.0.1 ssh-ed25519 AAAA"]


def test_playbooks_must_stay_inside_the_jobs_dir(tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    (jobs / "playbooks" / "ok.yaml").write_text("[]")
    (tmp_path / "outside.yaml").write_text("[]")
    req = request(playbooks={"run": ["playbooks/ok.yaml"]})
    assert resolve_playbooks(req, jobs)["run"] == [(jobs / "playbooks" / "ok.yaml").resolve()]
    for bad in ("../outside.yaml", "playbooks/missing.yaml"):
        with pytest.raises(PlaybookError, match="not a file in the jobs dir"):
            resolve_playbooks(request(playbooks={"run": [bad]}), jobs)


@pytest.fixture
def jobdir(tmp_path):
    """A job dir; its ssh control dir lies outside tmp_path, in the system's."""
    jobdir = JobDir(tmp_path / "work", "abc")
    yield jobdir
    jobdir.cleanup()


def test_ansible_dir_layout(tmp_path, jobdir):
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    (jobs / "playbooks" / "build.yaml").write_text("- hosts: node\n  tasks: []\n")
    req = request(
        vars={"arch": "x86_64", "make_flags": ["-j{{ ansible_processor_nproc }}"]},
        playbooks={"run": ["playbooks/build.yaml"]},
        subject="{{ lookup('pipe', 'id') }}",
        owner="{% if true %}x{% endif %} <x@example.org>",
        project="linux{{ 1 }}",
        branch="{{ 2 }}",
        changes="1,1 {{ 3 }}",
        review_repo="{{ 4 }}",
        artifacts={"kernel-build": "/logs/{{ 5 }}"},
    )
    node = NodeAddress(
        "127.0.0.1", 2222, "zuul", ["ssh-ed25519 AAAA"], "kernel-ci-debian-0000000007"
    )
    cache = GitCache(tmp_path / "git", 60)
    change = FetchedChange(cache.repo(req.project), "1" * 40)
    deps = {"kernel-build": tmp_path / "logs" / "5" / "artifacts"}
    phases = write_ansible_dir(
        jobdir,
        req,
        node,
        jobs_dir=jobs,
        private_key=Path("/keys/id_ed25519"),
        connect_timeout=5,
        change=change,
        dependencies=deps,
    )
    assert [p.name for ps in phases.values() for p in ps] == [
        "setup.yaml",
        "run-0.yaml",
        "collect-logs.yaml",
    ]
    inventory = yaml.safe_load(jobdir.inventory.read_text())["all"]["hosts"]["node"]
    assert inventory["ansible_port"] == 2222
    assert inventory["ansible_ssh_private_key_file"] == "/keys/id_ed25519"
    assert inventory["nodepool"] == {"image_build": "kernel-ci-debian-0000000007"}
    cfg = jobdir.config.read_text()
    assert "pipelining = True" in cfg and "retry_files_enabled = False" in cfg
    assert f"UserKnownHostsFile={jobdir.known_hosts}" in cfg
    assert "StrictHostKeyChecking=yes" in cfg
    text = jobdir.vars.read_text()
    assert "  subject: !unsafe " in text and "  owner: !unsafe " in text
    variables = yaml.load(text, Loader=VarsLoader)
    assert variables["zuul"] == req.to_dict()
    # Everything in `zuul` is unsafe; the job's vars (from the layout) stay templates.
    assert strings(variables["zuul"]) and all(
        isinstance(value, UnsafeText) for value in strings(variables["zuul"])
    )
    assert variables["arch"] == "x86_64" and not isinstance(variables["arch"], UnsafeText)
    assert not isinstance(variables["make_flags"][0], UnsafeText)
    for path in (jobdir.inventory, jobdir.setup_playbook, jobdir.collect_playbook):
        assert "{{ 1 }}" not in path.read_text() and "lookup" not in path.read_text()
    assert variables["zuul_log_dir"] == str(jobdir.logs)
    assert len(str(jobdir.control_dir)) < 40  # room for ssh's socket name under 108 bytes
    # The change goes from the launcher's cache to the node over the node's ssh;
    # the node is given no URL or path to fetch from.
    tasks = yaml.load(jobdir.setup_playbook.read_text(), Loader=VarsLoader)[0]["tasks"]
    push = next(t for t in tasks if t.get("delegate_to") == "localhost")
    argv = push["ansible.builtin.command"]["argv"]
    assert argv[:3] == ["git", "-C", str(tmp_path / "git" / "linux%7B%7B%201%20%7D%7D.git")]
    assert argv[-3:] == [
        "ssh://zuul@127.0.0.1:2222/~/src/{{ zuul.project }}",
        "+1111111111111111111111111111111111111111:refs/heads/{{ zuul.branch }}",
        "+1111111111111111111111111111111111111111:refs/zuul/change",
    ]
    ssh = push["environment"]["GIT_SSH_COMMAND"]
    assert "-i /keys/id_ed25519" in ssh and f"UserKnownHostsFile={jobdir.known_hosts}" in ssh
    assert "StrictHostKeyChecking=yes" in ssh and "BatchMode=yes" in ssh
    assert "git_url" not in jobdir.setup_playbook.read_text()
    copy = next(t for t in tasks if "ansible.builtin.copy" in t)
    assert copy["loop"] == [{"job": "kernel-build", "src": str(deps["kernel-build"])}]
    # A job without a checkout and without dependencies: the change's commits go
    # to refs/zuul/change only, and no task copies artifacts.
    req.checkout = False
    write_ansible_dir(
        jobdir, req, node, jobs_dir=jobs, private_key=Path("/keys/id_ed25519"),
        connect_timeout=5, change=change, dependencies={},
    )  # fmt: skip
    tasks = yaml.load(jobdir.setup_playbook.read_text(), Loader=VarsLoader)[0]["tasks"]
    assert [t["name"] for t in tasks] == [
        "Wait for the node to answer over ssh",
        "Keep the node's repository as it is, or make an empty one",
        "Push the change's commits to the node, without checking them out",
    ]
    argv = tasks[-1]["ansible.builtin.command"]["argv"]
    assert argv[-3:] == [
        "--receive-pack=git receive-pack",
        "ssh://zuul@127.0.0.1:2222/~/src/{{ zuul.project }}",
        "+1111111111111111111111111111111111111111:refs/zuul/change",
    ]


def test_publish_leaves_out_tmp_and_keys(tmp_path, jobdir):
    jobdir.prepare()
    (jobdir.artifacts / "bzImage").write_text("x\n")
    jobdir.inventory.write_text("all: {}\n")
    (jobdir.tmp / "junk").write_text("")
    (jobdir.ansible / "id_ed25519").write_text("PRIVATE")
    target = logs.log_dir(tmp_path / "logs", "1/1/check/j/abc")
    assert target == tmp_path / "logs" / "1/1/check/j/abc" and target.is_dir()
    logs.publish(jobdir, target)
    assert (target / "artifacts" / "bzImage").read_text() == "x\n"
    assert sorted(p.name for p in (target / "_ansible").iterdir()) == ["inventory.yaml"]
    with pytest.raises(ValueError, match="leaves the log root"):
        logs.log_dir(tmp_path / "logs", "../escape")


def test_node_logs_cannot_escape_the_log_dir(tmp_path, jobdir):
    jobdir.prepare()
    with tarfile.open(jobdir.node_logs_archive, "w:gz") as tar:
        for name, data in (
            ("artifacts/.config", b"CONFIG_64BIT=y\n"),
            ("console/../../../evil", b"x"),
            ("console/serial.log", b"boot\n"),
            ("other/file", b"x"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    logs.unpack_node_logs(jobdir)
    assert (jobdir.artifacts / ".config").read_text() == "CONFIG_64BIT=y\n"
    assert (jobdir.console / "serial.log").read_text() == "boot\n"
    assert not (jobdir.logs / "other").exists()
    assert not (tmp_path / "work" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not jobdir.node_logs_archive.exists()


def test_dependency_dirs_stay_in_the_launchers_log_root(tmp_path):
    root = tmp_path / "logs"
    (root / "1/1/check/build/u1/artifacts").mkdir(parents=True)
    found = {"build": root / "1/1/check/build/u1/artifacts"}
    assert logs.dependency_dirs(root, {"build": "1/1/check/build/u1"}) == found
    assert logs.dependency_dirs(root, {"build": str(root / "1/1/check/build/u1")}) == found
    with pytest.raises(logs.DependencyError, match="leaves the log root"):
        logs.dependency_dirs(root, {"build": "/etc"})
    with pytest.raises(logs.DependencyError, match=r"not in this launcher's log root \("):
        logs.dependency_dirs(root, {"build": "1/1/check/build/u2"})


def test_git_cache_names_stay_inside_the_cache(tmp_path):
    cache = GitCache(tmp_path, 1)
    assert cache.repo("linux") == tmp_path / "linux.git"
    assert cache.repo("../../etc") == tmp_path / "..%2F..%2Fetc.git"
    assert cache.repo("kernel/linux") == tmp_path / "kernel%2Flinux.git"


def test_config_defaults_and_errors(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "zuul.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "state-dir": str(tmp_path / "state"),
                "zookeeper": {"hosts": "127.0.0.1:2181"},
                "gearman": {"server": "127.0.0.1", "port": 4731},
                "web": {"url": "http://h:9000"},
                "launcher": {"max-builds": 3},
            }
        )
    )
    config = load(conf)
    assert config.max_builds == 3 and config.gearman_port == 4731
    assert config.log_root == tmp_path / "state" / "logs"
    assert config.log_url == "http://h:9000/logs"
    assert config.jobs_dir == tmp_path / "jobs"
    assert config.private_key == tmp_path / "state" / "keys" / "id_ed25519"
    assert config.git_cache == tmp_path / "state" / "launcher" / "git"
    conf.write_text(yaml.safe_dump({"zookeeper": {"hosts": "h"}, "launcher": {"max-builds": 0}}))
    with pytest.raises(ConfigError, match="launcher/max-builds"):
        load(conf)
    conf.write_text(yaml.safe_dump({"launcher": {"colour": "red"}, "zookeeper": {"hosts": "h"}}))
    with pytest.raises(ConfigError, match="launcher/colour: extra keys not allowed"):
        load(conf)


def test_build_log_lines_carry_event_and_build(caplog):
    caplog.set_level(logging.INFO, logger="launcher.build")
    build_log("launcher.build", request(event_id="ev1")).info("Node %s in use", 7)
    build_log("launcher.build", request()).info("No event")
    assert caplog.messages == ["[e: ev1] [build: abc] Node 7 in use", "[build: abc] No event"]


def test_failure_output_fires_once_and_sees_command_lines():
    reasons: list[str] = []
    watch = EarlyFailure([r"^BUG: ", "(unclosed"], reasons.append, logging.getLogger("t"))
    assert watch.feed("TASK [Boot] ***") and reasons == []
    assert watch.feed("node | BUG: kernel NULL pointer dereference")
    assert watch.feed("node | BUG: again")
    assert reasons == [
        "Output matched failure-output '^BUG: ': BUG: kernel NULL pointer dereference"
    ]


def test_failure_token_lines_are_reported_and_left_out_of_the_log():
    reasons: list[str] = []
    watch = EarlyFailure([], reasons.append, logging.getLogger("t"))
    forged = 'node | 0123 {"task": "x", "playbook": "y"}'
    assert watch.feed(forged) and reasons == []
    assert not watch.feed(f'{watch.token} {{"task": "Build", "playbook": "run-0.yaml"}}')
    assert reasons == ["Task 'Build' failed in run-0.yaml."]
    assert watch.env() == {"ZUUL_EARLY_FAILURE_TOKEN": watch.token}
