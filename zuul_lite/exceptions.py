"""Errors the scheduler side raises; each message is one sentence for a user."""


class ZuulLiteError(Exception):
    pass


class ConfigError(ZuulLiteError):
    pass


class InboxError(ZuulLiteError):
    """Bad input to the local inbox: malformed mbox, empty series, unknown project."""


class MergeError(ZuulLiteError):
    """A series does not apply; the message names the failing patch."""
