"""Static hosts listed in the pool config (`nodes:`), lent out one request at
a time. Nothing is booted or destroyed: "launch" picks a free host and
"cleanup" hands it back, so a static host is the one kind of node that is
reused; the operator owns what happens to its state between builds.
"""

from __future__ import annotations

import logging
import threading

import paramiko

from nodepool_lite.drivers.base import Provider, RequestHandler
from nodepool_lite.drivers.sshscan import scan_host_key
from nodepool_lite.drivers.static.config import StaticNode, StaticPool
from nodepool_lite.exceptions import LaunchError
from nodepool_lite.model import Node

log = logging.getLogger("nodepool_lite.drivers.static")


class StaticProvider(Provider):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def request_handler(self, pool: StaticPool) -> RequestHandler:  # type: ignore[override]
        return StaticRequestHandler(self, pool)

    def free_hosts(self, pool: StaticPool, exclude: str | None = None) -> list[StaticNode]:
        busy = {
            n.external_id
            for n in self.zk.nodes()
            if n.provider == self.provider.name and n.id != exclude
        }
        return [h for h in pool.nodes if h.name not in busy]

    def launch(self, node: Node, pool: StaticPool) -> None:
        with self._lock:
            free = self.free_hosts(pool, exclude=node.id)
            host = next((h for h in free if node.type in h.labels), None)
            if host is None:
                raise LaunchError(f"No free static host offers label {node.type}.")
            node.external_id = host.name
            self.zk.store_node(node)  # claims the host before the lock is released
        try:
            host_key = host.host_key or scan_host_key(host.name, host.connection_port)
        except (OSError, paramiko.SSHException) as error:
            raise LaunchError(f"Static host {host.name}: no ssh host key ({error}).") from None
        node.interface_ip = host.name
        node.connection_port = host.connection_port
        node.username = host.username
        node.host_keys = [host_key]

    def cleanup_node(self, node_id: str) -> None:
        log.info("Static node %s returned", node_id)

    def node_alive(self, node: Node) -> bool:
        return True

    def leaked_node_ids(self) -> list[str]:
        return []


class StaticRequestHandler(RequestHandler):
    provider: StaticProvider
    pool: StaticPool

    def ready(self, labels: list[str]) -> bool:
        """Keep requests queued while every matching host is lent out."""
        free = self.provider.free_hosts(self.pool)
        for label in labels:
            host = next((h for h in free if label in h.labels), None)
            if host is None:
                return False
            free.remove(host)
        return True

    def launch(self, node: Node) -> None:
        self.provider.launch(node, self.pool)
