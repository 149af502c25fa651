"""reproduce.py: the reproduce.sh a kernel build leaves in its logs replays the
build on a developer's clone: the base commit, the series as applied (by git
am), the config commands and the build, on a tiny repository with a Makefile
that records what it was asked to do."""

from __future__ import annotations

import subprocess

from tests.kernel_tools import load
from tests.test_checkpatch_playbook import git

reproduce = load("reproduce")

# No built-in rules: panic.o must come from the catch-all rule, not cc.
MAKEFILE = '.SUFFIXES:\n%:\n\t@echo "make $@ $(ARCH) $(W)" >> made.txt\n'


def test_reproduce_sh_replays_the_series_config_and_build(tmp_path, capsys):
    repo = tmp_path / "ci"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch", "master")
    (repo / "Makefile").write_text(MAKEFILE)
    (repo / "panic.c").write_text("int x;\n")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "base")
    base = git(repo, "rev-parse", "HEAD")
    for n in (1, 2):
        # A body line that looks like an mbox separator must survive.
        (repo / "panic.c").write_text(f"int x{n};\n")
        git(repo, "commit", "--quiet", "-am", f"change {n}\n\nFrom here on\n")
    series = tmp_path / "series.mbox"
    series.write_text(git(repo, "format-patch", "--stdout", f"{base}..HEAD") + "\n")
    configure = tmp_path / "configure-kernel.sh"
    configure.write_text('make "$@" tinyconfig\nmake "$@" olddefconfig\n')
    out = tmp_path / "reproduce.sh"
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    code = reproduce.main(
        ["--out", str(out), "--job", "kernel-build-warnings", "--base", base,
         "--series", str(series), "--configure", str(configure), "--config-name",
         "tiny-bootable", "--make-arg", "ARCH=x86_64", "--build",
         'make -j"$(nproc)" ARCH=x86_64 W=1 panic.o', "--toolchain",
         f"gcc: {gcc.splitlines()[0]}", "--toolchain", "make: GNU Make 0.1",
         "--image", "kernel-ci-debian-0000000007"]
    )  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line == (
        f"reproduce: sh artifacts/reproduce.sh <your clone> (base {base[:12]} + 2 patch(es), "
        f"tiny-bootable, {gcc.splitlines()[0]}; GNU Make 0.1, image kernel-ci-debian-0000000007)"
    )
    script = out.read_text()
    assert "#   node image   kernel-ci-debian-0000000007" in script

    dev = tmp_path / "dev"
    git(tmp_path, "clone", "--quiet", str(repo), str(dev))
    git(dev, "config", "user.name", "dev")
    git(dev, "config", "user.email", "dev@example.org")
    result = subprocess.run(["sh", str(out), str(dev)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Only make differs from the node's toolchain: a note, not a stop.
    assert result.stderr.strip() == "Note: the node ran GNU Make 0.1; your make differs."
    assert (dev / "panic.c").read_text() == "int x2;\n"
    assert git(dev, "log", "--format=%s", f"{base}..HEAD").splitlines() == ["change 2", "change 1"]
    assert (dev / "made.txt").read_text().splitlines() == [
        "make tinyconfig x86_64 ",
        "make olddefconfig x86_64 ",
        "make panic.o x86_64 1",
    ]

    missing = tmp_path / "elsewhere"
    missing.mkdir()
    git(missing, "init", "--quiet")
    result = subprocess.run(["sh", str(out), str(missing)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"This clone does not have the base commit {base}" in result.stderr


def test_a_job_extends_the_reproduce_sh_of_the_job_it_depends_on(tmp_path, capsys):
    """kernel-boot-qemu: kernel-build's script, then the boot, in one command."""
    repo = tmp_path / "ci"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch", "master")
    (repo / "Makefile").write_text(MAKEFILE)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "base")
    base = git(repo, "rev-parse", "HEAD")
    (tmp_path / "series.mbox").write_text("")
    build = tmp_path / "build-reproduce.sh"
    reproduce.main(
        ["--out", str(build), "--job", "kernel-build", "--base", base, "--series",
         str(tmp_path / "series.mbox"), "--config-name", "tiny-bootable", "--make-arg",
         "ARCH=x86_64", "--build", "make ARCH=x86_64 bzImage", "--toolchain", "gcc: gcc 12.2.0",
         "--toolchain", "make: GNU Make 4.3", "--image", "kernel-ci-debian-0000000007"]
    )  # fmt: skip
    capsys.readouterr()
    fragment = tmp_path / "boot.sh"
    fragment.write_text('echo "boot $(cat made.txt | tail -n 1)" >> booted.txt\n')
    out = tmp_path / "reproduce.sh"
    args = ["--out", str(out), "--job", "kernel-boot-qemu", "--extend", str(build)]
    assert reproduce.main([*args, "--append", str(fragment)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"reproduce: sh artifacts/reproduce.sh <your clone> (base {base[:12]} + 0 patch(es), "
        "tiny-bootable, gcc 12.2.0; GNU Make 4.3, image kernel-ci-debian-0000000007; "
        "then kernel-boot-qemu)"
    )
    assert out.read_text().splitlines()[2] == (
        "# ... then kernel-boot-qemu, as the CI node ran it (at the end)."
    )
    dev = tmp_path / "dev"
    git(tmp_path, "clone", "--quiet", str(repo), str(dev))
    result = subprocess.run(["sh", str(out), str(dev)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (dev / "booted.txt").read_text() == "boot make bzImage x86_64 \n"
