"""TLS-RPT (RFC 8460) I/O: the durable daily store in the spool, and sending reports.

Layout under `<spool>/tlsrpt/`:

    open/<YYYY-MM-DD>/<domain>.jsonl   results of the current period, one JSON per line
    cut/<YYYY-MM-DD>                   epoch at which that day's period was last ended
    closed/<start>-<end>/<domain>.jsonl  ended periods waiting to be reported

`record()` appends one line with O_APPEND and fsyncs it before returning, so a result
that was acknowledged survives a crash; a torn last line (a crash inside the write)
was never acknowledged and is skipped when reading. Several daemons may append to the
same file: O_APPEND writes of one short line are not interleaved.

A day's period ends when the day (UTC) is over, or at once with `close(now, everything=
True)` (`mxsend tlsrpt send`): `open/<day>` is renamed into `closed/`, and new results
start a fresh `open/<day>`. A batch is removed per domain once its report went to every
`rua` (mailto: queued through the caller's `enqueue`, https: POSTed); a failed POST is
retried at the next pass for up to MAX_RETRY_AGE seconds, then dropped.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from mxsend import https
from mxsend.durable import append_durable, fsync_dir, make_dirs, write_atomic
from mxsend.tlsdns import TlsResolver
from mxsend.tlsrpt import (
    MEDIA_TYPE,
    TXT_PREFIX,
    SessionResult,
    build_report,
    gzip_report,
    mailto_address,
    parse_rua,
    report_message,
)

MAX_RETRY_AGE = 86400.0
POST_TIME_LIMIT = 30.0
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_BATCH = re.compile(r"(\d+)-(\d+)")
_SAFE_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")

# enqueue(sender, recipient, message bytes): queue a message in the spool (the spool's
# writer, tlsrpt_daily.spool_enqueue); must be durable when it returns.
Enqueue = Callable[[str, str, bytes], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Batch:
    """An ended period: its files and its time range."""

    path: Path
    start: datetime
    end: datetime

    def domains(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.jsonl"))


class TlsRptStore:
    """Durable per-domain, per-day session results under `<spool>/tlsrpt/`."""

    def __init__(self, spool: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = spool / "tlsrpt"
        self._clock = clock

    def record(self, result: SessionResult) -> None:
        """Append one session result; on return it is on disk (fsync)."""
        domain = result.policy_domain.lower().rstrip(".")
        if not _SAFE_DOMAIN.fullmatch(domain):
            raise ValueError(f"{domain!r} is not a domain name")
        day = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")
        line = json.dumps(result.to_json(), separators=(",", ":")).encode() + b"\n"
        day_dir = self.root / "open" / day
        if not day_dir.is_dir():
            day_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(day_dir.parent)
        append_durable(day_dir / f"{domain}.jsonl", line)

    def close(self, *, everything: bool = False) -> list[Batch]:
        """End finished days (every open day with `everything`); return all ended batches."""
        now = self._clock()
        today = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        open_root = self.root / "open"
        for day_dir in sorted(open_root.glob("*")) if open_root.is_dir() else []:
            if not _DAY.fullmatch(day_dir.name) or (day_dir.name >= today and not everything):
                continue
            day_start = datetime.strptime(day_dir.name, "%Y-%m-%d").replace(tzinfo=UTC)
            start = max(day_start.timestamp(), self._cut(day_dir.name))
            end = min(now, (day_start + timedelta(days=1)).timestamp())
            target = self.root / "closed" / f"{int(start)}-{int(end)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # two ends within one second: keep both apart
                target = target.with_name(f"{int(start)}-{int(end) + 1}")
            os.rename(day_dir, target)
            fsync_dir(open_root)
            fsync_dir(target.parent)
            if day_dir.name == today:
                make_dirs(self.root / "cut")
                write_atomic(self.root / "cut" / today, f"{int(end)}\n".encode())
        return list(self.batches())

    def _cut(self, day: str) -> float:
        try:
            return float((self.root / "cut" / day).read_text().strip())
        except (OSError, ValueError):
            return 0.0

    def batches(self) -> Iterator[Batch]:
        closed = self.root / "closed"
        for path in sorted(closed.glob("*")) if closed.is_dir() else []:
            match = _BATCH.fullmatch(path.name)
            if match:
                yield Batch(path, datetime.fromtimestamp(int(match.group(1)), UTC),
                            datetime.fromtimestamp(int(match.group(2)), UTC))

    @staticmethod
    def results(batch: Batch, domain: str) -> list[SessionResult]:
        """A domain's results in a batch; a torn or damaged line is skipped."""
        results = []
        try:
            data = (batch.path / f"{domain}.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        for line in data.splitlines():
            try:
                results.append(SessionResult.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
        return results

    @staticmethod
    def sent_to(batch: Batch, domain: str) -> set[str]:
        """The rua this batch's report already went to (a retry skips them)."""
        try:
            return set(json.loads((batch.path / f"{domain}.sent").read_bytes()))
        except (OSError, ValueError, TypeError):
            return set()

    def mark_sent(self, batch: Batch, domain: str, uri: str) -> None:
        uris = sorted(self.sent_to(batch, domain) | {uri})
        write_atomic(batch.path / f"{domain}.sent", json.dumps(uris).encode())

    @staticmethod
    def done(batch: Batch, domain: str) -> None:
        """The domain's report went out: forget its results (and an empty batch)."""
        (batch.path / f"{domain}.sent").unlink(missing_ok=True)
        (batch.path / f"{domain}.jsonl").unlink(missing_ok=True)
        fsync_dir(batch.path)
        if not any(batch.path.iterdir()):
            batch.path.rmdir()
            fsync_dir(batch.path.parent)


async def post_report(
    uri: str, compressed: bytes, resolver: TlsResolver, *, ca_file: Path | None,
    time_limit: float = POST_TIME_LIMIT,
) -> None:
    """POST the gzip'd report to an https: rua (RFC 8460 §5.4); HttpError unless 2xx."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lookups = await resolver.addresses(host)
    addresses = [address for lookup in lookups for address in lookup.texts]
    response = await https.request(
        "POST", host, path, addresses=addresses, context=https.verifying_context(ca_file),
        port=parts.port or 443, body=compressed, max_body=65536, time_limit=time_limit,
        headers=[("Content-Type", MEDIA_TYPE)],
    )
    if not 200 <= response.status < 300:
        raise https.HttpError(f"{host} answered HTTP {response.status}")


@dataclass(frozen=True, slots=True)
class Sent:
    """What happened to one domain's report, for the caller's log."""

    domain: str
    destinations: tuple[str, ...]
    problems: tuple[str, ...] = ()


class TlsRptSender:
    """Builds each ended batch's reports and sends them to the domains' rua."""

    def __init__(
        self, store: TlsRptStore, resolver: TlsResolver, enqueue: Enqueue, *,
        report_from: str, organization: str = "", ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._enqueue = enqueue
        self._from = report_from
        self._submitter = report_from.rpartition("@")[2]
        self._organization = organization or self._submitter
        self._ca_file = ca_file
        self._clock = clock

    async def send(self, *, everything: bool = False) -> list[Sent]:
        """End the due periods (all with `everything`) and report every batch."""
        outcomes = []
        for batch in self._store.close(everything=everything):
            for domain in batch.domains():
                outcomes.append(await self._send_one(batch, domain))
        return outcomes

    async def _send_one(self, batch: Batch, domain: str) -> Sent:
        txt = await self._resolver.txt(TXT_PREFIX + domain)
        rua = parse_rua(txt.texts)
        results = self._store.results(batch, domain)
        if not rua or not results:
            self._store.done(batch, domain)  # the domain asks for no reports
            return Sent(domain, ())
        report = build_report(results, organization=self._organization, contact=self._from,
                              start=batch.start, end=batch.end)
        compressed = gzip_report(report)
        now = datetime.fromtimestamp(self._clock(), UTC)
        problems: list[str] = []
        already = self._store.sent_to(batch, domain)
        for uri in rua:
            if uri in already:
                continue
            if uri.lower().startswith("mailto:"):
                message = report_message(
                    report=report, compressed=compressed, policy_domain=domain,
                    submitter=self._submitter, sender=self._from,
                    recipient=mailto_address(uri), now=now,
                )
                queued = self._enqueue(self._from, mailto_address(uri), message)
                if queued is not None:
                    await queued
            else:
                try:
                    await post_report(uri, compressed, self._resolver, ca_file=self._ca_file)
                except https.HttpError as exc:
                    problems.append(f"{uri}: {exc}")
                    continue
            self._store.mark_sent(batch, domain, uri)
        too_old = self._clock() - batch.end.timestamp() > MAX_RETRY_AGE
        if not problems or too_old:
            self._store.done(batch, domain)
        return Sent(domain, rua, tuple(problems))
