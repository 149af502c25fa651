"""The layout: pipelines, projects and the jobs they run, validated by voluptuous.

A bad file is refused with one sentence naming the file and the key path; the
scheduler then keeps the layout it already had.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import voluptuous as v
import yaml

from zuul_lite.exceptions import ConfigError
from zuul_lite.model import EventFilter, Job, Pipeline

log = logging.getLogger("zuul_lite.layout")

MANAGERS = ("independent", "dependent")

# Zuul's built-in job: no node, no playbook, succeeds at once.
NOOP = Job(name="noop", node_type=None, run=[], description="Does nothing; succeeds at once.")


def _regex(value: Any) -> str:
    """A regex that compiles, so the scheduler never meets a bad one at run time."""
    if not isinstance(value, str):
        raise v.Invalid("expected a regular expression")
    try:
        re.compile(value)
    except re.error as error:
        raise v.Invalid(f"not a valid regular expression ({error})") from None
    return value


_trigger = v.Schema({v.Required("event"): str, "comment": _regex, "ref": _regex})
_report = v.Schema(
    {v.Extra: {v.Optional("verified"): v.In([-2, -1, 0, 1, 2]), v.Optional("submit"): bool}}
)

PIPELINE = v.Schema(
    {
        v.Required("name"): str,
        v.Required("manager"): v.In(MANAGERS),
        "description": str,
        v.Required("source"): str,
        v.Required("trigger"): {str: [_trigger]},
        "success": _report,
        "failure": _report,
        "merge-failure": _report,
        "window": v.All(int, v.Range(min=0)),
        "window-floor": v.All(int, v.Range(min=1)),
        "window-increase-type": v.In(["linear", "exponential"]),
        "window-increase-factor": v.All(int, v.Range(min=1)),
        "window-decrease-type": v.In(["linear", "exponential"]),
        "window-decrease-factor": v.All(int, v.Range(min=1)),
    }
)

PROJECT = v.Schema(
    {
        v.Required("name"): str,
        v.Extra: {v.Required("jobs"): [str]},
    }
)

LAYOUT = v.Schema(
    {
        v.Required("pipelines"): [PIPELINE],
        v.Required("projects"): [PROJECT],
    }
)

JOB = v.Schema(
    {
        v.Required("job"): {
            v.Required("name"): str,
            "description": str,
            v.Required("node-type"): str,
            "timeout": v.All(int, v.Range(min=1)),
            "pre-run": v.Any(str, [str]),
            v.Required("run"): v.Any(str, [str]),
            "post-run": v.Any(str, [str]),
            "dependencies": [str],
            "vars": dict,
            "failure-output": v.Any(_regex, [_regex]),
            # Writes caches shared with other builds: runs only on trusted trees.
            "trusted": bool,
            # A FAILURE is run once more on a fresh node before it counts.
            "rerun-on-failure": bool,
            # false: the node gets the change's commits, its work tree is not moved.
            "checkout": bool,
        }
    }
)

JOBS = v.Schema([JOB])


@dataclass
class Layout:
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    projects: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def jobs_for(self, project: str, pipeline: str) -> list[Job]:
        names = self.projects.get(project, {}).get(pipeline, [])
        return [self.jobs[n] for n in names if n in self.jobs]


def _key_path(error: v.Invalid) -> str:
    parts = []
    for p in error.path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "(top level)"


def _validate(schema: v.Schema, data: Any, path: Path) -> Any:
    try:
        return schema(data)
    except v.MultipleInvalid as e:
        err = e.errors[0]
        raise ConfigError(f"{path}: {_key_path(err)}: {err.error_message}.") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}.") from None


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_jobs(jobs_dir: Path) -> dict[str, Job]:
    jobs: dict[str, Job] = {"noop": NOOP}
    files = sorted(jobs_dir.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{jobs_dir}: no job definitions (*.yaml) found.")
    for path in files:
        for i, entry in enumerate(_validate(JOBS, _read_yaml(path) or [], path)):
            d = entry["job"]
            if d["name"] in jobs:
                raise ConfigError(f"{path}: [{i}].job.name: job {d['name']} is defined twice.")
            for playbook in (
                _as_list(d.get("pre-run")) + _as_list(d["run"]) + _as_list(d.get("post-run"))
            ):
                if not (jobs_dir / playbook).is_file():
                    raise ConfigError(
                        f"{path}: [{i}].job: playbook {playbook} of job {d['name']} "
                        f"does not exist in {jobs_dir}."
                    )
            jobs[d["name"]] = Job(
                name=d["name"],
                node_type=d["node-type"],
                run=_as_list(d["run"]),
                pre_run=_as_list(d.get("pre-run")),
                post_run=_as_list(d.get("post-run")),
                timeout=d.get("timeout", 1800),
                dependencies=d.get("dependencies", []),
                vars=d.get("vars", {}),
                failure_output=_as_list(d.get("failure-output")),
                description=d.get("description", ""),
                trusted=d.get("trusted", False),
                rerun_on_failure=d.get("rerun-on-failure", False),
                checkout=d.get("checkout", True),
            )
    for job in jobs.values():
        for dep in job.dependencies:
            if dep not in jobs:
                raise ConfigError(f"{jobs_dir}: job {job.name} depends on unknown job {dep}.")
    _check_cycles(jobs, jobs_dir)
    return jobs


def _check_cycles(jobs: dict[str, Job], jobs_dir: Path) -> None:
    """A dependency cycle would leave every job in it waiting forever."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise ConfigError(f"{jobs_dir}: job dependencies form a cycle: {cycle}.")
        if name in done:
            return
        for dep in jobs[name].dependencies:
            visit(dep, [*path, name])
        done.add(name)

    for name in jobs:
        visit(name, [])


