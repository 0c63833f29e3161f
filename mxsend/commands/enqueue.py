"""`mxsend enqueue`: sendmail-compatible injection into the spool (contract §2, §10).

    mxsend enqueue [-f|-r SENDER] [-N NOTIFY] [-R RET] [-V ENVID] [-B TYPE] [-t] [-i]
                   [-oi] [-oeX] [-odX] [-eX] [-bm] [-F NAME] [-v] [-U] [--require-tls]
                   [--] RCPT...

The same under the name `sendmail` (a symlink to the mxsend script; cli.py). Flags of
sendmail that mean nothing here (-F, -v, -U, -e/-oe error modes, -od delivery modes,
other -oX options) are accepted and ignored, as Postfix's sendmail does.

The message is read from stdin; without -i (or -oi) a line holding a single "." ends it,
as sendmail does. The bytes are kept as given (no unstuffing of "..": sendmail only
does that in SMTP mode); with -t, only the Bcc header lines are removed. The file is
written by the writers' protocol (tmp/, fsync, into new/), so either a complete message
is handed over or nothing is. Exit codes are sendmail's, from sysexits.h.

This module is on the path of every cron job and web request that sends mail, so it
imports only what it needs (config, envelope): not the spool's daemon side, nor the
daemon's stack (tests/test_enqueue.py checks). It writes the file itself, by the same
writers' protocol any outside writer follows (contract §1).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mxsend.addresses import validate_mailbox, xtext_encode
from mxsend.config import Config
from mxsend.envelope import (
    MAX_ENVID,
    NOTIFY_KEYWORDS,
    NOTIFY_NEVER,
    Envelope,
    Message,
    Recipient,
    serialise_bsmtp,
)
from mxsend.errors import EnvelopeError
from mxsend.hostname import helo_name

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75

# Contract §10, Files: the spool's folders 0750, its files 0640, shared with the
# daemon through the group. A writer of another user than new/'s owner (the daemon)
# writes 0660: with Linux's fs.protected_hardlinks the daemon may link a file of another
# user into its queue only if it may read and write it (the spool's rule too).
DIR_MODE = 0o750
FILE_MODE = 0o640
OTHER_WRITER_FILE_MODE = 0o660
# sendmail -oX and -eX options that mean nothing here: error reporting (-oeX, -eX) and
# delivery mode (-odX). Other -oX options are ignored too, as Postfix's sendmail does.
_ERROR_MODES = frozenset("emnpqw")
_BODY_TYPES = ("7BIT", "8BITMIME")

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
    body_type: str | None = None  # -B: 7BIT or 8BITMIME
    require_tls: bool = False  # --require-tls: the REQUIRETLS MAIL parameter (RFC 8689)


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


def default_sender(user: str, domain: str) -> str:
    """Contract §10: `<login>@<smtp.helo_name>`, the FQDN when helo_name is empty."""
    return f"{user}@{domain}"


def login_name() -> str:
    """The caller's login, from the real uid as sendmail does (not $USER, which anyone sets)."""
    import pwd  # here: only the default sender needs it

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no passwd entry: a container running an arbitrary uid
        return os.environ.get("LOGNAME") or os.environ.get("USER") or f"uid{os.getuid()}"


def parse_body_type(value: str) -> str:
    """sendmail -B: the body's type, 7BIT or 8BITMIME (RFC 6152)."""
    body = value.strip().upper()
    if body not in _BODY_TYPES:
        raise EnqueueError(EX_USAGE, f"-B: expected 7BIT or 8BITMIME, got {value!r}")
    return body


def check_ignored_flags(args: argparse.Namespace) -> None:
    """The sendmail flags accepted only to be ignored must still be ones sendmail has."""
    if args.mode is not None and args.mode != "m":
        raise EnqueueError(EX_USAGE, f"-b{args.mode}: not supported; mxsend enqueue only "
                           "queues mail (-bm)")
    if args.error_mode is not None and args.error_mode not in _ERROR_MODES:
        raise EnqueueError(EX_USAGE, f"-e{args.error_mode}: unknown error mode")


def qualify(address: str, domain: Callable[[], str]) -> str:
    """`root` -> `root@<local domain>`, as sendmail and Postfix (myorigin) qualify a bare
    login: cron mails `root` or `$MAILTO`, which is often a login name."""
    return f"{address}@{domain()}" if address and "@" not in address else address


