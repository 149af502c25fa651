#!/usr/bin/env python3
"""KTAP v1 output (KUnit, kselftest) as per-test results and a JUnit XML.

Runs on the node (python3 alone, the standard library only), on output that
the series under test produced: it never trusts the plan or the nesting to be
complete. What it handles beyond well-formed KTAP:

- nested subtests, found by indentation (KUnit indents by 4, kselftest by 2
  or by a `# ` prefix that is stripped here);
- the SKIP and TODO directives (`ok 1 name # SKIP why`): SKIP is neither
  a pass nor a failure, TODO turns a failure into an expected one;
- a missing plan (the results are taken as they come);
- crashed output: a subtest that never got its result line, or a plan that
  promised more tests than came, is an ERROR with the reason in its log;
- kernel log noise and `[   1.234]` timestamps between KTAP lines.

Command line (what kernel-kunit runs):
    ktap.py LOG [--junit junit.xml] [--json results.json] [--findings findings.json]
                [--base-results base.json --base-name SHA]
prints one line per failed test with its log lines and a total, and exits
1 when a test failed or crashed, 2 when LOG holds no KTAP at all. With the
results of the same job on the base commit (the --json of a run there, or
the job's baseline, `zuul.baseline`, whose findings name each test's
status), a test that failed there too is reported as already failing on
base and does not make it exit 1. --findings writes what the job found for
zuul-lite (zuul_lite/baseline.py): each test's status and the failures not
counted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

PASS, FAIL, SKIP, TODO, ERROR = "PASS", "FAIL", "SKIP", "TODO", "ERROR"
# Nesting deeper than this is read as text (hostile output could nest
# until Python's recursion limit).
MAX_DEPTH = 32
FAILED = (FAIL, ERROR)

_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_VERSION = re.compile(r"^K?TAP version \d+\s*$")
_SUBTEST = re.compile(r"^# Subtest: (?P<name>.*?)\s*$")
_PLAN = re.compile(r"^1\.\.(?P<count>\d+)\s*(?:#.*)?$")
_RESULT = re.compile(
    r"^(?P<ok>ok|not ok)\s+(?P<number>\d+)\s*(?:-\s*)?(?P<name>[^#]*?)\s*"
    r"(?:#\s*(?:(?P<directive>SKIP|TODO|XFAIL)\b\s*)?(?P<reason>.*?))?\s*$",
    re.IGNORECASE,
)


@dataclass
class TestResult:
    """One test (or suite: a test with subtests) and what KTAP said of it."""

    name: str
    status: str = ERROR
    number: int = 0
    reason: str = ""  # the directive's text, or why the parser calls it an ERROR
    log: list[str] = field(default_factory=list)
    subtests: list[TestResult] = field(default_factory=list)
    expected: int | None = None  # the plan's count, when there was a plan

    def leaves(self, prefix: str = ""):
        """(dotted path, test) for each test without subtests, in order."""
        path = f"{prefix}.{self.name}" if prefix else self.name
        if not self.subtests:
            yield path, self
        for sub in self.subtests:
            yield from sub.leaves(path)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "log": self.log,
            "subtests": [sub.to_dict() for sub in self.subtests],
        }


@dataclass
class _Line:
    indent: int
    text: str


def _lines(text: str) -> list[_Line]:
    """Each line without timestamp and trailing space, with its indentation.

    A kselftest nested test is prefixed `# ` per level: before a KTAP line
    that counts as two columns of indentation.
    """
    lines = []
    for raw in text.splitlines():
        line = _TIMESTAMP.sub("", raw.rstrip().expandtabs(8))
        indent = len(line) - len(line.lstrip(" "))
        body = line.lstrip(" ")
        while body.startswith("# ") and _is_ktap(body[2:].lstrip(" ")):
            rest = body[2:]
            indent += 2 + len(rest) - len(rest.lstrip(" "))
            body = rest.lstrip(" ")
        lines.append(_Line(indent, body))
    return lines


def _is_ktap(body: str) -> bool:
    return bool(_starts_test(body) or _RESULT.match(body))


def _starts_test(body: str) -> bool:
    return bool(_VERSION.match(body) or _SUBTEST.match(body) or _PLAN.match(body))


class _Parser:
    """Reads tests by indentation: a KTAP line indented deeper than the
    current level opens a subtest, which the next result line at the current
    level closes; a KTAP line indented less ends the level. Other lines
    (diagnostics, kernel log) belong to the test whose result line follows."""

    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self.pos = 0

    def peek(self) -> _Line | None:
        return self.lines[self.pos] if self.pos < len(self.lines) else None

    def parse(self, test: TestResult, indent: int, depth: int = 0) -> None:
        """Read `test`'s header and subtests at `indent`, up to its own result line."""
        self._header(test, indent)
        pending: list[str] = []
        while (line := self.peek()) is not None:
            ktap = _is_ktap(line.text)
            if ktap and line.indent < indent:
                break
            if ktap and line.indent > indent and depth >= MAX_DEPTH:
                ktap = False  # deeper than any real test: text, not a stack overflow
            if ktap and line.indent > indent:
                sub = TestResult(name="", log=pending)
                pending = []
                self.parse(sub, line.indent, depth + 1)
                closing = self.peek()
                match = closing and closing.indent == indent and _RESULT.match(closing.text)
                if match:
                    self.pos += 1
                    _apply(sub, match)
                else:
                    _crashed(sub, "its result line is missing (the output ended or broke off)")
                _check_plan(sub)
                test.subtests.append(sub)
                continue
            if ktap and _VERSION.match(line.text) and test.subtests:
                break  # a further KTAP document at this level
            self.pos += 1
            if result := ktap and _RESULT.match(line.text):
                sub = TestResult(name="", log=pending)
                pending = []
                _apply(sub, result)
                test.subtests.append(sub)
            elif line.text and not ktap:
                pending.append(line.text.removeprefix("# "))
        test.log.extend(pending)

    def _header(self, test: TestResult, indent: int) -> None:
        while (line := self.peek()) is not None and line.indent == indent:
            if _VERSION.match(line.text):
                if test.expected is not None or test.name:
                    return  # the next document
            elif subtest := _SUBTEST.match(line.text):
                test.name = subtest["name"]
            elif plan := _PLAN.match(line.text):
                test.expected = int(plan["count"])
            else:
                return
            self.pos += 1


