#!/usr/bin/env python3
"""A boot's result for zuul-lite, compared with the base commit's.

Runs on the node (python3 alone, the standard library only):

    bootbaseline.py ok|failed FINDINGS [BASELINE]

writes FINDINGS (artifacts/findings.json, zuul_lite/baseline.py) with the
boot's result. For a failed boot, BASELINE is `zuul.baseline` as JSON (what
kernel-boot-qemu found on the base commit in the post pipeline, or null):
if the base failed to boot too, the failure is listed as already failing on
base and the script exits 0; otherwise it says why the failure counts and
exits 1.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    result, findings_path = argv[0], os.path.expanduser(argv[1])
    os.makedirs(os.path.dirname(findings_path), exist_ok=True)
    baseline = None
    if len(argv) > 2:
        with open(argv[2], encoding="utf-8") as stream:
            baseline = json.load(stream)
    found: dict = {"boot": result}
    rc = 0
    if result == "failed":
        baseline = baseline if isinstance(baseline, dict) else {}
        on_base = (baseline.get("findings") or {}).get("boot")
        sha = str(baseline.get("sha", ""))[:12]
        if on_base == "failed":
            found.update(already_failing=["boot"], base=sha)
            print(
                f"The boot failed, and so did this job's boot of base {sha} in the post "
                f"pipeline ({baseline.get('log_url', '')}): already failing on base {sha}, "
                "not counted."
            )
        elif on_base == "ok":
            print(f"The boot failed; base {sha} booted in this job in the post pipeline.")
            rc = 1
        else:
            print("The boot failed; no boot of the base commit is recorded, so it counts.")
            rc = 1
    with open(findings_path, "w", encoding="utf-8") as stream:
        json.dump(found, stream)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
