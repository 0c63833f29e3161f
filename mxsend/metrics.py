"""Prometheus metrics (contract §10): a tiny recording API and the /metrics endpoint.

The daemon calls the module's functions (`delivered("sent")`, `bounce("failure")`,
`transaction(0.8)`, ...); they do nothing until metrics are on, so the calls cost one
function call when `[metrics] listen` is "". The counters of logged events (`delivery`,
`bounce`, `script_error`) are fed by `observe_event`, which log.py calls for every
event once metrics are on: each logged event is counted once, whatever `log.level`.

Several daemons (`queue.processes > 1`) are summed with prometheus-client's
multiprocess mode: each process writes its counters into an mmap'ed file of its own in
one directory, and the process that serves /metrics (the supervisor, or the only
daemon) merges them at scrape time. The directory is made by the serving process with
`tempfile.mkdtemp` (so under $TMPDIR: a private /tmp with systemd's PrivateTmp) and
handed to the daemons it starts in $PROMETHEUS_MULTIPROC_DIR. Not inside the spool: the
spool's group commit is a syncfs(2) of its file system, which would write these
constantly dirtied pages back at every round; and a spool shared by several hosts or
containers would mix processes whose pids collide.

The queue gauges describe the spool, not a process: they are computed at scrape time
from its folders by the serving process, with no process label.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mxsend import log
from mxsend.config import Config
from mxsend.config_values import split_host_port

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Known label values: each series exists, at zero, from the start. Anything else is
# counted as "other", so no input can grow the number of series.
STATUSES = ("sent", "deferred", "bounced")
KINDS = ("failure", "delay", "relayed", "success")
FUNCTIONS = ("CheckFile", "ServerDetails", "load")
# The VPOP3 8.8 hooks (contract §9) are counted under their names too, without a zero
# series of their own (a script without them never has an error in them).
_MORE_FUNCTIONS = ("ReturnCodeHandler", "ModifyReturnPath", "GetCheckCache",
                   "GetOverrides", "CheckServer")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
_MORE_TLS_VERSIONS = ("TLSv1", "TLSv1.1")
OTHER = "other"

# Queued to final: from seconds (a fast relay) to queue.max_age (5 days).
DELIVERY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
# One SMTP transaction: MAIL to the reply to the final dot.
TRANSACTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _Null:
    """What the recording functions call while metrics are off."""

    def delivered(self, status: str) -> None: ...
    def bounce(self, kind: str) -> None: ...
    def script_error(self, function: str) -> None: ...
    def tls_session(self, version: str) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def suspended(self, count: int) -> None: ...
    def transaction(self, seconds: float) -> None: ...
    def delivery(self, seconds: float) -> None: ...


class _Labelled:
    """One labelled family's children: the known ones made (at zero) at once, a few
    more allowed by name, anything else counted as "other"."""

    def __init__(self, family: Any, known: tuple[str, ...], more: tuple[str, ...] = ()
                 ) -> None:
        self._family = family
        self._allowed = frozenset((*known, *more))
        self._children = {name: family.labels(name) for name in known}
        self._lock = threading.Lock()

    def inc(self, name: str) -> None:
        child = self._children.get(name)
        if child is None:
            key = name if name in self._allowed else OTHER
            with self._lock:
                child = self._children.get(key) or self._family.labels(key)
                self._children[key] = child
        child.inc()


class _Recorder(_Null):
    """The metric families of one process, written to its multiprocess files."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        # A fresh value class, before any metric exists: prometheus_client chose one at
        # import (maybe before $PROMETHEUS_MULTIPROC_DIR was set), and its open files
        # belong to the directory of that time.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self._deliveries = _Labelled(
            Counter("mxsend_deliveries", "Delivery events by status.", ["status"],
                    registry=None), STATUSES)
        self._bounces = _Labelled(
            Counter("mxsend_bounces", "DSNs queued, by kind.", ["kind"], registry=None),
            KINDS)
        self._errors = _Labelled(
            Counter("mxsend_script_errors", "Script errors by function.", ["function"],
                    registry=None), FUNCTIONS, _MORE_FUNCTIONS)
        self._tls = _Labelled(
            Counter("mxsend_tls_sessions", "TLS sessions established, by protocol version.",
                    ["version"], registry=None), TLS_VERSIONS, _MORE_TLS_VERSIONS)
        self._connections = Gauge("mxsend_connections_open", "Outbound SMTP connections open.",
                                  registry=None, multiprocess_mode="livesum")
        # Suspensions are shared by every daemon of the spool (contract §9), so each
        # knows all of them: the largest count is the spool's, a sum would count twice.
        self._suspended = Gauge("mxsend_suspended_destinations",
                                "Destinations suspended by a reply rule.",
                                registry=None, multiprocess_mode="livemax")
        self._transaction = Histogram("mxsend_transaction_seconds",
                                      "SMTP transactions, MAIL to the final reply.",
                                      buckets=TRANSACTION_BUCKETS, registry=None)
        self._delivery = Histogram("mxsend_delivery_seconds",
                                   "Messages from queued to final (all recipients).",
                                   buckets=DELIVERY_BUCKETS, registry=None)

    def delivered(self, status: str) -> None:
        self._deliveries.inc(status)

    def bounce(self, kind: str) -> None:
        self._bounces.inc(kind)

    def script_error(self, function: str) -> None:
        self._errors.inc(function)

    def tls_session(self, version: str) -> None:
        self._tls.inc(version)

    def connection_opened(self) -> None:
        self._connections.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def suspended(self, count: int) -> None:
        self._suspended.set(count)

    def transaction(self, seconds: float) -> None:
        self._transaction.observe(seconds)

    def delivery(self, seconds: float) -> None:
        self._delivery.observe(seconds)


