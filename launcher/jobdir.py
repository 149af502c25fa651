"""The one object that owns the layout of a build directory.

Every other launcher module asks a JobDir for a path instead of joining
strings, so the layout below is the whole truth (doc/architecture.md has the
short form):

    <work>/<uuid>/
      ansible/                 copied to the log dir as _ansible/ (tmp/ left out)
        inventory.yaml         host `node`, address, port, user, key, known_hosts
        ansible.cfg            ssh + pipelining, our known_hosts, local temp below
        known_hosts            the node's host keys, so ssh never prompts
        vars.yaml              `zuul` (the gearman arguments), `zuul_log_dir`, job vars
        setup.yaml             wait for ssh, push the change (checked out unless the
                               job has checkout: false), copy dependency artifacts
        pre-<n>.yaml run-<n>.yaml post-<n>.yaml   the job's playbooks as run
        collect-logs.yaml      pull ~/artifacts and ~/console into logs/
        results.jsonl          one JSON line per playbook, written by our callback
        tmp/                   ANSIBLE_LOCAL_TEMP, ANSIBLE_HOME, the fetched node-logs
                               archive (never published)
      logs/                    copied to <log_root>/<log_path>/ when the build ends
        job-output.json        per-task results of every playbook
        artifacts/  console/   what collect-logs.yaml pulled from the node
    <tmp>/zlcp-<uuid>/         ssh ControlPath sockets: a unix socket path must stay
                               under 108 bytes, which a deep work dir would exceed

job-output.txt (timestamped ansible-playbook output) is the exception: it is
written straight into <log_root>/<log_path>/ from the first line, so the web's
log browser and the log URL sent in WORK_DATA show a running build live.

The private key is never copied here: the inventory names the operator's key
file by path, and publishing skips anything that looks like a key anyway.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

PHASES = ("pre", "run", "post")


class JobDir:
    """Paths of one build's working tree under the launcher's state dir."""

    def __init__(self, work_root: Path, uuid: str) -> None:
        self.root = Path(work_root) / uuid
        self.ansible = self.root / "ansible"
        self.logs = self.root / "logs"
        self.tmp = self.ansible / "tmp"
        self.inventory = self.ansible / "inventory.yaml"
        self.config = self.ansible / "ansible.cfg"
        self.known_hosts = self.ansible / "known_hosts"
        self.vars = self.ansible / "vars.yaml"
        self.setup_playbook = self.ansible / "setup.yaml"
        self.collect_playbook = self.ansible / "collect-logs.yaml"
        self.results = self.ansible / "results.jsonl"
        self.node_logs_archive = self.tmp / "node-logs.tar.gz"
        self.control_dir = Path(tempfile.gettempdir()) / f"zlcp-{uuid[:16]}"
        self.job_output_json = self.logs / "job-output.json"
        self.artifacts = self.logs / "artifacts"
        self.console = self.logs / "console"

    def prepare(self) -> None:
        """Create a fresh ansible/ for an attempt; logs/ keeps earlier attempts' output."""
        shutil.rmtree(self.ansible, ignore_errors=True)
        shutil.rmtree(self.control_dir, ignore_errors=True)
        for path in (
            self.ansible,
            self.tmp,
            self.logs,
            self.artifacts,
            self.console,
            self.control_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)

    def playbook(self, phase: str, index: int) -> Path:
        """Where the job's `index`-th playbook of `phase` is copied and run from."""
        return self.ansible / f"{phase}-{index}.yaml"

    def cleanup(self) -> None:
        """Remove the working tree once its logs are published."""
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.control_dir, ignore_errors=True)
