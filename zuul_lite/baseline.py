"""Baselines: what a kernel job found on a merged branch head, kept per
(project, commit, job) so that a change's build of the same job can tell
what it broke from what was broken already (doc/jobs.md, "Baselines").

A job writes `artifacts/findings.json` on its node: the tests it ran with
their status, whether the kernel booted, the compiler warnings it saw by
identity. The node ran the change's code, so the launcher reads that file
through `Findings.from_json` (size and shape checked) into the build's
result. Only a trusted pipeline's build of a branch head (post: ref-updated,
so a merged tree) is recorded, in the history database's `zuul_baseline`
table; a check or gate build of a change never writes a baseline another
change reads. A change's build gets the baseline of its base commit, if one
is recorded, as `zuul.baseline` (`Baseline.to_dict()`), and its job compares
with it on the node; without one the job runs the base itself as before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from zuul_lite.exceptions import ZuulLiteError

log = logging.getLogger("zuul_lite.baseline")

# The findings travel in the build's result, which ZooKeeper stores (1 MiB a
# znode at most): a whole kernel's KUnit results are ~200 KiB.
MAX_FINDINGS_BYTES = 512 << 10
MAX_ENTRIES = 50_000  # tests, warnings or files in one build's findings
MAX_TEXT = 1000  # characters of one test path, warning identity or file name
TEST_STATUSES = ("PASS", "FAIL", "SKIP", "ERROR", "TODO")
FAILED_TESTS = ("FAIL", "ERROR")
BOOT_STATUSES = ("ok", "failed")


class FindingsError(ZuulLiteError, ValueError):
    """A findings file that does not fit the schema: one sentence."""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise FindingsError(f"{what} is not a string of at most {MAX_TEXT} characters.")
    return value


def _texts(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise FindingsError(f"{what} is not a list of at most {MAX_ENTRIES} strings.")
    return [_text(v, f"an entry of {what}") for v in value]


@dataclass(frozen=True, slots=True)
class Findings:
    """What one build of a kernel job found, by identity (never by count).

    `tests`: KTAP test path ("suite.test") to status; `boot`: "ok" or
    "failed" for a job that boots, else None; `warnings`: warning identities
    (buildwarnings.py: file, function and message) of the files listed in
    `warning_files`, the ones the build compiled. `already_failing` and
    `base` are the job's own comparison: the failures it did not count
    because the base commit `base` fails them too (for the report).
    """

    tests: dict[str, str] = field(default_factory=dict)
    boot: str | None = None
    warnings: list[str] = field(default_factory=list)
    warning_files: list[str] = field(default_factory=list)
    already_failing: list[str] = field(default_factory=list)
    base: str = ""

    @property
    def empty(self) -> bool:
        return not (self.tests or self.boot or self.warning_files)

    def failed_tests(self) -> list[str]:
        return [path for path, status in self.tests.items() if status in FAILED_TESTS]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Findings:
        """The findings in `data`, checked: a node wrote them."""
        if not isinstance(data, dict):
            raise FindingsError("The findings are not a JSON object.")
        tests = data.get("tests", {})
        if not isinstance(tests, dict) or len(tests) > MAX_ENTRIES:
            raise FindingsError(f"tests is not an object of at most {MAX_ENTRIES} tests.")
        for path, status in tests.items():
            _text(path, "a test path")
            if status not in TEST_STATUSES:
                raise FindingsError(f"test {path[:80]} has status {str(status)[:20]!r}.")
        boot = data.get("boot")
        if boot is not None and boot not in BOOT_STATUSES:
            raise FindingsError(f"boot is {str(boot)[:20]!r}, not one of ok, failed.")
        return cls(
            tests=dict(tests),
            boot=boot,
            warnings=_texts(data.get("warnings", []), "warnings"),
            warning_files=_texts(data.get("warning_files", []), "warning_files"),
            already_failing=_texts(data.get("already_failing", []), "already_failing"),
            base=_text(data.get("base", ""), "base"),
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Findings:
        if len(raw) > MAX_FINDINGS_BYTES:
            raise FindingsError(f"The findings are larger than {MAX_FINDINGS_BYTES} bytes.")
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise FindingsError(f"The findings are not JSON: {error}.") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """What was found, in a few words (`zuul-lite baselines`)."""
        said = []
        if self.tests:
            failed = self.failed_tests()
            said.append(f"{len(self.tests)} tests, {len(failed)} failing")
            if failed:
                said[-1] += f" ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})"
        if self.boot:
            said.append(f"boot {self.boot}")
        if self.warning_files:
            said.append(
                f"{len(self.warnings)} warnings in {len(self.warning_files)} compiled files"
            )
        return "; ".join(said) or "nothing recorded"

    def note(self) -> str:
        """One line for the report of a build that passed although the base's
        failures showed up in it too; "" when there were none."""
        if not self.already_failing:
            return ""
        return f"already failing on base {self.base[:12]}: {named(self.already_failing)}"


@dataclass(frozen=True, slots=True)
class Baseline:
    """The findings of a trusted build of `job` on commit `sha` of `project`:
    what a change's build on top of `sha` compares with (`zuul.baseline`)."""

    project: str
    sha: str
    job: str
    build_uuid: str
    log_url: str
    findings: Findings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(
            project=data["project"],
            sha=data["sha"],
            job=data["job"],
            build_uuid=data["build_uuid"],
            log_url=data.get("log_url") or "",
            findings=Findings.from_dict(data["findings"]),
        )


def failed_tests_of(findings: Any) -> list[str]:
    """The failing tests a build's findings name; none when it has no
    findings or bad ones (BaselineStore logs those)."""
    if findings is None:
        return []
    try:
        return Findings.from_dict(findings).failed_tests()
    except FindingsError:
        return []


def named(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, then how many more: one line of a report."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")
