"""The launcher's ansible side against real ansible-playbook (local connection):
which task failures the early-failure callback announces, and that text from
patch authors reaches ansible untemplated."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import yaml

from launcher.config import default_ansible_playbook
from launcher.earlyfailure import EarlyFailure
from launcher.playbooks import CALLBACK_DIR
from tests.harness import local_ansible_dir
from zuul_lite.build_contract import BuildRequest

FAIL = {"ansible.builtin.command": "false"}
OK = {"ansible.builtin.debug": {"msg": "ok"}}

CAUGHT = [
    {"name": "Ignored", **FAIL, "ignore_errors": True},
    {"name": "Failed when false", **FAIL, "failed_when": False},
    {"block": [{"name": "Rescued", **FAIL}], "rescue": [OK]},
    {"block": [{"block": [{"name": "Rescued from outside", **FAIL}]}], "rescue": [OK]},
    {"block": [{"ansible.builtin.include_tasks": "included.yaml"}], "rescue": [OK]},
    {"block": [{"name": "In an ignored block", **FAIL}], "always": [OK], "ignore_errors": True},
]


def run_local(tmp_path: Path, tasks: list[dict], env: dict[str, str]) -> list[str]:
    (tmp_path / "included.yaml").write_text(yaml.safe_dump([{"name": "Included", **FAIL}]))
    playbook = tmp_path / "run-0.yaml"
    playbook.write_text(
        yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])
    )
    out = subprocess.run(
        [default_ansible_playbook(), "-i", "localhost,", "-c", "local", str(playbook)],
        env={
            **os.environ,
            "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACK_DIR),
            "ANSIBLE_CALLBACKS_ENABLED": "zuul_early_failure",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
            "ANSIBLE_HOME": str(tmp_path / "tmp"),
            **env,
        },
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    return out.stdout.splitlines()


def test_only_failures_that_fail_the_play_are_announced(tmp_path):
    reasons: list[str] = []
    watch = EarlyFailure([], reasons.append, logging.getLogger("t"))
    failing = {"block": [{"name": "First", **FAIL}], "rescue": [{"name": "Rescue fails", **FAIL}]}
    lines = run_local(tmp_path, [*CAUGHT, failing, {"name": "Never runs", **OK}], watch.env())
    kept = [line for line in lines if watch.feed(line)]
    assert reasons == ["Task 'Rescue fails' failed in run-0.yaml."]
    assert not any(watch.token in line for line in kept)
    recap = next(line for line in lines if line.startswith("localhost "))
    assert "rescued=4" in recap and "ignored=2" in recap and "failed=1" in recap


def test_nothing_is_announced_without_the_token(tmp_path):
    lines = run_local(tmp_path, [{"name": "Fails", **FAIL}], {})
    assert not any(line.startswith("{") or '"task"' in line for line in lines)


def test_author_text_reaches_ansible_untemplated(tmp_path):
    """Subject and owner are written `!unsafe`, and ansible prints them as text:
    the lookups in them never run (they would create the marker files)."""
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    show = [
        {
            "name": "Show",
            "ansible.builtin.debug": {
                "msg": "subject={{ zuul.subject }} owner={{ zuul.owner }} branch={{ zuul.branch }}"
            },
        }
    ]
    (jobs / "playbooks" / "show.yaml").write_text(
        yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": show}])
    )
    subject = f"{{{{ lookup('pipe', 'touch {tmp_path}/pwned') }}}}"
    owner = f"{{% set x = lookup('pipe', 'touch {tmp_path}/pwned-owner') %}}{{{{ 6 * 7 }}}}"
    request = BuildRequest(
        uuid="u1",
        job="j",
        node_type="n",
        log_path="l",
        subject=subject,
        owner=owner,
        branch="{{ 6 * 7 }}",
        playbooks={"run": ["playbooks/show.yaml"]},
    )
    jobdir, phases = local_ansible_dir(tmp_path, request, jobs)
    unsafe: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!unsafe", lambda loader, node: unsafe.append(node.value))
    yaml.load(jobdir.vars.read_text(), Loader=Loader)
    assert subject in unsafe and owner in unsafe
    out = subprocess.run(
        [
            default_ansible_playbook(),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"@{jobdir.vars}",
            str(phases["run"][0]),
        ],
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(jobdir.tmp)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout
    assert f"subject={subject} owner={owner} branch={{{{ 6 * 7 }}}}" in out.stdout
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned-owner").exists()