_sink: _Null = _Null()


def observe_event(name: str, message_id: str | None, fields: Mapping[str, Any]) -> None:
    """log.py's observer: each `delivery`, `bounce` and `script_error` event counted."""
    if name == "delivery":
        _sink.delivered(str(fields.get("status")))
    elif name == "bounce":
        _sink.bounce(str(fields.get("kind")))
    elif name == "script_error":
        _sink.script_error(str(fields.get("function")))


def _record() -> None:
    """Metrics on in this process: a recorder, and the log's events counted."""
    global _sink
    if not isinstance(_sink, _Recorder):
        _sink = _Recorder()
    log.unobserve(observe_event)
    log.observe(observe_event)


def _stop_recording() -> None:
    global _sink
    _sink = _Null()
    log.unobserve(observe_event)


# --- the recording API (the daemon's side) -----------------------------------------------


def delivered(status: str) -> None:
    """One `delivery` event: status sent, deferred or bounced."""
    _sink.delivered(status)


def bounce(kind: str) -> None:
    """One DSN queued: kind failure, delay, relayed or success."""
    _sink.bounce(kind)


def script_error(function: str) -> None:
    """One `script_error` event: function CheckFile, ServerDetails or load."""
    _sink.script_error(function)


def tls_session(version: str) -> None:
    """A STARTTLS handshake that succeeded, with ssl's version ("TLSv1.3")."""
    _sink.tls_session(version)


def connection_opened() -> None:
    """An outbound SMTP connection is open (pair with connection_closed)."""
    _sink.connection_opened()


def connection_closed() -> None:
    _sink.connection_closed()


def suspended(count: int) -> None:
    """How many destinations are suspended now (set, not added)."""
    _sink.suspended(count)


def transaction(seconds: float) -> None:
    """One SMTP transaction's duration, MAIL to the final reply."""
    _sink.transaction(seconds)


def delivery(seconds: float) -> None:
    """A message whose recipients are all final, `seconds` after it was queued."""
    _sink.delivery(seconds)


