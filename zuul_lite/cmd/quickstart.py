"""`zuul-lite quickstart`: the embedded default, end to end, on this machine.

Makes the CA and certificates the configs name (once), starts ZooKeeper and
the five daemons, makes sure a node image exists, imports the Debian kernel
tree as project `linux`, submits the sample series and prints each vote.
Every step reuses what an earlier run left, so running it twice costs only
the wait for votes (and submits nothing twice).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from nodepool_lite import config as npconfig
from nodepool_lite.certs import CertDir, ensure_certs
from nodepool_lite.drivers import ensure_keypair
from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import ZooKeeperServer
from zuul_lite import config as zconfig
from zuul_lite.cmd import services
from zuul_lite.connections.local import LocalConnection
from zuul_lite.model import Change
from zuul_lite.reporter import format_duration
from zuul_lite.series import read_series
from zuul_lite.state import ZuulState

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "doc" / "examples" / "patches"
SAMPLE_ORDER = ("good", "build-failure", "checkpatch-failure")
IMAGE_WAIT = 3600
VOTE_WAIT = 3600


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _wait(what: str, done, timeout: float, every: float = 20.0, detail=None) -> None:
    """Wait on `done(t)` (an Event-backed check), printing a line every `every` s."""
    start = last = time.monotonic()
    while not done(every):
        now = time.monotonic()
        if now - start > timeout:
            raise SystemExit(f"zuul-lite: gave up waiting for {what} after {int(now - start)}s.")
        if now - last >= every:
            last = now
            extra = f": {detail()}" if detail else ""
            say(f"  ... still waiting for {what} ({format_duration(now - start)}){extra}")


def _zk_port(hosts: str) -> int:
    return int(hosts.split(",")[0].split("/")[0].rsplit(":", 1)[1])


def ensure_tls(zcfg: zconfig.ZuulConfig, ncfg: npconfig.Config) -> CertDir | None:
    """Make what the configs' `tls` keys name, in the directory of their CA file;
    None when neither config asks for TLS (plain loopback, for development)."""
    named = [t for t in (zcfg.zk_tls, zcfg.gearman_tls, ncfg.zookeeper_tls) if t is not None]
    if not named:
        return None
    directory = Path(named[0].ca).parent
    servers = zcfg.zk_hosts.split("/")[0].split(",")
    hosts = [s.rsplit(":", 1)[0].strip("[]") for s in servers] + [zcfg.gearman_server]
    existed = (directory / "ca.pem").exists()
    certs = ensure_certs(directory, hosts)
    say(f"TLS certificates in {directory}: {'reused' if existed else 'made a new CA'}.")
    return certs


def ensure_image(zk: ZooKeeper, image: str) -> None:
    def ready() -> bool:
        return any(b.state == "ready" for b in zk.get_image_builds(image))

    if ready():
        say(f"Node image {image}: ready (reused).")
        return
    say(
        f"Node image {image}: building with diskimage-builder "
        "(a few minutes the first time; the builder log is in run/nodepool-builder.log)"
    )
    zk.request_image_build(image)
    event = threading.Event()
    zk.watch_children(f"/nodepool/images/{image}/builds", lambda c: event.set())

    def done(timeout: float) -> bool:
        event.wait(timeout)
        event.clear()
        builds = zk.get_image_builds(image)
        if builds and all(b.state == "failed" for b in builds[-1:]):
            raise SystemExit(f"zuul-lite: the image build failed; see {builds[-1].log_path}.")
        return ready()

    _wait(f"image {image}", done, IMAGE_WAIT)
    say(f"Node image {image}: ready.")


def series_key(path: Path) -> str:
    """The git blob id the inbox stores the series under (its patchset revision)."""
    data = read_series(path).mbox()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def submit_samples(local: LocalConnection) -> list[tuple[str, int]]:
    """Submit each sample once; a rerun finds the change it made before."""
    known = {}
    for number in local.list_changes():
        change = local.get_change_data(number)
        for ps in change["patchsets"]:
            known[ps["revision"]] = number
    out = []
    for name in SAMPLE_ORDER:
        path = SAMPLES / name
        key = series_key(path)
        if key in known:
            say(f"Sample {name}: already submitted as change {known[key]}.")
            out.append((name, known[key]))
            continue
        number, ps = local.submit(path, "linux")
        say(f"Sample {name}: submitted as change {number}, patchset {ps}.")
        out.append((name, number))
    return out


def _progress(zk: ZooKeeper) -> str:
    shown = {"queued": "running", "waiting": "waiting", "skipped": "SKIPPED"}
    parts = []
    for pipeline in ZuulState(zk).read_status()["pipelines"]:
        for item in pipeline["items"]:
            change = Change.from_dict(item["change"])
            what = (
                f"change {change.number}"
                if change.number
                else f"{pipeline['name']} {change.label}"
            )
            bs = item["buildset"]
            if bs["merge_state"] == "pending":
                parts.append(f"{what}: merging")
                continue
            jobs = ", ".join(
                f"{b['job']} {b['result'] or shown.get(b['state'], b['state'])}"
                for b in sorted(bs["builds"].values(), key=lambda b: b.get("index", 0))
            )
            parts.append(f"{what}: {jobs}")
    return "; ".join(parts) or "reporting"


def wait_for_post(zk: ZooKeeper, local: LocalConnection, project: str) -> None:
    """Wait until the post pipeline has built the project's branch head: that
    trusted build fills the shared compiler cache, which the samples' builds
    (untrusted: they only read it) then hit."""
    state = ZuulState(zk)
    head = local.head(project)
    if not state.ref_in_flight(project, head):
        return
    event = threading.Event()
    watched: set[str] = set()

    def watch_pipelines() -> None:
        # A scheduler still starting makes its pipelines' znodes meanwhile.
        for pipeline in set(state.pipeline_names()) - watched:
            watched.add(pipeline)
            state.watch_items(pipeline, lambda uuids: event.set())

    state.watch_trigger_events(lambda names: event.set())
    watch_pipelines()

    def done(timeout: float) -> bool:
        event.wait(timeout)
        event.clear()
        watch_pipelines()
        return not state.ref_in_flight(project, head)

    say(
        f"Building {project}'s branch head in the post pipeline: the trusted build that "
        "fills the shared compiler cache (minutes the first time, seconds afterwards)."
    )
    _wait("the post pipeline", done, VOTE_WAIT, every=30.0, detail=lambda: _progress(zk))
    say("Compiler cache: filled from the branch head.")


def wait_for_votes(zk: ZooKeeper, local: LocalConnection, changes: list[tuple[str, int]]):
    event = threading.Event()
    for _, number in changes:
        zk.watch_data(local.change_path(number), lambda d, v: event.set())

    def voted(number: int) -> bool:
        change = local.get_change_data(number)
        latest = len(change["patchsets"])
        return any(v["patchset"] == latest for v in change["votes"])

    def done(timeout: float) -> bool:
        event.wait(timeout)
        event.clear()
        return all(voted(n) for _, n in changes)

    if all(voted(n) for _, n in changes):
        return
    say("Waiting for votes (kernel builds and QEMU boots run on throwaway nodes).")
    _wait("votes", done, VOTE_WAIT, every=30.0, detail=lambda: _progress(zk))


def print_votes(local: LocalConnection, changes: list[tuple[str, int]]) -> None:
    print()
    for name, number in changes:
        change = local.get_change_data(number)
        latest = len(change["patchsets"])
        vote = [v for v in change["votes"] if v["patchset"] == latest][-1]
        value = vote["value"]
        shown = f"{value:+d}" if isinstance(value, int) else "0"
        print(f"Change {number} ({name}): {change['subject']}")
        print(f"  Verified {shown}")
        for line in vote["message"].splitlines()[1:]:
            if line.strip():
                print(f"  {line}")
        print()


def stop_all(zcfg: zconfig.ZuulConfig, npconf: Path) -> int:
    run_dir = zcfg.state_dir / "run"
    for service in reversed(services.services(zcfg.path, npconf, run_dir)):
        if services.stop(service, run_dir):
            say(f"Stopped {service.name}.")
    ZooKeeperServer(zcfg.state_dir / "zk", port=_zk_port(zcfg.zk_hosts)).stop()
    say(
        "Stopped ZooKeeper. Nodes are destroyed by the nodepool launcher; "
        f"state stays in {zcfg.state_dir}."
    )
    return 0


def run(args) -> int:
    from zuul_lite.kerneltree import ensure_kernel_repo

    # The console is for the progress lines; the daemons log to run/*.log.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    zcfg = zconfig.load(args.config)
    npconf = Path(args.config).resolve().parent / "nodepool.yaml"
    if args.stop:
        return stop_all(zcfg, npconf)
    ncfg = npconfig.load(npconf)
    state = zcfg.state_dir
    run_dir = state / "run"
    say(f"State directory {state}; daemon logs in {run_dir}.")

    certs = ensure_tls(zcfg, ncfg)
    zk_certs = certs if zcfg.zk_tls is not None else None
    zkserver = ZooKeeperServer(state / "zk", port=_zk_port(zcfg.zk_hosts), tls=zk_certs)
    was_running = zkserver.running()
    zkserver.start()
    how = " (TLS, client certificates required)" if zk_certs else ""
    say(f"ZooKeeper on {zkserver.hosts}{how}: {'reused' if was_running else 'started'}.")
    ensure_keypair(state)
    for sub in ("logs", "ccache", "merger"):
        (state / sub).mkdir(parents=True, exist_ok=True)

    zk = ZooKeeper(zcfg.zk_hosts, tls=zcfg.zk_tls)
    zk.connect()
    try:
        # Before the daemons: the builder's first image build checks out and
        # builds the project's branch head (elements/kernel-tree-cache,
        # DIB_KERNEL_TREE_REPO in nodepool.yaml); the scheduler finds the
        # import's ref-updated event in ZooKeeper when it starts.
        say("Kernel tree: importing Debian's linux-source-6.1 (once; reused afterwards).")
        tree = ensure_kernel_repo(progress=lambda m: say(f"  {m}"))
        local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), state)
        local.import_project("linux", tree)
        say(f"Project linux: served from {local.repo_path('linux')}.")
        for service in services.services(zcfg.path, npconf, run_dir):
            pid, new = services.start(service, run_dir)
            say(f"{service.name}: {'started' if new else 'reused'} (pid {pid}).")
        for image in [d.name for d in ncfg.diskimages]:
            ensure_image(zk, image)
        say(f"Changes under test: fetched by launchers from {zcfg.git_url}linux.")
        for service in services.services(zcfg.path, npconf, run_dir):
            problem = services.check_alive(service, run_dir)
            if problem:
                raise SystemExit(f"zuul-lite: {problem}")
        wait_for_post(zk, local, "linux")
        changes = submit_samples(local)
        wait_for_votes(zk, local, changes)
        print_votes(local, changes)
    finally:
        zk.disconnect()
    say(f"Browse the logs and the live status at {zcfg.web_url}/ .")
    say("Everything keeps running. Stop it all with: ./tools/quickstart.sh stop")
    return 0