def _apply(test: TestResult, match: re.Match) -> None:
    """Set the test's status from its result line."""
    test.name = match["name"] or test.name or f"test {match['number']}"
    test.number = int(match["number"])
    directive = (match["directive"] or "").upper()
    test.reason = (match["reason"] or "").strip()
    if directive == "SKIP":
        test.status = SKIP
    elif directive in ("TODO", "XFAIL"):
        test.status = TODO
    else:
        test.status = PASS if match["ok"].lower() == "ok" else FAIL


def _check_plan(test: TestResult) -> None:
    """Fewer subtests than the plan promised: the rest crashed or never ran,
    which a leaf `(missing N)` holding the last log lines says."""
    if test.expected is None or len(test.subtests) >= test.expected:
        return
    missing = test.expected - len(test.subtests)
    why = f"the plan promised {test.expected} tests but {missing} never reported"
    test.subtests.append(
        TestResult(
            name=f"(missing {missing})",
            status=ERROR,
            number=len(test.subtests) + 1,
            reason=why,
            log=test.log[-20:],
        )
    )
    if test.status not in FAILED:
        test.status = ERROR
        test.reason = why


def _crashed(test: TestResult, why: str) -> None:
    test.status = ERROR
    test.reason = why
    test.log.append(f"ktap.py: {why}")


def parse(text: str) -> TestResult | None:
    """The KTAP output in `text` as a root test whose subtests are the
    top-level tests (suites); None when `text` holds no KTAP version line.
    Several documents (kunit.py runs, kselftest targets) are merged."""
    lines = _lines(text)
    start = next((i for i, line in enumerate(lines) if _VERSION.match(line.text)), None)
    if start is None:
        return None
    parser = _Parser(lines[start:])
    root = TestResult(name="", status=PASS)
    while (line := parser.peek()) is not None:
        if _VERSION.match(line.text):
            document = TestResult(name="")
            parser.parse(document, line.indent)
            _check_plan(document)
            root.subtests.extend(document.subtests)
            root.log.extend(document.log)
        else:
            parser.pos += 1
    root.status = FAIL if failures(root) else PASS
    return root


def _failed_or_leaves(test: TestResult, prefix: str = ""):
    """Leaves, and tests with subtests that are ERRORs none of their subtests explain."""
    path = f"{prefix}.{test.name}" if prefix else test.name
    if not test.subtests:
        yield path, test
        return
    if test.status == ERROR and not any(sub.status in FAILED for sub in test.subtests):
        yield path, test
    for sub in test.subtests:
        yield from _failed_or_leaves(sub, path)


def counts(root: TestResult) -> dict[str, int]:
    """How many leaf tests ended in each status."""
    totals = dict.fromkeys((PASS, FAIL, SKIP, TODO, ERROR), 0)
    for _, test in _tests(root, "leaves"):
        totals[test.status] += 1
    return totals


def failures(root: TestResult) -> list[tuple[str, TestResult]]:
    """(dotted path, test) of each test that failed or crashed: leaves, and a
    suite that broke off after its last subtest."""
    tests = _tests(root, "failed_or_leaves")
    return [(path, test) for path, test in tests if test.status in FAILED]


