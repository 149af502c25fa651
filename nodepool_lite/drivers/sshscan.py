"""Reading a node's ssh host key over the network (Nodepool's nodescan), for
drivers that do not make the key themselves (static hosts, cloud servers),
and an ssh client that trusts only the host key a node record gives."""

from __future__ import annotations

import base64

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


def node_client(host: str, port: int, host_key: str) -> paramiko.SSHClient:
    """An SSHClient, not yet connected, that accepts only `host_key` ("type
    base64", as a node record holds it) for `host:port`."""
    kind, blob = host_key.split()[:2]
    client = paramiko.SSHClient()
    key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    client.get_host_keys().add(f"[{host}]:{port}", kind, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client
