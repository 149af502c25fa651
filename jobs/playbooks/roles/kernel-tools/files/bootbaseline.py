#!/usr/bin/env python3
"""A boot's result for zuul-lite, compared with the base commit's.

Runs on the node (python3 alone, the standard library only):

    bootbaseline.py ok FINDINGS
    bootbaseline.py failed FINDINGS [BASELINE] [--base-boot ok|failed|unbuilt --base SHA]

writes FINDINGS (artifacts/findings.json, zuul_lite/baseline.py) with the
boot's result. For a failed boot, BASELINE is `zuul.baseline` as JSON (what
kernel-boot-qemu found on the base commit in the post pipeline, or null);
without a recorded boot there, --base-boot says how the base commit's kernel,
built and booted by this job, did (unbuilt: it did not build). If the base
failed to boot too, the failure is listed as already failing on base and the
script exits 0; otherwise it says why the failure counts and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def verdict(baseline: object, base_boot: str | None, base: str) -> tuple[bool, str, str]:
    """Whether the failure is already on the base, the base's sha12, and why."""
    recorded = baseline if isinstance(baseline, dict) else {}
    on_base = (recorded.get("findings") or {}).get("boot")
    if on_base in ("ok", "failed"):
        sha = str(recorded.get("sha", ""))[:12]
        where = f"this job's boot of base {sha} in the post pipeline"
        if on_base == "failed":
            why = f"and so did {where} ({recorded.get('log_url', '')})"
            return (
                True,
                sha,
                f"The boot failed, {why}: already failing on base {sha}, not counted.",
            )
        return False, sha, f"The boot failed; base {sha} booted in this job in the post pipeline."
    sha = base[:12]
    here = f"base {sha}'s kernel, built and booted here"
    if base_boot == "failed":
        why = f"and so did {here} (console/serial-base.log)"
        return True, sha, f"The boot failed, {why}: already failing on base {sha}, not counted."
    if base_boot == "ok":
        return False, sha, f"The boot failed; {here}, booted (console/serial-base.log)."
    if base_boot == "unbuilt":
        why = f"base {sha}'s kernel could not be built here (artifacts/base/)"
        return False, sha, f"The boot failed; {why}, so the failure counts."
    return False, sha, "The boot failed; no boot of the base commit is recorded, so it counts."


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", choices=["ok", "failed"])
    parser.add_argument("findings")
    parser.add_argument("baseline", nargs="?")
    parser.add_argument("--base-boot", choices=["ok", "failed", "unbuilt"])
    parser.add_argument("--base", default="")
    args = parser.parse_args(argv)
    findings_path = os.path.expanduser(args.findings)
    os.makedirs(os.path.dirname(findings_path), exist_ok=True)
    baseline = None
    if args.baseline:
        with open(args.baseline, encoding="utf-8") as stream:
            baseline = json.load(stream)
    found: dict = {"boot": args.result}
    rc = 0
    if args.result == "failed":
        already, sha, why = verdict(baseline, args.base_boot, args.base)
        print(why)
        if already:
            found.update(already_failing=["boot"], base=sha)
        else:
            rc = 1
    with open(findings_path, "w", encoding="utf-8") as stream:
        json.dump(found, stream)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
