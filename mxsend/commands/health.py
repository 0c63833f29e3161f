"""`mxsend health`: the container health check (Dockerfile HEALTHCHECK).

Healthy while some daemon refreshes its heartbeat in the spool: the scheduler does so
every HEARTBEAT_INTERVAL seconds from its event loop, so a wedged loop turns unhealthy.
"""

from __future__ import annotations

import argparse
import sys
import time

from mxsend.config import Config
from mxsend.scheduler import HEARTBEAT_INTERVAL
from mxsend.spool import Spool

# Three missed beats: slack for a busy machine, still well inside Docker's interval.
MAX_AGE = 3 * HEARTBEAT_INTERVAL


def run(args: argparse.Namespace, config: Config) -> int:
    spool = Spool(config.spool.path, owner="health-check")
    live = spool.live_owners(MAX_AGE, time.time())
    if not live:
        print(f"mxsend: no daemon heartbeat in {config.spool.path} within {MAX_AGE:.0f}s",
              file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(live)}")
    return 0
