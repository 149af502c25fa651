"""Synthesis of everything ansible-playbook reads for one build.

The files land in the JobDir's `ansible/` and are published as `_ansible/`, so
a developer can see exactly what ran. The launcher's own steps (setup and
log collection) are written here as data; the job's playbooks come from the
trusted jobs dir, never from the change under test, and every task targets the
node but one: the launcher pushes the change from its cache to the node (git,
no code of the change runs here) and otherwise only runs ansible itself and
untars collected logs.
Text from the change and the review system reaches ansible only inside the
`zuul` variable, written `!unsafe`; the synthesised playbooks only refer to it,
the inventory holds nodepool's address for the node, and the job's vars come
from the layout (trusted, so they may be templates).
"""

from __future__ import annotations

import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.gitcache import FetchedChange
from launcher.jobdir import PHASES, JobDir
from zuul_lite.build_contract import BuildRequest

log = logging.getLogger("launcher.playbooks")

CALLBACK_DIR = Path(__file__).parent / "callback"


@dataclass(slots=True)
class NodeAddress:
    """How ansible reaches the node: what the inventory and known_hosts need."""

    host: str
    port: int
    username: str
    host_keys: list[str]
    # "<image>-<build id>" the node booted from, for the jobs' reproduce.sh.
    image_build: str = ""

    @classmethod
    def of(cls, node) -> NodeAddress:
        """Of a nodepool Node record."""
        return cls(
            node.interface_ip or "127.0.0.1",
            node.connection_port,
            node.username,
            list(node.host_keys),
            node.image_build or "",
        )


class PlaybookError(Exception):
    """A job names a playbook that the jobs dir does not have (a config error)."""


class Unsafe(str):
    """A string written with YAML's `!unsafe` tag, which ansible never templates."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", value))


def _dump(path: Path, data: Any) -> None:
    path.write_text(yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False))


def _unsafe(value: Any) -> Any:
    """`value` with every string in it (dict keys aside) marked unsafe."""
    if isinstance(value, str):
        return Unsafe(value)
    if isinstance(value, dict):
        return {key: _unsafe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unsafe(item) for item in value]
    return value


def zuul_variable(request: BuildRequest) -> dict[str, Any]:
    """The `zuul` variable: the request with every string in it marked unsafe.

    Subject and owner come from patch authors, project and branch from the
    review system; nothing else in it needs templating either, so no field
    added later can carry an author's text into a template. (Dict keys are
    job names and phases, from the layout.)
    """
    return _unsafe(request.to_dict())


# The push checks the branch out into the node's empty work tree
# (updateInstead), on as many threads as the node has CPUs: for the kernel
# tree here 8.5 s instead of 11 s on one.
RECEIVE_PACK = "git -c receive.denyCurrentBranch=updateInstead -c checkout.workers=0 receive-pack"

# Where the change's commit is in the node's repository, whether the job
# checks it out or not (doc/jobs.md, "checkout").
CHANGE_REF = "refs/zuul/change"

# The workspace directories, made by the same task as the repository (each
# task is an ssh round trip and a module run).
WORKSPACE_DIRS = "mkdir -p src artifacts console deps\n"

# The node's repository of the project: a clean checkout of the branch under
# test (the image's kernel-tree-cache, built at a recent base; a static
# host's last build) stays, so the push sends only the objects it lacks,
# updateInstead rewrites only the files the change moves, and make rebuilds
# only what they affect. Anything else (none, another branch, changed files)
# makes way for an empty repository, which the push fills with the whole tree.
KEEP_OR_INIT = """\
repo=src/{{ zuul.project | quote }}
branch={{ zuul.branch | quote }}
if [ -d "$repo/.git" ] \\
    && [ "$(git -C "$repo" symbolic-ref -q HEAD)" = "refs/heads/$branch" ] \\
    && git -C "$repo" update-index -q --refresh \\
    && git -C "$repo" diff-index --quiet HEAD --; then
  echo "checkout kept: $repo at $(git -C "$repo" rev-parse HEAD) (the push moves it)"
else
  rm -rf "$repo"
  git init --quiet --initial-branch "$branch" "$repo"
  echo "empty repository: $repo (the push brings the whole tree)"
fi
"""

# A job with `checkout: false`: any repository of the project on the node
# stays as it is, work tree and all (nothing on it is read or rewritten, so
# no file of the tree is even looked at); the push only adds the objects of
# the change it lacks under CHANGE_REF. Without one, an empty repository.
KEEP_REPOSITORY = """\
repo=src/{{ zuul.project | quote }}
if [ -d "$repo/.git" ]; then
  echo "repository kept: $repo, its work tree not moved (the push adds the change)"
else
  rm -rf "$repo"
  git init --quiet "$repo"
  echo "empty repository: $repo (the push brings the change's history, no work tree)"
