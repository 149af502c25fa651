"""validate-config refuses what the scheduler cannot run, with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from zuul_lite.exceptions import ConfigError
from zuul_lite.layout import load_jobs, load_layout

FIXTURES = Path(__file__).parent / "fixtures"
JOBS = FIXTURES / "jobs"

PIPELINE = """
pipelines:
  - name: check
    manager: {manager}
    source: local
    trigger:
      local:
        - event: comment-added
          comment: '{comment}'
projects:
  - name: demo
    check:
      jobs: [lint, build, boot]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "layout.yaml"
    path.write_text(text)
    return path


def test_unknown_manager(tmp_path: Path) -> None:
    path = write(tmp_path, PIPELINE.format(manager="sideways", comment="recheck"))
    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.manager"):
        load_layout(path, JOBS, {"local"})


def test_regex_that_does_not_compile(tmp_path: Path) -> None:
    path = write(tmp_path, PIPELINE.format(manager="independent", comment="(recheck"))
    with pytest.raises(ConfigError, match=r"trigger.local\[0\]\.comment: not a valid regular"):
        load_layout(path, JOBS, {"local"})


def test_node_type_no_label_offers(tmp_path: Path) -> None:
    path = write(tmp_path, PIPELINE.format(manager="independent", comment="recheck"))
    with pytest.raises(ConfigError, match=r"needs node type small, which no nodepool label"):
        load_layout(path, JOBS, {"local"}, node_types={"kernel-debian"})
    assert load_layout(path, JOBS, {"local"}, node_types={"small"}).pipelines["check"]


def test_job_dependency_cycle(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    (jobs / "playbooks" / "x.yaml").write_text("[]\n")
    (jobs / "jobs.yaml").write_text(
        "- job: {name: a, node-type: small, run: playbooks/x.yaml, dependencies: [b]}\n"
        "- job: {name: b, node-type: small, run: playbooks/x.yaml, dependencies: [a]}\n"
    )
    path = write(tmp_path, PIPELINE.format(manager="independent", comment="recheck"))
    with pytest.raises(ConfigError, match="job dependencies form a cycle: a -> b -> a"):
        load_layout(path, jobs, {"local"})


def test_checkout_is_a_job_flag(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "playbooks").mkdir(parents=True)
    (jobs / "playbooks" / "x.yaml").write_text("[]\n")
    job = "- job: {name: a, node-type: small, run: playbooks/x.yaml, checkout: %s}\n"
    (jobs / "jobs.yaml").write_text(job % "no-thanks")
    with pytest.raises(ConfigError, match=r"jobs.yaml: \[0\]\.job\.checkout: expected bool"):
        load_jobs(jobs)
    (jobs / "jobs.yaml").write_text(job % "false")
    assert load_jobs(jobs)["a"].checkout is False
    assert load_jobs(JOBS)["build"].checkout is True  # the default: the change checked out


def test_gate_window_settings(tmp_path: Path) -> None:
    text = PIPELINE.format(manager="dependent", comment="recheck").replace(
        "    source: local\n", "    source: local\n    window: 5\n    window-floor: 2\n"
    )
    pipeline = load_layout(write(tmp_path, text), JOBS, {"local"}).pipelines["check"]
    assert (pipeline.window, pipeline.window_floor) == (5, 2)
    assert pipeline.window_increase_type == "linear"
    assert pipeline.window_decrease_type == "exponential"