def _tests(root: TestResult, walk: str):
    """The root's tests (not the root itself) by `leaves` or `failed_or_leaves`."""
    for suite in root.subtests:
        yield from (suite.leaves() if walk == "leaves" else _failed_or_leaves(suite))


def junit_xml(root: TestResult) -> str:
    """One <testsuite> per top-level test; its leaves are the testcases,
    named by their path under the suite (parameterised cases: `test.param`)."""
    suites = ET.Element("testsuites", name="ktap")
    for suite in root.subtests:
        cases = [
            (path.split(".", 1)[1] if "." in path else path, test) for path, test in suite.leaves()
        ]
        element = ET.SubElement(suites, "testsuite", name=suite.name)
        tally = dict.fromkeys((FAIL, ERROR, SKIP), 0)
        for name, test in cases:
            case = ET.SubElement(element, "testcase", classname=suite.name, name=name)
            text = "\n".join(test.log)
            if test.status == FAIL:
                failure = ET.SubElement(case, "failure", message=test.reason or "not ok")
                failure.text = text
            elif test.status == ERROR:
                error = ET.SubElement(case, "error", message=test.reason or "crashed")
                error.text = text
            elif test.status in (SKIP, TODO):
                ET.SubElement(case, "skipped", message=test.reason or test.status.lower())
            if test.status in tally:
                tally[test.status] += 1
            if test.log and test.status not in FAILED:
                ET.SubElement(case, "system-out").text = text
        element.set("tests", str(len(cases)))
        element.set("failures", str(tally[FAIL]))
        element.set("errors", str(tally[ERROR]))
        element.set("skipped", str(tally[SKIP]))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def report(
    root: TestResult,
    base_failures: set[str] = frozenset(),
    base_name: str = "",
    log_lines: int = 20,
) -> str:
    """What the job prints: each failed test with its log lines, then totals.

    A test in `base_failures` (failing on the base commit too) is listed as
    `already failing on base <base_name>` and does not count as failed.
    """
    out = []
    for path, test in failures(root):
        why = f": {test.reason}" if test.reason else ""
        if path in base_failures:
            out.append(f"{test.status} {path}{why} (already failing on base {base_name})")
            continue
        out.append(f"{test.status} {path}{why}")
        out.extend(f"    {line}" for line in test.log[-log_lines:])
    totals = counts(root)
    out.append(
        f"{sum(totals.values())} tests: "
        + ", ".join(f"{count} {status.lower()}" for status, count in totals.items())
    )
    return "\n".join(out)


def failed_paths(results_json: str) -> set[str]:
    """The failed tests named in a --json file of an earlier run, or in a
    baseline (`{"findings": {"tests": {path: status}}}`)."""
    with open(results_json, encoding="utf-8") as stream:
        data = json.load(stream)
    if "failed" in data:
        return set(data["failed"])
    tests = data.get("findings", data).get("tests", {})
    return {path for path, status in tests.items() if status in FAILED}


def findings(root: TestResult, base_failures: set[str], base_name: str) -> dict:
    """What zuul-lite keeps of this run (zuul_lite/baseline.py, Findings)."""
    tests = {path: test.status for path, test in _tests(root, "leaves")}
    failed = failures(root)
    tests.update((path, test.status) for path, test in failed)
    return {
        "tests": tests,
        "already_failing": [path for path, _ in failed if path in base_failures],
        "base": base_name if base_failures else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a file holding KTAP output (with noise around it)")
    parser.add_argument("--junit", help="write a JUnit XML here")
    parser.add_argument("--json", help="write the per-test results as JSON here")
    parser.add_argument("--findings", help="write what zuul-lite keeps of the run here")
    parser.add_argument(
        "--base-results", help="the --json of the run on the base commit, or its baseline"
    )
    parser.add_argument("--base-name", default="base", help="how the report names the base")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as stream:
        root = parse(stream.read())
    if root is None:
        print(f"No KTAP output in {args.log}: the tests did not run or printed nothing.")
        return 2
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as stream:
            stream.write(junit_xml(root))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(
                {
                    "tests": {path: test.status for path, test in _tests(root, "leaves")},
                    "failed": [path for path, _ in failures(root)],
                    "root": root.to_dict(),
                },
                stream,
                indent=1,
            )
    base_failures = failed_paths(args.base_results) if args.base_results else set()
    if args.findings:
        with open(args.findings, "w", encoding="utf-8") as stream:
            json.dump(findings(root, base_failures, args.base_name), stream, indent=1)
    print(report(root, base_failures, args.base_name))
    return 1 if any(path not in base_failures for path, _ in failures(root)) else 0


if __name__ == "__main__":
    sys.exit(main())
