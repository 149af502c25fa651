"""Import the scripts of jobs/playbooks/roles/kernel-tools/files/, which run on
nodes (stdlib only) and so are not part of any package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FILES = Path(__file__).resolve().parents[1] / "jobs" / "playbooks" / "roles" / "kernel-tools"
FILES = FILES / "files"


def load(name: str):
    """The module of `<name>.py` (loaded once, as `kernel_tools_<name>`)."""
    module_name = f"kernel_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
