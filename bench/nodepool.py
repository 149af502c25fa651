"""Node request -> fulfilled, per driver, with and without min-ready; a used
node's slot handed to the next request (reuse); the launcher's idle RSS/CPU.

A real ZooKeeper on loopback, the launcher in this process (its own
ZooKeeper session, as zuul-launcher and nodepool are separate processes),
the requestor's handshake as zuul-launcher does it (tests/nodepool_env.py):

- request -> fulfilled: from submitting a request to its watch seeing it
  fulfilled. With `min-ready: 1` a ready spare waits before each request
  (the next one is awaited before the next request, as between two jobs);
  without, the node is launched for the request (static: a host lent out;
  nspawn: a container booted to sshd; qemu: a VM booted under TCG to sshd,
  ~45 s each, so `--qemu-n` requests only).
- reuse: one slot only (static: one host; nspawn, qemu: max-servers 1) in use,
  a second request waiting; from the first node marked `used` to the second
  request fulfilled (deletion, then launch on the freed slot).
- idle: `nodepool launcher` as its own process with a static pool and
  min-ready 1, settled; RSS and CPU over `--idle` seconds.

The peer is Nodepool 11.0 on this kind of machine: its static driver took
0.41-0.59 s p50 per request from its 1 s loop, a reused static slot 4.1 s.
Goal with ready nodes: p50 <= 30 ms.

nspawn needs root and a node image (the cached dib build or the debootstrap
dev rootfs of tests/nodepool_env.py); it is skipped otherwise. qemu (opt-in)
uses the VM image of tests/qemu_env.py (cached machine-wide; a cold build
takes minutes). The openstack driver is not measured: its handout from a
ready node is the same pool-worker code as any driver's, and its boot is a
cloud's time, which no cloud here can give.

    .venv/bin/python bench/nodepool.py [-n 30] [--idle 35] [--drivers static,nspawn,qemu]
                                       [--qemu-n 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ holds the node image and nodepool helpers
    sys.path.insert(0, str(ROOT))

from _zuul_env import cpu_seconds  # noqa: E402

from nodepool_lite import config as npconfig  # noqa: E402
from nodepool_lite.drivers import registry  # noqa: E402
from nodepool_lite.launcher import NodePool  # noqa: E402
from nodepool_lite.min_ready import is_spare  # noqa: E402
from nodepool_lite.model import NodeRequest, NodeState, RequestState  # noqa: E402
from nodepool_lite.zk import ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer, free_port  # noqa: E402
from tests.nodepool_env import (  # noqa: E402
    LABEL,
    STATIC_LABEL,
    launcher_process,
    register_node_image,
    release,
    static_config,
    static_host,
    take_nodes,
    wait_for,
    write_config,
)
from tests.qemu_env import VM_LABEL, ready_vm_image, write_qemu_config  # noqa: E402

PEER_P50 = "0.41-0.59 s"
PEER_REUSE = 4.1


class Timed:
    """A submitted request and when its watch saw it fulfilled."""

    def __init__(self, zk: ZooKeeper, label: str):
        self.done = threading.Event()
        self.elapsed = 0.0
        self.req = NodeRequest(node_types=[label], requestor="bench")
        self.start = time.monotonic()
        zk.submit_node_request(self.req, self._seen)

    def _seen(self, req: NodeRequest | None) -> bool | None:
        if req is not None and req.state == RequestState.FULFILLED:
            self.elapsed = time.monotonic() - self.start
            self.done.set()
            return False
        if req is None or req.state == RequestState.FAILED:
            raise SystemExit(f"request failed: {req.reason if req else 'vanished'}")
        return None

    def wait(self, timeout: float = 120.0) -> float:
        if not self.done.wait(timeout):
            raise SystemExit(f"request {self.req.id} not fulfilled in {timeout:.0f}s")
        return self.elapsed


def spares(zk: ZooKeeper, label: str) -> list:
    return [n for n in zk.nodes() if n.type == label and is_spare(n)]


def requests_to_fulfilled(zk: ZooKeeper, label: str, n: int, min_ready: bool) -> list[float]:
    times = []
    for _ in range(n):
        if min_ready:
            # As between two jobs: the spare is ready and the launcher idle.
            wait_for(lambda: spares(zk, label) and not zk.node_request_ids(), 120, "a spare")
            time.sleep(0.2)
        timed = Timed(zk, label)
        times.append(timed.wait())
        nodes = take_nodes(zk, timed.req)
        release(zk, nodes)
        for node in nodes:
            wait_for(lambda node=node: zk.get_node(node.id) is None, 60, "node deleted")
    return times


def reuse(zk: ZooKeeper, label: str, n: int) -> list[float]:
    """One slot: the next request waits while the node is in use."""
    times = []
    first = Timed(zk, label)
    first.wait()
    held = take_nodes(zk, first.req)
    for _ in range(n):
        waiting = Timed(zk, label)
        used_at = time.monotonic()
        release(zk, held)
        waiting.wait()
        times.append(waiting.start + waiting.elapsed - used_at)
        held = take_nodes(zk, waiting.req)
    release(zk, held)
    return times


def p50(times: list[float]) -> float:
    return statistics.median(times)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def driver_config(name: str, directory: Path, zk_hosts: str, slots: int, min_ready: int) -> Path:
    """One pool of `slots` (static hosts or nspawn max-servers); the same
    state dir every time, so each launcher cleans up what the last left."""
    if name == "static":
        hosts = [static_host(f"127.0.0.{i + 1}", 22, [STATIC_LABEL]) for i in range(slots)]
        labels = [{"name": STATIC_LABEL, "min-ready": min_ready}]
        return static_config(directory, zk_hosts, {"static": hosts}, labels=labels)
    if name == "qemu":
        path = write_qemu_config(directory, zk_hosts, max_servers=slots)
        data = yaml.safe_load(path.read_text())
        data["labels"] = [{"name": VM_LABEL, "min-ready": min_ready}]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
    return write_config(directory, zk_hosts, max_servers=slots, min_ready=min_ready)


def run_driver(name: str, zk_hosts: str, work: Path, n: int) -> tuple[list[list[str]], float]:
    """The table's rows for driver `name`, and its p50 with a ready node."""
    label = {"static": STATIC_LABEL, "qemu": VM_LABEL}.get(name, LABEL)
    directory = work / name
    directory.mkdir(exist_ok=True)
    rows = []
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    try:
        for how, slots, min_ready in (("min-ready 1", 2, 1), ("no min-ready", 2, 0),
                                      ("reuse of a used slot", 1, 0)):  # fmt: skip
            np = NodePool(driver_config(name, directory, zk_hosts, slots, min_ready))
            np.start()
            try:
                # Spares the last run left are marked used: this launcher deletes them.
                for node in spares(zk, label):
                    zk.lock_node(node)
                    node.state = NodeState.USED
                    zk.store_node(node)
                    zk.unlock_node(node)
                    wait_for(lambda node=node: zk.get_node(node.id) is None, 120, "spare deleted")
                if how.startswith("reuse"):
                    times = reuse(zk, label, n)
                else:
                    times = requests_to_fulfilled(zk, label, n, bool(min_ready))
                wait_for(lambda m=min_ready: len(zk.nodes()) == m, 120, "used nodes deleted")
            finally:
                np.stop()
                np.join()
            rows.append([name, how, str(n), ms(p50(times)), ms(max(times))])
            if min_ready:
                ready_p50 = p50(times)
    finally:
        zk.disconnect()
    return rows, ready_p50


