"""`mxsend health`: the container health check (Dockerfile HEALTHCHECK).

Healthy while every daemon on the spool refreshes its heartbeat: each does so every
heartbeat.INTERVAL seconds from its event loop, so one wedged or stopped loop turns the
check unhealthy, even while other daemons run. A daemon that exits cleanly removes its
heartbeat; one that died leaves it until another daemon recovers its claims.
"""

from __future__ import annotations

import argparse
import sys
import time

from mxsend import heartbeat
from mxsend.config import Config

MAX_AGE = heartbeat.MAX_AGE


def run(args: argparse.Namespace, config: Config) -> int:
    beats = heartbeat.read_beats(config.spool.path)
    stale = heartbeat.stale(beats, time.time(), MAX_AGE)
    if not beats:
        print(f"mxsend: no daemon heartbeat in {config.spool.path}", file=sys.stderr)
        return 1
    if stale:
        print(f"mxsend: no heartbeat within {MAX_AGE:.0f}s from "
              f"{', '.join(b.owner for b in stale)}", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(b.owner for b in beats)}")
    return 0
