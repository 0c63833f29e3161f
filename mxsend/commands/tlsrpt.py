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

from mxsend.config import Config
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.errors import ConfigError
from mxsend.spool import Spool
from mxsend.tlsdns import TlsResolver
from mxsend.tlsrpt_store import Enqueue, Sent, TlsRptSender, TlsRptStore


def spool_enqueue(config: Config) -> Enqueue:
    """Queue a report message in the spool by the writers' protocol (tmp/, new/)."""
    spool = Spool.configured(config.spool)

    def enqueue(sender: str, recipient: str, data: bytes) -> None:
        for directory in ("tmp", "new"):
            (config.spool.path / directory).mkdir(parents=True, exist_ok=True)
        envelope = Envelope(sender=sender, recipients=(Recipient(recipient),))
        spool.enqueue(Message(envelope=envelope, data=data))

    return enqueue


async def send_reports(config: Config, *, everything: bool) -> list[Sent]:
    store = TlsRptStore(config.spool.path)
    sender = TlsRptSender(
        store, TlsResolver(config.dns), spool_enqueue(config),
        report_from=config.tls.report_from, ca_file=config.smtp.ca_file,
    )
    return await sender.send(everything=everything)


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