def load_layout(
    path: Path, jobs_dir: Path, connections: set[str], node_types: set[str] | None = None
) -> Layout:
    """Read and check the layout; raises ConfigError with one sentence."""
    path = Path(path)
    data = _validate(LAYOUT, _read_yaml(path), path)
    layout = Layout(jobs=load_jobs(Path(jobs_dir)))
    for i, p in enumerate(data["pipelines"]):
        for conn in [p["source"], *p["trigger"]]:
            if conn not in connections:
                raise ConfigError(
                    f"{path}: pipelines[{i}]: connection {conn} is not defined in zuul.yaml."
                )
        if p["name"] in layout.pipelines:
            raise ConfigError(
                f"{path}: pipelines[{i}].name: pipeline {p['name']} is defined twice."
            )
        for conn in [*p.get("success", {}), *p.get("failure", {}), *p.get("merge-failure", {})]:
            if conn not in connections:
                raise ConfigError(
                    f"{path}: pipelines[{i}]: reporter connection {conn} is not defined "
                    "in zuul.yaml."
                )
        dependent = p["manager"] == "dependent"
        layout.pipelines[p["name"]] = Pipeline(
            name=p["name"],
            manager=p["manager"],
            source=p["source"],
            description=p.get("description", ""),
            triggers={c: [EventFilter(**t) for t in ts] for c, ts in p["trigger"].items()},
            success=p.get("success", {}),
            failure=p.get("failure", {}),
            merge_failure=p.get("merge-failure", p.get("failure", {})),
            window=p.get("window", 20 if dependent else 0),
            window_floor=p.get("window-floor", 3),
            window_increase_type=p.get("window-increase-type", "linear"),
            window_increase_factor=p.get("window-increase-factor", 1),
            window_decrease_type=p.get("window-decrease-type", "exponential"),
            window_decrease_factor=p.get("window-decrease-factor", 2),
        )
    for i, proj in enumerate(data["projects"]):
        entry = {}
        for pipeline, body in proj.items():
            if pipeline == "name":
                continue
            if pipeline not in layout.pipelines:
                raise ConfigError(f"{path}: projects[{i}].{pipeline}: no such pipeline.")
            for job in body["jobs"]:
                if job not in layout.jobs:
                    raise ConfigError(f"{path}: projects[{i}].{pipeline}.jobs: unknown job {job}.")
                j = layout.jobs[job]
                if node_types is not None and j.node_type and j.node_type not in node_types:
                    raise ConfigError(
                        f"{path}: projects[{i}].{pipeline}.jobs: job {job} "
                        f"needs node type {j.node_type}, which no nodepool label offers "
                        f"(labels: {', '.join(sorted(node_types)) or 'none'})."
                    )
                if j.trusted and not layout.pipelines[pipeline].trusted:
                    raise ConfigError(
                        f"{path}: projects[{i}].{pipeline}.jobs: job {job} of project "
                        f"{proj['name']} is trusted (it writes caches other builds read), so it "
                        "may run only in a pipeline triggered by ref-updated alone (merged "
                        f"branch heads), which {pipeline} is not."
                    )
                for dep in j.dependencies:
                    if dep not in body["jobs"]:
                        raise ConfigError(
                            f"{path}: projects[{i}].{pipeline}.jobs: job {job} "
                            f"depends on {dep}, which this pipeline does not run."
                        )
            entry[pipeline] = body["jobs"]
        layout.projects[proj["name"]] = entry
    return layout
