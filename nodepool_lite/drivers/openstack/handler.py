"""Serving a pool's requests: an image to boot from, and the cloud's quota
(servers, cores, RAM) as well as the pool's `max-servers`."""

from __future__ import annotations

import logging

from nodepool_lite.drivers.base import RequestHandler
from nodepool_lite.drivers.openstack.config import OpenStackPool
from nodepool_lite.drivers.openstack.provider import CLOUD_ERRORS, OpenStackProvider
from nodepool_lite.exceptions import LaunchError
from nodepool_lite.model import Node, NodeState

log = logging.getLogger("nodepool_lite.drivers.openstack.handler")


class OpenStackRequestHandler(RequestHandler):
    provider: OpenStackProvider
    pool: OpenStackPool

    def ready(self, labels: list[str]) -> bool:
        """Labels booted from our diskimage wait for its first upload."""
        zk, name = self.provider.zk, self.provider.provider.name
        images = {self.pool.labels[label].diskimage for label in labels} - {None}
        return all(zk.get_most_recent_upload(image or "", name) for image in images)

    def has_capacity(self, labels: list[str], used: int) -> bool:
        if not super().has_capacity(labels, used):
            return False
        try:
            return self._within_quota(labels) and self._within_pool_limits(labels)
        except (*CLOUD_ERRORS, LaunchError) as error:
            # The cloud cannot tell: let the launch try, and fail with its reason.
            log.warning("Quota of cloud %s unknown: %s", self.provider.provider.cloud, error)
            return True

    def _within_pool_limits(self, labels: list[str]) -> bool:
        """The pool's own `max-cores` and `max-ram` over its nodes and `labels`."""
        if self.pool.max_cores is None and self.pool.max_ram is None:
            return True
        mine = [n.type for n in self.provider.pool_nodes(self.pool)]
        flavors = [self.provider.flavor(self.pool.labels[name]) for name in [*labels, *mine]]
        return (
            self.pool.max_cores is None or sum(f.vcpus for f in flavors) <= self.pool.max_cores
        ) and (self.pool.max_ram is None or sum(f.ram for f in flavors) <= self.pool.max_ram)

    def _within_quota(self, labels: list[str]) -> bool:
        """The cloud's absolute limits (-1: unlimited) against its usage, our
        servers not yet created there, and what `labels` would add."""
        limits = self.provider.conn.compute.get_limits().absolute
        pending = [
            n.type
            for n in self.provider.pool_nodes(self.pool)
            if n.state == NodeState.BUILDING and not n.external_id
        ]
        flavors = [self.provider.flavor(self.pool.labels[name]) for name in [*labels, *pending]]
        checks = [
            ("instances", limits.instances, limits.instances_used, len(flavors)),
            ("cores", limits.total_cores, limits.total_cores_used, sum(f.vcpus for f in flavors)),
            ("ram", limits.total_ram, limits.total_ram_used, sum(f.ram for f in flavors)),
        ]
        for what, limit, in_use, wanted in checks:
            if limit is not None and limit >= 0 and (in_use or 0) + wanted > limit:
                log.debug("Cloud %s quota of %s is full", self.provider.provider.cloud, what)
                return False
        return True

    def launch(self, node: Node) -> None:
        self.provider.launch(node, self.pool)
