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
        [--findings findings.json]
writes the added warnings (and what the series fixed or kept) to
warnings.txt, prints the added ones and exits 1 when the series adds any.
With --baseline, BASE_LOG is instead `zuul.baseline` as JSON (what the job
found on the base commit in the post pipeline: warning identities of the
files it compiled), and only its warnings in the files of --files count.
--record SERIES_LOG writes only the findings of a branch head: its
warnings' identities and the files it compiled (zuul_lite/baseline.py).
"""

from __future__ import annotations

import argparse
import json
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
# kbuild's quiet line for each object it compiles.
_COMPILED = re.compile(r"^\s+CC\s+(?P<object>\S+)\.o\s*$")


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
        where = f"{self.file}:{self.line}" if self.line else self.file  # 0: from a baseline
        if self.column:
            where += f":{self.column}"
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


def identity_text(warning: CompilerWarning) -> str:
    """The identity as one string (a baseline's `warnings`)."""
    file, function, message, option = warning.identity
    return "\t".join((file, function or "", message, option))


def from_identity(text: str) -> CompilerWarning:
    file, function, message, option = (text.split("\t") + ["", "", ""])[:4]
    return CompilerWarning(file, 0, 0, function or None, message, option)


def compiled_files(log: str, strip: str = "") -> list[str]:
    """The .c files a build log says kbuild compiled, in order."""
    found = (_COMPILED.match(line) for line in log.splitlines())
    return list(dict.fromkeys(_clean_path(m["object"], strip) + ".c" for m in found if m))


def baseline_warnings(path: str, files: list[str]) -> list[CompilerWarning]:
    """The warnings of `files` in a baseline (zuul.baseline as JSON), and of
    every header: the touched files may include any of them."""
    with open(path, encoding="utf-8") as stream:
        findings = (json.load(stream) or {}).get("findings") or {}
    wanted = set(files)
    warnings = [from_identity(text) for text in findings.get("warnings", [])]
    return [w for w in warnings if w.file in wanted or not w.file.endswith(".c")]


def write_findings(path: str, warnings: list[CompilerWarning], files: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(
            {"warnings": [identity_text(w) for w in warnings], "warning_files": files}, stream
        )


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
    parser.add_argument("logs", nargs="+", help="BASE_LOG SERIES_LOG, or SERIES_LOG (--record)")
    parser.add_argument("--out", help="write the report here")
    parser.add_argument("--base-name", default="base", help="how the report names the base")
    parser.add_argument("--strip", default="", help="a path prefix to drop from file names")
    parser.add_argument("--findings", help="write what zuul-lite keeps of the series' build")
    parser.add_argument("--baseline", action="store_true", help="BASE_LOG is a baseline")
    parser.add_argument("--files", help="the files compared (one a line), with --baseline")
    parser.add_argument("--record", action="store_true", help="SERIES_LOG only: its findings")
    args = parser.parse_args(argv)
    with open(args.logs[-1], encoding="utf-8", errors="replace") as stream:
        series_log = stream.read()
    series = parse(series_log, args.strip)
    if args.findings:
        write_findings(args.findings, series, compiled_files(series_log, args.strip))
    if args.record:
        print(f"{len(series)} warning(s) in {len(compiled_files(series_log))} compiled file(s)")
        return 0
    if args.baseline:
        with open(args.files, encoding="utf-8") as stream:
            files = [line.strip() for line in stream if line.strip()]
        base = baseline_warnings(args.logs[0], files)
    else:
        with open(args.logs[0], encoding="utf-8", errors="replace") as stream:
            base = parse(stream.read(), args.strip)
    result = diff(base, series)
    if args.baseline:
        # A header warning the series' few objects did not trigger was not removed.
        result.fixed = [w for w in result.fixed if w.file in files]
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
