#!/usr/bin/env python3
"""Write reproduce.sh: one script that redoes a build on a developer's machine.

Runs on the node (python3 alone, the standard library only). The script
holds everything the build depended on: the base commit, the series as it
was applied (an mbox, replayed with `git am`), the commands that made the
.config, the make command, and, as a check and in its header, the node's
toolchain versions and the node image build. It runs in a clone of the
project that has the base commit:

    sh reproduce.sh ~/src/linux

Command line (what kernel-tools/tasks/reproduce.yaml runs):
    reproduce.py --out reproduce.sh --job JOB --base SHA --series MBOX
        [--configure SCRIPT] --make-arg ARG... --build CMD... --toolchain LINE...
        --image BUILD --config-name NAME
prints the one-line `reproduce: ...` that a failed build's summary quotes.
A job that runs what another job built (kernel-boot-qemu) extends that
job's script with its own steps, a shell fragment:
    reproduce.py --out reproduce.sh --job JOB --extend ITS_REPRODUCE_SH --append FRAGMENT
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import sys

TEMPLATE = """\
#!/bin/sh
# Reproduce {job} on your machine, exactly as the CI node ran it:
#   base commit  {base}
#   series       {patches} patch(es), applied below with git am
#   config       {config_name}
#   make         {make_args}
#   node image   {image}
{toolchain_comments}
# Run it in a clone of the project that has the base commit (a work tree you
# can spare: it is checked out at the base and the series applied):
#   sh reproduce.sh [DIR]
set -eu
cd "${{1:-.}}"
base={base}
if ! git cat-file -e "$base^{{commit}}" 2>/dev/null; then
  echo "This clone does not have the base commit $base: fetch it first." >&2
  exit 1
fi
{toolchain_checks}
git checkout --quiet --detach "$base"
{apply}
{configure}# The build.
{build}
"""

CONFIGURE = """\
# The configuration, as the node made it.
configure_kernel() {{
{body}
}}
configure_kernel {make_args}
"""

# The first line of each patch git format-patch writes.
PATCH_START = re.compile(r"^From [0-9a-f]{40} Mon Sep 17 00:00:00 2001$", re.MULTILINE)

APPLY = """\
git am --quiet <<'{marker}'
{series}
{marker}"""


def _toolchain_check(line: str) -> str:
    """A warning, not a stop, when a local tool prints another version."""
    command, _, version = line.partition(": ")
    return (
        f'if [ "$({command} --version 2>/dev/null | head -n 1)" != {shlex.quote(version)} ]; '
        f"then echo {shlex.quote(f'Note: the node ran {version}; your {command} differs.')} >&2; "
        "fi"
    )


def render(args: argparse.Namespace, series: str, configure: str) -> str:
    patches = len(PATCH_START.findall(series))
    if patches:
        digest = hashlib.sha256(series.encode()).hexdigest()[:16]
        apply = APPLY.format(series=series.rstrip("\n"), marker=f"ZUUL_SERIES_{digest}")
    else:
        apply = "# The build was of the base commit itself: no patches."
    make_args = " ".join(shlex.quote(arg) for arg in args.make_arg)
    return TEMPLATE.format(
        job=args.job,
        base=args.base,
        patches=patches,
        config_name=args.config_name,
        make_args=make_args or "-",
        image=args.image or "unknown",
        toolchain_comments="\n".join(f"#   toolchain    {line}" for line in args.toolchain),
        toolchain_checks="\n".join(_toolchain_check(line) for line in args.toolchain),
        apply=apply,
        configure=CONFIGURE.format(
            body="\n".join(f"  {line}" if line else "" for line in configure.splitlines()),
            make_args=make_args,
        )
        if configure
        else "",
        build="\n".join(args.build),
    )


# The header lines render() writes, which an extended script's line is made of.
HEADER = re.compile(
    r"^#   (?P<key>base commit|series|config|toolchain|node image) +(?P<value>.*)$", re.MULTILINE
)


def extend(script: str, job: str, fragment: str) -> tuple[str, str]:
    """`script` (another job's reproduce.sh) with `fragment` run after it, and
    the `reproduce: ...` line naming what its header says."""
    found: dict[str, list[str]] = {}
    for match in HEADER.finditer(script):
        found.setdefault(match["key"], []).append(match["value"].strip())
    shebang, title, rest = script.split("\n", 2)  # under the "# Reproduce <job>" line
    script = f"{shebang}\n{title}\n# ... then {job}, as the CI node ran it (at the end).\n{rest}"
    script = f"{script.rstrip()}\n\n# {job}.\n{fragment.rstrip()}\n"
    base = found.get("base commit", ["?"])[0][:12]
    patches = found.get("series", ["0"])[0].split()[0]
    tools = "; ".join(line.partition(": ")[2] for line in found.get("toolchain", []))
    config = found.get("config", ["?"])[0]
    image = found.get("node image", ["unknown"])[0]
    line = (
        f"reproduce: sh artifacts/reproduce.sh <your clone> (base {base} + {patches} patch(es), "
        f"{config}, {tools}, image {image}; then {job})"
    )
    return script, line


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--extend" in argv:
        parser = argparse.ArgumentParser(description="extend another job's reproduce.sh")
        parser.add_argument("--out", required=True)
        parser.add_argument("--job", required=True)
        parser.add_argument("--extend", required=True, help="the other job's reproduce.sh")
        parser.add_argument("--append", required=True, help="a shell fragment to run after it")
        args = parser.parse_args(argv)
        with open(args.extend, encoding="utf-8", errors="surrogateescape") as stream:
            script = stream.read()
        with open(args.append, encoding="utf-8", errors="surrogateescape") as stream:
            fragment = stream.read()
        script, line = extend(script, args.job, fragment)
        with open(args.out, "w", encoding="utf-8", errors="surrogateescape") as stream:
            stream.write(script)
        print(line)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--base", required=True, help="the base commit's sha")
    parser.add_argument("--series", required=True, help="git format-patch --stdout base..HEAD")
    parser.add_argument("--configure", help="the script that made the .config, if one did")
    parser.add_argument("--config-name", required=True)
    parser.add_argument("--make-arg", action="append", default=[])
    parser.add_argument("--build", action="append", default=[], help="a build command line")
    parser.add_argument(
        "--toolchain", action="append", default=[], help="'<tool>: <its --version line>'"
    )
    parser.add_argument("--image", default="", help="the node's image build")
    args = parser.parse_args(argv)
    with open(args.series, encoding="utf-8", errors="surrogateescape") as stream:
        series = stream.read()
    configure = ""
    if args.configure:
        with open(args.configure, encoding="utf-8") as stream:
            configure = stream.read()
    with open(args.out, "w", encoding="utf-8", errors="surrogateescape") as stream:
        stream.write(render(args, series, configure))
    patches = len(PATCH_START.findall(series))
    tools = "; ".join(line.partition(": ")[2] for line in args.toolchain)
    said = [f"base {args.base[:12]} + {patches} patch(es)", args.config_name, tools]
    said.append(f"image {args.image or 'unknown'}")
    print(f"reproduce: sh artifacts/reproduce.sh <your clone> ({', '.join(p for p in said if p)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
