"""`zuul-launcher -c etc/zuul.yaml`: run the launcher until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import logging.config
import sys
from pathlib import Path

import yaml

from launcher.config import ConfigError, load
from launcher.server import LauncherServer
from nodepool_lite.exceptions import TLSError
from nodepool_lite.signals import Signals

log = logging.getLogger("launcher.cmd")


def _setup_logging(path: str | None, debug: bool, logfile: str | None = None) -> None:
    if path:
        logging.config.dictConfig(yaml.safe_load(Path(path).read_text()))
        return
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=logfile,
    )
    logging.getLogger("gear").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("kazoo").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zuul-launcher", description=__doc__)
    parser.add_argument(
        "-c",
        "--config",
        default="/etc/zuul-lite/zuul.yaml",
        help="zuul.yaml (reads launcher:, gearman:, zookeeper:)",
    )
    parser.add_argument("--log-config", help="logging dictConfig YAML")
    parser.add_argument("--log-file", help="log here instead of stderr")
    parser.add_argument("-d", "--debug", action="store_true", help="debug logging")
    opts = parser.parse_args(argv)
    _setup_logging(opts.log_config, opts.debug, opts.log_file)
    try:
        config = load(opts.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if not config.private_key.exists():
        print(
            f"The private key {config.private_key} does not exist; set launcher/private-key.",
            file=sys.stderr,
        )
        return 2
    try:
        for files in (config.zk_tls, config.gearman_tls):
            if files is not None:
                files.check()
    except TLSError as error:
        print(error, file=sys.stderr)
        return 2
    signals = Signals()
    server = LauncherServer(config)
    server.start()
    log.info("Signal %s received", signals.wait())
    server.stop()
    server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
