"""The daemon's own TLS-RPT pass (RFC 8460 §4; contract §8): once an hour, report the
days that have ended.

A day's results are reported after its UTC midnight, by whichever daemon of the spool
first takes `<spool>/tlsrpt/sender.lock` (flock: released by the kernel when a process
dies, so a crashed sender never blocks the others). `mxsend tlsrpt send` takes the same
lock, waiting for it, so a report is never built twice at once. A pass also retries the
`https:` POSTs that failed (TlsRptSender, for up to a day).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from mxsend.config import Config
from mxsend.envelope import Envelope, Message, Recipient
from mxsend.log import get_logger
from mxsend.tlsdns import TlsResolver
from mxsend.tlsrpt_store import Enqueue, Sent, TlsRptSender, TlsRptStore

log = get_logger()

INTERVAL = 3600.0  # seconds between passes; a day's reports go out within the hour


def spool_enqueue(config: Config) -> Enqueue:
    """Queue a report message in the spool by the writers' protocol (tmp/, new/)."""
    from mxsend.spool import Spool

    spool = Spool.configured(config.spool)

    def enqueue(sender: str, recipient: str, data: bytes) -> None:
        for directory in ("tmp", "new"):
            (config.spool.path / directory).mkdir(parents=True, exist_ok=True)
        envelope = Envelope(sender=sender, recipients=(Recipient(recipient),))
        spool.enqueue(Message(envelope=envelope, data=data))

    return enqueue


class SenderLock:
    """`<spool>/tlsrpt/sender.lock`, held by the process sending reports."""

    def __init__(self, spool: Path) -> None:
        self._path = spool / "tlsrpt" / "sender.lock"
        self._fd: int | None = None

    def acquire(self, *, wait: bool) -> bool:
        """True once held; False if another process holds it and `wait` is off."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


async def send_reports(config: Config, enqueue: Enqueue, *, everything: bool,
                       wait: bool = False) -> list[Sent] | None:
    """One pass under the lock; None if another process is sending (and not `wait`)."""
    lock = SenderLock(config.spool.path)
    # Waiting blocks: in a thread, never in the event loop.
    held = (await asyncio.to_thread(lock.acquire, wait=True) if wait
            else lock.acquire(wait=False))
    if not held:
        return None
    try:
        sender = TlsRptSender(TlsRptStore(config.spool.path), TlsResolver(config.dns), enqueue,
                              report_from=config.tls.report_from,
                              ca_file=config.smtp.ca_file)
        return await sender.send(everything=everything)
    finally:
        lock.release()


async def run(current: Callable[[], Config], enqueue: Callable[[Config], Enqueue],
              stopping: asyncio.Event, interval: float = INTERVAL) -> None:
    """The daemon's task: a pass now and every `interval` seconds until `stopping`."""
    while not stopping.is_set():
        config = current()
        if config.tls.tlsrpt:
            try:
                for sent in await send_reports(config, enqueue(config),
                                               everything=False) or ():
                    log.info("tlsrpt report for %s: %s%s", sent.domain,
                             ", ".join(sent.destinations) or "no rua published",
                             "; " + "; ".join(sent.problems) if sent.problems else "")
            except Exception:  # a bug must not stop the daemon; the next pass retries
                log.exception("TLS-RPT pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
