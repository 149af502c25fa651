"""An OpenStack cloud answered at the HTTP level, so openstacksdk's real code
runs against it: Keystone v3 (token with the catalog of openstacksdk's
ConnectionFixture), Nova (servers, flavors, limits, keypairs) and Glance
(images), with bodies as the OpenStack API reference documents them.

Servers go BUILD -> (the next entry of `boot_statuses`, default ACTIVE) on
their first GET, as a cloud that takes one poll to boot.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
import requests_mock
from openstack.fixture.connection import ConnectionFixture

IDENTITY = "https://identity.example.com"
COMPUTE = "https://compute.example.com/v2.1"
IMAGE = "https://image.example.com"

_IDENTITY_VERSIONS = {
    "versions": {
        "values": [
            {
                "id": "v3.14",
                "status": "stable",
                "links": [{"href": f"{IDENTITY}/v3/", "rel": "self"}],
                "media-types": [
                    {
                        "base": "application/json",
                        "type": "application/vnd.openstack.identity-v3+json",
                    }
                ],
            }
        ]
    }
}
_COMPUTE_VERSION = {
    "version": {
        "id": "v2.1",
        "status": "CURRENT",
        "version": "2.79",
        "min_version": "2.1",
        "links": [{"href": f"{COMPUTE}/", "rel": "self"}],
    }
}
_IMAGE_VERSIONS = {
    "versions": [
        {"id": "v2.9", "status": "CURRENT", "links": [{"href": f"{IMAGE}/v2/", "rel": "self"}]}
    ]
}


def clouds_yaml(path: Path, cloud: str = "fake") -> Path:
    path.write_text(
        f"clouds:\n  {cloud}:\n    region_name: RegionOne\n    auth:\n"
        f"      auth_url: {IDENTITY}\n      username: zuul\n      password: secret\n"
        "      project_name: ci\n      user_domain_name: default\n"
        "      project_domain_name: default\n"
    )
    return path


@dataclass
class FakeCloud:
    """The cloud's state; tests read and change it directly."""

    address: str = "127.0.0.1"
    boot_statuses: list[str] = field(default_factory=list)  # per created server, in order
    fault: str = "No valid host was found. There are not enough hosts available."
    max_instances: int = 10
    max_cores: int = 20
    max_ram: int = 51200
    servers: dict[str, dict] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)
    image_data: dict[str, bytes] = field(default_factory=dict)
    keypairs: dict[str, dict] = field(default_factory=dict)
    flavors: list[dict] = field(
        default_factory=lambda: [
            {"id": "f1", "name": "small", "ram": 2048, "vcpus": 1, "disk": 20},
            {"id": "f2", "name": "large", "ram": 8192, "vcpus": 4, "disk": 80},
        ]
    )
    created: list[dict] = field(default_factory=list)  # create bodies, in order
    deleted: list[str] = field(default_factory=list)
    limits_asked: threading.Event = field(default_factory=threading.Event)
    unknown: list[str] = field(default_factory=list)  # requests no route answered
    down: bool = False  # Nova and Glance refuse connections

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.fixture = ConnectionFixture()

    def add_server(self, name: str, metadata: dict | None = None, status: str = "ACTIVE") -> str:
        server_id = str(uuid.uuid4())
        self.servers[server_id] = self._server(server_id, name, metadata or {}, status, "f1")
        return server_id

    def _server(self, server_id: str, name: str, metadata: dict, status: str, flavor: str):
        return {
            "id": server_id,
            "name": name,
            "status": status,
            "metadata": metadata,
            "flavor": {"id": flavor},
            "addresses": {
                "private": [{"addr": self.address, "version": 4, "OS-EXT-IPS:type": "fixed"}]
            },
            "accessIPv4": "",
            "accessIPv6": "",
            "links": [],
            "tenant_id": self.fixture.project_id,
        }

    # -- requests_mock -----------------------------------------------------

    def install(self, mocker: requests_mock.Mocker) -> None:
        mocker.get(f"{IDENTITY}/", json=_IDENTITY_VERSIONS)
        mocker.post(
            f"{IDENTITY}/v3/auth/tokens",
            json=self.fixture.v3_token,
            headers={"X-Subject-Token": uuid.uuid4().hex},
            status_code=201,
        )
        nova, glance = re.compile(r"https://compute\.example\.com/"), re.compile(IMAGE + "/")
        for method in ("GET", "POST", "PUT", "DELETE"):
            mocker.register_uri(method, nova, json=self._nova)
            mocker.register_uri(method, glance, json=self._glance)

    def _nova(self, request, context):
        if self.down:
            raise requests.exceptions.ConnectionError("Connection refused")
        path = request.path.removeprefix("/v2.1").rstrip("/")
        with self.lock:
            return self._route_nova(request, context, path)

    def _route_nova(self, request, context, path: str):
        method = request.method
        if path == "" and method == "GET":
            return _COMPUTE_VERSION
        if path == "/servers" and method == "POST":
            return self._create(request.json()["server"], context)
        if path == "/servers/detail" and method == "GET":
            return {"servers": list(self.servers.values())}
        match = re.fullmatch(r"/servers/([^/]+)", path)
        if match:
            server = self.servers.get(match[1])
            if server is None:
                context.status_code = 404
                return {"itemNotFound": {"code": 404, "message": "Instance could not be found"}}
            if method == "DELETE":
                del self.servers[match[1]]
                self.deleted.append(match[1])
                context.status_code = 204
                return None
            if server["status"] == "BUILD":
                server["status"] = self.boot_statuses.pop(0) if self.boot_statuses else "ACTIVE"
                if server["status"] == "ERROR":
                    server["fault"] = {"code": 500, "message": self.fault}
            return {"server": server}
        if path == "/flavors/detail":
            return {"flavors": self.flavors}
        if path == "/limits":
            self.limits_asked.set()
            return {"limits": {"rate": [], "absolute": self._absolute()}}
        if path == "/os-keypairs" and method == "POST":
            keypair = request.json()["keypair"]
            self.keypairs[keypair["name"]] = {**keypair, "type": "ssh", "fingerprint": "x"}
            return {"keypair": self.keypairs[keypair["name"]]}
        match = re.fullmatch(r"/os-keypairs/([^/]+)", path)
        if match and method == "GET":
            if match[1] not in self.keypairs:
                context.status_code = 404
                return {"itemNotFound": {"code": 404, "message": "Keypair not found"}}
            return {"keypair": self.keypairs[match[1]]}
        return self._unknown(request, context)

    def _create(self, body: dict, context) -> dict:
        self.created.append(body)
        server_id = str(uuid.uuid4())
        flavor = body["flavorRef"]
        self.servers[server_id] = self._server(
            server_id, body["name"], body.get("metadata", {}), "BUILD", flavor
        )
        context.status_code = 202
        return {"server": {"id": server_id, "links": [], "adminPass": "x"}}

    def _absolute(self) -> dict:
        sizes = {f["id"]: f for f in self.flavors}
        used = [sizes[s["flavor"]["id"]] for s in self.servers.values()]
        return {
            "maxTotalInstances": self.max_instances,
            "totalInstancesUsed": len(used),
            "maxTotalCores": self.max_cores,
            "totalCoresUsed": sum(f["vcpus"] for f in used),
            "maxTotalRAMSize": self.max_ram,
            "totalRAMUsed": sum(f["ram"] for f in used),
        }

    def _glance(self, request, context):
        with self.lock:
            return self._route_glance(request, context, request.path.rstrip("/"))

    def _route_glance(self, request, context, path: str):
        method = request.method
        if path == "" and method == "GET":
            context.status_code = 300
            return _IMAGE_VERSIONS
        if path == "/v2/images" and method == "GET":
            names = request.qs.get("name")
            return {
                "images": [
                    i for i in self.images.values() if not names or i["name"].lower() in names
                ]
            }
        if path == "/v2/images" and method == "POST":
            body = request.json()
            image_id = str(uuid.uuid4())
            self.images[image_id] = {**body, "id": image_id, "status": "queued"}
            context.status_code = 201
            return self.images[image_id]
        match = re.fullmatch(r"/v2/images/([^/]+)(/file)?", path)
        if match:
            image = self.images.get(match[1])
            if image is None:
                context.status_code = 404
                return None
            if match[2] and method == "PUT":
                body = request.body
                self.image_data[match[1]] = body.read() if hasattr(body, "read") else body or b""
                image["status"] = "active"
                context.status_code = 204
                return None
            if method == "DELETE":
                del self.images[match[1]]
                context.status_code = 204
                return None
            return image
        return self._unknown(request, context)

    def _unknown(self, request, context):
        self.unknown.append(f"{request.method} {request.url}")
        context.status_code = 404
        return {"error": {"message": "not answered by the fake", "code": 404}}


def image_json(name: str, **extra) -> dict:
    return {"id": str(uuid.uuid4()), "name": name, "status": "active", **extra}
