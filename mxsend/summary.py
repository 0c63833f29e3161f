"""The `summary` event that ends `run --once` (contract §10): one line, the last.

`Tally` counts, from the log's own events (log.observe), the run's `delivery` events by
status (the DSNs it generated and delivered included) and the messages `skipped`. With
`queue.processes > 1` each daemon writes its tally as one JSON line to the pipe the
supervisor passed in $MXSEND_SUMMARY_FD; the supervisor sums them once all have exited
and logs the one `summary`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mxsend import log

SUMMARY_FD_ENV = "MXSEND_SUMMARY_FD"
STATUSES = ("sent", "deferred", "bounced")


@dataclass(slots=True)
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    skipped: set[str] = field(default_factory=set)

    def __call__(self, name: str, message_id: str | None, fields: Mapping[str, Any]) -> None:
        if name == "delivery":
            status = fields.get("status")
            if status in self.counts:
                self.counts[str(status)] += 1
        elif name == "skipped" and message_id is not None:
            self.skipped.add(message_id)

    def totals(self) -> dict[str, int]:
        return {**self.counts, "skipped": len(self.skipped)}


def add(totals: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Several daemons' totals summed (a message skipped by two counts twice)."""
    summed = dict.fromkeys((*STATUSES, "skipped"), 0)
    for one in totals:
        for key in summed:
            value = one.get(key, 0)
            summed[key] += value if isinstance(value, int) else 0
    return summed


def log_summary(totals: Mapping[str, int], seconds: float) -> None:
    log.event("summary", None, sent=totals.get("sent", 0),
              deferred=totals.get("deferred", 0), bounced=totals.get("bounced", 0),
              skipped=totals.get("skipped", 0), seconds=round(seconds, 3))
    log.flush()


def report(tally: Tally, seconds: float, environ: Mapping[str, str] = os.environ) -> None:
    """The end of `run --once`: to the supervisor's pipe if there is one, else logged."""
    fd = environ.get(SUMMARY_FD_ENV, "")
    if not fd.isdigit():
        log_summary(tally.totals(), seconds)
        return
    data = (json.dumps(tally.totals()) + "\n").encode()
    # Under PIPE_BUF: one atomic write; the supervisor reads it after we exit.
    with contextlib.suppress(OSError):
        os.write(int(fd), data)
    with contextlib.suppress(OSError):
        os.close(int(fd))


def read_report(fd: int) -> dict[str, int]:
    """What one daemon wrote to its summary pipe ({} if it died first); closes `fd`."""
    chunks: list[bytes] = []
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        doc = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, int)} if isinstance(doc, dict) else {}
