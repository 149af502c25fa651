"""Servers of one OpenStack cloud as nodes, through openstacksdk.

A node is a server named `<label>-<provider>-<node id>` carrying our
metadata (`nodepool_node_id`, `nodepool_provider_name`, `nodepool_pool_name`,
`nodepool_node_label`): that metadata, not anything we remember, is how a
restarted launcher finds its servers, tells leaked ones (ours, unknown to
ZooKeeper) from aliens (not ours, never touched), and deletes a node.

Booting: the launcher's public key as a keypair, a config drive, wait for
ACTIVE, then for sshd on the server's address, whose host key is read over
ssh (Nodepool's nodescan) and stored in the node record for zuul-launcher.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import openstack
import paramiko
from keystoneauth1 import exceptions as ksa_exc
from openstack import exceptions as os_exc
from openstack.config import loader

from nodepool_lite.drivers import ensure_keypair
from nodepool_lite.drivers.base import Provider, RequestHandler
from nodepool_lite.drivers.openstack.config import (
    OpenStackLabel,
    OpenStackPool,
    OpenStackProviderConfig,
)
from nodepool_lite.drivers.sshscan import scan_host_key
from nodepool_lite.exceptions import LaunchError, NodepoolError
from nodepool_lite.model import Node
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.drivers.openstack")

META_NODE = "nodepool_node_id"
META_PROVIDER = "nodepool_provider_name"
META_POOL = "nodepool_pool_name"
META_LABEL = "nodepool_node_label"
DELETE_TIMEOUT = 600.0
LEAK_SCAN_INTERVAL = 60.0
# What a cloud call raises: the API's errors, and keystoneauth's (connection
# refused, timeouts, authentication) which openstacksdk lets through.
CLOUD_ERRORS = (os_exc.SDKException, ksa_exc.ClientException)


class OpenStackProvider(Provider):
    provider: OpenStackProviderConfig

    # Seconds between status polls (servers ACTIVE / gone, sshd up); the API
    # gives no push notification to wait on.
    poll_interval = 2.0

    def __init__(self, provider: OpenStackProviderConfig, state_dir: Path, zk: ZooKeeper):
        super().__init__(provider, state_dir, zk)
        self.public_key = Path(f"{ensure_keypair(self.state_dir)}.pub").read_text().strip()
        self._conn: openstack.connection.Connection | None = None
        self._lock = threading.Lock()
        self._keypair_ready = False
        self._flavors: dict[str, object] = {}
        self._leak_scan = -LEAK_SCAN_INTERVAL

    @property
    def conn(self) -> openstack.connection.Connection:
        """Connected on first use, so a cloud that is down does not stop the
        launcher from starting (its requests wait or fail with the reason)."""
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.provider)
            return self._conn

    def request_handler(self, pool: OpenStackPool) -> RequestHandler:  # type: ignore[override]
        from nodepool_lite.drivers.openstack.handler import OpenStackRequestHandler

        return OpenStackRequestHandler(self, pool)

    # What the cloud runs -------------------------------------------------

    def servers(self) -> list:
        try:
            return list(self.conn.compute.servers(details=True))
        except CLOUD_ERRORS as error:
            raise NodepoolError(
                f"Cloud {self.provider.cloud}: cannot list servers ({error})."
            ) from None

    def _servers_of(self, node_id: str) -> list:
        return [
            s
            for s in self.servers()
            if is_ours(s, self.provider.name) and s.metadata.get(META_NODE) == node_id
        ]

    def leaked_node_ids(self) -> list[str]:
        """Node ids of our servers, listed at most every LEAK_SCAN_INTERVAL:
        the cleanup worker asks on every ZooKeeper change, a cloud API is slow
        and rate limited (Nodepool's leak cleanup runs on an interval too)."""
        with self._lock:
            if time.monotonic() - self._leak_scan < LEAK_SCAN_INTERVAL:
                return []
            self._leak_scan = time.monotonic()
        name = self.provider.name
        return sorted({s.metadata[META_NODE] for s in self.servers() if is_ours(s, name)})

    def node_alive(self, node: Node) -> bool:
        return any(s.status not in ("ERROR", "DELETED") for s in self._servers_of(node.id or ""))

    # Sizes and images ----------------------------------------------------

    def flavor(self, label: OpenStackLabel):
        """`flavor-name`, or the smallest flavor with at least `min-ram` MiB."""
        with self._lock:
            if label.name in self._flavors:
                return self._flavors[label.name]
        flavors = list(self.conn.compute.flavors(details=True))
        if label.flavor_name:
            found = [f for f in flavors if label.flavor_name in (f.name, f.id)]
        else:
            found = sorted(
                (f for f in flavors if f.ram >= (label.min_ram or 0)),
                key=lambda f: (f.ram, f.vcpus, f.name),
            )
        if not found:
            want = label.flavor_name or f"at least {label.min_ram} MiB of RAM"
            raise LaunchError(f"Cloud {self.provider.cloud} has no flavor {want}.")
        with self._lock:
            self._flavors[label.name] = found[0]
        return found[0]

    def image_id(self, label: OpenStackLabel) -> tuple[str, str | None]:
        """(Glance image id, "<image>-<build id>" for uploads of our builds)."""
        if label.diskimage:
            upload = self.zk.get_most_recent_upload(label.diskimage, self.provider.name)
            if upload is None or not upload.external_id:
                raise LaunchError(f"No ready upload of image {label.diskimage}.")
            return upload.external_id, f"{label.diskimage}-{upload.build_id}"
        try:
            image = self.conn.image.find_image(label.cloud_image, ignore_missing=False)
        except os_exc.NotFoundException:
            raise LaunchError(
                f"Cloud {self.provider.cloud} has no image {label.cloud_image}."
            ) from None
        return image.id, None

    def _key_name(self, label: OpenStackLabel) -> str:
        """The label's keypair, or ours (registered once, kept across restarts)."""
        if label.key_name:
            return label.key_name
        name = f"zuul-lite-{self.provider.name}"
        if not self._keypair_ready:
            try:
                self.conn.compute.get_keypair(name)
            except os_exc.NotFoundException:
                log.info("Registering keypair %s in cloud %s", name, self.provider.cloud)
                self.conn.compute.create_keypair(name=name, public_key=self.public_key)
            self._keypair_ready = True
        return name

    # Launch and delete ---------------------------------------------------

    def launch(self, node: Node, pool: OpenStackPool) -> None:
        assert node.id is not None
        label = pool.labels[node.type]
        start = time.monotonic()
        try:
            server = self._create(node, pool, label)
        except CLOUD_ERRORS as error:
            raise LaunchError(f"Node {node.id}: cannot create its server ({error}).") from None
        node.external_id = server.id
        self.zk.store_node(node)  # a crash from here on leaves a findable server
        try:
            self._boot(node, label, server, start)
        except Exception:
            self.cleanup_node(node.id)
            raise
        log.info(
            "Node %s (%s) ready at %s (server %s) in %.1fs",
            node.id, node.type, node.interface_ip, server.id, time.monotonic() - start,
        )  # fmt: skip

    def _create(self, node: Node, pool: OpenStackPool, label: OpenStackLabel):
        image_id, image_build = self.image_id(label)
        node.image_build = image_build
        args: dict = {
            "name": f"{label.name}-{self.provider.name}-{node.id}",
            "flavor_id": self.flavor(label).id,
            "key_name": self._key_name(label),
            "config_drive": True,
            "metadata": {
                META_NODE: node.id,
                META_PROVIDER: self.provider.name,
                META_POOL: pool.name,
                META_LABEL: label.name,
            },
            "networks": [{"uuid": n} for n in pool.networks] or "auto",
        }
        if label.boot_from_volume:
            args["block_device_mapping"] = [
                {
                    "boot_index": 0,
                    "uuid": image_id,
                    "source_type": "image",
                    "destination_type": "volume",
                    "volume_size": label.volume_size,
                    "delete_on_termination": True,
                }
            ]
        else:
            args["image_id"] = image_id
        return self.conn.compute.create_server(**args)

    def _boot(self, node: Node, label: OpenStackLabel, server, start: float) -> None:
        deadline = start + self.provider.boot_timeout
        try:
            server = self.conn.compute.wait_for_server(
                server,
                status="ACTIVE",
                failures=["ERROR"],
                interval=self.poll_interval,
                wait=max(1.0, deadline - time.monotonic()),
            )
        except os_exc.ResourceFailure:
            raise LaunchError(
                f"Node {node.id}: server {server.id} {self._fault(server)}."
            ) from None
        except os_exc.ResourceTimeout:
            raise LaunchError(
                f"Node {node.id}: server {server.id} not ACTIVE within "
                f"{self.provider.boot_timeout:.0f}s."
            ) from None
        ip = interface_ip(server)
        if ip is None:
            raise LaunchError(f"Node {node.id}: server {server.id} has no IP address.")
        node.interface_ip = ip
        node.connection_port = label.connection_port
        node.username = label.username
        node.host_keys = [self._host_key(node, deadline)]

    def _fault(self, server) -> str:
        try:
            fault = self.conn.compute.get_server(server.id).fault or {}
        except CLOUD_ERRORS:
            fault = {}
        return f"went to ERROR: {fault.get('message') or 'no fault given'}"

    def _host_key(self, node: Node, deadline: float) -> str:
        """sshd starts after ACTIVE: scan until it answers (Nodepool's nodescan)."""
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return scan_host_key(node.interface_ip or "", node.connection_port, timeout=10)
            except (OSError, paramiko.SSHException) as e:
                error = e
            time.sleep(self.poll_interval)
        raise LaunchError(
            f"Node {node.id}: no ssh on {node.interface_ip}:{node.connection_port} "
            f"within {self.provider.boot_timeout:.0f}s ({error})."
        )

    def cleanup_node(self, node_id: str) -> None:
        """Delete every server of `node_id` and wait until the cloud lists none."""
        servers = self._servers_of(node_id)
        try:
            for server in servers:
                self.conn.compute.delete_server(server, ignore_missing=True)
            for server in servers:
                self.conn.compute.wait_for_delete(
                    server, interval=self.poll_interval, wait=DELETE_TIMEOUT
                )
        except os_exc.ResourceTimeout:
            raise LaunchError(
                f"Node {node_id}: a server still there after {DELETE_TIMEOUT:.0f}s."
            ) from None
        except CLOUD_ERRORS as error:
            raise LaunchError(f"Node {node_id}: cannot delete its server ({error}).") from None
        log.info("Node %s: %d server(s) deleted", node_id, len(servers))

    def pool_nodes(self, pool: OpenStackPool) -> list[Node]:
        """This pool's nodes in ZooKeeper: what it has, or is about to have,
        in the cloud (one not yet created has no `external_id`)."""
        return [
            n for n in self.zk.nodes() if n.provider == self.provider.name and n.pool == pool.name
        ]


def is_ours(server, provider: str) -> bool:
    """A server of `provider` (by our metadata), with a node id."""
    meta = server.metadata or {}
    return meta.get(META_PROVIDER) == provider and bool(meta.get(META_NODE))


def connect(provider: OpenStackProviderConfig) -> openstack.connection.Connection:
    """A connection to the provider's cloud and region, as clouds.yaml says."""
    region = loader.OpenStackConfig().get_one(
        cloud=provider.cloud, region_name=provider.region_name
    )
    return openstack.connection.Connection(config=region)


def interface_ip(server) -> str | None:
    """The address to reach the server at: its access IPv4, else a floating
    then a fixed IPv4 address (Nodepool's interface_ip)."""
    if server.access_ipv4:
        return server.access_ipv4
    addresses = [a for net in (server.addresses or {}).values() for a in net]
    for kind in ("floating", "fixed", None):
        for address in addresses:
            if address.get("version", 4) == 4 and address.get("OS-EXT-IPS:type") == kind:
                return address["addr"]
    return None
