"""`mxsend run [--once]`: the daemon in the foreground."""

from __future__ import annotations

import argparse
import asyncio

from mxsend.config import Config
from mxsend.log import setup_logging
from mxsend.scheduler import run_daemon


def run(args: argparse.Namespace, config: Config) -> int:
    setup_logging(config.log.format, config.log.level)
    return asyncio.run(run_daemon(config, once=args.once))
