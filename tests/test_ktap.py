"""ktap.py: KTAP v1 output from KUnit and kselftest as per-test results and
JUnit XML, including output that a crash cut short."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from tests.kernel_tools import load

ktap = load("ktap")

# KUnit as the UML kernel prints it (6.1): timestamps, kernel noise, a
# parameterised test, a failing expectation with its log lines, a skip.
KUNIT = """\
[    0.120000] Linux version 6.1.0 (zuul@zuul-lite) #1
[    0.130000] KTAP version 1
[    0.130001] 1..2
[    0.130002]     KTAP version 1
[    0.130003]     # Subtest: example
[    0.130004]     1..4
[    0.130005]     # example_simple_test: initializing
[    0.130006]     ok 1 example_simple_test
[    0.130007]     # example_skip_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:29
[    0.130008]     Expected 1 + 1 == 3, but
[    0.130009]         1 + 1 == 2 (0x2)
[    0.130010]     not ok 2 example_fail_test
[    0.130011]     ok 3 example_skip_test # SKIP this test should be skipped
[    0.130012]         KTAP version 1
[    0.130013]         # Subtest: example_params_test
[    0.130014]         ok 1 example value 3 # SKIP unsupported param value
[    0.130015]         ok 2 example value 2
[    0.130016]     # example_params_test: pass:1 fail:0 skip:1 total:2
[    0.130017]     ok 4 example_params_test
[    0.130018] # example: pass:2 fail:1 skip:1 total:4
[    0.130019] not ok 1 example
[    0.130020]     KTAP version 1
[    0.130021]     # Subtest: list-kunit-test
[    0.130022]     1..1
[    0.130023]     ok 1 list_test_list_init
[    0.130024] ok 2 list-kunit-test
[    0.130025] reboot: System halted
"""


def statuses(root) -> dict[str, str]:
    return {path: test.status for suite in root.subtests for path, test in suite.leaves()}


def test_kunit_output_becomes_per_test_results():
    root = ktap.parse(KUNIT)
    assert statuses(root) == {
        "example.example_simple_test": "PASS",
        "example.example_fail_test": "FAIL",
        "example.example_skip_test": "SKIP",
        "example.example_params_test.example value 3": "SKIP",
        "example.example_params_test.example value 2": "PASS",
        "list-kunit-test.list_test_list_init": "PASS",
    }
    assert root.status == "FAIL"
    [(path, failed)] = ktap.failures(root)
    assert path == "example.example_fail_test"
    # The diagnostic lines before a result line are that test's log.
    assert failed.log == [
        "example_skip_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:29",
        "Expected 1 + 1 == 3, but",
        "1 + 1 == 2 (0x2)",
    ]
    skipped = root.subtests[0].subtests[2]
    assert skipped.reason == "this test should be skipped"
    assert ktap.counts(root) == {"PASS": 3, "FAIL": 1, "SKIP": 2, "TODO": 0, "ERROR": 0}


def test_todo_is_an_expected_failure_and_the_plan_may_be_missing():
    root = ktap.parse(
        "KTAP version 1\n"
        "not ok 1 known_broken # TODO fixed in a later release\n"
        "ok 2 - works\n"
        "    KTAP version 1\n"
        "    ok 1 inner\n"
        "ok 3 outer\n"
    )
    assert statuses(root) == {"known_broken": "TODO", "works": "PASS", "outer.inner": "PASS"}
    assert root.status == "PASS" and ktap.failures(root) == []


def test_output_cut_short_by_a_crash_is_an_error_with_the_last_lines():
    root = ktap.parse(
        "KTAP version 1\n"
        "1..2\n"
        "    KTAP version 1\n"
        "    # Subtest: crashy\n"
        "    1..3\n"
        "    ok 1 first\n"
        "BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "Kernel panic - not syncing: Fatal exception\n"
    )
    failed = dict(ktap.failures(root))
    assert set(failed) == {"crashy.(missing 2)", "(missing 1)"}
    missing = failed["crashy.(missing 2)"]
    assert missing.status == "ERROR"
    assert "Kernel panic - not syncing: Fatal exception" in missing.log
    assert root.subtests[0].status == "ERROR"
    assert root.status == "FAIL"
    assert "crashy.(missing 2): the plan promised 3 tests but 2 never reported" in ktap.report(
        root
    )


def test_a_suite_that_breaks_off_after_its_last_test_is_an_error():
    root = ktap.parse("KTAP version 1\n    KTAP version 1\n    # Subtest: s\n    ok 1 a\n")
    [(path, failed)] = ktap.failures(root)
    assert path == "s" and failed.status == "ERROR"
    assert "result line is missing" in failed.reason


def test_kselftest_nesting_by_hash_prefix():
    root = ktap.parse(
        "TAP version 13\n"
        "1..1\n"
        "# timeout set to 45\n"
        "# selftests: size: get_size\n"
        "# TAP version 13\n"
        "# 1..2\n"
        "# ok 1 get runtime memory use\n"
        "# not ok 2 sysinfo\n"
        "# # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0\n"
        "not ok 1 selftests: size: get_size # exit=1\n"
    )
    assert statuses(root) == {
        "selftests: size: get_size.get runtime memory use": "PASS",
        "selftests: size: get_size.sysinfo": "FAIL",
    }


def test_no_ktap_at_all():
    assert ktap.parse("Kernel panic - not syncing: VFS: Unable to mount root fs\n") is None


def test_cli_writes_junit_and_json(tmp_path, capsys):
    log = tmp_path / "kunit.log"
    log.write_text(KUNIT)
    code = ktap.main(
        [str(log), "--junit", str(tmp_path / "junit.xml"), "--json", str(tmp_path / "r.json")]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "FAIL example.example_fail_test"
    assert "    Expected 1 + 1 == 3, but" in out
    assert out.splitlines()[-1] == "6 tests: 3 pass, 1 fail, 2 skip, 0 todo, 0 error"
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    example = suites.find("testsuite[@name='example']")
    assert (example.get("tests"), example.get("failures"), example.get("skipped")) == (
        "5",
        "1",
        "2",
    )
    failure = example.find("testcase[@name='example_fail_test']/failure")
    assert "EXPECTATION FAILED" in failure.text
    assert example.find("testcase[@name='example_params_test.example value 2']") is not None
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["tests"]["list-kunit-test.list_test_list_init"] == "PASS"

    empty = tmp_path / "empty.log"
    empty.write_text("nothing\n")
    assert ktap.main([str(empty)]) == 2
    assert "No KTAP output" in capsys.readouterr().out


def test_tests_failing_on_base_too_do_not_fail(tmp_path, capsys):
    """The same run on the base commit: its failures are named, not counted."""
    base_log, series_log = tmp_path / "base.log", tmp_path / "series.log"
    base_log.write_text(KUNIT)
    series_log.write_text(KUNIT)
    base_json = tmp_path / "base.json"
    assert ktap.main([str(base_log), "--json", str(base_json)]) == 1
    capsys.readouterr()
    args = [str(series_log), "--base-results", str(base_json), "--base-name", "1a2b3c4d"]
    assert ktap.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "FAIL example.example_fail_test (already failing on base 1a2b3c4d)"
    # A test that fails only with the series still does.
    series_log.write_text(
        KUNIT.replace("ok 1 list_test_list_init", "not ok 1 list_test_list_init")
    )
    assert ktap.main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert "FAIL list-kunit-test.list_test_list_init" in out


def test_absurd_nesting_is_text_not_a_crash():
    text = "KTAP version 1\n" + "".join(f"{' ' * 4 * n}KTAP version 1\n" for n in range(1, 2000))
    root = ktap.parse(text + "ok 1 deep\n")
    assert root is not None and ktap.counts(root)["ERROR"] >= 1
