"""launcher.logs.unpack_node_logs against crafted archives, as a node running the
change's code could send them: whatever is in the archive, nothing lands outside
the build's logs/, and caps end the unpacking with one sentence for the build's log."""

from __future__ import annotations

import gzip
import logging
import stat
import tarfile
from pathlib import Path

import pytest

from launcher import logs
from launcher.jobdir import JobDir

END = b"\0" * 2 * tarfile.BLOCKSIZE


def entry(name: str, data: bytes = b"", **fields) -> bytes:
    """One member as tar blocks: its header(s) as given, then its data padded.

    `fields` set TarInfo attributes after `size` = len(data), so a header may lie.
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * padding


def archive(*entries: bytes) -> bytes:
    return b"".join(entries) + END


@pytest.fixture
def jobdir(tmp_path):
    jobdir = JobDir(tmp_path / "work", "abc")
    jobdir.prepare()
    yield jobdir
    jobdir.cleanup()  # its ssh control dir lies outside tmp_path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the build dir that no member may reach."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def unpack(jobdir: JobDir, tar_bytes: bytes, **caps) -> str:
    jobdir.node_logs_archive.write_bytes(gzip.compress(tar_bytes))
    message = logs.unpack_node_logs(jobdir, **caps)
    assert not jobdir.node_logs_archive.exists()
    return message


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_names_that_leave_the_log_dir_are_skipped(jobdir, outside, caplog):
    caplog.set_level(logging.WARNING, logger="launcher.logs")
    message = unpack(
        jobdir,
        archive(
            entry("artifacts/.config", b"CONFIG_64BIT=y\n"),
            entry("../escaped", b"x"),
            entry("console/../../../escaped", b"x"),
            entry("artifacts/../../escaped", b"x"),
            entry(str(outside / "absolute"), b"x"),
            entry("artifacts/nul", b"x", pax_headers={"path": "artifacts/nul\0name"}),
            entry("./console/serial.log", b"boot\n"),
            entry("other/file", b"x"),
        ),
    )
    assert message == ""
    assert (jobdir.artifacts / ".config").read_text() == "CONFIG_64BIT=y\n"
    assert (jobdir.console / "serial.log").read_text() == "boot\n"
    assert files_under(outside) == []
    assert files_under(jobdir.logs) == [
        "artifacts",
        "artifacts/.config",
        "console",
        "console/serial.log",
    ]
    assert not list(jobdir.root.parent.parent.glob("**/escaped"))
    skipped = [r.getMessage() for r in caplog.records if "unsafe name" in r.getMessage()]
    assert len(skipped) == 5


def test_links_devices_and_fifos_are_skipped(jobdir, outside, caplog):
    caplog.set_level(logging.WARNING, logger="launcher.logs")
    message = unpack(
        jobdir,
        archive(
            entry("artifacts/link", type=tarfile.SYMTYPE, linkname=str(outside)),
            # Written through the link if it had been made: it must land inside.
            entry("artifacts/link/pwned", b"x"),
            entry("artifacts/up", type=tarfile.SYMTYPE, linkname="../../.."),
            entry("artifacts/passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
            entry("artifacts/config", type=tarfile.LNKTYPE, linkname="artifacts/.config"),
            entry("console/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
            entry("console/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
            entry("console/fifo", type=tarfile.FIFOTYPE),
        ),
    )
    assert message == ""
    assert files_under(outside) == []
    link = jobdir.artifacts / "link"
    assert link.is_dir() and not link.is_symlink()
    assert (link / "pwned").read_text() == "x"
    for name in ("up", "passwd", "config"):
        assert not (jobdir.artifacts / name).exists()
        assert not (jobdir.artifacts / name).is_symlink()
    assert files_under(jobdir.console) == []
    skipped = [r for r in caplog.records if "not a regular file or directory" in r.getMessage()]
    assert len(skipped) == 7


def test_modes_are_sanitised(jobdir):
    unpack(
        jobdir,
        archive(
            entry("artifacts/setuid", b"x", mode=0o4777),
            entry("artifacts/setgid", b"x", mode=0o2755),
            entry("artifacts/readonly", b"x", mode=0o444),
            entry("artifacts/odd", b"x", mode=0o017),
            entry("artifacts/dir", type=tarfile.DIRTYPE, mode=0o7000),
            entry("artifacts/dir/file", b"x", mode=0o644),
        ),
    )

    def mode(name: str) -> int:
        return stat.S_IMODE((jobdir.artifacts / name).stat().st_mode)

    assert mode("setuid") == 0o755
    assert mode("setgid") == 0o755
    assert mode("readonly") == 0o644
    assert mode("odd") == 0o604
    assert mode("dir") & 0o700 == 0o700 and not mode("dir") & 0o7000
    assert (jobdir.artifacts / "dir" / "file").read_text() == "x"


def test_a_header_claiming_less_cannot_hide_members_in_its_data(jobdir, outside):
    """tarfile reads the claimed 10 bytes, then takes the rest of the data for
    headers: the members hidden there go through the same checks."""
    hidden = entry(str(outside / "hidden"), b"x") + entry("../escaped", b"x")
    liar = entry("artifacts/liar", b"0123456789" + b"\0" * 502 + hidden, size=10)
    assert unpack(jobdir, archive(liar)) == ""
    assert (jobdir.artifacts / "liar").read_bytes() == b"0123456789"
    assert files_under(outside) == []
    assert not list(jobdir.root.parent.parent.glob("**/escaped"))


def test_a_header_claiming_more_is_counted_by_the_bytes_written(jobdir):
    config = entry("artifacts/.config", b"CONFIG_64BIT=y\n")
    # 1 GB claimed (under the default cap), 20 kB there, no end of archive.
    liar = entry("console/serial.log", b"b" * 20_000, size=10**9)
    message = unpack(jobdir, config + liar, max_bytes=1000)
    assert (
        message == "The node's logs were truncated: their files add up to more than 1,000 bytes."
    )
    assert (jobdir.artifacts / ".config").read_text() == "CONFIG_64BIT=y\n"
    assert (jobdir.console / "serial.log").read_bytes() == b"b" * (1000 - 15)


def test_a_header_claiming_more_than_the_data_ends_the_unpacking(jobdir):
    config = entry("artifacts/.config", b"CONFIG_64BIT=y\n")
    message = unpack(jobdir, config + entry("console/serial.log", b"b" * 3000, size=10_000))
    assert message.startswith("The node's logs were truncated: unpacking stopped at an error (")
    assert message.endswith(").") and "\n" not in message
    assert (jobdir.artifacts / ".config").read_text() == "CONFIG_64BIT=y\n"


def test_too_many_entries(jobdir):
    message = unpack(
        jobdir,
        archive(*(entry(f"artifacts/f{n:02}", b"x") for n in range(20))),
        max_entries=5,
    )
    assert message == "The node's logs were truncated: the archive has more than 5 entries."
    assert files_under(jobdir.artifacts) == ["f00", "f01", "f02", "f03", "f04"]


def test_too_many_bytes(jobdir):
    message = unpack(
        jobdir,
        archive(
            entry("console/a", b"a" * 600),
            entry("console/b", b"b" * 600),
            entry("console/c", b"c" * 10),
        ),
        max_bytes=1000,
    )
    assert (
        message == "The node's logs were truncated: their files add up to more than 1,000 bytes."
    )
    assert (jobdir.console / "a").read_bytes() == b"a" * 600
    assert (jobdir.console / "b").read_bytes() == b"b" * 400
    assert not (jobdir.console / "c").exists()


def test_sparse_members_count_the_zeros_written(jobdir):
    """A GNU sparse member carries 1 byte of data and claims 5 MB: the zeros are bytes too."""
    sparse = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.realsize": "5000000",
        "GNU.sparse.map": "4999999,1",
    }
    message = unpack(
        jobdir, archive(entry("console/sparse", b"z", pax_headers=sparse)), max_bytes=1000
    )
    assert (
        message == "The node's logs were truncated: their files add up to more than 1,000 bytes."
    )
    assert (jobdir.console / "sparse").read_bytes() == b"\0" * 1000


def test_headers_are_capped_with_the_stream(jobdir):
    """A pax header, which tarfile reads into memory whole, counts against the stream cap."""
    big = entry("console/serial.log", b"boot\n", pax_headers={"comment": "x" * 100_000})
    message = unpack(jobdir, archive(big), max_bytes=1000, max_entries=1)
    cap = 1000 + logs.STREAM_OVERHEAD_PER_ENTRY
    assert message == (
        f"The node's logs were truncated: the archive is more than {cap:,} bytes uncompressed."
    )
    assert files_under(jobdir.console) == []


@pytest.mark.parametrize("payload", [b"not an archive at all", gzip.compress(b"not a tar")[:-8]])
def test_a_damaged_archive_is_one_sentence(jobdir, payload):
    jobdir.node_logs_archive.write_bytes(payload)
    message = logs.unpack_node_logs(jobdir)
    assert message.startswith("The node's logs were truncated: unpacking stopped at an error (")
    assert not jobdir.node_logs_archive.exists()


def test_no_archive_is_no_message(jobdir):
    assert logs.unpack_node_logs(jobdir) == ""
