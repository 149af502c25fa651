"""Errors the scheduler side raises; each message is one sentence for a user."""


class ZuulLiteError(Exception):
    pass


class ConfigError(ZuulLiteError):
    pass


class InboxError(ZuulLiteError):
    """Bad input to the local inbox: malformed mbox, empty series, unknown project."""


class ReviewSystemError(ZuulLiteError):
    """A review system outside ZooKeeper (Gerrit, Patchwork) did not answer or
    refused a request. While reporting, the item stays and the report is tried
    again later: a vote is never dropped because the review system was away."""


class MergeError(ZuulLiteError):
    """A series does not apply; the message names the failing patch."""


class EnqueueRefused(ZuulLiteError):
    """A change that does not enter a pipeline; `report` when its author must
    be told (a Depends-On cycle or a missing change), not for the ordinary
    cases (already queued, no jobs)."""

    def __init__(self, message: str, report: bool = False) -> None:
        super().__init__(message)
        self.report = report
