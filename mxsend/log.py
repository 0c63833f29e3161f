"""Logging: one line per event on stderr, as text (`key=value`) or JSON (contract §6).

The core raises and returns values; only the daemon and the CLI log. Events go through
`event()`, which keeps the contract's names and keys in one place. Secrets never reach
here: callers pass addresses and replies, never keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "mxsend"
_logger = logging.getLogger(LOGGER_NAME)

# The contract's events and the keys each one carries besides ts/event/id.
EVENTS: Mapping[str, tuple[str, ...]] = {
    "queued": ("sender", "recipients", "size"),
    "skipped": ("reason",),
    "delivery": ("recipient", "status", "relay", "tls", "dsn", "response", "attempt",
                 "command", "dkim", "tls_policy"),
    "tls_policy_override": ("domain", "server", "policy"),
    "bounce": ("bounce_id", "recipients", "kind"),
    "quarantined": ("reason",),
    "script_error": ("function", "error"),
    "script_log": ("message",),
    "suspended": ("destination", "until", "reply"),   # contract §9, shaper.py
    "cluster": ("state",),                            # contract §9, cluster.py
}


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`2026-11-26T09:30:00.123Z info delivery id=Q1 recipient=b@x status=sent ...`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower()}"
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
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "id": None,
        }
        if getattr(record, "event", None):
            doc.update(fields)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Send mxsend's records to stderr in the chosen format; safe to call again (SIGHUP)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _logger.handlers[:] = [handler]
    _logger.setLevel(level.upper())
    _logger.propagate = False


def event(name: str, message_id: str | None, level: int = logging.INFO, **fields: Any) -> None:
    """Log one contract event; `fields` should be the keys EVENTS lists for it."""
    if not _logger.isEnabledFor(level):
        return
    _logger.log(level, name, extra={"event": name, "fields": {"id": message_id, **fields}})


def get_logger() -> logging.Logger:
    return _logger
