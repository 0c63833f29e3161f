"""`mxsend enqueue`: sendmail-compatible injection into the spool (contract §2).

    mxsend enqueue [-f SENDER] [-N NOTIFY] [-R RET] [-V ENVID] [-t] [-i] [-oi] [--] RCPT...

The message is read from stdin; without -i (or -oi) a line holding a single "." ends it,
as sendmail does. The bytes are kept as given (no unstuffing of "..": sendmail only
does that in SMTP mode); with -t, only the Bcc header lines are removed. The file is
written by the writers' protocol (tmp/, fsync, into new/), so either a complete message
is handed over or nothing is. Exit codes are sendmail's, from sysexits.h.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import re
import socket
import sys
from dataclasses import dataclass
from email.utils import getaddresses
from typing import BinaryIO

from mxsend.config import Config
from mxsend.envelope import (
    MAX_ENVID,
    NOTIFY_KEYWORDS,
    NOTIFY_NEVER,
    Envelope,
    Message,
    Recipient,
    validate_mailbox,
    xtext_encode,
)
from mxsend.errors import EnvelopeError, SpoolError
from mxsend.spool import Spool

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75

_RECIPIENT_HEADERS = frozenset({b"to", b"cc", b"bcc"})
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class EnqueueError(Exception):
    """A refusal with its sysexits code and one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Options:
    """The command line after validation."""

    sender: str  # bare; "" is the null sender
    recipients: tuple[str, ...]
    notify: tuple[str, ...] | None
    ret: str | None
    envid: str | None
    from_headers: bool
    ignore_dots: bool


# --- pure decisions ---------------------------------------------------------------------


def bare_address(text: str) -> str:
    """`<a@b>` or `a@b` (or `Name <a@b>` as sendmail takes it) -> `a@b`."""
    text = text.strip()
    if "<" in text and text.endswith(">"):
        text = text[text.rindex("<") + 1 : -1]
    return text.strip()


def check_address(address: str, what: str) -> str:
    try:
        return validate_mailbox(address, utf8=not address.isascii())
    except EnvelopeError as exc:
        raise EnqueueError(EX_DATAERR, f"invalid {what} address {address!r}: {exc}") from None


def parse_notify(value: str) -> tuple[str, ...]:
    """sendmail -N: `never` or a comma list of success, failure, delay (RFC 3461 §4.1)."""
    words = tuple(w.strip().upper() for w in value.split(","))
    if words == (NOTIFY_NEVER,):
        return words
    if not words or not set(words) <= NOTIFY_KEYWORDS or len(set(words)) != len(words):
        raise EnqueueError(
            EX_USAGE, f"-N: expected never or a list of success,failure,delay, got {value!r}"
        )
    return words


def parse_ret(value: str) -> str:
    ret = value.strip().upper()
    if ret not in ("FULL", "HDRS"):
        raise EnqueueError(EX_USAGE, f"-R: expected full or hdrs, got {value!r}")
    return ret


def parse_envid(value: str) -> str:
    """sendmail -V takes the envelope id as text; the spool holds it as xtext (RFC 3461 §4.4)."""
    if not value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise EnqueueError(EX_USAGE, "-V: the envelope id must be printable ASCII")
    encoded = xtext_encode(value)
    if len(encoded) > MAX_ENVID:
        raise EnqueueError(EX_USAGE, f"-V: the envelope id is longer than {MAX_ENVID}")
    return encoded


def default_sender(user: str, fqdn: str) -> str:
    return f"{user}@{fqdn}"


def options_from_args(args: argparse.Namespace, sender_default: str) -> Options:
    """Validate the command line; EnqueueError with EX_USAGE or EX_DATAERR."""
    # -oi arrives as -o with the value "i"; other -oX options of sendmail are ignored.
    ignore_dots = bool(args.ignore_dots) or "i" in args.sendmail_options
    notify = parse_notify(args.notify) if args.notify is not None else None
    ret = parse_ret(args.ret) if args.ret is not None else None
    envid = parse_envid(args.envid) if args.envid is not None else None
    if args.sender is None:
        sender = check_address(sender_default, "sender")
    else:
        sender = bare_address(args.sender)
        if sender:
            sender = check_address(sender, "sender")
    recipients: list[str] = []
    for text in args.recipients:
        # sendmail accepts "a@b, c@d" as one argument.
        for part in (p for p in text.split(",") if p.strip()):
            recipients.append(check_address(bare_address(part), "recipient"))
    return Options(
        sender=sender,
        recipients=tuple(recipients),
        notify=notify,
        ret=ret,
        envid=envid,
        from_headers=bool(args.from_headers),
        ignore_dots=ignore_dots,
    )


