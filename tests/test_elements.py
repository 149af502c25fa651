"""Static checks of elements/: the mistakes that otherwise surface minutes into
a disk-image-create run (a script that is not executable, a bash syntax error,
a dependency on an element that does not exist) fail here in milliseconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import diskimage_builder
import pytest
import yaml
from diskimage_builder.element_dependencies import get_elements

from nodepool_lite.builder import REPO_ELEMENTS

DIB_ELEMENTS = Path(diskimage_builder.__file__).parent / "elements"
OURS = sorted(p.name for p in REPO_ELEMENTS.iterdir() if p.is_dir())
PHASES = ("root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d",
          "finalise.d", "cleanup.d", "environment.d")  # fmt: skip


def scripts() -> list[Path]:
    return sorted(p for phase in PHASES for p in REPO_ELEMENTS.glob(f"*/{phase}/*") if p.is_file())


def packages() -> set[str]:
    out: set[str] = set()
    for path in REPO_ELEMENTS.glob("*/package-installs.yaml"):
        out |= set(yaml.safe_load(path.read_text()))
    return out


def test_each_element_documents_itself():
    assert "kernel-ci-node" in OURS
    for name in OURS:
        readme = REPO_ELEMENTS / name / "README.rst"
        assert readme.is_file(), f"{name} has no README.rst"
        assert readme.read_text().splitlines()[1] == name


def test_kernel_ci_node_expands_to_a_partitionless_debian_node():
    paths = f"{REPO_ELEMENTS}:{DIB_ELEMENTS}"
    names = {name for name, _ in get_elements(["debian-minimal", "kernel-ci-node"], paths)}
    assert set(OURS) - {"vm-node"} <= names
    assert not names & {"vm", "bootloader", "block-device-mbr", "block-device-gpt"}


def test_vm_node_is_a_partitionless_image_with_a_kernel():
    """The qemu driver's image: booted with -kernel/-initrd, so no bootloader
    or partitions, and no container-node (its placeholder would keep the kernel out)."""
    paths = f"{REPO_ELEMENTS}:{DIB_ELEMENTS}"
    names = {name for name, _ in get_elements(["debian-minimal", "vm-node"], paths)}
    assert {"vm-node", "node-sshd", "zuul-user"} <= names
    assert not names & {"container-node", "vm", "bootloader", "block-device-mbr"}


@pytest.mark.parametrize("script", scripts(), ids=lambda p: str(p.relative_to(REPO_ELEMENTS)))
def test_scripts_are_executable_strict_bash(script: Path):
    text = script.read_text()
    if script.parent.name == "environment.d":  # sourced, not run
        assert script.suffix == ".bash"
    else:
        assert script.stat().st_mode & 0o111, "not executable: dib-run-parts would skip it"
        assert text.startswith("#!/bin/bash\n")
        assert "set -eu\nset -o pipefail\n" in text
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_node_gets_what_jobs_need():
    wanted = {
        "openssh-server", "sudo", "python3", "build-essential", "bc", "bison", "flex",
        "libelf-dev", "libssl-dev", "cpio", "ccache", "git", "perl", "rsync", "kmod",
        "qemu-system-x86", "busybox-static", "gcc-aarch64-linux-gnu",
    }  # fmt: skip
    assert wanted <= packages()


def test_dib_lint_is_clean():
    bin_dir = Path(sys.executable).parent
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",  # dib-lint runs `python`
        "ELEMENTS_DIR": REPO_ELEMENTS.name,
        "LIB_DIR": REPO_ELEMENTS.name,  # we ship no dib lib/ of our own
    }
    result = subprocess.run(
        [str(bin_dir / "dib-lint")], cwd=REPO_ELEMENTS.parent, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernel_tree_cache_builds_as_kernel_build_does():
    """The image's tree is built with kernel-build's tiny-bootable options, make
    arguments and pinned environment, or a node's make would rebuild it all."""
    jobs = REPO_ELEMENTS.parent / "jobs" / "playbooks"
    element = REPO_ELEMENTS / "kernel-tree-cache"
    defaults = yaml.safe_load((jobs / "roles/kernel-tools/defaults/main.yaml").read_text())
    options = (element / "kernel-tree-cache" / "tiny-bootable-options").read_text().split()
    assert options == defaults["kernel_tiny_options"]
    script = (element / "install.d" / "80-kernel-tree-cache").read_text()
    for name, value in defaults["kernel_build_env"].items():
        assert f'{name}="{value}"' in script or f"{name}={value} " in script, name
    assert 'args=(ARCH=x86_64 "CC=ccache gcc")' in script
    assert "LANG=C.UTF-8" in script
