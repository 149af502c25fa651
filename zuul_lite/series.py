"""Reading a patch series: an mbox file or a directory of `git format-patch` files.

The series is checked here, before anything is stored, so a malformed mbox or
an empty series is refused with one sentence and nothing half-written remains.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import io
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


def is_from_line(line: bytes) -> bool:
    """Whether `line` starts a message of an mbox, as git mailsplit decides
    (is_from_line in git's mailsplit.c: "From ", then a time and a year), so a
    commit message line such as "From the datasheet:" does not split a patch."""
    if len(line) < 20 or not line.startswith(b"From "):
        return False
    colon = line.rfind(b":", 4, len(line) - 2)
    try:
        if colon < 4 or not all(chr(line[colon + i]).isdigit() for i in (-4, -2, -1, 1, 2)):
            return False
    except IndexError:
        return False
    year = re.match(rb"\s*(\d+)", line[colon + 3 :])
    return bool(year) and int(year.group(1)) > 90


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of an mbox, each byte for byte as in `data` (no line-ending
    or ">From" rewriting), cut where git am would cut them."""
    messages: list[list[bytes]] = []
    for line in io.BytesIO(data).readlines():  # on "\n" only, as git reads it
        if is_from_line(line) or not messages:
            messages.append([])
        messages[-1].append(line)
    return [b"".join(m) for m in messages]


def header_text(msg: email.message.Message, name: str) -> str:
    """Header `name` of `msg` as a person reads it: raw 8-bit bytes taken as
    UTF-8 (else Latin-1), RFC 2047 words decoded, unfolded; "" if missing."""
    value = next((v for k, v in msg.raw_items() if k.lower() == name.lower()), None)
    if value is None:
        return ""
    # The email module hands raw 8-bit header bytes over as surrogates.
    raw = str(value).encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    try:
        text = str(email.header.make_header(email.header.decode_header(text)))
    except (LookupError, UnicodeError, ValueError):
        pass  # an unknown charset or a broken encoded word: keep it as written
    return " ".join(text.split())


def _check(msg: email.message.Message, raw: bytes, where: str) -> Patch:
    subject = header_text(msg, "Subject")
    if not subject:
        raise InboxError(f"{where} is not a patch email: it has no Subject header.")
    author = header_text(msg, "From")
    body = raw.decode("utf-8", "replace")
    if COVER.search(subject):
        return Patch(subject=subject, author=author, raw=raw)
    if "\ndiff --git " not in body and "\n+++ " not in body:
        raise InboxError(f"{where} ('{subject}') holds no diff.")
    return Patch(subject=subject, author=author, raw=raw)


def _from_file(path: Path) -> list[Patch]:
    """Each message of the file, kept as its exact bytes: they are what git am
    applies, so a Latin-1 line or a CRLF in a patch reaches the tree as sent."""
    data = path.read_bytes()
    if not is_from_line(data.split(b"\n", 1)[0] + b"\n"):
        # A single patch without the mbox "From " line: git am accepts it, so do we.
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        if msg.get("Subject") is None:
            raise InboxError(f"{path} is neither an mbox nor a patch email.")
        return [_check(msg, data, str(path))]
    return [
        _check(email.message_from_bytes(raw, policy=email.policy.compat32), raw, where)
        for raw, where in (
            (raw, f"{path} message {i + 1}") for i, raw in enumerate(split_mbox(data))
        )
    ]


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
