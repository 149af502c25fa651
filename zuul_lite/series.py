"""Reading a patch series: an mbox file or a directory of `git format-patch` files.

The series is checked here, before anything is stored, so a malformed mbox or
an empty series is refused with one sentence and nothing half-written remains.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import re
from dataclasses import dataclass
from pathlib import Path

from zuul_lite.exceptions import InboxError


@dataclass(frozen=True)
class Patch:
    subject: str
    author: str
    raw: bytes


# "Depends-On: 5", "Depends-On: http://host/change/5" (Zuul's cross-change footer).
DEPENDS_ON = re.compile(r"^Depends-On:\s*(\S+)\s*$", re.IGNORECASE | re.MULTILINE)
COVER = re.compile(r"\[[^\]]*\b0+/\d+\]")


def depends_on(text: str) -> list[str]:
    """The Depends-On values of a commit message or cover letter, in order."""
    return DEPENDS_ON.findall(text)


@dataclass(frozen=True)
class Series:
    patches: list[Patch]
    cover: Patch | None = None  # a "[PATCH 0/N]" letter: no diff, not applied

    @property
    def subject(self) -> str:
        """The cover letter's subject, else the first patch's, without its [PATCH n/m]."""
        subj = (self.cover or self.patches[0]).subject
        if subj.startswith("[") and "]" in subj:
            subj = subj.split("]", 1)[1].strip()
        return subj

    @property
    def author(self) -> str:
        return self.patches[0].author

    def mbox(self) -> bytes:
        messages = ([self.cover] if self.cover else []) + self.patches
        return b"".join(p.raw if p.raw.endswith(b"\n") else p.raw + b"\n" for p in messages)

    def depends_on(self) -> list[str]:
        """Depends-On footers of the cover letter and of every commit message."""
        found: list[str] = []
        for patch in ([self.cover] if self.cover else []) + self.patches:
            text = patch.raw.decode("utf-8", "replace").split("\n---\n", 1)[0]
            found += [d for d in depends_on(text) if d not in found]
        return found


def _check(msg: email.message.Message, raw: bytes, where: str) -> Patch:
    subject = " ".join(str(msg.get("Subject", "")).split())
    if not subject:
        raise InboxError(f"{where} is not a patch email: it has no Subject header.")
    body = raw.decode("utf-8", "replace")
    if COVER.search(subject):
        return Patch(subject=subject, author=str(msg.get("From", "")), raw=raw)
    if "\ndiff --git " not in body and "\n+++ " not in body:
        raise InboxError(f"{where} ('{subject}') holds no diff.")
    return Patch(subject=subject, author=str(msg.get("From", "")), raw=raw)


def _from_file(path: Path) -> list[Patch]:
    data = path.read_bytes()
    if not data.startswith(b"From "):
        # A single patch without the mbox "From " line: git am accepts it, so do we.
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        if msg.get("Subject") is None:
            raise InboxError(f"{path} is neither an mbox nor a patch email.")
        return [_check(msg, data, str(path))]
    box = mailbox.mbox(str(path), create=False)
    patches = []
    try:
        for i, key in enumerate(box.keys()):
            raw = box.get_bytes(key, from_=True)
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            patches.append(_check(msg, raw, f"{path} message {i + 1}"))
    finally:
        box.close()
    return patches


def read_series(path: Path | str) -> Series:
    path = Path(path)
    if not path.exists():
        raise InboxError(f"{path} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".patch", ".diff", ".eml"))
        patches = [p for f in files for p in _from_file(f)]
    else:
        patches = _from_file(path)
    cover = None
    if patches and COVER.search(patches[0].subject):
        cover, patches = patches[0], patches[1:]
    if any(COVER.search(p.subject) for p in patches):
        raise InboxError(f"{path} holds a cover letter that is not its first message.")
    if not patches:
        raise InboxError(f"{path} holds no patches.")
    return Series(patches, cover)
