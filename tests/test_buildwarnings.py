"""buildwarnings.py: warnings of a W=1 build matched by identity (file,
function, message), so moved code is not a new warning and a new one is."""

from __future__ import annotations

import json

from tests.kernel_tools import load
from zuul_lite.baseline import Findings

bw = load("buildwarnings")

BASE = """\
  CC      kernel/panic.o
kernel/panic.c: In function ‘panic’:
kernel/panic.c:180:13: warning: variable ‘old_cpu’ set but not used [-Wunused-but-set-variable]
  180 |         int old_cpu, this_cpu;
      |             ^~~~~~~
kernel/panic.c: At top level:
kernel/panic.c:612:6: warning: no previous prototype for ‘__warn_printk’ [-Wmissing-prototypes]
  CC      kernel/exit.o
kernel/exit.c: In function ‘do_exit’:
kernel/exit.c:790:9: warning: ‘x’ may be used uninitialized [-Wmaybe-uninitialized]
kernel/exit.c:770:13: note: ‘x’ was declared here
"""

# The series inserts four lines above each warning: only lines move.
MOVED = BASE.replace(":180:", ":184:").replace(":612:", ":616:").replace(":790:", ":794:")


def identities(log: str) -> list[tuple]:
    return [w.identity for w in bw.parse(log)]


def test_warnings_carry_file_function_and_message():
    warnings = bw.parse(BASE)
    assert [(w.file, w.line, w.function, w.option) for w in warnings] == [
        ("kernel/panic.c", 180, "panic", "-Wunused-but-set-variable"),
        ("kernel/panic.c", 612, None, "-Wmissing-prototypes"),
        ("kernel/exit.c", 790, "do_exit", "-Wmaybe-uninitialized"),
    ]
    assert str(warnings[0]) == (
        "kernel/panic.c:180:13: warning: variable ‘old_cpu’ set but not used "
        "[-Wunused-but-set-variable] (in panic)"
    )


def test_moved_lines_add_no_warning():
    result = bw.diff(bw.parse(BASE), bw.parse(MOVED))
    assert result.added == [] and result.fixed == []
    assert [w.line for w in result.kept] == [184, 616, 794]


def test_quotes_and_locations_in_messages_do_not_change_the_identity():
    utf8 = "a.c: In function ‘f’:\na.c:3:5: warning: ‘g’ declared at b.h:12:3 is odd [-Wx]\n"
    ascii_c = "./a.c: In function 'f':\n./a.c:9:1: warning: 'g' declared at b.h:40 is odd [-Wx]\n"
    assert identities(utf8) == identities(ascii_c)
    assert bw.diff(bw.parse(utf8), bw.parse(ascii_c)).added == []


def test_a_new_warning_is_added_even_beside_an_old_one_of_the_same_kind():
    series = MOVED.replace(
        "  CC      kernel/exit.o\n",
        "kernel/panic.c: In function ‘panic’:\n"
        "kernel/panic.c:190:13: warning: variable ‘zuul’ set but not used"
        " [-Wunused-but-set-variable]\n"
        "  CC      kernel/exit.o\n",
    )
    result = bw.diff(bw.parse(BASE), bw.parse(series))
    assert [str(w) for w in result.added] == [
        "kernel/panic.c:190:13: warning: variable ‘zuul’ set but not used "
        "[-Wunused-but-set-variable] (in panic)"
    ]


def test_a_second_copy_of_an_old_warning_in_the_same_function_counts():
    """Matched one for one: the same message twice where the base had it once."""
    one = "a.c: In function ‘f’:\na.c:3:5: warning: unused variable ‘i’ [-Wunused-variable]\n"
    two = one + "a.c:8:5: warning: unused variable ‘i’ [-Wunused-variable]\n"
    result = bw.diff(bw.parse(one), bw.parse(two))
    assert [w.line for w in result.added] == [8]
    # The same warning printed twice (a header in two objects) is one warning.
    assert len(bw.parse(one + one)) == 1


def test_functions_are_tracked_per_file_when_make_interleaves_compilers():
    log = (
        "a.c: In function ‘fa’:\n"
        "b.c: In function ‘fb’:\n"
        "a.c:1:1: warning: one [-Wx]\n"
        "b.c:2:2: warning: two [-Wx]\n"
    )
    assert [w.function for w in bw.parse(log)] == ["fa", "fb"]