def idle(zk_hosts: str, work: Path, seconds: float) -> tuple[float, float]:
    """RSS (MiB) and CPU (% of one core) of an idle `nodepool launcher`."""
    directory = work / "idle"
    directory.mkdir()
    hosts = [static_host("127.0.0.1", 22, [STATIC_LABEL])]
    conf = static_config(
        directory, zk_hosts, {"static": hosts}, labels=[{"name": STATIC_LABEL, "min-ready": 1}]
    )
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    daemon = launcher_process(conf)
    try:
        wait_for(lambda: spares(zk, STATIC_LABEL), 60, "the launcher's spare")
        time.sleep(1.0)  # let start-up work finish before measuring
        before = cpu_seconds(daemon.pid)
        start = time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(daemon.pid) - before
        wall = time.monotonic() - start
        rss = rss_mib(daemon.pid)
    finally:
        daemon.terminate()  # its static spare is a record in a throwaway ZooKeeper
        daemon.wait()
        zk.disconnect()
    return rss, 100.0 * used / wall


def round_trip(zk_hosts: str) -> float:
    """p50 of one ZooKeeper read; a request served from a ready node takes
    about 14 of them (locks of request and node, reads, writes)."""
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    try:
        times = []
        for _ in range(50):
            start = time.monotonic()
            zk.exists("/")
            times.append(time.monotonic() - start)
    finally:
        zk.disconnect()
    return p50(times)


