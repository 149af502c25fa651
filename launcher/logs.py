"""Log collection and publishing, and the summary the vote quotes.

The collect playbook fetches one archive of the node's ~/artifacts and
~/console. The node ran the change's code, so the archive is hostile: it is
unpacked here by our own checks rather than tarfile's extraction filters (not
enough before Python 3.11.13 / 3.12.11), streaming one member at a time; see
unpack_node_logs(). Publishing copies logs/ and the ansible/ dir (as _ansible/,
without tmp/ or anything key-like) to <log_root>/<log_path>/.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

from launcher.jobdir import JobDir
from zuul_lite.baseline import MAX_FINDINGS_BYTES, Findings, FindingsError

log = logging.getLogger("launcher.logs")

SUMMARY_LINES = 10
# Compiler and linker errors, checkpatch ERROR:, make's "***", python tracebacks.
ERROR_LINE = re.compile(
    r"(\berror\b:|\bERROR\b:?|\*\*\* |Traceback|\bFAILED\b|\bfatal\b:|\bFAIL\b|not ok )",
    re.IGNORECASE,
)
# Lines indented under an error line belong to it (at most this many are quoted).
CONTEXT_INDENT = "    "
CONTEXT_LINES = 6
SOURCE_EXCERPT = re.compile(r"^\s*\d*\s*\|")
# How a kernel job says how to redo the failed build (kernel-tools/reproduce.py).
REPRODUCE = "reproduce: "
FINDINGS = "findings.json"  # in artifacts/: what the job found (zuul_lite/baseline.py)
PRIVATE_KEY = re.compile(r"(^id_|\.pem$|\.key$|private)", re.IGNORECASE)

# Caps on what one node's log archive may unpack to: file bytes actually
# written (never the sizes its headers claim) and members of any kind.
MAX_UNPACKED_BYTES = 1 << 30
MAX_ENTRIES = 100_000
# Headers, padding and long names come on top of the file data; the decompressed
# stream is capped as well, so a crafted header cannot make tarfile buffer gigabytes.
STREAM_OVERHEAD_PER_ENTRY = 8 * 1024
CHUNK = 1 << 20
LOG_TOPS = ("artifacts", "console")
# What a crafted archive makes tarfile, gzip or zlib raise.
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


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


def _error_lines(lines: list[str]) -> list[str]:
    """The error lines, each with the lines indented under it (a failed
    KTAP test's log, the console lines a failed boot quotes), but not gcc's
    source excerpts (`  407 |   ...`), which the error's file:line names."""
    out: list[str] = []
    seen: set[str] = set()
    context = 0
    for line in lines:
        if context and line.startswith(CONTEXT_INDENT) and not SOURCE_EXCERPT.match(line):
            out.append(line)
            context -= 1
            continue
        context = 0
        # make repeats its last "***" line from each recursion level.
        if ERROR_LINE.search(line) and line not in seen:
            seen.add(line)
            out.append(line)
            context = CONTEXT_LINES
    return out


def extract_summary(records: list[dict[str, Any]], limit: int = SUMMARY_LINES) -> str:
    """Quote the first error lines of the first failed task, for the vote.

    Lines that look like errors (`error:`, checkpatch `ERROR:`, make's `***`,
    ...), each with up to CONTEXT_LINES lines indented under it, are
    preferred; when a task fails without any, its last output lines are
    quoted instead. A `reproduce: ...` line the task printed comes last,
    whatever else is cut. Returns "" when no task failed.
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
                # A job's "reproduce: ..." line always ends the summary.
                reproduce = [line for line in lines if line.startswith(REPRODUCE)][-1:]
                lines = [line for line in lines if not line.startswith(REPRODUCE)]
                room = limit - 1 - len(reproduce)
                errors = _error_lines(lines)
                quoted = errors[:room] if errors else lines[-room:]
                header = f"Task '{task.get('name', '?')}' failed in {record.get('playbook')}:"
                return "\n".join([header, *(line[:300] for line in quoted), *reproduce])
    return ""


def read_findings(
    jobdir: JobDir, log_: logging.Logger | logging.LoggerAdapter = log
) -> dict | None:
    """What the job found (artifacts/findings.json, see zuul_lite/baseline.py),
    checked, as a dict for the result; None if it wrote none or a bad one
    (said in the launcher's log: the node is hostile, its build goes on)."""
    path = jobdir.artifacts / FINDINGS
    if path.is_symlink() or not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_FINDINGS_BYTES:
            raise FindingsError(f"{FINDINGS} is larger than {MAX_FINDINGS_BYTES} bytes.")
        return Findings.from_json(path.read_bytes()).to_dict()
    except (OSError, FindingsError) as error:
        log_.warning("Ignoring the job's %s: %s", FINDINGS, error)
        return None


class _Truncated(Exception):
    """A cap was reached; the message says which, for the build's log."""


class _CappedStream:
    """The decompressed archive, read in bounded chunks until `limit` bytes."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(CHUNK if size < 0 else min(size, CHUNK))
        self.count += len(data)
        if self.count > self.limit:
            raise _Truncated(f"the archive is more than {self.limit:,} bytes uncompressed")
        return data


def _safe_parts(name: str) -> list[str] | None:
    """The member's path components, or None when the name is unsafe to write."""
    if "\0" in name or name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def _file_mode(mode: int) -> int:
    """No setuid, setgid, sticky or group/other write; owner read-write; exec only
    for others when the owner has it (tarfile's `data` filter does the same)."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _copy_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int, budget: int
) -> tuple[int, bool]:
    """Stream one regular member into the open file `fd`, at most `budget` bytes.

    Returns the bytes written and whether the whole member fitted (what fits is
    written either way).
    """
    written = 0
    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as source:
        os.fchmod(fd, _file_mode(member.mode))
        while chunk := source.read(min(CHUNK, budget - written + 1)):
            if written + len(chunk) > budget:
                out.write(chunk[: budget - written])
                return budget, False
            out.write(chunk)
            written += len(chunk)
        try:
            os.utime(fd, (member.mtime, member.mtime))
        except (OverflowError, ValueError, OSError):
            pass  # a nonsense mtime only costs the timestamp
    return written, True


def _open_target(member: tarfile.TarInfo, target: Path) -> int | None:
    """Create a directory member, or open a file member's target for writing.

    Returns the file's descriptor (None for a directory); OSError when the
    target clashes with what is there (a file where a directory goes, ...).
    """
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: never write through a link, whatever put it there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(target, flags, 0o600)


def unpack_node_logs(
    jobdir: JobDir, max_bytes: int = MAX_UNPACKED_BYTES, max_entries: int = MAX_ENTRIES
) -> str:
    """Unpack the fetched archive (the collect playbook's tar.gz) into logs/.

    Of artifacts/ and console/, only regular files and directories whose
    names pass our checks (no absolute path, `..` or NUL, target inside
    logs/) are written, with sanitised modes; links, devices and fifos are
    skipped and logged. Members are streamed one at a time and the bytes
    written are counted. Returns "" or, when a cap or a damaged archive
    stopped the unpacking (what was unpacked stays), one sentence for the
    build's log.
    """
    archive = jobdir.node_logs_archive
    if not archive.exists():
        return ""
    dest = jobdir.logs.resolve()
    stream_cap = max_bytes + max_entries * STREAM_OVERHEAD_PER_ENTRY
    written = entries = 0
    reason = ""
    try:
        with (
            gzip.open(archive) as raw,
            tarfile.open(fileobj=_CappedStream(raw, stream_cap), mode="r|") as tar,
        ):
            for member in tar:
                entries += 1
                if entries > max_entries:
                    raise _Truncated(f"the archive has more than {max_entries:,} entries")
                parts = _safe_parts(member.name)
                if parts is None or not dest.joinpath(*parts).resolve().is_relative_to(dest):
                    log.warning("Skipping %r from the node's logs: unsafe name", member.name)
                    continue
                if not parts or parts[0] not in LOG_TOPS:
                    continue
                if not (member.isreg() or member.isdir()):
                    log.warning(
                        "Skipping %r from the node's logs: not a regular file or directory",
                        member.name,
                    )
                    continue
                try:
                    fd = _open_target(member, dest.joinpath(*parts))
                except OSError as error:
                    log.warning("Skipping %r from the node's logs: %s", member.name, error)
                    continue
                if fd is None:
                    continue
                copied, complete = _copy_member(tar, member, fd, max_bytes - written)
                written += copied
                if not complete:
                    raise _Truncated(f"their files add up to more than {max_bytes:,} bytes")
    except _Truncated as error:
        reason = str(error)
    except ARCHIVE_ERRORS as error:
        reason = f"unpacking stopped at an error ({error})"
    finally:
        archive.unlink(missing_ok=True)
    if not reason:
        return ""
    log.warning("The node's logs in %s were truncated: %s", jobdir.logs, reason)
    return f"The node's logs were truncated: {reason}."


def write_job_output_json(jobdir: JobDir, records: list[dict[str, Any]]) -> None:
    """job-output.json: every playbook record of every attempt, in order."""
    jobdir.job_output_json.write_text(json.dumps(records, indent=2, default=str))


def _ignore_for_publish(directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name == "tmp" or PRIVATE_KEY.search(name)}


class DependencyError(Exception):
    """A dependency's artifacts are not in this launcher's log root: one sentence."""


def dependency_dirs(log_root: Path, artifacts: dict[str, str]) -> dict[str, Path]:
    """The artifacts/ dir of each dependency, in this launcher's own log root.

    The request names each dependency's log path relative to the log root
    (an older scheduler sent absolute paths, which still do when they lie
    inside it); the setup playbook copies these dirs to the node.
    """
    root = log_root.resolve()
    dirs = {}
    for job, path in artifacts.items():
        target = (root / path / "artifacts").resolve()
        if not target.is_relative_to(root):
            raise DependencyError(f"The log path {path} of dependency {job} leaves the log root.")
        if not target.is_dir():
            raise DependencyError(
                f"The artifacts of dependency {job} are not in this launcher's log root "
                f"({target} is missing)."
            )
        dirs[job] = target
    return dirs


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
