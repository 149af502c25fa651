"""Drivers by name. An explicit table rather than setup.cfg entry points:
entry points only exist after `pip install` of this package, so a checkout
run in place (tests, the quick start, a venv installed before a driver was
added) would find no drivers; the table is imported lazily, so openstacksdk
is loaded only where an openstack provider is configured."""

from __future__ import annotations

import importlib

from nodepool_lite.drivers.base import Driver

DRIVERS = {
    "nspawn": "nodepool_lite.drivers.nspawn:NspawnDriver",
    "static": "nodepool_lite.drivers.static:StaticDriver",
    "openstack": "nodepool_lite.drivers.openstack:OpenStackDriver",
    "qemu": "nodepool_lite.drivers.qemu:QemuDriver",
}


def names() -> list[str]:
    return sorted(DRIVERS)


def get_driver(name: str) -> Driver | None:
    """The driver called `name`, or None if there is none."""
    target = DRIVERS.get(name)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()
