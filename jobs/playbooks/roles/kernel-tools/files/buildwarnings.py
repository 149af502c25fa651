#!/usr/bin/env python3
"""Compiler warnings a series adds, by identity, never by count or line.

Runs on the node (python3 alone, the standard library only). A warning's
identity is its file, the function gcc names in the `In function` line
before it, and its message with line and column numbers taken out and quotes
made the same (gcc's ‘x’ under a UTF-8 locale, 'x' under C, clang's 'x'):
a patch that moves code around an old warning shifts its line, not its
identity, so it is not new. The base build's identities are subtracted from
the series' one warning at a time, so a second copy of an old warning in the
same function does count as added.

Command line (what kernel-build-warnings runs):
    buildwarnings.py BASE_LOG SERIES_LOG --out warnings.txt [--base-name SHA]
writes the added warnings (and what the series fixed or kept) to
warnings.txt, prints the added ones and exits 1 when the series adds any.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass

_QUOTES = str.maketrans({"‘": "'", "’": "'", "`": "'", "“": '"', "”": '"'})
_WARNING = re.compile(
    r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?:(?P<column>\d+):)?\s+warning:\s+"
    r"(?P<message>.*?)(?:\s+\[(?P<option>-W[^\]]+)\])?\s*$"
)
_FUNCTION = re.compile(r"^(?P<file>[^\s:][^:]*): In (?:\w+ )*function '(?P<function>[^']+)'")
_TOP_LEVEL = re.compile(r"^(?P<file>[^\s:][^:]*): At top level:")
# file:line[:column] references inside a message ("declared at foo.h:12").
_LOCATION = re.compile(r"(?P<path>[\w./+-]+\.[chS]):\d+(?::\d+)?")
_LINE_WORD = re.compile(r"\bline \d+")


@dataclass(frozen=True)
class CompilerWarning:
    """One compiler warning as printed, and the parts its identity is made of."""

    file: str
    line: int
    column: int
    function: str | None
    message: str
    option: str

    @property
    def identity(self) -> tuple[str, str | None, str, str]:
        return (self.file, self.function, normalise(self.message), self.option)

    def __str__(self) -> str:
        where = (
            f"{self.file}:{self.line}:{self.column}" if self.column else f"{self.file}:{self.line}"
        )
        option = f" [{self.option}]" if self.option else ""
        inside = f" (in {self.function})" if self.function else ""
        return f"{where}: warning: {self.message}{option}{inside}"


def normalise(message: str) -> str:
    """The message as it names things, not where: quotes unified, locations
    and line numbers in it dropped."""
    message = message.translate(_QUOTES)
    message = _LOCATION.sub(r"\g<path>", message)
    return _LINE_WORD.sub("line N", message)


def _clean_path(path: str, strip: str) -> str:
    path = path.strip()
    if strip and path.startswith(strip):
        path = path[len(strip) :]
    while path.startswith("./"):
        path = path[2:]
    return path


def parse(log: str, strip: str = "") -> list[CompilerWarning]:
    """The warnings in a build log, each once (a header included by several
    objects warns once per object), in order.

    `strip` is a path prefix to drop (the tree's absolute path). The function
    is tracked per file: with make -j the lines of several compilers mix, but
    each compiler names a file before it warns in it.
    """
    functions: dict[str, str | None] = {}
    seen: dict[CompilerWarning, None] = {}
    for raw in log.splitlines():
        line = raw.translate(_QUOTES).rstrip()
        if match := _FUNCTION.match(line):
            functions[_clean_path(match["file"], strip)] = match["function"]
        elif match := _TOP_LEVEL.match(line):
            functions[_clean_path(match["file"], strip)] = None
        elif match := _WARNING.match(line):
            path = _clean_path(match["file"], strip)
            warning = CompilerWarning(
                file=path,
                line=int(match["line"]),
                column=int(match["column"] or 0),
                function=functions.get(path),
                message=raw_message(raw, match),
                option=match["option"] or "",
            )
            seen.setdefault(warning, None)
    return list(seen)


def raw_message(raw: str, match: re.Match) -> str:
    """The message as the compiler printed it (quotes and all), for the report."""
    start = raw.find("warning:") + len("warning:")
    text = raw[start:].strip()
    option = match["option"]
    if option and text.endswith(f"[{option}]"):
        text = text[: -len(option) - 2].rstrip()
    return text


@dataclass
class Diff:
    """The series' warnings split by whether the base build had the same identity."""

    added: list[CompilerWarning]
    kept: list[CompilerWarning]
    fixed: list[CompilerWarning]


def diff(base: list[CompilerWarning], series: list[CompilerWarning]) -> Diff:
    """Match the series' warnings to the base's by identity, one for one."""
    left = Counter(w.identity for w in base)
    added, kept = [], []
    for warning in series:
        if left[warning.identity] > 0:
            left[warning.identity] -= 1
            kept.append(warning)
        else:
            added.append(warning)
    fixed = []
    for warning in base:
        if left[warning.identity] > 0:
            left[warning.identity] -= 1
            fixed.append(warning)
    return Diff(added, kept, fixed)


def report(result: Diff, base_name: str) -> str:
    """warnings.txt: the added warnings first, one per line as the compiler
    printed them, then the ones the base already had and the ones it fixed."""
    lines = [f"{len(result.added)} warning(s) added by the series, compared with base {base_name}"]
    lines += [str(w) for w in result.added]
    if result.kept:
        lines.append(f"{len(result.kept)} warning(s) already on base {base_name} (not counted):")
        lines += [f"  {w}" for w in result.kept]
    if result.fixed:
        lines.append(f"{len(result.fixed)} warning(s) of base {base_name} the series removes:")
        lines += [f"  {w}" for w in result.fixed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_log", help="the build log of the base commit")
    parser.add_argument("series_log", help="the build log of the series")
    parser.add_argument("--out", required=True, help="write the report here")
    parser.add_argument("--base-name", default="base", help="how the report names the base")
    parser.add_argument("--strip", default="", help="a path prefix to drop from file names")
    args = parser.parse_args(argv)
    logs = []
    for path in (args.base_log, args.series_log):
        with open(path, encoding="utf-8", errors="replace") as stream:
            logs.append(parse(stream.read(), args.strip))
    result = diff(*logs)
    text = report(result, args.base_name)
    with open(args.out, "w", encoding="utf-8") as stream:
        stream.write(text)
    # The job's output (and so a failure's summary): the added ones only.
    print("\n".join(text.splitlines()[: 1 + len(result.added)]))
    if result.kept or result.fixed:
        print(
            f"({len(result.kept)} already on base {args.base_name}, not counted; "
            f"{len(result.fixed)} removed: see warnings.txt)"
        )
    return 1 if result.added else 0


if __name__ == "__main__":
    sys.exit(main())