def read_input(stream: BinaryIO, *, ignore_dots: bool, limit: int) -> bytes:
    """The message from stdin: up to EOF, or without -i up to a line holding one '.'."""
    chunks: list[bytes] = []
    size = 0
    while True:
        line = stream.readline(limit + 2)
        if not line:
            break
        if not ignore_dots and line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > limit:
            raise EnqueueError(EX_DATAERR, "message larger than spool.max_message_size")
        chunks.append(line)
    return b"".join(chunks)


def _header_fields(data: bytes) -> tuple[list[list[bytes]], bytes]:
    """The header as fields (each a list of its physical lines, ends kept) and the rest."""
    fields: list[list[bytes]] = []
    lines = data.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return fields, b"".join(lines[index:])
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)  # folded continuation (RFC 5322 §2.2.3)
        elif _FIELD_NAME.match(line):
            fields.append([line])
        else:
            # Not a header line: the header has ended without a blank line.
            return fields, b"".join(lines[index:])
    return fields, b""


def recipients_from_headers(data: bytes) -> tuple[tuple[str, ...], bytes]:
    """-t: the addresses in To, Cc and Bcc, and the data with the Bcc fields removed.

    Every other header line stays byte for byte as it was.
    """
    fields, rest = _header_fields(data)
    found: list[str] = []
    kept: list[bytes] = []
    for field in fields:
        match = _FIELD_NAME.match(field[0])
        name = match.group(1).lower() if match else b""
        if name in _RECIPIENT_HEADERS:
            value = b"".join(field)[match.end() if match else 0 :]
            text = value.decode("utf-8", errors="replace").replace("\r", "").replace("\n", "")
            found += [addr for _, addr in getaddresses([text]) if addr]
        if name != b"bcc":
            kept.extend(field)
    return tuple(found), b"".join(kept) + rest


def build_message(options: Options, data: bytes) -> Message:
    """The Message to queue; EnqueueError(EX_DATAERR) when it cannot be one."""
    if not data.strip():
        raise EnqueueError(EX_DATAERR, "empty message")
    recipients = list(options.recipients)
    if options.from_headers:
        from_headers, data = recipients_from_headers(data)
        recipients += [check_address(bare_address(a), "recipient") for a in from_headers]
    recipients = list(dict.fromkeys(recipients))  # once each, first occurrence's order
    if not recipients:
        raise EnqueueError(EX_DATAERR, "no recipients")
    utf8 = not options.sender.isascii() or not all(r.isascii() for r in recipients)
    eight_bit = any(byte > 127 for byte in data)
    envelope = Envelope(
        sender=options.sender,
        recipients=tuple(Recipient(r, notify=options.notify) for r in recipients),
        ret=options.ret,
        envid=options.envid,
        # RFC 6152: declare 8-bit content so a server is not surprised by it.
        body="8BITMIME" if eight_bit else None,
        smtputf8=utf8,
    )
    return Message(envelope=envelope, data=data)


def exit_code_for(error: SpoolError) -> int:
    """sendmail's codes for spool trouble: cannot create, try later, or I/O error."""
    cause = error.__cause__
    number = cause.errno if isinstance(cause, OSError) else None
    if number in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR):
        return EX_TEMPFAIL
    if number in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR):
        return EX_CANTCREAT
    return EX_IOERR


# --- the command ------------------------------------------------------------------------


def enqueue(args: argparse.Namespace, config: Config, stdin: BinaryIO) -> str:
    """Validate, read, and hand the message to the spool; return its queue id."""
    try:
        fallback = default_sender(getpass.getuser(), socket.getfqdn())
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        fallback = default_sender("mxsend", socket.getfqdn())
    options = options_from_args(args, fallback)
    data = read_input(stdin, ignore_dots=options.ignore_dots,
                      limit=config.spool.max_message_size)
    message = build_message(options, data)
    spool = Spool(config.spool.path, max_message_size=config.spool.max_message_size)
    for directory in ("tmp", "new"):
        try:
            (config.spool.path / directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnqueueError(
                exit_code_for(_wrap(exc)), f"cannot create {config.spool.path / directory}: "
                f"{exc.strerror}"
            ) from None
    try:
        return spool.enqueue(message)
    except SpoolError as exc:
        raise EnqueueError(exit_code_for(exc), str(exc)) from None


def _wrap(exc: OSError) -> SpoolError:
    error = SpoolError(str(exc))
    error.__cause__ = exc
    return error


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        enqueue(args, config, sys.stdin.buffer)
    except EnqueueError as exc:
        print(f"mxsend enqueue: {exc}", file=sys.stderr)
        return exc.code
    return EX_OK