def options_from_args(args: argparse.Namespace, login: Callable[[], str],
                      domain: Callable[[], str]) -> Options:
    """Validate the command line; EnqueueError with EX_USAGE or EX_DATAERR.

    `login` and `domain` are asked only when needed: the FQDN may cost a DNS lookup.
    """
    check_ignored_flags(args)
    # -oi arrives as -o with the value "i"; other -oX options of sendmail are ignored.
    ignore_dots = bool(args.ignore_dots) or "i" in args.sendmail_options
    body_type = parse_body_type(args.body_type) if args.body_type is not None else None
    notify = parse_notify(args.notify) if args.notify is not None else None
    ret = parse_ret(args.ret) if args.ret is not None else None
    envid = parse_envid(args.envid) if args.envid is not None else None
    if args.sender is None:
        sender = check_address(default_sender(login(), domain()), "sender")
    else:
        sender = bare_address(args.sender)
        if sender:
            sender = check_address(qualify(sender, domain), "sender")
    recipients: list[str] = []
    for text in args.recipients:
        # sendmail accepts "a@b, c@d" as one argument.
        for part in (p for p in text.split(",") if p.strip()):
            recipients.append(check_address(qualify(bare_address(part), domain), "recipient"))
    return Options(
        sender=sender,
        recipients=tuple(recipients),
        notify=notify,
        ret=ret,
        envid=envid,
        from_headers=bool(args.from_headers),
        ignore_dots=ignore_dots,
        body_type=body_type,
        require_tls=bool(args.require_tls),
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
    from email.utils import getaddresses  # here: only -t needs it, and it costs ~4 ms

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


def build_message(options: Options, data: bytes, domain: Callable[[], str]) -> Message:
    """The Message to queue; EnqueueError(EX_DATAERR) when it cannot be one."""
    if not data.strip():
        raise EnqueueError(EX_DATAERR, "empty message")
    recipients = list(options.recipients)
    if options.from_headers:
        from_headers, data = recipients_from_headers(data)
        recipients += [check_address(qualify(bare_address(a), domain), "recipient")
                       for a in from_headers]
    recipients = list(dict.fromkeys(recipients))  # once each, first occurrence's order
    if not recipients:
        raise EnqueueError(EX_DATAERR, "no recipients")
    utf8 = not options.sender.isascii() or not all(r.isascii() for r in recipients)
    # -B8BITMIME declares it (cron does); 8-bit bytes need it whatever -B said.
    eight_bit = options.body_type == "8BITMIME" or not data.isascii()
    envelope = Envelope(
        sender=options.sender,
        recipients=tuple(Recipient(r, notify=options.notify) for r in recipients),
        ret=options.ret,
        envid=options.envid,
        # RFC 6152: declare 8-bit content so a server is not surprised by it.
        body="8BITMIME" if eight_bit else None,
        smtputf8=utf8,
        requiretls=options.require_tls,
    )
    return Message(envelope=envelope, data=data)


def exit_code_for(error: OSError) -> int:
    """sendmail's codes for spool trouble: cannot create, try later, or I/O error."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR):
        return EX_TEMPFAIL
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                       errno.EEXIST, errno.EISDIR):
        return EX_CANTCREAT
    return EX_IOERR


# Crockford's base32 (no I, L, O, U), sortable in ASCII order: the spool's queue ids.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id(now: float, token: bytes) -> str:
    """As spool.new_queue_id: 11 characters of microseconds since the epoch, then 10
    random ones, so ids from enqueue and the daemon sort together by time."""
    micros = int(now * 1_000_000)
    stamp = "".join(_ALPHABET[(micros >> (5 * i)) & 31] for i in range(10, -1, -1))
    rand = int.from_bytes(token, "big")
    return stamp + "".join(_ALPHABET[(rand >> (5 * i)) & 31] for i in range(9, -1, -1))


# --- the writers' protocol (contract §1) --------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_file_mode(new_owner: int, euid: int) -> int:
    """0640 when we are the user who owns new/ (the daemon's), else 0660."""
    return FILE_MODE if new_owner == euid else OTHER_WRITER_FILE_MODE


def _write_new(path: Path, raw: bytes, mode: int) -> None:
    """Create `path` (never an existing file), write all of `raw`, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the caller's umask (cron's, PHP's)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def hand_over(root: Path, raw: bytes) -> str:
    """tmp/ -> write, fsync -> link into new/ -> fsync new/; return the queue id.

    From the fsync of new/ on, the message is the daemon's and survives a crash. A link,
    not a rename, so that a file another writer handed over is never replaced.
    """
    tmp, new = root / "tmp", root / "new"
    for directory in (root, tmp, new):
        # Normally the daemon made them, and what exists is left as the daemon set it.
        if not directory.is_dir():
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(directory, DIR_MODE)  # not less, whatever the umask
    mode = writer_file_mode(new.stat().st_uid, os.geteuid())
    for _ in range(8):
        queue_id = new_queue_id(time.time(), os.urandom(7))
        temp = tmp / f"{queue_id}.{os.getpid()}"
        try:
            _write_new(temp, raw, mode)
            os.link(temp, new / queue_id, follow_symlinks=False)
        except FileExistsError:
            continue  # an id taken in the same microsecond: draw another
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        _fsync_dir(new)
        return queue_id
    raise OSError(errno.EEXIST, "could not find a free queue id")


# --- the command ------------------------------------------------------------------------


def enqueue(args: argparse.Namespace, config: Config, stdin: BinaryIO) -> str:
    """Validate, read, and hand the message to the spool; return its queue id."""

    @functools.cache
    def domain() -> str:
        return helo_name(config.smtp.helo_name)

    options = options_from_args(args, login_name, domain)
    data = read_input(stdin, ignore_dots=options.ignore_dots,
                      limit=config.spool.max_message_size)
    message = build_message(options, data, domain)
    root = config.spool.path
    try:
        return hand_over(root, serialise_bsmtp(message))
    except OSError as exc:
        raise EnqueueError(exit_code_for(exc),
                           f"cannot write to {root}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        enqueue(args, config, sys.stdin.buffer)
    except EnqueueError as exc:
        print(f"mxsend enqueue: {exc}", file=sys.stderr)
        return exc.code
    return EX_OK
