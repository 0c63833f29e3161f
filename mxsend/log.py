"""Logging: one line per event on stderr, as text (`key=value`) or JSON (contract §6).

The core raises and returns values; only the daemon and the CLI log. Events go through
`event()`, which keeps the contract's names and keys in one place. Secrets never reach
here: callers pass addresses and replies, never keys.

What an event says is also counted: `observe()` registers a function called with every
event's name, id and fields, whatever `log.level` filters (the metrics and the `summary` of
`run --once` count from here, so they cannot drift from the log).

The daemon's lines go through `BufferedWriter`: one write(2) per batch of lines, the
batch ending with the event loop's turn (docs/operations.md, "Logs").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

LOGGER_NAME = "mxsend"
_logger = logging.getLogger(LOGGER_NAME)

# The contract's events and the keys each one carries besides ts/event/id.
EVENTS: Mapping[str, tuple[str, ...]] = {
    "queued": ("sender", "recipients", "size"),
    "skipped": ("reason",),
    "delivery": ("recipient", "status", "relay", "tls", "dsn", "response", "attempt",
                 "command", "dkim", "tls_policy", "delay", "delays", "message_id", "orcpt",
                 "tls_cipher", "verified"),
    "tls_policy_override": ("domain", "server", "policy"),
    "bounce": ("bounce_id", "recipients", "kind"),
    "quarantined": ("reason",),
    "script_error": ("function", "error"),
    "script_log": ("message",),
    "suspended": ("destination", "until", "reply"),   # contract §9, shaper.py
    "cluster": ("state",),                            # contract §9, cluster.py
    # `run --once`, its last line: the run's delivery events by status, skipped messages.
    "summary": ("sent", "deferred", "bounced", "skipped", "seconds"),
    # log.debug_peers: one line per command sent (`>`) or reply read (`<`).
    "transcript": ("relay", "direction", "line"),
}

Observer = Callable[[str, str | None, Mapping[str, Any]], None]
_observers: list[Observer] = []
# "i/n" on every line of a daemon of several (queue.processes > 1), "supervisor" on
# the supervisor's; None for the only daemon (nothing to tell apart).
_process: str | None = None
_buffered = False


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"  # as in the JSON format
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def _stamp(record: logging.LogRecord) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


class TextFormatter(logging.Formatter):
    """`2026-11-26T09:30:00.123Z info delivery id=Q1 recipient=b@x status=sent ...`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        head = f"{_stamp(record)} {record.levelname.lower()}"
        if _process is not None:
            head += f" process={_process}"
        event = getattr(record, "event", None)
        if event:
            parts = [head, event, *(f"{k}={_format_value(v)}" for k, v in fields.items())]
        else:
            parts = [head, record.getMessage()]
        line = " ".join(parts)
        if record.exc_info:
            line += " " + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with at least `ts`, `event` and `id`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc: dict[str, Any] = {
            "ts": _stamp(record),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "id": None,
        }
        if _process is not None:
            doc["process"] = _process
        if getattr(record, "event", None):
            doc.update(fields)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class BufferedWriter(logging.Handler):
    """Formatted lines into a buffer, written to `fd` with one write(2) per batch.

    A batch ends at the end of the event loop's turn that started it (call_soon), at
    MAX_LINES, at flush() (setup_logging again, logging.shutdown at exit) or when no
    event loop runs in the logging thread (then each line is written at once). SIGTERM
    is handled by the daemon's loop, which runs on to its end: nothing is lost. A crash
    (SIGKILL, a fault) loses the lines of the batch under way, at most one turn's worth.
    """

    MAX_LINES = 256
    MAX_WAITS = 5  # seconds without room in a full non-blocking stderr: the batch is dropped

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._lines: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # a flush is scheduled on it

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.MAX_LINES:
            self._write()
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return  # the scheduled flush takes this line too
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()  # no loop in this thread: nothing would flush it
            return
        self._loop = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        self._loop = None
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8", "replace")
        self._lines.clear()
        view = memoryview(data)
        waited = 0
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                # A non-blocking stderr (some runtimes hand one over) that is full: wait
                # for the reader a little, never for ever.
                _, writable, _ = select.select([], [self._fd], [], 1.0)
                if not writable:
                    waited += 1
                    if waited >= self.MAX_WAITS:
                        return
            except OSError:
                return  # stderr closed: logging must never stop the daemon


def setup_logging(fmt: str = "text", level: str = "info", *, buffered: bool | None = None,
                  process: str | None = None) -> None:
    """Send mxsend's records to stderr in the chosen format; safe to call again (SIGHUP).

    `buffered` (the daemon) and `process` stay as set by the first call that gave them.
    """
    global _buffered, _process
    if buffered is not None:
        _buffered = buffered
    if process is not None:
        _process = process
    flush()
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if _buffered:
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            pass  # stderr replaced by an object without a file (a test's capture)
        else:
            sys.stderr.flush()
            handler = BufferedWriter(fd)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False


def flush() -> None:
    """Write out what is buffered (before exit, or before printing to stderr)."""
    for handler in _logger.handlers:
        with contextlib.suppress(OSError, ValueError):  # a stream closed under us
            handler.flush()


def observe(observer: Observer) -> None:
    """Call `observer(name, id, fields)` for every event from now on, whatever the level."""
    _observers.append(observer)


def unobserve(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)


def event(name: str, queue_id: str | None, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log one contract event about message `queue_id` (its `id`); `fields` should be
    the keys EVENTS lists for it."""
    for observer in _observers:
        observer(name, queue_id, fields)
    if not _logger.isEnabledFor(level):
        return
    _logger.log(level, name, extra={"event": name, "fields": {"id": queue_id, **fields}})


def transcript(relay: str, direction: str, line: str) -> None:
    """One line of a debug peer's SMTP transcript (log.debug_peers), at level debug
    whatever `log.level` says: as Postfix's debug_peer_list, naming a peer raises the
    verbosity for that peer only."""
    record = _logger.makeRecord(
        _logger.name, logging.DEBUG, __file__, 0, "transcript", (), None,
        extra={"event": "transcript",
               "fields": {"id": None, "relay": relay, "direction": direction, "line": line}})
    _logger.handle(record)


def get_logger() -> logging.Logger:
    return _logger
