"""The builder against real ZooKeeper: one real disk-image-create per machine
(shared through tests/images.py), the rest with a stand-in for dib that writes a
tiny tar in milliseconds, so states, logs, retention and the daemon are tested
without minutes of apt."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from nodepool_lite import builder, dib_orphans
from nodepool_lite.builder import (
    BuildRun,
    BuildWorker,
    NodePoolBuilder,
    build_image,
    cleanup,
    reconcile,
    rootfs_path,
)
from nodepool_lite.config import Config, load
from nodepool_lite.drivers.nspawn.limits import is_mounted
from nodepool_lite.drivers.userns import NODE_UID_BASE, NODE_UID_COUNT, host_id
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.model import BuildState, ImageBuild, Node
from tests.images import MARKER, ensure_node_image, node_config, prune_stale
from tests.nodepool_env import REPO, nodepool_process, wait_for, zookeeper_servers

FAKE_DIB = """
import sys, tarfile, io, time
out = sys.argv[sys.argv.index("-o") + 1]
print("fake dib building", out, "with", *sys.argv[sys.argv.index("-o") + 2:], flush=True)
if "fail" in sys.argv:
    print("ERROR: element failed", flush=True)
    sys.exit(1)
if "slow" in sys.argv:
    # As dib: a work dir under TMP_DIR (a tmpfs as root), a child in a
    # session of its own (sudo's), then a long wait.
    import os, subprocess
    work = os.path.join(os.environ["TMP_DIR"], "dib_build.fake")
    os.mkdir(work)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", work], check=True)
        image = os.path.join(work, "image.raw")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        loop = subprocess.run(["losetup", "-f", "--show", image], check=True,
                              capture_output=True, text=True).stdout.strip()
        with open(os.path.join(os.path.dirname(out), "loop"), "w") as f:
            f.write(loop)
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with open(os.path.join(os.path.dirname(out), "pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}\\n")
    time.sleep(600)
with tarfile.open(out + ".tar", "w") as tar:
    info = tarfile.TarInfo("etc/hostname")
    data = b"node\\n"
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
"""


def small_config(
    tmp_path: Path, elements: tuple[str, ...] = ("base",), rebuild_age: int = 86400
) -> Config:
    """Images `small` (`elements`) and `slow` (a dib that runs until killed)."""
    path = tmp_path / f"nodepool-{len(list(tmp_path.glob('nodepool-*')))}.yaml"
    path.write_text(
        f"state-dir: {tmp_path / 'state'}\n"
        "diskimages:\n"
        f"  - {{name: small, elements: [{', '.join(elements)}], rebuild-age: {rebuild_age}}}\n"
        "  - {name: slow, elements: [slow], rebuild-age: 1000000000}\n"
    )
    return load(path)


@pytest.fixture
def fake_dib(tmp_path, monkeypatch):
    """disk-image-create replaced by FAKE_DIB; the machine cache moved to tmp."""
    script = tmp_path / "fake-dib.py"
    script.write_text(FAKE_DIB)
    monkeypatch.setenv("ZUUL_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builder, "check_elements", lambda config, diskimage: None)
    monkeypatch.setattr(
        builder,
        "dib_command",
        lambda diskimage, output: (
            [sys.executable, str(script), "-o", str(output)] + list(diskimage.elements)
        ),
    )
    return script


def test_build_records_log_and_rootfs(zk, tmp_path, fake_dib):
    config = small_config(tmp_path, elements=("debian-minimal", "kernel-ci-node"))
    seen: list[str] = []
    states_while_running: list[BuildState] = []

    def progress(line: str) -> None:
        seen.append(line)
        states_while_running.append(zk.get_image_builds("small")[-1].state)

    build = build_image(config, zk, "small", progress=progress)
    assert build.state == BuildState.READY
    assert set(states_while_running) == {BuildState.BUILDING}
    stored = zk.get_image_build("small", build.id)
    assert stored.state == BuildState.READY
    assert stored.builder == socket.gethostname()
    assert stored.elements == ["debian-minimal", "kernel-ci-node"]
    assert Path(stored.path) == tmp_path / "state" / "images" / f"small-{build.id}"
    assert (rootfs_path(stored) / "etc" / "hostname").read_text() == "node\n"
    log_text = Path(stored.log_path).read_text()
    assert "fake dib building" in log_text
    assert any("fake dib building" in line for line in seen)


def test_failed_build_keeps_log_only(zk, tmp_path, fake_dib):
    config = small_config(tmp_path, elements=("fail",))
    build = build_image(config, zk, "small")
    assert zk.get_image_build("small", build.id).state == BuildState.FAILED
    assert "ERROR: element failed" in Path(build.log_path).read_text()
    assert not rootfs_path(build).exists()


def test_unknown_image_is_one_sentence(zk, tmp_path):
    with pytest.raises(ConfigError, match=r"^Unknown image 'nope'.*\.$"):
        build_image(small_config(tmp_path), zk, "nope")


def test_unknown_element_is_one_sentence_before_any_build(zk, tmp_path):
    config = small_config(tmp_path, elements=("debian-minimal", "kernel-ci-node", "nope"))
    with pytest.raises(ConfigError) as error:
        build_image(config, zk, "small")
    assert str(error.value) == (
        f"{config.path}: diskimages[0].elements[2]: unknown element 'nope' "
        "(not in elements/, ELEMENTS_PATH or diskimage-builder's)."
    )
    assert zk.get_image_builds("small") == []


def test_cleanup_keeps_two_newest_ready_and_in_use(zk, tmp_path, fake_dib):
    config = small_config(tmp_path)
    builds = [build_image(config, zk, "small") for _ in range(4)]
    failed = build_image(small_config(tmp_path, elements=("fail",)), zk, "small")
    zk.store_node(Node(type="small", image_build=f"small-{builds[0].id}"))
    leftover = tmp_path / "state" / "images" / "small-9999999999"
    leftover.mkdir()
    cleanup(config, zk)
    remaining = {b.id for b in zk.get_image_builds("small")}
    # builds[1] is superseded and unused; a failure newer than every ready build stays.
    assert remaining == {builds[0].id, builds[2].id, builds[3].id, failed.id}
    assert not Path(builds[1].path).exists()
    assert not leftover.exists()


def test_reconcile_fails_dead_builds_of_this_host(zk, tmp_path, fake_dib):
    config = small_config(tmp_path)
    mine = ImageBuild(builder=socket.gethostname())
    other = ImageBuild(builder="elsewhere")
    zk.store_image_build("small", mine)
    zk.store_image_build("small", other)
    reconcile(config, zk)
    assert zk.get_image_build("small", mine.id).state == BuildState.FAILED
    assert zk.get_image_build("small", other.id).state == BuildState.BUILDING


def test_build_due_by_age_and_failure_backoff(zk, tmp_path, fake_dib):
    config = small_config(tmp_path, rebuild_age=100)
    now = time.time()
    assert builder.build_due(config, zk, "small", now)
    build = build_image(config, zk, "small")
    assert not builder.build_due(config, zk, "small", now + 50)
    assert builder.build_due(config, zk, "small", build.created_time + 101)


def test_daemon_builds_on_request_and_stops_a_running_build(zk, tmp_path, fake_dib):
    config = small_config(tmp_path, rebuild_age=10**9)
    zk.store_image_build("slow", ImageBuild(state=BuildState.READY))  # not due
    daemon = NodePoolBuilder(config, zk, interval=3600)
    daemon.start()
    try:
        deadline = time.time() + 30  # "small" has no build: built at start
        while not zk.get_image_builds("small", [BuildState.READY]):
            assert time.time() < deadline, "no build of a due image"
            time.sleep(0.1)
        zk.request_image_build("small")
        while len(zk.get_image_builds("small", [BuildState.READY])) < 2:
            assert time.time() < deadline, "request not served"
            time.sleep(0.1)
        zk.request_image_build("slow")
        while not zk.get_image_builds("slow", [BuildState.BUILDING]):
            assert time.time() < deadline, "slow build did not start"
            time.sleep(0.1)
    finally:
        daemon.stop()
        daemon.join(120)  # the slow dib runs until killed: only a cancel ends its build
    assert not daemon.build_worker.is_alive(), "stop did not cancel the running build"
    assert "small" not in zk.get_image_build_requests()
    slow = zk.get_image_builds("slow")[-1]
    assert slow.state == BuildState.FAILED
    if os.geteuid() == 0 and Path(slow.path, "loop").exists():
        assert not fake_dib_loop(Path(slow.path))


# `nodepool builder` with FAKE_DIB, as a process of its own to kill with -9.
BUILDER_WITH_FAKE_DIB = """
import sys, threading
from nodepool_lite import builder, dib_orphans
from nodepool_lite.config import load
from nodepool_lite.zk import ZooKeeper
conf, hosts, script = sys.argv[1:4]
builder.dib_command = lambda d, out: [sys.executable, script, "-o", str(out), *d.elements]
builder.check_elements = lambda config, diskimage: None
zk = ZooKeeper(hosts)
zk.connect()
builder.NodePoolBuilder(load(conf), zk, interval=3600).start()
threading.Event().wait()
"""


def test_a_process_left_holding_dibs_output_does_not_keep_the_build_running(tmp_path):
    """A child forked just as dib died (a cancel's kill), or left running by
    it, keeps dib's stdout open in its own session, with a command line and
    working directory that name nothing of the build: the run still ends,
    and the child is killed (it carries the build's TMP_DIR)."""
    build_dir = tmp_path / "build"
    tmp = dib_orphans.tmp_dir(build_dir)
    tmp.mkdir(parents=True)
    pids = tmp_path / "pids"
    script = (
        "import subprocess, sys\n"
        "child = subprocess.Popen(['sleep', '600'], start_new_session=True, cwd='/')\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "print('dib output', flush=True)\n"
        "sys.exit(3)\n"
    )
    cmd = [sys.executable, "-c", script, "-o", str(build_dir / "image")]
    env = {**os.environ, "TMP_DIR": str(tmp)}
    lines: list[str] = []
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(
            BuildRun().run(cmd, env, build_dir, tmp_path / "build.log", lines.append)
        ),
        daemon=True,
    )
    runner.start()
    runner.join(60)
    assert result == [3], "the run waited for the child holding its output"
    assert lines == ["dib output"]
    try:
        pidfd = os.pidfd_open(int(pids.read_text()))
    except ProcessLookupError:
        return  # killed and reaped
    try:
        assert select.select([pidfd], [], [], 30)[0], "the child left running was not killed"
    finally:
        os.close(pidfd)


def fake_dib_loop(build_dir: Path) -> bool:
    """Is the loop device FAKE_DIB attached for the build in `build_dir` still there?"""
    name = Path(build_dir, "loop").read_text().removeprefix("/dev/")
    return Path(f"/sys/block/{name}/loop/backing_file").exists()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_builder_mid_build_then_restart(zk, zk_hosts, tmp_path, fake_dib):
    """dib outlives a builder killed with -9; the restarted builder kills it
    (and its child in another session), unmounts its tmpfs, fails the build
    and starts a fresh one, never beside the orphan."""
    config = small_config(tmp_path, rebuild_age=10**9)
    for image in ("small", "slow"):
        zk.store_image_build(image, ImageBuild(state=BuildState.READY))  # not due
    zk.request_image_build("slow")
    runner = tmp_path / "builder-runner.py"
    runner.write_text(BUILDER_WITH_FAKE_DIB)
    daemon = subprocess.Popen(
        [sys.executable, str(runner), str(config.path), zk_hosts, str(fake_dib)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    restarted = None
    try:
        # Its record gets its path in a second write, once the first named its id.
        [orphan] = wait_for(lambda: [b for b in zk.get_image_builds("slow", [BuildState.BUILDING])
                                     if b.path], 30, "the build to start")  # fmt: skip
        pids_file = Path(orphan.path) / "pids"
        pids = wait_for(lambda: pids_file.exists() and pids_file.read_text().split(), 30, "dib")
        pids = [int(pid) for pid in pids]
        work = Path(orphan.path) / "tmp" / "dib_build.fake"
        if os.geteuid() == 0:
            assert is_mounted(work) and fake_dib_loop(Path(orphan.path))
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        assert all(_alive(pid) for pid in pids)
        restarted = NodePoolBuilder(config, zk, interval=3600)
        restarted.start()  # reconciles before its build worker runs
        assert not any(_alive(pid) for pid in pids)
        assert not is_mounted(work) and not work.parent.exists()
        assert os.geteuid() != 0 or not fake_dib_loop(Path(orphan.path))
        assert zk.get_image_build("slow", orphan.id).state == BuildState.FAILED
        assert "the builder died" in (Path(orphan.path) / "build.log").read_text()
        wait_for(lambda: [b for b in zk.get_image_builds("slow", [BuildState.BUILDING])
                          if b.id != orphan.id], 30, "a fresh build")  # fmt: skip
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if restarted is not None:
            restarted.stop()
            restarted.join(10)
    fresh = zk.get_image_builds("slow")[-1]
    assert fresh.state == BuildState.FAILED  # stopped: its dib and child killed too
    assert not (Path(fresh.path) / "tmp").exists()


# -- the real image: built once per machine per elements/ hash -------------------

# What a job does first on a node: become root, run Python, clone the merger's
# (root-owned, read-only) repo, find its tools.
NODE_CHECK = (
    "sudo -n id -un && python3 -c 'print(42)' && echo $HOME && "
    "git clone -q --shared /srv/merger/linux ~/probe && "
    # kernel-tree-cache: a clean checkout, which git reads without rehashing
    'test -z "$(git -C ~/src/linux status --porcelain)" && '
    "qemu-system-x86_64 --version >/dev/null && busybox true && ccache -V >/dev/null"
)


@pytest.fixture
def node_image(zk, tmp_path) -> ImageBuild:
    return ensure_node_image(zk, node_config(tmp_path))


real_image = pytest.mark.node_image("kernel-ci-debian")


@real_image
def test_real_image_build(node_image, zk):
    stored = zk.get_image_build("kernel-ci-debian", node_image.id)
    assert stored.state == BuildState.READY
    assert stored.elements == ["debian-minimal", "kernel-ci-node"]
    log_text = Path(stored.log_path).read_text()
    assert "disk-image-create" in log_text and "kernel-ci-node" in log_text
    root = rootfs_path(stored)
    for tool in ("usr/sbin/sshd", "usr/bin/gcc", "usr/bin/qemu-system-x86_64", "bin/busybox",
                 "usr/bin/ccache", "usr/bin/python3", "usr/bin/make", "usr/bin/git",
                 "usr/bin/sudo", "usr/bin/bc", "usr/bin/flex", "usr/bin/bison"):  # fmt: skip
        assert (root / tool).exists(), tool
    passwd = (root / "etc/passwd").read_text()
    assert "zuul:x:2000:2000::/home/zuul:/bin/bash" in passwd.splitlines()
    # Shifted for the nodes' user namespace: uid 2000 of a node.
    assert (root / "home/zuul/.ssh").stat().st_uid == host_id(2000)
    assert (root / "etc/ssh/ssh_host_ed25519_key").exists()
    assert not list((root / "etc/ssh").glob("ssh_host_rsa_key*"))
    assert not list((root / "boot").glob("vmlinuz*")), "container images carry no kernel"
    # kernel-tree-cache: the tests' kernel tree at its base, built, owned by zuul.
    tree = root / "home/zuul/src/linux"
    assert (tree / "arch/x86/boot/bzImage").is_file() and (tree / "kernel/panic.o").is_file()
    assert tree.stat().st_uid == host_id(2000)
    config = (tree / ".git/config").read_text()
    assert "checkStat = minimal" in config and "trustctime = false" in config
    assert "[remote" not in config
    assert "gcc-aarch64-linux-gnu" in (root / "var/lib/dpkg/status").read_text()


@real_image
def test_real_image_accepts_zuul_over_ssh(node_image, tmp_path):
    """The nspawn driver's way of booting a node, by hand: overlay, nspawn, sshd."""
    merger = tmp_path / "merger"
    subprocess.run(["git", "init", "-q", str(merger / "linux")], check=True)
    subprocess.run(["git", "-C", str(merger / "linux"), "-c", "user.name=t", "-c",
                    "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "base"],
                   check=True)  # fmt: skip
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    layers = {n: tmp_path / n for n in ("upper", "work", "root")}
    for path in layers.values():
        path.mkdir()
    lower = rootfs_path(node_image)
    opts = f"lowerdir={lower},upperdir={layers['upper']},workdir={layers['work']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(layers["root"])],
                   check=True)  # fmt: skip
    root = layers["root"]
    sshd_log = tmp_path / "sshd.log"
    sshd = None
    try:
        auth = root / "home/zuul/.ssh/authorized_keys"
        auth.write_text(Path(f"{key}.pub").read_text())
        os.chown(auth, host_id(2000), host_id(2000))
        port = _free_port()
        sshd = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit",
             "--as-pid2", f"--private-users={NODE_UID_BASE}:{NODE_UID_COUNT}",
             "--private-users-ownership=off", f"--bind-ro={merger}:/srv/merger", "/bin/sh", "-c",
             f"mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -p {port} "
             "-o ListenAddress=127.0.0.1"],
            stdout=sshd_log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        ssh = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "zuul@127.0.0.1"]  # fmt: skip
        deadline = time.time() + 20
        while True:
            result = subprocess.run(
                [*ssh, NODE_CHECK],
                capture_output=True, text=True,
            )  # fmt: skip
            if result.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert result.returncode == 0, result.stderr + sshd_log.read_text()
        assert result.stdout.split() == ["root", "42", "/home/zuul"]
        assert "unable to resolve host" not in result.stderr
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        subprocess.run(["umount", str(root)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@real_image
def test_ensure_node_image_reuses_the_cached_build(node_image, zk, tmp_path):
    again = ensure_node_image(zk, node_config(tmp_path))
    assert again.id != node_image.id
    assert again.path == node_image.path
    assert again.created_time > node_image.created_time  # fresh for rebuild-age
    assert zk.get_image_build("kernel-ci-debian", again.id).state == BuildState.READY


def test_prune_stale_drops_only_old_unused_cache_slots(tmp_path):
    slots = {n: tmp_path / f"img-{n * 16}" for n in "abcd"}
    for name, slot in slots.items():
        slot.mkdir()
        if name != "d":  # d: a build that died before its marker
            (slot / MARKER).write_text("{}")
    two_days_ago = time.time() - 2 * 86400
    os.utime(slots["b"] / MARKER, (two_days_ago, two_days_ago))
    prune_stale(slots["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-" + "a" * 16, "img-" + "c" * 16]


def test_cleanup_never_deletes_dirs_outside_the_state_dir(zk, tmp_path, fake_dib):
    shared = tmp_path / "cache" / "images" / "small-0123456789abcdef" / "small-0000000007"
    (shared / "rootfs").mkdir(parents=True)
    config = small_config(tmp_path)
    zk.store_image_build("small", ImageBuild(state=BuildState.READY, path=str(shared)))
    for _ in range(2):
        build_image(config, zk, "small")
    cleanup(config, zk)
    assert len(zk.get_image_builds("small")) == 2  # the shared one was the oldest
    assert (shared / "rootfs").is_dir()


def test_an_image_that_cannot_be_built_does_not_stop_the_others(
    zk, tmp_path, fake_dib, caplog, monkeypatch
):
    """A pass of the build worker says why it skips one image (an element
    gone since the config was loaded) and builds the next one."""
    path = tmp_path / "nodepool-two.yaml"
    path.write_text(
        f"state-dir: {tmp_path / 'state'}\n"
        "diskimages:\n  - {name: bad, elements: [base]}\n  - {name: good, elements: [base]}\n"
    )
    config = load(path)

    def check_elements(config, diskimage):
        if diskimage.name == "bad":
            raise ConfigError("diskimages[0].elements[0]: unknown element 'base'.")

    monkeypatch.setattr(builder, "check_elements", check_elements)
    BuildWorker(config, zk).run_once()
    assert zk.get_image_builds("bad") == []
    assert [b.state for b in zk.get_image_builds("good")] == [BuildState.READY]
    assert "Not building bad: diskimages[0].elements[0]: unknown element 'base'." in caplog.text


def _mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    return [p for p in points if p == str(top) or p.startswith(f"{top}/")]


def _loops_under(top: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(f"{top}/"):
                found.append(backing.parent.parent.name)
    return found


def _dib_pids(build_dir: Path) -> set[int]:
    """Processes carrying the build's TMP_DIR (what dib and its children inherit)."""
    entry = f"TMP_DIR={dib_orphans.tmp_dir(build_dir)}".encode() + b"\0"
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if entry in (proc / "environ").read_bytes() and _alive(int(proc.name)):
                found.add(int(proc.name))
    return found


@pytest.mark.node_image("vm-debian")  # after the prebuild: its dib caches are warm
@pytest.mark.skipif(os.geteuid() != 0, reason="disk-image-create needs root")
def test_kill_9_of_nodepool_builder_during_a_real_dib_build(zk, zk_hosts, tmp_path):
    """The real `nodepool builder` killed with -9 while the real
    disk-image-create works in its chroot: dib, its mounts (tmpfs, the
    chroot's /proc, /sys, /dev) and loop devices outlive it; the restarted
    builder removes them all before a fresh build starts, and that build's
    own dib goes with its builder's stop."""
    conf = tmp_path / "nodepool.yaml"
    conf.write_text(yaml.safe_dump({
        "zookeeper-servers": zookeeper_servers(zk_hosts),
        "state-dir": str(tmp_path / "state"),
        "diskimages": [{"name": "real", "elements": ["debian-minimal", "zuul-user"],
                        "rebuild-age": 10**9}],
    }))  # fmt: skip
    with open(tmp_path / "builder.log", "wb") as log:
        daemon = nodepool_process(conf, "builder", log)
    restarted = None
    profiles = set(Path(tempfile.gettempdir()).glob("profiledir.*"))  # dib-run-parts's

    def started(but: str | None = None) -> list[ImageBuild]:
        # A build's record gets its path in a second write.
        building = zk.get_image_builds("real", [BuildState.BUILDING])
        return [b for b in building if b.path and b.id != but]

    try:
        [orphan] = wait_for(started, 60, "the build to start")
        build_dir = Path(orphan.path)
        # In the chroot: dib has mounted /proc into the image it builds.
        wait_for(lambda: [p for p in _mounts_under(build_dir) if p.endswith("/proc")], 600,
                 "dib to work in its chroot")  # fmt: skip
        pids = _dib_pids(build_dir)
        assert pids
        os.kill(daemon.pid, signal.SIGKILL)  # the daemon alone, as `kill -9 <pid>`
        daemon.wait()
        assert any(_alive(pid) for pid in pids) and _mounts_under(build_dir)

        restarted = NodePoolBuilder(load(conf), zk, interval=3600)
        restarted.start()  # reconciles before its build worker runs
        assert not any(_alive(pid) for pid in pids) and not _dib_pids(build_dir)
        assert not _mounts_under(build_dir) and not _loops_under(build_dir)
        assert zk.get_image_build("real", orphan.id).state == BuildState.FAILED
        assert "the builder died" in (build_dir / "build.log").read_text()
        [fresh] = wait_for(lambda: started(but=orphan.id), 60, "a new build")
        wait_for(lambda: _dib_pids(Path(fresh.path)), 60, "the fresh build's dib")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if restarted is not None:
            restarted.stop()
            restarted.join(60)
        for build_dir in (tmp_path / "state" / "images").glob("*"):  # a failed assertion's
            dib_orphans.kill_build(build_dir)
            dib_orphans.release_mounts(build_dir)
    fresh_dir = Path(fresh.path)
    assert not _dib_pids(fresh_dir) and not _mounts_under(fresh_dir)
    assert not _loops_under(fresh_dir)
    assert zk.get_image_build("real", fresh.id).state == BuildState.FAILED
    assert set(Path(tempfile.gettempdir()).glob("profiledir.*")) <= profiles
