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
import threading
from pathlib import Path

from nodepool_lite.exceptions import NodepoolError
from nodepool_lite.zk import ZooKeeper
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.layout import load_layout

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
    zk = ZooKeeper(cfg.zk_hosts)
    zk.connect()
    return zk


def _local(cfg: zconfig.ZuulConfig, zk: ZooKeeper) -> LocalConnection:
    for name, c in cfg.connections.items():
        if c["driver"] == "local":
            return LocalConnection(name, zk, cfg.state_dir)
    raise ZuulLiteError(f"{cfg.path} defines no local connection.")


def _wait_for_signal(stop) -> None:
    done = threading.Event()

    def handler(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    done.wait()
    stop()


def cmd_scheduler(args, cfg) -> int:
    from zuul_lite.scheduler import Scheduler

    zk = _connect(cfg)
    sched = Scheduler(cfg, zk)
    sched.start()
    signal.signal(signal.SIGHUP, lambda s, f: sched.reconfigure())
    log.info("Scheduler running (gearman port %s)", sched.gearman_port)
    _wait_for_signal(sched.stop)
    zk.disconnect()
    return 0


def cmd_web(args, cfg) -> int:
    from zuul_lite.web.app import create_app
    from zuul_lite.web.server import WebServer

    zk = _connect(cfg)
    server = WebServer(create_app(zk, cfg.log_root), host=cfg.web_listen, port=cfg.web_port)
    server.start()
    log.info("Web server on http://%s:%s", cfg.web_listen, cfg.web_port)
    _wait_for_signal(server.stop)
    zk.disconnect()
    return 0


def cmd_submit(args, cfg) -> int:
    zk = _connect(cfg)
    try:
        change, ps = _local(cfg, zk).submit(
            args.path, args.project, branch=args.branch, change=args.change, owner=args.owner
        )
    finally:
        zk.disconnect()
    print(f"Change {change} patchset {ps} submitted to {args.project}.")
    return 0


def cmd_recheck(args, cfg) -> int:
    zk = _connect(cfg)
    try:
        _local(cfg, zk).recheck(args.change)
    finally:
        zk.disconnect()
    print(f"Recheck requested for change {args.change}.")
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
    zk = _connect(cfg)
    try:
        change = _local(cfg, zk).get_change(args.change)
    finally:
        zk.disconnect()
    print(json.dumps(change, indent=2) if args.json else format_change(change))
    return 0


def cmd_status(args, cfg) -> int:
    from zuul_lite.scheduler import status

    zk = _connect(cfg)
    try:
        data = status(zk)
    finally:
        zk.disconnect()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for pipeline in data["pipelines"]:
        print(f"{pipeline['name']}: {len(pipeline['items'])} item(s)")
        for item in pipeline["items"]:
            print(f"  {item['change']},{item['patchset']} {item['subject']} [{item['state']}]")
            for b in item["builds"].values():
                print(f"    {b['job']}: {b['result'] or b['state']}")
    return 0


def cmd_validate(args, cfg) -> int:
    layout = load_layout(cfg.layout_path, cfg.jobs_dir, set(cfg.connections))
    print(
        f"{cfg.layout_path}: OK ({len(layout.pipelines)} pipelines, {len(layout.jobs)} jobs, "
        f"{len(layout.projects)} projects)."
    )
    return 0


def cmd_import(args, cfg) -> int:
    zk = _connect(cfg)
    try:
        repo = _local(cfg, zk).import_project(args.project, Path(args.source), args.branch)
    finally:
        zk.disconnect()
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
    s = sub.add_parser("show", help="show a change with its votes")
    s.add_argument("change", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = sub.add_parser("status", help="show the pipelines' queues")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    sub.add_parser("validate-config", help="check the layout and jobs").set_defaults(
        func=cmd_validate
    )
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
