"""Log collection and publishing, and the summary the vote quotes.

The collect playbook fetches one archive of the node's ~/artifacts and
~/console; it is unpacked here with tarfile's `data` filter, so a crafted
archive (links, absolute or `..` paths) from a node running untrusted code
cannot write outside the build's log dir. Publishing copies logs/ and the
ansible/ dir (as _ansible/, without tmp/ or anything key-like) to
<log_root>/<log_path>/.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from launcher.jobdir import JobDir

log = logging.getLogger("launcher.logs")

SUMMARY_LINES = 10
# Compiler and linker errors, checkpatch ERROR:, make's "***", python tracebacks.
ERROR_LINE = re.compile(
    r"(\berror\b:|\bERROR\b:?|\*\*\* |Traceback|\bFAILED\b|\bfatal\b:|\bFAIL\b|not ok )",
    re.IGNORECASE,
)
PRIVATE_KEY = re.compile(r"(^id_|\.pem$|\.key$|private)", re.IGNORECASE)


def read_results(jobdir: JobDir) -> list[dict[str, Any]]:
    """The per-playbook records our callback wrote, in the order the playbooks ran."""
    if not jobdir.results.exists():
        return []
    records = []
    for line in jobdir.results.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("Skipping an unreadable result line in %s", jobdir.results)
    return records


def _host_results(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's host results, with loop items flattened into the list."""
    out = []
    for result in task.get("hosts", {}).values():
        out.append(result)
        out.extend(item for item in result.get("results") or [] if isinstance(item, dict))
    return out


def _lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in ("stderr", "stdout", "msg", "module_stderr", "module_stdout"):
        value = result.get(key)
        if isinstance(value, str):
            lines.extend(value.splitlines())
    return [line.rstrip() for line in lines if line.strip()]


def extract_summary(records: list[dict[str, Any]], limit: int = SUMMARY_LINES) -> str:
    """Quote the first error lines of the first failed task, for the vote.

    Lines that look like errors (`error:`, checkpatch `ERROR:`, make's `***`,
    ...) are preferred; when a task fails without any, its last output lines
    are quoted instead. Returns "" when no task failed.
    """
    for record in records:
        for play in record.get("plays", []):
            for task in play.get("tasks", []):
                failed = [
                    r
                    for r in _host_results(task)
                    if r.get("status") in ("failed", "unreachable")
                    or (r.get("failed") and r.get("status") != "ignored")
                ]
                if not failed:
                    continue
                lines: list[str] = []
                for result in failed:
                    lines.extend(_lines(result))
                # make repeats its last "***" line from each recursion level.
                errors = list(dict.fromkeys(line for line in lines if ERROR_LINE.search(line)))
                quoted = errors[: limit - 1] if errors else lines[-(limit - 1) :]
                header = f"Task '{task.get('name', '?')}' failed in {record.get('playbook')}:"
                return "\n".join([header, *(line[:300] for line in quoted)])
    return ""


def unpack_node_logs(jobdir: JobDir) -> None:
    """Unpack the fetched archive into logs/artifacts and logs/console (data only)."""
    archive = jobdir.node_logs_archive
    if not archive.exists():
        return
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.name.split("/", 1)[0] not in ("artifacts", "console"):
                    continue
                try:
                    tar.extract(member, jobdir.logs, filter="data")
                except tarfile.FilterError as error:
                    log.warning("Skipping %s from the node's logs: %s", member.name, error)
    except (tarfile.TarError, OSError) as error:
        log.warning("Could not unpack the node's logs from %s: %s", archive, error)
    finally:
        archive.unlink(missing_ok=True)


def write_job_output_json(jobdir: JobDir, records: list[dict[str, Any]]) -> None:
    """job-output.json: every playbook record of every attempt, in order."""
    jobdir.job_output_json.write_text(json.dumps(records, indent=2, default=str))


def _ignore_for_publish(directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name == "tmp" or PRIVATE_KEY.search(name)}


def log_dir(log_root: Path, log_path: str) -> Path:
    """<log_root>/<log_path>/, created; ValueError if log_path climbs out of the root."""
    target = (log_root / log_path).resolve()
    if not target.is_relative_to(log_root.resolve()):
        raise ValueError(f"The log path {log_path} leaves the log root.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def publish(jobdir: JobDir, target: Path) -> None:
    """Copy logs/ and ansible/ (as _ansible/) into the build's log dir `target`."""
    shutil.copytree(jobdir.logs, target, dirs_exist_ok=True, symlinks=True)
    if jobdir.ansible.exists():
        shutil.copytree(
            jobdir.ansible,
            target / "_ansible",
            dirs_exist_ok=True,
            symlinks=True,
            ignore=_ignore_for_publish,
        )
