"""Turning a finished queue item into a vote and its message."""

from __future__ import annotations

from zuul_lite.layout import Pipeline
from zuul_lite.model import QueueItem, Result


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


def vote_value(pipeline: Pipeline, connection: str, item: QueueItem) -> int | None:
    if item.merge_error is not None:
        action = pipeline.merge_failure
    elif item.succeeded():
        action = pipeline.success
    else:
        action = pipeline.failure
    return action.get(connection, {}).get("verified")


def job_lines(item: QueueItem) -> list[str]:
    lines = []
    for build in item.ordered_builds():
        url = f" {build.log_url}" if build.log_url else ""
        took = f" in {format_duration(build.elapsed)}" if build.elapsed is not None else ""
        lines.append(f"- {build.job}{url} : {build.result}{took}")
        if build.result != Result.SUCCESS and build.summary:
            lines.extend("    " + ln for ln in build.summary.splitlines()[:12])
    return lines


def format_report(pipeline: Pipeline, item: QueueItem) -> str:
    head = f"zuul-lite {pipeline.name} pipeline, change {item.label}:"
    if item.merge_error is not None:
        return (
            f"{head} {Result.MERGE_CONFLICT}.\n\n{item.merge_error}\n"
            "No jobs were run: rebase the series onto the branch head and resubmit."
        )
    verdict = "Build succeeded." if item.succeeded() else "Build failed."
    return "\n".join([f"{head} {verdict}", "", *job_lines(item)])
