"""Series are kept byte for byte: what `git format-patch` wrote is what the
merger applies, and it makes the very tree it was made from (issue 13.5).

Each case commits real content with real git, formats it, reads it with
read_series, applies `Series.mbox()` with the merger's own `git am` and
compares the resulting tree with the original commit's.
"""

from __future__ import annotations

import email
import email.policy
import subprocess
from pathlib import Path

import pytest

from tests.harness import run_git
from zuul_lite.merger import _am, _patch_marks
from zuul_lite.series import header_text, read_series, split_mbox


def _repo(root: Path) -> Path:
    repo = root / "src"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "master")
    (repo / "README").write_bytes(b"demo\n")
    (repo / "latin1.txt").write_bytes(b"na\xefve\n")
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-qm", "Initial commit")
    return repo


def _commit(repo: Path, files: dict[str, bytes], message: bytes) -> None:
    for name, data in files.items():
        (repo / name).write_bytes(data)
        run_git(repo, "add", name)
    subprocess.run(
        ["git", "-C", str(repo), "commit", "-q", "-F", "-"],
        input=message,
        check=True,
        env={
            "GIT_AUTHOR_NAME": "Dev",
            "GIT_AUTHOR_EMAIL": "dev@example.com",
            "GIT_COMMITTER_NAME": "Dev",
            "GIT_COMMITTER_EMAIL": "dev@example.com",
            "PATH": "/usr/bin:/bin",
        },
    )


def _applied_tree(repo: Path, tmp: Path, mbox: bytes, count: int) -> str:
    """The tree `mbox` (`count` patches) makes on the base commit, applied as
    the merger does."""
    tree = tmp / "applied"
    subprocess.run(["git", "clone", "-q", str(repo), str(tree)], check=True)
    run_git(tree, "checkout", "-q", f"master~{count}")
    _am(tree, mbox)
    return run_git(tree, "rev-parse", "HEAD^{tree}").strip()


def _format(repo: Path, out: Path, *args: str, count: int = 1) -> Path:
    out.write_bytes(
        subprocess.run(
            ["git", "-C", str(repo), "format-patch", "--stdout", *args, f"HEAD~{count}"],
            check=True,
            capture_output=True,
        ).stdout
    )
    return out


def test_latin1_bytes_and_a_from_line_apply_to_the_same_tree(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _commit(
        repo,
        {"latin1.txt": b"na\xefve caf\xe9\n", "crlf.txt": b"dos\r\nline\r\n"},
        b"text: Latin-1 and CRLF content\n\n"
        b"From the datasheet: the register is 8 bits wide.\n"
        b"From v6.1 on, 12:30 is when it runs.\n",
    )
    mbox = _format(repo, tmp_path / "series.mbox")
    series = read_series(mbox)
    assert len(series.patches) == 1  # the "From " lines of the message did not split it
    assert series.mbox() == mbox.read_bytes()
    assert (
        _applied_tree(repo, tmp_path, series.mbox(), 1)
        == run_git(repo, "rev-parse", "HEAD^{tree}").strip()
    )


def test_cover_letter_and_encoded_subjects(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _commit(repo, {"a.txt": "é\n".encode()}, "café: add a UTF-8 file\n".encode())
    _commit(repo, {"b.txt": b"b\n"}, "naïve: second patch\n".encode())
    out = tmp_path / "out"
    run_git(repo, "format-patch", "-q", "--cover-letter", "-o", str(out), "HEAD~2")
    raw = sorted(out.glob("*.patch"))[1].read_bytes()
    assert b"Subject: [PATCH 1/2] =?UTF-8?q?caf=C3=A9" in raw  # git encodes it (RFC 2047)
    series = read_series(out)
    assert series.cover is not None and series.cover.subject.startswith("[PATCH 0/2]")
    assert [p.subject for p in series.patches] == [
        "[PATCH 1/2] café: add a UTF-8 file",
        "[PATCH 2/2] naïve: second patch",
    ]
    # The merger cuts a batch of series back into heads by these marks.
    assert [subject for _, subject in _patch_marks(series.mbox())] == [
        "café: add a UTF-8 file",
        "naïve: second patch",
    ]
    assert (
        _applied_tree(repo, tmp_path, series.mbox(), 2)
        == run_git(repo, "rev-parse", "HEAD^{tree}").strip()
    )


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"=?UTF-8?q?caf=C3=A9=3A_fix?=", "café: fix"),
        (b"=?ISO-8859-1?q?na=EFve?= fix", "naïve fix"),
        ("café: raw UTF-8".encode(), "café: raw UTF-8"),
        (b"caf\xe9: raw Latin-1", "café: raw Latin-1"),
        (b"a folded\n subject", "a folded subject"),
        (b"=?x-unknown?q?abc?=", "=?x-unknown?q?abc?="),
    ],
)
def test_header_text(raw: bytes, text: str) -> None:
    msg = email.message_from_bytes(
        b"Subject: " + raw + b"\n\nbody\n", policy=email.policy.compat32
    )
    assert header_text(msg, "subject") == text
    assert header_text(msg, "From") == ""


def test_split_mbox_cuts_where_git_does() -> None:
    first = b"From 0123 Mon Sep 17 00:00:00 2001\nSubject: a\n\nFrom here on\n"
    second = b"From 4567 Mon Sep 17 00:00:00 2001\nSubject: b\n\nbody\r\n"
    assert split_mbox(first + second) == [first, second]
