"""Boot time of a qemu driver node: a NodeRequest submitted -> fulfilled, i.e.
until the launcher's key logs in over the VM's forwarded ssh port (the
launcher fulfils a request only then). Under TCG on these hosts (KVM opens
but fails at run time, see MACHINE-NOTES). Also prints the guest's own
account of the boot (`systemd-analyze`) for the first node.

Uses the test VM image (tests/qemu_env.py, 512 MiB, 1 vCPU); a cold cache
builds it first (a few minutes, not counted). Needs root.

    .venv/bin/python bench/qemu_boot.py [-n 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ holds the VM image and nodepool helpers
    sys.path.insert(0, str(ROOT))

from nodepool_lite.launcher import NodePool  # noqa: E402
from nodepool_lite.model import RequestState  # noqa: E402
from nodepool_lite.zk import ZooKeeper  # noqa: E402
from nodepool_lite.zkserver import ZooKeeperServer, free_port  # noqa: E402
from tests.nodepool_env import release, request, take_nodes, wait_for  # noqa: E402
from tests.qemu_env import PROVIDER, VM_LABEL, ready_vm_image, write_qemu_config  # noqa: E402
from tests.test_nodepool_qemu import kill_vms_under, ssh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="boots (one at a time)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qemu-boot-") as tmp:
        root = Path(tmp)
        zk_server = ZooKeeperServer(root / "zk", port=free_port(), force_sync=False)
        zk_server.start()
        zk = ZooKeeper(zk_server.hosts)
        zk.connect()
        conf = write_qemu_config(root, zk_server.hosts, max_servers=1)
        ready_vm_image(zk, conf)
        pool = NodePool(conf)
        pool.start()
        times = []
        try:
            for i in range(args.n):
                start = time.monotonic()
                req, done, _ = request(zk, VM_LABEL)
                if not done.wait(600):
                    raise SystemExit("no node within 600 s")
                took = time.monotonic() - start
                fresh = zk.get_node_request(req.id or "")
                if fresh is None or fresh.state != RequestState.FULFILLED:
                    raise SystemExit(f"request failed: {fresh.reason if fresh else 'gone'}")
                [node] = take_nodes(zk, req)
                times.append(took)
                print(f"boot {i + 1}: request -> ssh login {took:.1f} s", flush=True)
                if i == 0:
                    _, out = ssh(pool, node, "systemd-analyze; systemd-analyze blame | head -5")
                    print("guest: " + out.strip().replace("\n", "\n  "), flush=True)
                release(zk, [node])
                wait_for(lambda: not zk.nodes(), 120, "node deleted")
                wait_for(lambda: not pool.providers[PROVIDER].leaked_node_ids(), 60, "VM gone")
        finally:
            pool.stop()
            pool.join()
            kill_vms_under(root)  # a stopped launcher leaves its VMs running
            zk.disconnect()
            zk_server.stop()
    accel = pool.providers[PROVIDER].accel()
    print(f"median request -> ssh login ({accel}, {len(times)} boots): "
          f"{statistics.median(times):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
