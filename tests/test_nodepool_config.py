"""nodepool.yaml validation: good files load, bad ones give one sentence with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodepool_lite import config
from nodepool_lite.drivers.nspawn.config import Bind
from nodepool_lite.exceptions import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads():
    cfg = config.load(ROOT / "etc" / "nodepool.yaml")
    assert cfg.zookeeper_hosts == "127.0.0.1:2281"
    assert cfg.zookeeper_tls is not None
    assert cfg.zookeeper_tls.cert == "/var/lib/zuul-lite/tls/nodepool.pem"
    assert cfg.state_dir == Path("/var/lib/zuul-lite")
    [image] = cfg.diskimages
    assert (image.name, image.release, image.rebuild_age) == (
        "kernel-ci-debian",
        "bookworm",
        86400,
    )
    assert image.elements == ["debian-minimal", "kernel-ci-node"] and image.formats == ["tar"]
    assert cfg.diskimage("kernel-ci-debian") is image and cfg.diskimage("x") is None
    [pool] = cfg.providers[0].pools
    assert pool.max_servers == 2 and pool.labels["kernel-debian"].diskimage == "kernel-ci-debian"
    # The change reaches nodes over ssh, not a mount; the compiler cache is
    # the only mount, writable only on the trusted label.
    assert pool.bind_ro == [] and pool.bind == []
    ccache = Bind("/var/lib/zuul-lite/ccache", "/var/cache/ccache")
    assert pool.mounts("kernel-debian") == [(ccache, False)]
    assert pool.mounts("kernel-debian-trusted") == [(ccache, True)]


def test_static_pool_offers_its_hosts_labels():
    cfg = config.load(ROOT / "tests" / "fixtures" / "nodepool-static.yaml")
    [pool] = cfg.providers[0].pools
    assert list(pool.labels) == ["static-label"] and pool.nodes[0].connection_port == 2222


def test_chroot_joins_hosts(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("zookeeper-servers: [{host: a, port: 1, chroot: /x}, {host: b}]\n")
    assert config.load(path).zookeeper_hosts == "a:1,b:2181/x"


@pytest.mark.parametrize(
    "text, message",
    [
        ("providers: [{name: p, driver: nspawn, pools: [{name: m, max-servers: two}]}]",
         "providers[0].pools[0].max-servers: expected int"),
        ("providers: [{name: p, driver: vmware, pools: []}]",
         "providers[0].driver: expected one of nspawn, openstack, qemu, static"),
        ("labels: [{name: a}]\ndiskimages: [{name: d, elements: [e]}]\nproviders: [{name: p, "
         "driver: nspawn, cloud: c, pools: []}]",
         "providers[0].cloud: not a key of the nspawn driver"),
        ("providers: [{name: p, driver: static, pools: [{name: m, labels: [{name: a, "
         "memory: 1}]}]}]",
         "providers[0].pools[0].labels[0].memory: not a key of the static driver"),
        ("labels: [{name: a}]\nproviders: [{name: p, driver: static, pools: [{name: m, "
         "nodes: [{name: h, labels: [b]}]}]}]",
         "providers[0].pools[0].nodes[0]: unknown label 'b'"),
        ("diskimages: [{name: d}]", "diskimages[0].elements: required key not provided"),
        ("labels: [{name: a}]\nproviders: [{name: p, driver: nspawn, pools: [{name: m, "
         "labels: [{name: a, diskimage: nope}]}]}]",
         "providers[0].pools[0].labels[0].diskimage: unknown diskimage 'nope'"),
        ("labels: [{name: a}]\ndiskimages: [{name: d, elements: [e]}]\nproviders: [{name: p, "
         "driver: nspawn, pools: [{name: m, bind-ro: [/c], labels: [{name: a, diskimage: d, "
         "bind: [/c]}]}]}]",
         "providers[0].pools[0].labels[0]: /c is mounted twice (pool and label binds)"),
        ("providers: [{name: p, driver: static, pools: [{name: m, labels: [{name: b}]}]}]",
         "providers[0].pools[0].labels[0]: unknown label 'b'"),
        ("labels: [{name: a, min-ready: 1}]",
         "labels[0].min-ready: no provider pool offers label 'a'"),
        ("providers: [{name: p, driver: static, launch-retries: 0, pools: []}]",
         "providers[0].launch-retries: value must be at least 1"),
        ("bogus: 1", "bogus: extra keys not allowed"),
        ("labels: [{name: a]", "invalid YAML at line 1."),
    ],
)  # fmt: skip
def test_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "n.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert str(error.value) == f"{path}: {message}"
