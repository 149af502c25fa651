"""The driver interface, in Nodepool's shape (nodepool/driver/__init__.py).

A driver brings these, and the launcher and `config.py` know nothing
else about it:

- `Driver`: its name, the voluptuous schema of a `providers:` entry of its
  kind (the common keys below plus its own), and `load()` turning the
  validated entry into its `ProviderConfig`;
- `Provider`: turns a Node record into a running machine and back into
  nothing, and says what it runs (for reconciliation after a crash; what
  ZooKeeper knows no node of, the Driver lists without a running provider);
- `ImageUploader` (optional): how the builder uploads image builds to it;
- `RequestHandler`: one per pool, what the pool worker asks before and while
  serving a request (does the pool offer the labels, are they ready, is there
  room, launch one node).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import voluptuous as v

from nodepool_lite.exceptions import NodepoolError
from nodepool_lite.model import Node
from nodepool_lite.zk import ZooKeeper


def common_label(extra: dict) -> dict:
    """A pool's label entry: its name (declared under top-level `labels:`)."""
    return {v.Required("name"): str, **extra}


def common_pool(labels: dict, extra: dict) -> dict:
    return {
        v.Required("name"): str,
        v.Optional("max-servers", default=1): v.All(int, v.Range(min=0)),
        v.Optional("labels", default=list): [labels],
        **extra,
    }


def common_provider(pools: dict, extra: dict) -> dict:
    return {
        v.Required("name"): str,
        v.Required("driver"): str,
        v.Required("pools"): [pools],
        # Boots of one node before its pool declines the request (another
        # pool offering the label may then serve it).
        v.Optional("launch-retries", default=3): v.All(int, v.Range(min=1)),
        **extra,
    }


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    name: str
    diskimage: str | None = None  # checked against `diskimages:` by config.py


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    name: str
    max_servers: int
    labels: dict[str, LabelConfig] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    name: str
    driver: str
    pools: list[PoolConfig]
    launch_retries: int = 3


class Driver(ABC):
    """One kind of provider; looked up by name in drivers/registry.py."""

    name: ClassVar[str]

    @abstractmethod
    def schema(self) -> v.Schema:
        """The whole `providers:` entry: common keys plus the driver's own."""

    @abstractmethod
    def load(self, data: dict[str, Any], config: Any) -> ProviderConfig:
        """The validated entry as objects; `config` is the whole (top-level)
        validated file, for checks across sections. Raises v.Invalid with a
        path relative to the entry."""

    @abstractmethod
    def provider(self, config: ProviderConfig, state_dir: Path, zk: ZooKeeper) -> Provider:
        """The running provider for `config`."""

    def alien_servers(
        self, config: ProviderConfig, state_dir: Path, known: set[str]
    ) -> list[tuple[str, str]]:
        """(id, name) of what the provider runs that ZooKeeper does not know
        as one of its nodes, as Nodepool's alien-list: `known` holds the id of
        every node record, `state_dir` is the one `provider()` gets. Listed
        for the operator (`nodepool alien-list`), never touched: this is
        asked without a running provider, maybe beside a running launcher.
        Raises NodepoolError (one sentence) when the provider cannot be asked."""
        return []

    def uploader(self, config: ProviderConfig) -> ImageUploader | None:
        """How the builder puts image builds into this provider; None for
        drivers that boot from the builds on the local disk."""
        return None


def node_dirs(nodes_dir: Path) -> dict[str, list[int]]:
    """Node id -> [] for each node directory `<nodes_dir>/<id>` (dot names are
    the driver's own); a driver adds the pids it finds running each node."""
    if not nodes_dir.is_dir():
        return {}
    return {p.name: [] for p in nodes_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}


def local_aliens(
    find: Callable[[Path], dict[str, list[int]]], nodes_dir: Path, known: set[str]
) -> list[tuple[str, str]]:
    """alien_servers() of a driver whose node `<id>` is `<nodes_dir>/<id>` and
    what runs from it on this host, found by `find` (the discovery its
    provider's leak cleanup uses): those ZooKeeper has no record of, named
    `np-<id>` (the machine name the driver gives) while something runs, else
    by the directory left."""
    try:
        found = find(nodes_dir)
    except OSError as error:
        raise NodepoolError(f"Cannot list the nodes of {nodes_dir}: {error.strerror}.") from None
    return [
        (node_id, f"np-{node_id}" if pids else str(nodes_dir / node_id))
        for node_id, pids in sorted(found.items())
        if node_id not in known
    ]


class ImageUploader(ABC):
    """The builder's side of a provider that keeps its own copy of images."""

    @abstractmethod
    def upload(self, name: str, path: Path, meta: dict[str, str]) -> str:
        """Upload the image file `path` as `name`; returns the provider's image id."""

    @abstractmethod
    def delete(self, external_id: str) -> None:
        """Delete an uploaded image; fine if it is already gone."""

    def sweep(self, kept: set[tuple[str, str]]) -> list[str]:
        """Delete what uploads that died with their builder left in the
        provider: our copies whose (build id, upload id), from the metadata
        `nodepool_build_id` and `nodepool_upload_id` each upload was given,
        is not in `kept`; what it deleted. Called when the builder starts,
        before any upload of its own runs."""
        return []


class Provider(ABC):
    """One configured provider. Methods are called from several threads."""

    def __init__(self, provider: ProviderConfig, state_dir: Path, zk: ZooKeeper):
        self.provider = provider
        self.state_dir = Path(state_dir)
        self.zk = zk

    @abstractmethod
    def request_handler(self, pool: PoolConfig) -> RequestHandler:
        """What serves `pool`'s requests (one per pool worker)."""

    @abstractmethod
    def cleanup_node(self, node_id: str) -> None:
        """Destroy everything of `node_id`; idempotent, safe on half-built nodes."""

    @abstractmethod
    def node_alive(self, node: Node) -> bool:
        """Does the machine behind `node` still run (used to adopt it on restart)?"""

    def adopt(self, node: Node) -> bool:
        """Take over a node a previous launcher started, if it still runs
        (what the provider keeps in memory for a node is made again here)."""
        return self.node_alive(node)

    @abstractmethod
    def leaked_node_ids(self) -> list[str]:
        """Ids of every node this provider has resources for, known to ZK or not."""


class RequestHandler(ABC):
    """How one pool serves requests; drivers override what differs."""

    def __init__(self, provider: Provider, pool: PoolConfig):
        self.provider = provider
        self.pool = pool
        # Boots of one node before the pool declines its request.
        self.launch_attempts = provider.provider.launch_retries

    def serves(self, labels: list[str]) -> bool:
        """Could this pool ever serve all of `labels` together? False declines."""
        return all(label in self.pool.labels for label in labels) and (
            len(labels) <= self.pool.max_servers
        )

    def ready(self, labels: list[str]) -> bool:
        """Can `labels` be launched now (e.g. their image is built)? A False
        leaves the request queued instead of failing it."""
        return True

    def has_capacity(self, labels: list[str], used: int) -> bool:
        """Room for `labels` beside the pool's `used` nodes; a False makes the
        request (and those behind it) wait."""
        return used + len(labels) <= self.pool.max_servers

    @abstractmethod
    def launch(self, node: Node) -> None:
        """Boot `node` (its id is set) and fill in how to reach it; raise
        LaunchError after cleaning up what was half made."""
