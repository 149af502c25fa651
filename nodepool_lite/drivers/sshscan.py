"""Reading a node's ssh host key over the network (Nodepool's nodescan), for
drivers that do not make the key themselves (static hosts, cloud servers)."""

from __future__ import annotations

import paramiko


def scan_host_key(host: str, port: int, timeout: float = 10.0) -> str:
    """The ssh host key `host:port` offers, as "type base64" (known_hosts).
    Raises OSError or paramiko.SSHException when nothing answers ssh."""
    transport = paramiko.Transport((host, port))
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    finally:
        transport.close()