fi
"""


def _push_url(node: NodeAddress) -> str:
    """ssh://user@host:port/~/src/<project>: the node user's home, as git expands `~`."""
    host = f"[{node.host}]" if ":" in node.host else node.host
    return f"ssh://{node.username}@{host}:{node.port}/~/src/{{{{ zuul.project }}}}"


def _push_task(node: NodeAddress, change: FetchedChange, ssh_command: str, checkout: bool) -> dict:
    """The launcher pushes the change from its cache over the node's own ssh.

    With `checkout`, into the checked-out branch, which updateInstead moves
    to it; always to CHANGE_REF. Forced: a static host keeps the repository
    of its last build.
    """
    refspecs = [f"+{change.sha}:{CHANGE_REF}"]
    if checkout:
        refspecs.insert(0, f"+{change.sha}:refs/heads/{{{{ zuul.branch }}}}")
    return {
        "name": (
            "Push the change under test to the node, which checks it out"
            if checkout
            else "Push the change's commits to the node, without checking them out"
        ),
        "delegate_to": "localhost",
        "environment": {"GIT_SSH_COMMAND": Unsafe(ssh_command)},
        "ansible.builtin.command": {
            "argv": [
                "git",
                "-C",
                Unsafe(change.repo),
                "push",
                "--quiet",
                f"--receive-pack={RECEIVE_PACK if checkout else 'git receive-pack'}",
                _push_url(node),
                *refspecs,
            ],
        },
    }


def _dependency_tasks(dependencies: dict[str, Path]) -> list[dict]:
    """Copy the artifacts of the builds this job depends on to ~/deps/<job>/artifacts/."""
    if not dependencies:
        return []
    return [
        {
            # copy expands `~` from passwd, commands from $HOME: use the latter,
            # which is where the job's commands look.
            "name": "Find the workspace home",
            "ansible.builtin.command": "printenv HOME",
            "register": "zuul_node_home",
            "changed_when": False,
        },
        {
            "name": "Copy the artifacts of the builds this job depends on",
            "ansible.builtin.copy": {
                "src": "{{ item.src }}/",
                "dest": "{{ zuul_node_home.stdout }}/deps/{{ item.job }}/artifacts/",
            },
            "loop": [
                {"job": Unsafe(job), "src": Unsafe(path)} for job, path in dependencies.items()
            ],
        },
    ]


def _setup_playbook(
    node: NodeAddress,
    connect_timeout: int,
    change: FetchedChange,
    dependencies: dict[str, Path],
    ssh_command: str,
    checkout: bool,
) -> list[dict]:
    """Wait for ssh, push the change under test to the node, copy dependency artifacts.

    The change goes from the launcher's cache (gitcache.py) into the node's
    repository over the node's own ssh: the node never reaches the merger
    nor reads a path of the launcher's or the scheduler's host. With
    `checkout`, the node's checkout of the branch (KEEP_OR_INIT) is moved to
    the change; without, its work tree is left alone (KEEP_REPOSITORY).
    """
    return [
        {
            "name": "Prepare the node's workspace",
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Wait for the node to answer over ssh",
                    "ansible.builtin.wait_for_connection": {"timeout": connect_timeout},
                },
                {
                    "name": (
                        "Keep the node's checkout of the branch, or make an empty repository"
                        if checkout
                        else "Keep the node's repository as it is, or make an empty one"
                    ),
                    "ansible.builtin.shell": {
                        "executable": "/bin/bash",
                        "chdir": "~",
                        "cmd": WORKSPACE_DIRS + (KEEP_OR_INIT if checkout else KEEP_REPOSITORY),
                    },
                    "register": "zuul_workspace",
                    "changed_when": "'empty repository' in zuul_workspace.stdout",
                },
                _push_task(node, change, ssh_command, checkout),
                *_dependency_tasks(dependencies),
            ],
        }
    ]


def _collect_playbook(archive: Path) -> list[dict]:
    """Pack ~/artifacts and ~/console on the node and fetch the one archive.

    A single archive keeps the transfer to one file (ansible's fetch copies
    single files; synchronize is not in ansible-core); logs.py unpacks it with
    its own caps and path checks so nothing in it can escape the log dir.
    """
    node_archive = "/tmp/zuul-node-logs-{{ zuul.uuid }}.tar.gz"
    return [
        {
            "name": "Collect the node's logs",
            "hosts": "node",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Pack artifacts and console logs",
                    "ansible.builtin.shell": (
                        "mkdir -p ~/artifacts ~/console && "
                        f"tar -czf {node_archive} -C ~ artifacts console"
                    ),
                },
                {
                    "name": "Fetch them to the launcher",
                    "ansible.builtin.fetch": {
                        "src": node_archive,
                        "dest": str(archive),
                        "flat": True,
                    },
                },
                {
                    "name": "Remove the archive from the node",
                    "ansible.builtin.file": {"path": node_archive, "state": "absent"},
                },
            ],
        }
    ]