def join_from_environment(config: Config) -> bool:
    """A daemon started by a serving process records into its directory; True if so."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not config.metrics.listen or not directory or not os.path.isdir(directory):
        return False
    _record()
    return True


# --- the spool's queue gauges --------------------------------------------------------------

_HELD = "hold"  # held messages' state files (queue tools, contract §10), if present


def _names(directory: str) -> Iterator[os.DirEntry[str]]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(directory) as it:
        yield from (e for e in it if not e.name.startswith("."))


def _count(directory: str, *, nested: bool = False) -> int:
    if not nested:
        return sum(1 for _ in _names(directory))
    return sum(_count(e.path) for e in _names(directory) if e.is_dir(follow_symlinks=False))


def queue_counts(root: Path) -> dict[str, int]:
    """Messages by state, from one listing of the spool's folders (docs/spool.md):
    queued = new/ + incoming/*/ + queue/, active = active/*/, held = hold/, bad = bad/
    without the `.reason` files."""
    def path(name: str) -> str:
        return os.path.join(root, name)

    return {
        "queued": _count(path("new")) + _count(path("incoming"), nested=True)
        + _count(path("queue")),
        "active": _count(path("active"), nested=True),
        "held": _count(path(_HELD)),
        "bad": sum(1 for e in _names(path("bad")) if not e.name.endswith(".reason")),
    }


def oldest_age(root: Path, now: float) -> float:
    """Seconds since the oldest message still in the spool was written (msg/ holds
    every accepted message not yet final, new/ what is not yet accepted)."""
    oldest = now
    for folder in ("msg", "new"):
        for entry in _names(os.path.join(root, folder)):
            with contextlib.suppress(FileNotFoundError):
                oldest = min(oldest, entry.stat(follow_symlinks=False).st_mtime)
    return max(0.0, now - oldest)


class _Collector:
    """At scrape time: the merged multiprocess files, then the spool's gauges."""

    def __init__(self, directory: str, spool: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._directory = directory
        self._spool = spool
        self._merged = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        self._forget_dead()
        yield from self._merged.collect()  # type: ignore[no-untyped-call]
        counts = queue_counts(self._spool)
        family = GaugeMetricFamily("mxsend_queue_messages", "Messages in the spool by state.",
                                   labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
        yield GaugeMetricFamily("mxsend_queue_oldest_age_seconds",
                                "Age of the oldest message in the spool.",
                                value=oldest_age(self._spool, time.time()))

    def _forget_dead(self) -> None:
        """A daemon that died leaves its live gauges' files: remove them (its counters
        stay, so sums never go down)."""
        from prometheus_client.multiprocess import mark_process_dead

        for name in os.listdir(self._directory):
            if name.startswith("gauge_live") and name.endswith(".db"):
                pid = name[:-3].rpartition("_")[2]
                if pid.isdigit() and not _alive(int(pid)):
                    mark_process_dead(int(pid), self._directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsServer:
    """The /metrics HTTP endpoint of the serving process."""

    def __init__(self, server: Any, thread: threading.Thread, directory: str) -> None:
        self._server = server
        self._thread = thread
        self.directory = directory

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    async def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        _stop_recording()
        if os.environ.get(MULTIPROC_ENV) == self.directory:
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(self.directory, ignore_errors=True)


def start_metrics_server(config: Config) -> MetricsServer:
    """Serve /metrics on `metrics.listen` and record this process's own metrics; the
    daemons started after this inherit the directory (join_from_environment).
    OSError naming the key if the address cannot be bound."""
    host, port = split_host_port(config.metrics.listen, 0)
    directory = tempfile.mkdtemp(prefix="mxsend-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    _record()  # every family at zero from the start, before any daemon runs
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(_Collector(directory, config.spool.path))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        _stop_recording()
        shutil.rmtree(directory, ignore_errors=True)
        del os.environ[MULTIPROC_ENV]
        raise OSError(exc.errno, f"metrics.listen: cannot listen on {config.metrics.listen}: "
                      f"{exc.strerror}") from None
    return MetricsServer(server, thread, directory)


__all__ = [
    "MetricsServer",
    "bounce",
    "connection_closed",
    "connection_opened",
    "delivered",
    "delivery",
    "join_from_environment",
    "observe_event",
    "script_error",
    "start_metrics_server",
    "suspended",
    "tls_session",
    "transaction",
]
