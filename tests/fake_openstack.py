"""An OpenStack cloud answered at the HTTP level, so openstacksdk's real code
runs against it: Keystone v3 (token with the catalog of openstacksdk's
ConnectionFixture), Nova (servers, flavors, limits, keypairs) and Glance
(images), with bodies as the OpenStack API reference documents them.

One set of handlers, two transports: `install()` answers through
requests-mock in the test's process; `serve()` answers over real HTTP on
127.0.0.1, so another process (a launcher to kill -9) can reach it too. Every
service lives under the cloud's base URL as `<base>/<service type>`, which
the Keystone catalog names.

Servers go BUILD -> (the next entry of `boot_statuses`, default ACTIVE) on
their first GET, as a cloud that takes one poll to boot; with `boot_held`
they stay BUILD (`build_polled` fires when a BUILD server is polled).
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import requests_mock
from openstack.fixture.connection import ConnectionFixture

MOCKED_BASE = "https://cloud.example.com"  # requests-mock's; serve() uses the served URL


def clouds_yaml(path: Path, base: str = MOCKED_BASE, cloud: str = "fake") -> Path:
    path.write_text(
        f"clouds:\n  {cloud}:\n    region_name: RegionOne\n    auth:\n"
        f"      auth_url: {base}/identity\n      username: zuul\n      password: secret\n"
        "      project_name: ci\n      user_domain_name: default\n"
        "      project_domain_name: default\n"
    )
    return path


class _Catalog(ConnectionFixture):
    """ConnectionFixture's token, every endpoint under `base` (the
    fixture's own templates name fixed example.com hosts)."""

    def __init__(self, base: str, project_id: str | None):
        super().__init__(project_id=project_id)
        self._endpoint_templates = dict.fromkeys(
            ("public", "internal", "admin"), base + "/{service_type}"
        )
        self.build_tokens()


@dataclass
class Call:
    """One request to the cloud, as either transport received it."""

    method: str
    url: str
    body: bytes = b""

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.url).path

    @property
    def qs(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.url).query)

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class Reply:
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: object = None

    @property
    def data(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


@dataclass
class FakeCloud:
    """The cloud's state; tests read and change it directly."""

    address: str = "127.0.0.1"
    base: str = MOCKED_BASE
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
    boot_held: bool = False  # servers stay BUILD
    build_polled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.fixture = _Catalog(self.base, None)
        self._http: ThreadingHTTPServer | None = None

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

    # -- transports ----------------------------------------------------------

    def install(self, mocker: requests_mock.Mocker) -> None:
        """Answer the requests of this process through requests-mock."""
        mocker.register_uri(
            requests_mock.ANY, re.compile(re.escape(self.base) + "/"), content=self._mocked
        )

    def _mocked(self, request, context) -> bytes:
        body = request.body.read() if hasattr(request.body, "read") else request.body
        reply = self.answer(Call(request.method, request.url, _bytes(body)))
        if reply is None:
            raise requests.exceptions.ConnectionError("Connection refused")
        context.status_code = reply.status_code
        context.headers.update(reply.headers)
        return reply.data

    def serve(self) -> str:
        """Answer over HTTP on 127.0.0.1 (any process); returns the new base URL."""
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._http.server_address[1]}"
        self.fixture = _Catalog(self.base, self.fixture.project_id)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self.base

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def answer(self, request: Call) -> Reply | None:
        """The reply to `request`; None: the connection is refused."""
        service, _, path = request.path.removeprefix("/").partition("/")
        route = {"identity": self._keystone, "compute": self._nova, "image": self._glance}
        context = Reply(headers={"Content-Type": "application/json"})
        if service != "identity" and self.down:
            return None
        with self.lock:
            context.body = route.get(service, self._unknown)(request, context, f"/{path}")
        return context

    def _keystone(self, request: Call, context: Reply, path: str):
        if path.rstrip("/") == "" and request.method == "GET":
            return self._versions("identity", "v3")
        if path == "/v3/auth/tokens" and request.method == "POST":
            context.status_code = 201
            context.headers["X-Subject-Token"] = uuid.uuid4().hex
            return self.fixture.v3_token
        return self._unknown(request, context, path)

    def _versions(self, service: str, version: str) -> dict:
        """The version document of `service` (its links under the base)."""
        href = f"{self.base}/{service}/{version}/"
        if service == "identity":
            media = {"base": "application/json",
                     "type": "application/vnd.openstack.identity-v3+json"}  # fmt: skip
            value = {"id": "v3.14", "status": "stable", "media-types": [media]}
            return {"versions": {"values": [{**value, "links": [{"href": href, "rel": "self"}]}]}}
        if service == "compute":
            return {
                "version": {"id": "v2.1", "status": "CURRENT", "version": "2.79",
                            "min_version": "2.1", "links": [{"href": href, "rel": "self"}]}
            }  # fmt: skip
        return {"versions": [{"id": "v2.9", "status": "CURRENT",
                              "links": [{"href": href, "rel": "self"}]}]}  # fmt: skip

    def _nova(self, request: Call, context: Reply, path: str):
        path = path.removeprefix("/v2.1").rstrip("/")
        method = request.method
        if path == "" and method == "GET":
            return self._versions("compute", "v2.1")
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
                self.build_polled.set()
            if server["status"] == "BUILD" and not self.boot_held:
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
        return self._unknown(request, context, path)

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

    def _glance(self, request: Call, context: Reply, path: str):
        path = path.rstrip("/")
        method = request.method
        if path == "" and method == "GET":
            context.status_code = 300
            return self._versions("image", "v2")
        if path == "/v2/images" and method == "GET":
            names = request.qs.get("name")
            return {"images": [i for i in self.images.values() if not names or i["name"] in names]}
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
                self.image_data[match[1]] = request.body
                image["status"] = "active"
                context.status_code = 204
                return None
            if method == "DELETE":
                del self.images[match[1]]
                context.status_code = 204
                return None
            return image
        return self._unknown(request, context, path)

    def _unknown(self, request: Call, context: Reply, path: str):
        self.unknown.append(f"{request.method} {request.url}")
        context.status_code = 404
        return {"error": {"message": "not answered by the fake", "code": 404}}


def _bytes(body: bytes | str | None) -> bytes:
    return body.encode() if isinstance(body, str) else body or b""


def _handler(cloud: FakeCloud) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a cloud's API answers

        def log_message(self, *args) -> None:  # the test log has the client's side
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            reply = cloud.answer(Call(self.command, cloud.base + self.path, body))
            if reply is None:
                self.close_connection = True  # no answer: as a refused connection
                return
            data = reply.data
            self.send_response(reply.status_code)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 (http.server's names)

    return Handler


def image_json(name: str, **extra) -> dict:
    return {"id": str(uuid.uuid4()), "name": name, "status": "active", **extra}