def known_hosts_lines(node: NodeAddress) -> list[str]:
    """known_hosts entries for the node; ssh writes non-22 ports as [host]:port."""
    name = node.host if node.port == 22 else f"[{node.host}]:{node.port}"
    return [f"{name} {key.strip()}" for key in node.host_keys if key.strip()]


def resolve_playbooks(request: BuildRequest, jobs_dir: Path) -> dict[str, list[Path]]:
    """The job's pre/run/post playbooks as files in the jobs dir.

    Checked before a node is requested, so a config error costs no node.
    Raises PlaybookError when a path is missing or leaves the jobs dir.
    """
    resolved: dict[str, list[Path]] = {}
    for phase in PHASES:
        resolved[phase] = []
        for rel in request.playbooks.get(phase) or []:
            source = (jobs_dir / rel).resolve()
            if not source.is_relative_to(jobs_dir.resolve()) or not source.is_file():
                raise PlaybookError(
                    f"Job {request.job} names playbook {rel}, which is not a file "
                    f"in the jobs dir {jobs_dir}."
                )
            resolved[phase].append(source)
    return resolved


def write_ansible_dir(
    jobdir: JobDir,
    request: BuildRequest,
    node: NodeAddress,
    *,
    jobs_dir: Path,
    private_key: Path,
    connect_timeout: int,
    change: FetchedChange,
    dependencies: dict[str, Path],
) -> dict[str, list[Path]]:
    """Write inventory, config, vars and playbooks; return the playbooks by phase.

    Phases are `setup`, `pre`, `run`, `post`, `collect`, in the order they run.
    `change` is the fetched change the setup pushes to the node, `dependencies`
    the artifacts/ dir of each build this one depends on (logs.dependency_dirs).
    """
    sources = resolve_playbooks(request, jobs_dir)
    jobdir.prepare()
    keys = known_hosts_lines(node)
    jobdir.known_hosts.write_text("".join(line + "\n" for line in keys))
    strict = "yes" if keys else "accept-new"
    if not keys:
        log.warning(
            "Node %s:%s has no recorded host keys; accepting the first one seen",
            node.host,
            node.port,
        )
    _dump(
        jobdir.inventory,
        {
            "all": {
                "hosts": {
                    "node": {
                        "ansible_connection": "ssh",
                        "ansible_host": node.host,
                        "ansible_port": node.port,
                        "ansible_user": node.username,
                        "ansible_ssh_private_key_file": str(private_key),
                        # Zuul's `nodepool` host variable, what jobs record of the node.
                        "nodepool": {"image_build": node.image_build},
                    }
                }
            }
        },
    )
    ssh_args = (
        f"-o ControlMaster=auto -o ControlPersist=60s "
        f"-o UserKnownHostsFile={jobdir.known_hosts} "
        f"-o StrictHostKeyChecking={strict} -o BatchMode=yes"
    )
    jobdir.config.write_text(
        "[defaults]\n"
        f"inventory = {jobdir.inventory}\n"
        "stdout_callback = default\n"
        # Failed results (printed in full) stay readable; zuul_output echoes ok output.
        "callback_result_format = yaml\n"
        "callbacks_enabled = zuul_json, zuul_output, zuul_early_failure\n"
        f"callback_plugins = {CALLBACK_DIR}\n"
        f"local_tmp = {jobdir.tmp}\n"
        f"roles_path = {jobs_dir / 'roles'}:{jobs_dir / 'playbooks' / 'roles'}\n"
        "retry_files_enabled = False\n"
        "host_key_checking = True\n"
        "interpreter_python = auto_silent\n"
        "nocows = 1\n"
        "timeout = 30\n"
        "\n[ssh_connection]\n"
        "pipelining = True\n"
        f"ssh_args = {ssh_args}\n"
        f"control_path_dir = {jobdir.control_dir}\n"
    )
    zuul_vars = {
        "zuul": zuul_variable(request),
        "zuul_log_dir": str(jobdir.logs),
        "zuul_artifacts_dir": "~/artifacts",
    }
    _dump(jobdir.vars, {**request.vars, **zuul_vars})
    # The push's ssh authenticates the node exactly as ansible's does.
    ssh_command = shlex.join(
        [
            "ssh",
            "-i",
            str(private_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={jobdir.known_hosts}",
            "-o",
            f"StrictHostKeyChecking={strict}",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
        ]
    )
    _dump(
        jobdir.setup_playbook,
        _setup_playbook(
            node, connect_timeout, change, dependencies, ssh_command, request.checkout
        ),
    )
    _dump(jobdir.collect_playbook, _collect_playbook(jobdir.node_logs_archive))
    phases: dict[str, list[Path]] = {"setup": [jobdir.setup_playbook]}
    for phase in PHASES:
        phases[phase] = []
        for index, source in enumerate(sources[phase]):
            target = jobdir.playbook(phase, index)
            shutil.copyfile(source, target)
            phases[phase].append(target)
    phases["collect"] = [jobdir.collect_playbook]
    return phases
