"""The openstack driver against openstacksdk's real code, the cloud answered
at the HTTP level (tests/fake_openstack.py: through requests-mock, or served
on loopback for a launcher in its own process), with a real ZooKeeper and a
real sshd standing in for the servers' (their address is 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests_mock
import yaml

from nodepool_lite import config
from nodepool_lite.builder import cleanup
from nodepool_lite.cmd.nodepoolcmd import main
from nodepool_lite.drivers.openstack.provider import OpenStackProvider
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.model import (
    BuildState,
    ImageBuild,
    ImageUpload,
    NodeState,
    RequestState,
    UploadState,
)
from nodepool_lite.uploader import reconcile_uploads, upload_pass, uploaders
from tests.fake_openstack import FakeCloud, clouds_yaml, image_json
from tests.nodepool_env import REPO, launchers, release, request, take_nodes, wait_for

LABEL = "cloud-debian"
IMAGE = "kernel-ci-debian"


@pytest.fixture
def cloud(request, tmp_path, monkeypatch):
    """The fake cloud through requests-mock, or served over HTTP on loopback
    (`indirect` param "http") for a launcher in another process."""
    monkeypatch.setattr(OpenStackProvider, "poll_interval", 0.05)
    fake = FakeCloud()
    fake.images["debian"] = image_json("debian-12")
    with contextlib.ExitStack() as stack:
        if getattr(request, "param", "mock") == "http":
            fake.serve()
            stack.callback(fake.stop)
        else:
            fake.install(stack.enter_context(requests_mock.Mocker()))
        clouds = clouds_yaml(tmp_path / "clouds.yaml", fake.base)
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
        yield fake
    assert not fake.unknown, fake.unknown


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1: what a booted server answers with."""
    work = tmp_path_factory.mktemp("sshd")
    key = work / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {work}/pid\n"
        "UsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-f", conf, "-D", "-e"], stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port), 10, "sshd")
    yield port, Path(f"{key}.pub").read_text().split()[:2]
    proc.terminate()
    proc.wait()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def write_config(
    tmp_path: Path,
    zk_hosts: str,
    port: int,
    label: dict | None = None,
    pool: dict | None = None,
    provider: dict | None = None,
) -> Path:
    hosts, _, chroot = zk_hosts.partition("/")
    host, zk_port = hosts.split(":")
    entry = {"cloud-image": "debian-12", "flavor-name": "small", **(label or {})}
    data = {
        "zookeeper-servers": [{"host": host, "port": int(zk_port), "chroot": chroot}],
        "state-dir": str(tmp_path / "state"),
        "labels": [{"name": LABEL}],
        "diskimages": [{"name": IMAGE, "elements": ["e"], "formats": ["tar", "qcow2"]}],
        "providers": [
            {
                "name": "cloud",
                "driver": "openstack",
                "cloud": "fake",
                "boot-timeout": 30,
                **(provider or {}),
                "pools": [
                    {
                        "name": "main",
                        "max-servers": 2,
                        **(pool or {}),
                        "labels": [
                            {"name": LABEL, "connection-port": port}
                            | {k: v for k, v in entry.items() if v is not None}
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def nodepool(tmp_path, zk_hosts, sshd, cloud):
    with launchers() as start:
        yield lambda **overrides: start(write_config(tmp_path, zk_hosts, sshd[0], **overrides))


def test_launch_active_server_is_a_ready_node(nodepool, cloud, zk, sshd):
    np = nodepool()
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    [node] = take_nodes(zk, req)
    [body] = cloud.created
    assert body["metadata"] == {
        "nodepool_node_id": node.id,
        "nodepool_provider_name": "cloud",
        "nodepool_pool_name": "main",
        "nodepool_node_label": LABEL,
    }
    assert body["name"] == f"{LABEL}-cloud-{node.id}" and body["config_drive"] is True
    assert body["flavorRef"] == "f1" and body["imageRef"] == cloud.images["debian"]["id"]
    # The launcher's own key, registered once as the provider's keypair.
    public = (np.config.state_dir / "keys" / "id_ed25519.pub").read_text().strip()
    assert cloud.keypairs[body["key_name"]]["public_key"] == public
    assert (node.interface_ip, node.connection_port) == ("127.0.0.1", sshd[0])
    assert node.host_keys == [" ".join(sshd[1])]
    assert node.external_id in cloud.servers
    release(zk, [node])
    wait_for(lambda: not cloud.servers and not zk.nodes(), 30, "server deleted")
    assert cloud.deleted == [node.external_id]


def test_boot_error_is_retried(nodepool, cloud, zk):
    cloud.boot_statuses = ["ERROR", "ACTIVE"]
    nodepool()
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    [node] = take_nodes(zk, req)
    first, second = (body["name"] for body in cloud.created)
    assert first == second  # the same node, booted again
    assert len(cloud.deleted) == 1 and list(cloud.servers) == [node.external_id]


def test_boot_errors_fail_the_request_with_the_fault(nodepool, cloud, zk):
    cloud.boot_statuses = ["ERROR"] * 2
    nodepool(provider={"launch-retries": 2})
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    failed = zk.get_node_request(req.id)
    assert failed.state == RequestState.FAILED
    assert "went to ERROR: No valid host was found" in failed.reason
    assert len(cloud.created) == 2
    wait_for(lambda: not cloud.servers and not zk.nodes(), 30, "errored servers deleted")


@pytest.mark.parametrize("cloud", ["mock", "http"], indirect=True)  # both transports
def test_cloud_down_fails_the_request_with_a_sentence(nodepool, cloud, zk):
    cloud.down = True
    np = nodepool(provider={"launch-retries": 1})  # starts: the leak scan only warns
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    failed = zk.get_node_request(req.id)
    assert failed.state == RequestState.FAILED
    assert "cannot create its server" in failed.reason and "Traceback" not in failed.reason
    # The failed node is removed once the cloud can say it has no server.
    cloud.down = False
    np.wake()
    wait_for(lambda: not zk.nodes(), 30, "failed node removed")


def test_full_quota_makes_the_request_wait(nodepool, cloud, zk):
    cloud.max_instances = 1
    cloud.add_server("someone-elses")  # not ours, but it counts in the quota
    np = nodepool()
    cloud.limits_asked.clear()
    req, done, _ = request(zk, LABEL)
    assert cloud.limits_asked.wait(30)
    assert zk.get_node_request(req.id).state == RequestState.REQUESTED and not cloud.created
    cloud.max_instances = 2
    np.wake()
    assert done.wait(30)
    assert zk.get_node_request(req.id).state == RequestState.FULFILLED


def test_pool_max_cores_makes_the_request_wait(nodepool, cloud, zk):
    nodepool(pool={"max-cores": 1})  # one "small" server (1 vCPU)
    first, done, _ = request(zk, LABEL)
    assert done.wait(30)
    [node] = take_nodes(zk, first)
    cloud.limits_asked.clear()
    second, done, _ = request(zk, LABEL)
    assert cloud.limits_asked.wait(30)
    assert zk.get_node_request(second.id).state == RequestState.REQUESTED
    assert len(cloud.created) == 1
    release(zk, [node])  # its deletion frees the cores
    assert done.wait(30)
    assert zk.get_node_request(second.id).state == RequestState.FULFILLED


def test_leaked_server_deleted_alien_left_alone(nodepool, cloud, zk, capsys):
    meta = {"nodepool_node_id": "0000000099", "nodepool_provider_name": "cloud"}
    leaked = cloud.add_server("leaked", meta)
    other = cloud.add_server("other-provider", {**meta, "nodepool_provider_name": "elsewhere"})
    alien = cloud.add_server("alien")
    np = nodepool()  # start() reconciles: one cleanup pass has run
    assert cloud.deleted == [leaked]
    capsys.readouterr()
    # Ours, but leaked after that pass: listed until the next pass deletes it.
    later = cloud.add_server("later", {**meta, "nodepool_node_id": "0000000098"})
    assert main(["-c", str(np.config.path), "alien-list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(rows) == sorted(
        [["cloud", alien, "alien"], ["cloud", other, "other-provider"], ["cloud", later, "later"]]
    )
    assert set(cloud.servers) == {alien, other, later}
    cloud.down = True
    assert main(["-c", str(np.config.path), "alien-list"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == []
    assert err.startswith("nodepool: provider cloud: Cloud fake: cannot list servers (")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_node_of_a_dead_launcher_is_adopted_while_its_server_runs(nodepool, cloud, zk):
    np = nodepool()
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    [node] = take_nodes(zk, req)
    np.stop()
    np.join()
    nodepool()
    assert zk.get_node(node.id).state == NodeState.IN_USE and node.external_id in cloud.servers
    release(zk, [node])
    wait_for(lambda: not cloud.servers, 30, "server deleted")


def ready_build(zk, tmp_path: Path) -> ImageBuild:
    """A ready build with a qcow2 image, as the builder leaves it."""
    build_dir = tmp_path / "images" / f"build-{len(zk.get_image_builds(IMAGE))}"
    build_dir.mkdir(parents=True)
    (build_dir / f"{IMAGE}.qcow2").write_bytes(b"QFI\xfb qcow2 bytes")
    build = ImageBuild(state=BuildState.READY, path=str(build_dir), formats=["tar", "qcow2"])
    zk.store_image_build(IMAGE, build)
    return build


@pytest.mark.parametrize("cloud", ["mock", "http"], indirect=True)  # both transports
def test_builds_uploaded_to_glance_and_booted(nodepool, cloud, zk, tmp_path, capsys):
    build = ready_build(zk, tmp_path)
    np = nodepool(label={"cloud-image": None, "diskimage": IMAGE})
    req, done, _ = request(zk, LABEL)  # waits for the upload: the label is not ready
    targets = uploaders(np.config)
    upload_pass(zk, targets)
    [record] = zk.get_image_uploads(IMAGE, build.id, "cloud")
    assert record.state == UploadState.READY and record.external_name == f"{IMAGE}-{build.id}"
    glance = cloud.images[record.external_id]
    assert glance["disk_format"] == "qcow2" and glance["nodepool_build_id"] == build.id
    assert cloud.image_data[record.external_id] == b"QFI\xfb qcow2 bytes"
    upload_pass(zk, targets)  # uploaded once
    assert len(zk.get_image_uploads(IMAGE, build.id, "cloud")) == 1
    capsys.readouterr()
    assert main(["-c", str(np.config.path), "image-list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [f"{IMAGE}-{build.id}", record.id, "cloud", f"{IMAGE}-{build.id}", record.external_id,
            "ready"] == listed[-1].split()[:6]  # fmt: skip
    assert done.wait(30)
    [node] = take_nodes(zk, req)
    assert cloud.created[0]["imageRef"] == record.external_id
    assert node.image_build == f"{IMAGE}-{build.id}"
    # Retention marks the build deleting: its upload goes first, then the build.
    build.state = BuildState.DELETING
    zk.store_image_build(IMAGE, build)
    upload_pass(zk, targets)
    assert zk.get_image_uploads(IMAGE, build.id) == [] and record.external_id not in cloud.images
    release(zk, [node])


def test_retention_deletes_uploads_before_their_build(cloud, zk, zk_hosts, tmp_path):
    path = write_config(tmp_path, zk_hosts, 22, label={"cloud-image": None, "diskimage": IMAGE})
    cfg = config.load(path)
    targets = uploaders(cfg)
    oldest = ready_build(zk, tmp_path)
    upload_pass(zk, targets)
    [first] = zk.get_image_uploads(IMAGE, oldest.id)
    ready_build(zk, tmp_path)
    newest = ready_build(zk, tmp_path)
    upload_pass(zk, targets)  # the newest build only
    assert len(zk.get_image_uploads(IMAGE, newest.id)) == 1
    cleanup(cfg, zk)  # keeps two ready builds: the oldest goes, its upload first
    assert zk.get_image_build(IMAGE, oldest.id).state == BuildState.DELETING
    assert first.external_id in cloud.images
    upload_pass(zk, targets)
    assert first.external_id not in cloud.images and not zk.get_image_uploads(IMAGE, oldest.id)
    cleanup(cfg, zk)
    assert zk.get_image_build(IMAGE, oldest.id) is None
    assert len(cloud.images) == 2  # the cloud image and the newest upload


def test_image_delete_deletes_the_uploads_then_the_build(cloud, zk, zk_hosts, tmp_path, capsys):
    """`nodepool image-delete` of an uploaded build leaves no copy in the
    cloud: the build is marked deleting, the builder deletes its upload from
    Glance, then the build (as retention does)."""
    path = write_config(tmp_path, zk_hosts, 22, label={"cloud-image": None, "diskimage": IMAGE})
    cfg = config.load(path)
    build = ready_build(zk, tmp_path)
    upload_pass(zk, uploaders(cfg))
    [record] = zk.get_image_uploads(IMAGE, build.id)
    assert main(["-c", str(path), "image-delete", f"{IMAGE}-{build.id}"]) == 0
    assert "marked for deletion: the builder deletes its 1 upload(s) (cloud)" in (
        capsys.readouterr().out
    )
    assert zk.get_image_build(IMAGE, build.id).state == BuildState.DELETING
    upload_pass(zk, uploaders(cfg))
    assert record.external_id not in cloud.images
    cleanup(cfg, zk)
    assert zk.get_image_build(IMAGE, build.id) is None


def test_uploads_to_a_provider_no_longer_configured_do_not_keep_their_build(
    cloud, zk, zk_hosts, tmp_path, caplog
):
    """A provider taken out of the config cannot be asked to delete its copy:
    the builder says which copy is left there and forgets the record, so the
    build is deleted instead of staying `deleting` forever."""
    path = write_config(tmp_path, zk_hosts, 22, label={"cloud-image": None, "diskimage": IMAGE})
    build = ready_build(zk, tmp_path)
    upload_pass(zk, uploaders(config.load(path)))
    [record] = zk.get_image_uploads(IMAGE, build.id)
    build.state = BuildState.DELETING
    zk.store_image_build(IMAGE, build)
    upload_pass(zk, {})  # the provider is gone from the config
    assert "which is no longer configured" in caplog.text and record.external_id in caplog.text
    assert zk.get_image_uploads(IMAGE, build.id) == []
    cleanup(config.load(path), zk)
    assert zk.get_image_build(IMAGE, build.id) is None


def test_what_a_builder_stopped_mid_upload_left_in_glance_is_deleted_on_start(
    cloud, zk, zk_hosts, tmp_path
):
    """The builder died after Glance made the image and before the record got
    its id: on start the record is failed (to be retried) and the image,
    known only by its `nodepool_upload_id`, is deleted; a ready upload's
    image and an image that is not ours stay."""
    path = write_config(tmp_path, zk_hosts, 22, label={"cloud-image": None, "diskimage": IMAGE})
    targets = uploaders(config.load(path))
    kept = ready_build(zk, tmp_path)
    upload_pass(zk, targets)
    [ready] = zk.get_image_uploads(IMAGE, kept.id)
    build = ready_build(zk, tmp_path)
    dying = ImageUpload(image=IMAGE, build_id=build.id, provider="cloud")
    zk.store_image_upload(dying)  # `uploading`, as `upload` stores it first
    meta = {
        "nodepool_build_id": build.id,
        "nodepool_upload_id": dying.id,  # numbered per build: the ready one's number too
        "nodepool_provider_name": "cloud",
    }
    leaked = targets["cloud"][1].upload(
        f"{IMAGE}-{build.id}", Path(build.path, f"{IMAGE}.qcow2"), meta
    )
    foreign = next(iter(cloud.images))  # the cloud's own image
    reconcile_uploads(zk, targets)
    assert leaked not in cloud.images
    assert ready.external_id in cloud.images and foreign in cloud.images
    [failed] = zk.get_image_uploads(IMAGE, build.id)
    assert failed.state == UploadState.FAILED


@pytest.mark.parametrize(
    "provider, message",
    [
        ({"bind-ro": ["/x"]}, "bind-ro: not a key of the openstack driver"),
        ({"cloud": "nope"}, "cloud: no cloud 'nope' in {clouds} (Cloud nope was not found)"),
        ({"region-name": "Mars"},
         "cloud: no cloud 'fake' in {clouds} (Region Mars is not a valid region name for "
         "cloud fake)"),
        ({"label": {"diskimage": "img"}},
         "pools[0].labels[0]: give exactly one of diskimage or cloud-image"),
        ({"label": {"cloud-image": None, "diskimage": "img"}},
         "pools[0].labels[0].diskimage: diskimage img is uploaded to a cloud: add qcow2 to "
         "its formats"),
        ({"label": {"min-ram": 1024}},
         "pools[0].labels[0]: give exactly one of flavor-name or min-ram"),
        ({"label": {"memory": 1024}},
         "pools[0].labels[0].memory: not a key of the openstack driver"),
    ],
)  # fmt: skip
def test_bad_config_is_one_sentence(tmp_path, monkeypatch, provider, message):
    clouds = clouds_yaml(tmp_path / "clouds.yaml")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    label = {
        "name": LABEL,
        "cloud-image": "c",
        "flavor-name": "small",
        **provider.pop("label", {}),
    }
    entry = {"name": "p", "driver": "openstack", "cloud": "fake", **provider}
    entry["pools"] = [{"name": "m", "labels": [{k: v for k, v in label.items() if v}]}]
    path = tmp_path / "nodepool.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "labels": [{"name": LABEL}],
                "diskimages": [{"name": "img", "elements": ["e"]}],
                "providers": [entry],
            }
        )
    )
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert str(error.value) == f"{path}: providers[0].{message.format(clouds=clouds)}"


def test_broken_clouds_yaml_is_one_sentence(tmp_path, monkeypatch):
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds: [fake\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    path = tmp_path / "nodepool.yaml"
    path.write_text("providers: [{name: p, driver: openstack, cloud: fake, pools: []}]\n")
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert str(error.value) == f"{path}: providers[0].cloud: {clouds}: invalid YAML at line 2"


@pytest.mark.parametrize("cloud", ["http"], indirect=True)
def test_kill_9_launcher_mid_boot_then_restart(cloud, nodepool, zk, zk_hosts, tmp_path, sshd):
    """`nodepool launcher` killed with -9 while its server is in BUILD: once
    its session expires, the restarted launcher deletes that server (its node
    was building, so nothing adopts it), serves the request with a new one,
    and after release leaves nothing in the cloud or ZooKeeper."""
    cloud.boot_held = True
    conf = write_config(tmp_path, zk_hosts, sshd[0])
    with open(tmp_path / "launcher.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "nodepool_lite.cmd.nodepoolcmd", "-c", str(conf), "launcher"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        req, done, _ = request(zk, LABEL)
        assert cloud.build_polled.wait(60), (tmp_path / "launcher.log").read_text()
        [half] = cloud.servers
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        [building] = zk.nodes()
        assert building.state == NodeState.BUILDING and building.external_id == half
        cloud.boot_held = False
        nodepool()
        assert done.wait(60)
        [node] = take_nodes(zk, req)
        assert list(cloud.servers) == [node.external_id] and half in cloud.deleted
        release(zk, [node])
        wait_for(lambda: not cloud.servers and not zk.nodes(), 30, "server and node deleted")
        assert zk.get_node_request(req.id) is None
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
