"""`mxsend tlsrpt send`: end the current TLS-RPT period now and send its reports (§8).

Exactly what the daemon does once a day, at once: the results recorded since the last
report are reported, `mailto:` reports are queued in the spool (the daemon delivers
them), `https:` reports are POSTed by this command (a failure is retried by the
daemon's next pass). Safe while the daemon runs: the period ends by an atomic rename.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from mxsend import tlsrpt_daily
from mxsend.config import Config
from mxsend.errors import ConfigError
from mxsend.tlsrpt_store import Sent


async def send_reports(config: Config, *, everything: bool) -> list[Sent]:
    """End the period and send, under the spool's sender lock (waiting for a daemon)."""
    return await tlsrpt_daily.send_reports(config, tlsrpt_daily.spool_enqueue(config),
                                           everything=everything, wait=True) or []


def run(args: argparse.Namespace, config: Config) -> int:
    if not config.tls.tlsrpt:
        raise ConfigError("tls.tlsrpt: TLS-RPT is off; set tls.tlsrpt = true to send reports")
    outcomes = asyncio.run(send_reports(config, everything=True))
    code = 0
    for sent in outcomes:
        where = ", ".join(sent.destinations) or "no rua published"
        print(f"{sent.domain}: {where}")
        for problem in sent.problems:
            print(f"mxsend tlsrpt: {sent.domain}: {problem} (retried later)", file=sys.stderr)
            code = 1
    return code
