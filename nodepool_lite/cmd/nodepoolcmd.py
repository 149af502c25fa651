"""`nodepool`: the two daemons (launcher, builder) and the operator commands.

The commands reach the daemons only through ZooKeeper, as in Nodepool:
`image-build` writes a build request, `delete` marks a node `deleting`, `hold`
marks it `hold`. Every error a user can cause is one sentence on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from nodepool_lite import config as npconfig
from nodepool_lite.exceptions import LockError, NodepoolError
from nodepool_lite.model import BuildState, NodeState
from nodepool_lite.signals import Signals
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.cmd")

DEFAULT_CONFIG = os.environ.get("NODEPOOL_CONFIG", "/etc/zuul-lite/nodepool.yaml")


def _default_config() -> str:
    repo_etc = Path(__file__).resolve().parents[2] / "etc" / "nodepool.yaml"
    if not Path(DEFAULT_CONFIG).exists() and repo_etc.exists():
        return str(repo_etc)
    return DEFAULT_CONFIG


def setup_logging(args: argparse.Namespace) -> None:
    if args.log_config:
        with open(args.log_config) as f:
            logging.config.dictConfig(yaml.safe_load(f))
        return
    daemon = args.command in ("launcher", "builder")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if daemon else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=args.log_file,
    )
    # A user command reports a ZooKeeper it cannot reach in its one sentence.
    logging.getLogger("kazoo").setLevel(logging.WARNING if daemon else logging.CRITICAL)
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]  # fmt: skip
    return "\n".join(lines)


class Commands:
    """One method per subcommand; `zk` connects on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config = npconfig.load(args.config)
        self._zk: ZooKeeper | None = None

    @property
    def zk(self) -> ZooKeeper:
        if self._zk is None:
            self._zk = ZooKeeper(
                self.config.zookeeper_hosts, connect_timeout=10.0, tls=self.config.zookeeper_tls
            )
            self._zk.connect()
        return self._zk

    def close(self) -> None:
        if self._zk is not None:
            self._zk.disconnect()

    # -- daemons ------------------------------------------------------------

    def launcher(self) -> int:
        from nodepool_lite.launcher import NodePool

        signals = Signals(reload=True)
        nodepool = NodePool(self.args.config)
        nodepool.start()
        while signals.wait() == signal.SIGHUP:
            # Restarting is cheap and safe: the new instance adopts the nodes.
            try:
                new = npconfig.load(self.args.config)
            except NodepoolError as error:
                log.error("Keeping the running config: %s", error)
                continue
            log.info("Reloading %s", self.args.config)
            nodepool.stop()
            nodepool.join()
            nodepool = NodePool(new)  # the config just checked, not the file read again
            nodepool.start()
        nodepool.stop()
        nodepool.join()
        return 0

    def builder(self) -> int:
        from nodepool_lite.builder import NodePoolBuilder

        signals = Signals(reload=True)
        builder = NodePoolBuilder(self.config, self.zk)
        builder.start()
        while signals.wait() == signal.SIGHUP:
            try:
                builder.reconfigure(npconfig.load(self.args.config))
            except NodepoolError as error:
                log.error("Keeping the running config: %s", error)
        builder.stop()
        builder.join()
        return 0

    # -- images -------------------------------------------------------------

    def _known_image(self, name: str) -> None:
        if self.config.diskimage(name) is None:
            raise NodepoolError(f"Unknown image {name!r}: no such entry under diskimages.")

    def image_build(self) -> int:
        from nodepool_lite.builder import check_elements, get_diskimage

        name = self.args.image
        self._known_image(name)
        check_elements(self.config, get_diskimage(self.config, name))
        if not self.args.wait:
            self.zk.request_image_build(name)
            print(f"Build of {name} requested; the builder picks it up.")
            return 0
        from nodepool_lite.builder import build_image

        build = build_image(self.config, self.zk, name, progress=print)
        print(f"Build {name}-{build.id}: {build.state.value} (log {build.log_path})")
        return 0 if build.state == BuildState.READY else 1

    def dib_image_list(self) -> int:
        rows = []
        names = sorted(set(self.zk.get_image_names()) | {d.name for d in self.config.diskimages})
        for name in names:
            for b in self.zk.get_image_builds(name):
                rows.append([f"{name}-{b.id}", name, b.builder, ",".join(b.formats),
                             b.state.value, _age(b.state_time), b.path or ""])  # fmt: skip
        print(_table(["ID", "Image", "Builder", "Formats", "State", "Age", "Path"], rows))
        return 0

    def image_list(self) -> int:
        """Which build each provider pool boots its labels from."""
        rows = []
        for provider in self.config.providers:
            for pool in provider.pools:
                for label in pool.labels.values():
                    if label.diskimage is None:
                        continue
                    build = self.zk.get_most_recent_image_build(label.diskimage)
                    rows.append([provider.name, pool.name, label.name, label.diskimage,
                                 f"{label.diskimage}-{build.id}" if build else "(none ready)",
                                 _age(build.state_time) if build else ""])  # fmt: skip
        print(_table(["Provider", "Pool", "Label", "Image", "Build", "Age"], rows))
        uploads = [
            [f"{u.image}-{u.build_id}", u.id, u.provider, u.external_name or "",
             u.external_id or "", u.state.value, _age(u.state_time), u.reason or ""]
            for name in sorted(self.zk.get_image_names())
            for b in self.zk.get_image_builds(name)
            for u in self.zk.get_image_uploads(name, b.id or "")
        ]  # fmt: skip
        if uploads:
            headers = ["Build", "Upload", "Provider", "Provider image", "Provider image id",
                       "State", "Age", "Reason"]  # fmt: skip
            print()
            print(_table(headers, uploads))
        return 0

    def image_delete(self) -> int:
        from nodepool_lite.builder import remove_build

        image, _, build_id = self.args.build.rpartition("-")
        build = self.zk.get_image_build(image, build_id) if image else None
        if build is None:
            raise NodepoolError(f"No image build {self.args.build!r} (see dib-image-list).")
        users = [n.id for n in self.zk.nodes() if n.image_build == self.args.build]
        if users:
            raise NodepoolError(f"Image build {self.args.build} is in use by nodes {users}.")
        uploads = self.zk.get_image_uploads(image, build_id)
        if uploads:
            # Its copies in the providers go first, as retention does it
            # (uploader.py): the builder deletes them, then the build.
            build.state = BuildState.DELETING
            self.zk.store_image_build(image, build)
            where = ", ".join(sorted({u.provider for u in uploads}))
            print(
                f"Image build {self.args.build} is marked for deletion: the builder deletes "
                f"its {len(uploads)} upload(s) ({where}) first, then the build."
            )
            return 0
        remove_build(self.config, self.zk, build)
        print(f"Deleted image build {self.args.build}.")
        return 0

    # -- nodes --------------------------------------------------------------

    def list(self) -> int:
        rows = []
        for n in self.zk.nodes():
            where = f"{n.interface_ip}:{n.connection_port}" if n.interface_ip else ""
            rows.append([n.id, n.type, n.provider, n.state.value, _age(n.state_time), where,
                         n.allocated_to or "", n.comment or ""])  # fmt: skip
        print(_table(["ID", "Label", "Provider", "State", "Age", "Host:Port", "Request",
                      "Comment"], rows))  # fmt: skip
        return 0

    def _change_node(self, node_id: str, state: NodeState, comment: str | None) -> int:
        node = self.zk.get_node(node_id)
        if node is None:
            raise NodepoolError(f"No node {node_id!r} (see nodepool list).")
        try:
            self.zk.lock_node(node, timeout=5)
        except LockError:
            raise NodepoolError(
                f"Node {node_id} is locked by its user; try again later."
            ) from None
        try:
            node.state = state
            if comment is not None:
                node.comment = comment
            self.zk.store_node(node)
        finally:
            self.zk.unlock_node(node)
        print(f"Node {node_id}: {state.value}.")
        return 0

    def delete(self) -> int:
        return self._change_node(self.args.id, NodeState.DELETING, None)

    def hold(self) -> int:
        return self._change_node(self.args.id, NodeState.HOLD, self.args.reason)

    def request_list(self) -> int:
        """Node requests, in the order pool workers serve them."""
        rows = []
        for request_id in sorted(self.zk.node_request_ids()):
            r = self.zk.get_node_request(request_id)
            if r is not None:
                rows.append([r.id, r.state.value, _age(r.state_time), r.requestor,
                             ",".join(r.node_types), ",".join(r.nodes),
                             ",".join(sorted(r.declined_reasons)), r.reason or ""])  # fmt: skip
        headers = ["Request", "State", "Age", "Requestor", "Node types", "Nodes", "Declined by",
                   "Reason"]  # fmt: skip
        print(_table(headers, rows))
        return 0

    def info(self) -> int:
        launchers = self.zk.get_launchers()
        rows = [[name, ", ".join(labels)] for name, labels in launchers.items()]
        print(_table(["Launcher", "Labels"], rows))
        print()
        rows = []
        for request_id in self.zk.node_request_ids():
            r = self.zk.get_node_request(request_id)
            if r is not None:
                rows.append([r.id, r.state.value, ",".join(r.node_types), r.requestor,
                             ",".join(r.nodes), r.reason or ""])  # fmt: skip
        print(_table(["Request", "State", "Node types", "Requestor", "Nodes", "Reason"], rows))
        print()
        counts: dict[str, int] = {}
        for n in self.zk.nodes():
            counts[n.state.value] = counts.get(n.state.value, 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        print(f"Nodes: {summary}")
        print(f"Image build requests: {', '.join(self.zk.get_image_build_requests()) or 'none'}")
        return 0

    def alien_list(self) -> int:
        """What each provider runs that ZooKeeper knows no node of (Nodepool's
        alien-list), never touched. A provider that cannot be asked gets its
        sentence on stderr and exit status 1; the others are still listed."""
        from nodepool_lite.drivers import registry

        # Read before the providers are asked, as Nodepool does: a node
        # launched meanwhile may show up in this one listing.
        known = {n.id for n in self.zk.nodes() if n.id}
        rows, failures = [], []
        for provider in self.config.providers:
            driver = registry.get_driver(provider.driver)
            assert driver is not None  # config.load refused unknown drivers
            try:
                found = driver.alien_servers(provider, self.config.state_dir, known)
            except NodepoolError as error:
                failures.append(f"nodepool: provider {provider.name}: {error}")
                continue
            rows.extend([provider.name, server_id, name] for server_id, name in found)
        print(_table(["Provider", "Server id", "Name"], rows))
        for failure in failures:
            print(failure, file=sys.stderr)
        return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodepool", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=_default_config(), help="nodepool.yaml")
    parser.add_argument("-d", "--debug", action="store_true", help="debug logging")
    parser.add_argument("--log-file", help="log here instead of stderr")
    parser.add_argument("--log-config", help="logging dictConfig as YAML")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("launcher", help="run the nodepool launcher (foreground)")
    sub.add_parser("builder", help="run the image builder (foreground)")
    p = sub.add_parser("image-build", help="request a build of IMAGE")
    p.add_argument("image")
    p.add_argument("--wait", action="store_true", help="build here and now, wait for the result")
    sub.add_parser("image-list", help="the build each provider pool boots from")
    sub.add_parser("dib-image-list", help="every image build")
    p = sub.add_parser("image-delete", help="delete an image build")
    p.add_argument("build", help="IMAGE-ID as shown by dib-image-list")
    sub.add_parser("list", help="nodes")
    p = sub.add_parser("delete", help="destroy a node")
    p.add_argument("id")
    p = sub.add_parser("hold", help="keep a node for debugging until deleted")
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    sub.add_parser("request-list", help="node requests and which pools declined them")
    sub.add_parser("info", help="launchers, node requests, node counts")
    sub.add_parser("alien-list", help="what providers run that ZooKeeper knows no node of")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    commands = None
    try:
        commands = Commands(args)
        return getattr(commands, args.command.replace("-", "_"))()
    except NodepoolError as error:
        print(f"nodepool: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"nodepool: {error.filename or ''}: {error.strerror}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if commands is not None:
            commands.close()


if __name__ == "__main__":
    sys.exit(main())
