"""Turning a finished queue item into the text of its report."""

from __future__ import annotations

import re

from zuul_lite.baseline import named
from zuul_lite.model import Build, Pipeline, QueueItem, Result

# The line a launcher's summary starts with (launcher/logs.py extract_summary).
_TASK_HEADER = re.compile(r"^Task '.*' failed in \S+:$")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s"


def headline(summary: str) -> str:
    """The first line of a build's summary that says what went wrong, for a
    review system that shows one line per job (Patchwork's checks): not the
    launcher's "Task '...' failed in ...:" before it."""
    for line in summary.splitlines():
        line = line.strip()
        if line and not _TASK_HEADER.match(line):
            return line
    return ""


def _rerun_note(build: Build) -> str:
    """What a rerun-on-failure build's first run did: a flip is reported as
    flaky (and counts as passed); otherwise the first run is named too."""
    if build.first_result is None:
        return ""
    first = f" {build.first_log_url}" if build.first_log_url else ""
    if build.flaky:
        flipped = f"; flaky tests: {named(build.flaky_tests)}" if build.flaky_tests else ""
        return f" (flaky: {build.first_result}{first}, then SUCCESS on a fresh node{flipped})"
    return f" (the first run, on another node: {build.first_result}{first})"


def job_lines(item: QueueItem) -> list[str]:
    lines = []
    for build in item.buildset.ordered_builds():
        url = f" {build.log_url}" if build.log_url else ""
        took = f" in {format_duration(build.elapsed)}" if build.elapsed is not None else ""
        note = f" ({build.note})" if build.note else ""
        lines.append(f"- {build.job}{url} : {build.result}{took}{_rerun_note(build)}{note}")
        if build.result != Result.SUCCESS and build.summary:
            lines.extend("    " + ln for ln in build.summary.splitlines()[:12])
    return lines


def format_report(
    pipeline: Pipeline,
    item: QueueItem,
    action: str,
    merged: bool = False,
    merge_error: str | None = None,
) -> str:
    """The message of a report; `action` is the pipeline's action taken
    (success, failure, merge-failure, error)."""
    head = f"zuul-lite {pipeline.name} pipeline, change {item.label}:"
    bs = item.buildset
    if action == "error":
        return f"{head} {Result.ERROR}.\n\n{item.error}\nNo vote: this is not the change's fault."
    if action == "merge-failure":
        return (
            f"{head} {Result.MERGE_CONFLICT}.\n\n{bs.merge_error}\n"
            "No jobs were run: rebase the series onto the branch head and resubmit."
        )
    if item.failure:
        return f"{head} Build failed.\n\n{item.failure}"
    if merge_error:
        verdict = f"Build succeeded, but the change could not be merged: {merge_error}"
    elif action == "success":
        verdict = "Build succeeded; merged." if merged else "Build succeeded."
    else:
        verdict = "Build failed."
    lines = [f"{head} {verdict}", ""]
    ahead = [label for label in bs.changes if label != item.label]
    if ahead:
        lines[1:1] = ["", f"Tested on top of {', '.join(ahead)}."]
    return "\n".join([*lines, *job_lines(item)])