def test_the_same_message_in_another_function_is_new():
    old = "a.c: In function ‘f’:\na.c:3:5: warning: unused variable ‘i’ [-Wunused-variable]\n"
    new = old.replace("‘f’", "‘g’")
    assert len(bw.diff(bw.parse(old), bw.parse(new)).added) == 1


def test_cli_reports_and_fails_only_on_added_warnings(tmp_path, capsys):
    base, moved, out = tmp_path / "base.log", tmp_path / "series.log", tmp_path / "warnings.txt"
    base.write_text(BASE)
    moved.write_text(MOVED)
    assert bw.main([str(base), str(moved), "--out", str(out), "--base-name", "1a2b3c4d"]) == 0
    assert out.read_text().splitlines()[:2] == [
        "0 warning(s) added by the series, compared with base 1a2b3c4d",
        "3 warning(s) already on base 1a2b3c4d (not counted):",
    ]
    moved.write_text(MOVED + "/src/linux/kernel/fork.c:5:1: warning: new one [-Wfoo]\n")
    code = bw.main([str(base), str(moved), "--out", str(out), "--strip", "/src/linux/"])
    assert code == 1
    lines = out.read_text().splitlines()
    assert lines[:2] == [
        "1 warning(s) added by the series, compared with base base",
        "kernel/fork.c:5:1: warning: new one [-Wfoo]",
    ]
    assert capsys.readouterr().out.splitlines() == [
        "0 warning(s) added by the series, compared with base 1a2b3c4d",
        "(3 already on base 1a2b3c4d, not counted; 0 removed: see warnings.txt)",
        "1 warning(s) added by the series, compared with base base",
        "kernel/fork.c:5:1: warning: new one [-Wfoo]",
        "(3 already on base base, not counted; 0 removed: see warnings.txt)",
    ]


def test_a_branch_head_records_its_warnings_and_a_series_compares_with_them(tmp_path, capsys):
    """Post records what the head has (--record); a series' build is then
    compared with that baseline, for the files it touched, without a base build."""
    head_log = tmp_path / "head.log"
    head_log.write_text(BASE)
    findings = tmp_path / "findings.json"
    assert bw.main(["--record", str(head_log), "--findings", str(findings)]) == 0
    assert capsys.readouterr().out == "3 warning(s) in 2 compiled file(s)\n"
    recorded = Findings.from_json(findings.read_bytes())
    assert recorded.warning_files == ["kernel/panic.c", "kernel/exit.c"]
    assert recorded.warnings[0] == (
        "kernel/panic.c\tpanic\tvariable 'old_cpu' set but not used\t-Wunused-but-set-variable"
    )
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"sha": "1a2b", "findings": recorded.to_dict()}))
    files = tmp_path / "files.txt"
    files.write_text("kernel/panic.c\nkernel/exit.c\n")
    series = tmp_path / "series.log"
    new = "kernel/panic.c:200:5: warning: unused variable ‘y’ [-Wunused-variable]\n"
    series.write_text(
        MOVED.replace("  CC      kernel/exit.o\n", new + "  CC      kernel/exit.o\n")
    )
    out = tmp_path / "warnings.txt"
    args = ["--baseline", str(baseline), str(series), "--files", str(files), "--out", str(out)]
    assert bw.main([*args, "--base-name", "1a2b"]) == 1
    assert capsys.readouterr().out == (
        "1 warning(s) added by the series, compared with base 1a2b\n"
        "kernel/panic.c:200:5: warning: unused variable ‘y’ [-Wunused-variable]\n"
        "(3 already on base 1a2b, not counted; 0 removed: see warnings.txt)\n"
    )
    series.write_text(MOVED)
    assert bw.main(args) == 0
    # A warning the series removes is named as the baseline knows it (no line).
    series.write_text(MOVED.replace(":184:13: warning:", ":184:13: note:"))
    assert bw.main(args) == 0
    assert "  kernel/panic.c: warning: variable 'old_cpu' set but not used" in out.read_text()