def destroy_leftovers(work: Path, drivers: list[str]) -> None:
    """Whatever a run left of nspawn or qemu nodes (containers, VMs, forwards,
    mounts, overlays), by the driver's own leak cleanup: nothing outlives
    the bench."""
    for name in drivers:
        path = work / name / "nodepool.yaml"
        if name == "static" or not path.is_file():
            continue
        cfg = npconfig.load(path)
        spec = cfg.providers[0]
        provider = registry.get_driver(spec.driver).provider(spec, cfg.state_dir, None)
        for node_id in provider.leaked_node_ids():
            provider.cleanup_node(node_id)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="requests per measurement")
    parser.add_argument(
        "--idle",
        type=float,
        default=35.0,
        help="seconds of idle measurement (past one 30 s safety tick of the workers)",
    )
    parser.add_argument("--drivers", default="static,nspawn")
    parser.add_argument("--qemu-n", type=int, default=3, help="requests per qemu measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A node's sshd not up yet is retried by the driver; kazoo's reconnects are noise.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    drivers = args.drivers.split(",")
    if "nspawn" in drivers and os.geteuid() != 0:
        print("nspawn skipped: needs root")
        drivers.remove("nspawn")
    with tempfile.TemporaryDirectory(prefix="bench-nodepool-") as tmp:
        work = Path(tmp)
        server = ZooKeeperServer(work / "zk", port=free_port(), force_sync=False)
        server.start()
        try:
            zk_hosts = f"{server.hosts}/bench"
            if "nspawn" in drivers:
                zk = ZooKeeper(zk_hosts)
                zk.connect()
                register_node_image(zk)
                zk.disconnect()
            if "qemu" in drivers:
                zk = ZooKeeper(zk_hosts)
                zk.connect()
                (work / "qemu").mkdir()
                ready_vm_image(zk, driver_config("qemu", work / "qemu", zk_hosts, 1, 0))
                zk.disconnect()
            rtt = round_trip(zk_hosts)
            rows = []
            ready_p50 = {}
            for name in drivers:
                n = args.qemu_n if name == "qemu" else args.n
                driver_rows, ready_p50[name] = run_driver(name, zk_hosts, work, n)
                rows += driver_rows
            rss, cpu = idle(zk_hosts, work, args.idle)
        finally:
            destroy_leftovers(work, drivers)
            server.stop()
    headers = ["driver", "measure", "n", "p50", "max"]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"Nodepool 11.0 static driver (peer): request p50 {PEER_P50}; reuse {PEER_REUSE} s")
    for name, p50_ready in ready_p50.items():
        print(
            f"goal p50 <= 30 ms with a ready node: {name} {ms(p50_ready)}, "
            f"{'met' if p50_ready <= 0.030 else 'not met'} "
            f"(= {p50_ready / rtt:.1f} ZooKeeper round trips, which load stretches)"
        )
    print(f"idle launcher: RSS {rss:.1f} MiB, CPU {cpu:.2f}% of one core over {args.idle:.0f} s")
    print(
        f"ZooKeeper round trip p50 {ms(rtt)}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (figures scale with both)"
    )


if __name__ == "__main__":
    main()
