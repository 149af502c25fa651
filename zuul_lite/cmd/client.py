"""`zuul-lite`: the daemons (scheduler, web) and the user commands.

Every error a user can cause ends as one sentence on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from nodepool_lite.exceptions import NodepoolError
from nodepool_lite.signals import Signals
from nodepool_lite.zk import ZooKeeper
from zuul_lite import autohold, management
from zuul_lite import config as zconfig
from zuul_lite.baseline import Baseline
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.layout import load_layout
from zuul_lite.model import Change
from zuul_lite.state import FlakeCount, ZuulState

log = logging.getLogger("zuul_lite.cmd")

DEFAULT_CONFIG = os.environ.get("ZUUL_LITE_CONFIG", "/etc/zuul-lite/zuul.yaml")


def _default_config() -> str:
    repo_etc = Path(__file__).resolve().parents[2] / "etc" / "zuul.yaml"
    if not Path(DEFAULT_CONFIG).exists() and repo_etc.exists():
        return str(repo_etc)
    return DEFAULT_CONFIG


def setup_logging(verbose: bool, logfile: str | None = None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=logfile,
    )
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("gear").setLevel(logging.WARNING)


def _connect(cfg: zconfig.ZuulConfig) -> ZooKeeper:
    zk = ZooKeeper(cfg.zk_hosts, tls=cfg.zk_tls)
    zk.connect()
    return zk


def _local(cfg: zconfig.ZuulConfig, zk: ZooKeeper) -> LocalConnection:
    return management.local_connection(cfg, ZuulState(zk))


def _wait_for_signal(stop) -> None:
    Signals().wait()
    stop()


def cmd_scheduler(args, cfg) -> int:
    from zuul_lite.scheduler import Scheduler

    zk = _connect(cfg)
    signals = Signals(reload=True)
    sched = Scheduler(cfg, zk)
    sched.start()
    log.info("Scheduler running (gearman port %s)", sched.gearman_port)
    while signals.wait() == signal.SIGHUP:
        sched.reconfigure()  # posted: the scheduler's loop reloads the layout
    sched.stop()
    zk.disconnect()
    return 0


def cmd_web(args, cfg) -> int:
    from zuul_lite.history.db import HistoryDB
    from zuul_lite.web.app import create_app
    from zuul_lite.web.server import WebServer

    zk = _connect(cfg)
    app = create_app(zk, cfg.log_root, cfg=cfg, history=HistoryDB(cfg.dburi))
    server = WebServer(app, host=cfg.web_listen, port=cfg.web_port)
    server.start()
    log.info("Web server on http://%s:%s", cfg.web_listen, cfg.web_port)
    _wait_for_signal(server.stop)
    zk.disconnect()
    return 0


def _inbox(cfg: zconfig.ZuulConfig, action):
    """Run `action(local inbox)` on a ZooKeeper connection of its own."""
    zk = _connect(cfg)
    try:
        return action(_local(cfg, zk))
    finally:
        zk.disconnect()


def cmd_submit(args, cfg) -> int:
    change, ps = _inbox(
        cfg,
        lambda local: local.submit(
            args.path, args.project, branch=args.branch, change=args.change, owner=args.owner
        ),
    )
    print(f"Change {change} patchset {ps} submitted to {args.project}.")
    return 0


def cmd_recheck(args, cfg) -> int:
    _inbox(cfg, lambda local: local.recheck(args.change))
    print(f"Recheck requested for change {args.change}.")
    return 0


def cmd_approve(args, cfg) -> int:
    ps = _inbox(cfg, lambda local: local.approve(args.change))
    print(f"Change {args.change},{ps} approved.")
    return 0


def cmd_abandon(args, cfg) -> int:
    _inbox(cfg, lambda local: local.abandon(args.change))
    print(f"Change {args.change} abandoned.")
    return 0


def _manage(args, cfg, kind: str) -> int:
    """enqueue, dequeue, promote: checked here, carried out by the scheduler."""
    zk = _connect(cfg)
    try:
        state = ZuulState(zk)
        patchset = getattr(args, "patchset", None)
        print(management.request(cfg, state, kind, args.pipeline, args.change, patchset))
    finally:
        zk.disconnect()
    return 0


def _with_state(cfg, action):
    zk = _connect(cfg)
    try:
        return action(ZuulState(zk))
    finally:
        zk.disconnect()


def cmd_autohold(args, cfg) -> int:
    print(
        _with_state(
            cfg,
            lambda state: management.add_autohold(
                cfg, state, args.project, args.job, args.reason, args.count, args.change
            ),
        )
    )
    return 0


def cmd_autohold_list(args, cfg) -> int:
    found = _with_state(cfg, autohold.requests)
    print("\n".join(r.describe() for r in found) if found else "No autohold requests.")
    return 0


def cmd_autohold_delete(args, cfg) -> int:
    print(_with_state(cfg, lambda state: management.delete_autohold(state, args.id)))
    return 0


def format_flakes(counts: list[FlakeCount]) -> str:
    """One line per rerun-on-failure job of a project: how often it ended and
    how often it failed, then passed on a fresh node."""
    if not counts:
        return "No flake counts yet (no rerun-on-failure job has finished)."
    rows = [("PROJECT", "JOB", "RUNS", "FLIPS", "RATE")] + [
        (c.project, c.job, str(c.runs), str(c.flips), f"{c.rate:.1%}") for c in counts
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    tests = [
        f"  {c.project} {c.job} {test}: flipped in {n} of {c.runs} runs ({c.test_rate(test):.1%})"
        for c in counts
        for test, n in sorted(c.tests.items(), key=lambda t: (-t[1], t[0]))
    ]
    if tests:
        lines += ["Flaky tests (failed, then passed on a fresh node):", *tests]
    return "\n".join(lines)


def cmd_flakes(args, cfg) -> int:
    print(format_flakes(_with_state(cfg, lambda state: state.flake_counts())))
    return 0


def format_baselines(found: list[tuple[Baseline, float]]) -> str:
    """One line per recorded baseline, newest first: what a change's build on
    that commit compares with, and the trusted build it came from."""
    if not found:
        return "No baselines recorded (a job listed in the post pipeline records them)."
    lines = []
    for baseline, recorded in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(recorded))
        lines.append(
            f"{baseline.project} {baseline.sha[:12]} {baseline.job} (recorded {when} UTC): "
            f"{baseline.findings.summary()}"
        )
        lines.append(f"    {baseline.log_url or 'build ' + baseline.build_uuid}")
    return "\n".join(lines)


def cmd_baselines(args, cfg) -> int:
    from zuul_lite.history.db import HistoryDB

    db = HistoryDB(cfg.dburi)
    try:
        found = db.baselines(args.project, args.job, args.commit, args.limit)
    finally:
        db.dispose()
    print(format_baselines(found))
    return 0


def format_change(change: dict) -> str:
    lines = [
        f"Change {change['number']}: {change['subject']}",
        f"  project {change['project']} branch {change['branch']}, "
        f"owner {change['owner']}, status {change['status']}",
    ]
    for ps in change["patchsets"]:
        lines.append(f"  patchset {ps['number']}: {len(ps.get('patches', []))} patch(es)")
    for vote in change["votes"]:
        value = vote["value"]
        shown = f"{value:+d}" if isinstance(value, int) else "0"
        lines.append(f"\n  Verified {shown} on patchset {vote['patchset']} ({vote['pipeline']}):")
        lines.extend("    " + ln for ln in vote["message"].splitlines())
    return "\n".join(lines)


def cmd_show(args, cfg) -> int:
    change = _inbox(cfg, lambda local: local.get_change_data(args.change))
    print(json.dumps(change, indent=2) if args.json else format_change(change))
    return 0


def format_status(data: dict) -> str:
    """Each queue in order, each item with the item it is tested on top of."""
    lines = []
    for pipeline in data["pipelines"]:
        lines.append(f"{pipeline['name']}: {len(pipeline['items'])} item(s)")
        labels = {i["uuid"]: Change.from_dict(i["change"]).label for i in pipeline["items"]}
        for queue in pipeline["queues"]:
            if not queue.get("dynamic"):
                window = f", window {queue['window']}" if queue.get("window") else ""
                lines.append(f"  queue {queue['name']}{window}:")
            for item in queue["items"]:
                bs = item["buildset"]
                ahead = labels.get(item.get("item_ahead") or "", "the branch head")
                state = "merge conflict" if bs["merge_state"] == "conflict" else bs["merge_state"]
                if bs["merge_state"] == "complete":
                    state = "running"
                if not item.get("active") and bs["merge_state"] == "pending":
                    state = "waiting"
                change = item["change"]
                if change["number"] == 0:  # a branch head, tested as it is
                    what = f"{change['project']} {change.get('ref', '')} [{state}]"
                else:
                    what = f"{change['subject']} [{state}; on top of {ahead}]"
                lines.append(f"    {labels[item['uuid']]} {what}")
                for b in sorted(bs["builds"].values(), key=lambda b: b.get("index", 0)):
                    early = " (failing)" if b.get("early_failure") and not b["result"] else ""
                    if b.get("first_result") and not b["result"]:
                        early += f" (run once more after {b['first_result']})"
                    lines.append(f"      {b['job']}: {b['result'] or b['state']}{early}")
    return "\n".join(lines)


def cmd_status(args, cfg) -> int:
    zk = _connect(cfg)
    try:
        data = ZuulState(zk).read_status()
    finally:
        zk.disconnect()
    print(json.dumps(data, indent=2) if args.json else format_status(data))
    return 0


def _offered_labels(path: Path) -> set[str]:
    """Labels some nodepool pool can provide: a job needing another never runs."""
    from nodepool_lite import config as npconfig

    ncfg = npconfig.load(path)
    return {label for p in ncfg.providers for pool in p.pools for label in pool.labels}


def cmd_validate(args, cfg) -> int:
    nodepool_conf = Path(args.nodepool_config or cfg.path.parent / "nodepool.yaml")
    node_types = None
    if args.nodepool_config or nodepool_conf.exists():
        node_types = _offered_labels(nodepool_conf)
    layout = load_layout(cfg.layout_path, cfg.jobs_dir, set(cfg.connections), node_types)
    print(
        f"{cfg.layout_path}: OK ({len(layout.pipelines)} pipelines, "
        f"{sum(1 for j in layout.jobs.values() if not j.noop)} jobs, "
        f"{len(layout.projects)} projects)."
    )
    return 0


def cmd_import(args, cfg) -> int:
    repo = _inbox(
        cfg, lambda local: local.import_project(args.project, Path(args.source), args.branch)
    )
    print(f"Project {args.project} served from {repo}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zuul-lite", description="Gated CI for kernel patches.")
    p.add_argument("-c", "--config", default=_default_config(), help="zuul.yaml")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log-file")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("scheduler", help="run the scheduler").set_defaults(func=cmd_scheduler)
    sub.add_parser("web", help="run the web server").set_defaults(func=cmd_web)
    s = sub.add_parser("submit", help="submit a patch series (mbox or directory)")
    s.add_argument("path")
    s.add_argument("--project", default="linux")
    s.add_argument("--branch")
    s.add_argument("--change", type=int, help="upload as a new patchset of this change")
    s.add_argument("--owner")
    s.set_defaults(func=cmd_submit)
    s = sub.add_parser("recheck", help="run the check pipeline again for a change")
    s.add_argument("change", type=int)
    s.set_defaults(func=cmd_recheck)
    s = sub.add_parser("approve", help="approve a change for the gate")
    s.add_argument("change", type=int)
    s.set_defaults(func=cmd_approve)
    s = sub.add_parser("abandon", help="abandon a change")
    s.add_argument("change", type=int)
    s.set_defaults(func=cmd_abandon)
    for kind, text in (
        ("enqueue", "put a change into a pipeline, without a trigger"),
        ("dequeue", "take a change out of a pipeline, without a report"),
        ("promote", "move a change to the head of its gate queue"),
    ):
        s = sub.add_parser(kind, help=text)
        s.add_argument("--pipeline", required=True)
        s.add_argument("change", type=int)
        if kind == "enqueue":
            s.add_argument("--patchset", type=int)
        s.set_defaults(func=lambda a, c, k=kind: _manage(a, c, k))
    s = sub.add_parser("autohold", help="keep the node of the next failing builds of a job")
    s.add_argument("--project", required=True)
    s.add_argument("--job", required=True)
    s.add_argument("--change", type=int, help="only builds of this change")
    s.add_argument("--reason", required=True, help="who wants the node, and why")
    s.add_argument("--count", type=int, default=1, help="how many nodes to keep (default 1)")
    s.set_defaults(func=cmd_autohold)
    s = sub.add_parser("autohold-list", help="the autohold requests and the nodes they hold")
    s.set_defaults(func=cmd_autohold_list)
    s = sub.add_parser("autohold-delete", help="delete an autohold request")
    s.add_argument("id")
    s.set_defaults(func=cmd_autohold_delete)
    s = sub.add_parser("show", help="show a change with its votes")
    s.add_argument("change", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = sub.add_parser("status", help="show the pipelines' queues")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("flakes", help="how often each rerun-on-failure job flipped")
    s.set_defaults(func=cmd_flakes)
    s = sub.add_parser(
        "baselines", help="what trusted builds found on branch heads, which changes compare with"
    )
    s.add_argument("--project")
    s.add_argument("--job")
    s.add_argument("--commit", help="a commit sha or its prefix")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_baselines)
    s = sub.add_parser("validate-config", help="check the layout and jobs")
    s.add_argument(
        "--nodepool-config",
        help="nodepool.yaml whose labels the jobs' node types must be among "
        "(default: nodepool.yaml beside zuul.yaml, if there is one)",
    )
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("import-project", help="serve a git repo as a project of the inbox")
    s.add_argument("project")
    s.add_argument("source", help="a git repository to import")
    s.add_argument("--branch", default="master")
    s.set_defaults(func=cmd_import)
    s = sub.add_parser("quickstart", help="start everything and vote on the sample series")
    s.add_argument("--stop", action="store_true", help="stop every service it started")
    s.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    try:
        if args.command == "quickstart":
            from zuul_lite.cmd.quickstart import run

            return run(args)
        cfg = zconfig.load(args.config)
        return args.func(args, cfg)
    except (ZuulLiteError, NodepoolError) as e:
        print(f"zuul-lite: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
