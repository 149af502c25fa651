"""Errors nodepool_lite raises; kazoo's own exceptions never leave zk.py."""


class NodepoolError(Exception):
    """Base class: the message is one sentence a user can act on."""


class ZooKeeperServerError(NodepoolError):
    pass


class ZKError(NodepoolError):
    """A ZooKeeper operation failed (connection lost, bad version, ...)."""


class NoNodeError(ZKError):
    pass


class NodeExistsError(ZKError):
    pass


class BadVersionError(ZKError):
    pass


class LockError(ZKError):
    """A lock could not be taken (held by someone else, or timed out)."""


class ConfigError(NodepoolError):
    pass


class TLSError(NodepoolError):
    """A certificate, key or CA file is missing, unreadable or not what it should be."""


class LaunchError(NodepoolError):
    """A node could not be booted."""


class InvalidStateError(NodepoolError):
    """A model object was asked to make a state transition it does not allow."""
