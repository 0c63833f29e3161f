"""The one exception tree of mxsend.

Every error the core raises derives from MxsendError. Delivery errors say whether they
are temporary or permanent (the first digit of the reply, RFC 5321 §4.2.1) and carry the
reply, the phase and the host, so that a log line or a bounce can say exactly what
happened ("RCPT to mx1.example.org said 550 5.1.1 ...").
"""

from __future__ import annotations

from enum import Enum


class MxsendError(Exception):
    """Root of every error mxsend raises on purpose."""


class ConfigError(MxsendError):
    """The configuration is unusable; the message names the dotted key."""


class EnvelopeError(MxsendError):
    """A Batch SMTP file or an address is malformed."""


class SpoolError(MxsendError):
    """The spool could not be read or written."""


class Phase(Enum):
    """Where in an SMTP transaction something happened (RFC 5321 §3)."""

    DNS = "dns"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DATAEND = "dataend"


class DeliveryError(MxsendError):
    """A delivery attempt failed; carries the reply text, enhanced code, phase and host."""

    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        dsn: str | None = None,
        phase: Phase | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.dsn = dsn
        self.phase = phase
        self.host = host


class TemporaryFailure(DeliveryError):
    """Try again later (4xx, a timeout, a lost connection, SERVFAIL)."""

    permanent = False


class DestinationRefused(TemporaryFailure):
    """Not connected: the address is loopback, private or similar and not allowed (§10)."""


class PermanentFailure(DeliveryError):
    """Give up and bounce (5xx, null MX, NXDOMAIN, too big)."""

    permanent = True
