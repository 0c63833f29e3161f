"""Batch SMTP (RFC 2442) spool files, one transaction each: parse and serialise. Pure.

A spool file is the SMTP dialogue a client would have sent::

    MAIL FROM:<alice@example.com> RET=HDRS ENVID=QQ314159
    RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org
    DATA
    ...dot-stuffed message...
    .

Line ends may be CRLF or LF, mixed. The message bytes after DATA are kept unchanged
apart from line ends (normalised to CRLF) and dot-stuffing (removed), so a DKIM signature
survives. The address grammar (paths, mailboxes, xtext) is addresses.py's. Anything
unexpected raises EnvelopeError with a one-line reason, which the
spool writes next to the quarantined file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mxsend.addresses import CONTROL, parse_path, xtext_decode, xtext_encode
from mxsend.errors import EnvelopeError

# RFC 3461 §4.4: ENVID is at most 100 characters; §4.2 ORCPT at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500
# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets; parameters stretch it
# (§4.5.3.1.4 allows extensions to), so allow generously but not without bound.
MAX_COMMAND_LINE = 2048

NOTIFY_NEVER = "NEVER"
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_COMMAND = re.compile(rb"^(MAIL\s+FROM|RCPT\s+TO)\s*:\s*(.*)$", re.IGNORECASE | re.DOTALL)
_LINE_END = re.compile(rb"\r?\n")
# An LF not after a CR. Written with the LF first, so that the regex engine jumps from
# LF to LF instead of trying the lookbehind at every byte (`(?<!\r)\n` is 15x slower).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")

# `MAIL FROM:<path> K=V ...` exactly as serialise_bsmtp writes it (upper-case verb, one
# space before each parameter, printable ASCII): group 1 the verb, 2 the path (no quote,
# no `>` inside), 3 the parameters with their leading spaces.
_PLAIN_COMMAND = re.compile(
    rb"(MAIL) FROM:(<[\x21\x23-\x3d\x3f-\x7e]*>)"
    rb"((?: [A-Za-z0-9][A-Za-z0-9\-]*(?:=[\x21-\x7e]+)?)*)"
    rb"|(RCPT) TO:(<[\x21\x23-\x3d\x3f-\x7e]*>)"
    rb"((?: [A-Za-z0-9][A-Za-z0-9\-]*(?:=[\x21-\x7e]+)?)*)"
)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One RCPT with its DSN parameters (RFC 3461 §4.1, §4.2)."""

    address: str
    notify: tuple[str, ...] | None = None  # None: not given; ("NEVER",) or a subset
    orcpt: str | None = None  # "addr-type;xtext" exactly as given

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The MAIL FROM of a spool file and its recipients."""

    sender: str  # bare address; "" is the null sender
    recipients: tuple[Recipient, ...]
    ret: str | None = None  # "FULL" or "HDRS" (RFC 3461 §4.3)
    envid: str | None = None  # xtext as given (RFC 3461 §4.4)
    auth: str | None = None  # bare address, "" for AUTH=<> (RFC 4954 §5)
    body: str | None = None  # "7BIT" or "8BITMIME" (RFC 6152)
    smtputf8: bool = False  # RFC 6531
    size: int | None = None  # advisory (RFC 1870)
    requiretls: bool = False  # RFC 8689 §4: TLS required on every hop


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed spool file: the envelope and the message bytes as they will be sent.

    `data` has CRLF line ends, is not dot-stuffed and ends with CRLF (or is empty).
    """

    envelope: Envelope
    data: bytes


def domain_of(address: str) -> str:
    """The domain of a bare address, lower-cased; address literals keep their brackets."""
    return address.rpartition("@")[2].lower()


# --- command lines --------------------------------------------------------------------


def _split_command(line: bytes, lineno: int) -> tuple[str, str, list[tuple[str, str | None]]]:
    """`MAIL FROM:<a@b> K=V K2` -> ("MAIL", "<a@b>", [("K", "V"), ("K2", None)])."""
    if len(line) > MAX_COMMAND_LINE:
        raise EnvelopeError(f"line {lineno}: command line longer than {MAX_COMMAND_LINE} octets")
    plain = _PLAIN_COMMAND.fullmatch(line)
    if plain is None:
        return _split_command_exactly(line, lineno)
    # Printable ASCII, so decoding cannot fail, and nothing to strip or to reject.
    verb, path, param_text = plain.group(1, 2, 3) if plain.group(1) else plain.group(4, 5, 6)
    params: list[tuple[str, str | None]] = []
    for word in param_text.decode("ascii").split(" ")[1:]:
        keyword, eq, value = word.partition("=")
        params.append((keyword.upper(), value if eq else None))
    return verb.decode("ascii"), path.decode("ascii"), params


def _split_command_exactly(line: bytes, lineno: int
                           ) -> tuple[str, str, list[tuple[str, str | None]]]:
    """_split_command for any line: every rule checked on its own."""
    match = _COMMAND.match(line)
    if not match:
        raise EnvelopeError(f"line {lineno}: expected MAIL FROM or RCPT TO")
    verb = match.group(1)[:4].upper().decode()
    try:
        rest = match.group(2).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise EnvelopeError(f"line {lineno}: command is not valid UTF-8") from None
    if CONTROL.search(rest):
        raise EnvelopeError(f"line {lineno}: control character in command")
    if not rest.startswith("<"):
        raise EnvelopeError(f"line {lineno}: address not in angle brackets")
    end = _path_end(rest)
    if end < 0:
        raise EnvelopeError(f"line {lineno}: unterminated address")
    path, param_text = rest[: end + 1], rest[end + 1 :]
    if param_text and not param_text[0].isspace():
        raise EnvelopeError(f"line {lineno}: no space between address and parameters")
    params: list[tuple[str, str | None]] = []
    for word in param_text.split():
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not value):
            raise EnvelopeError(f"line {lineno}: bad parameter {word!r}")
        params.append((keyword.upper(), value if eq else None))
    return verb, path, params


def _path_end(text: str) -> int:
    """Index of the `>` closing the path, skipping quoted local parts."""
    if '"' not in text:
        return text.find(">")  # nothing quoted: the first `>` closes it
    return _path_end_scanning(text)


def _path_end_scanning(text: str) -> int:
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _unique(params: list[tuple[str, str | None]], lineno: int) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    for keyword, value in params:
        if keyword in result:
            raise EnvelopeError(f"line {lineno}: parameter {keyword} given twice")
        result[keyword] = value
    return result


def _need_value(keyword: str, value: str | None, lineno: int) -> str:
    if value is None:
        raise EnvelopeError(f"line {lineno}: {keyword} needs a value")
    return value


def _mail_params(params: dict[str, str | None], lineno: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for keyword, value in params.items():
        if keyword == "RET":
            ret = _need_value(keyword, value, lineno).upper()
            if ret not in ("FULL", "HDRS"):
                raise EnvelopeError(f"line {lineno}: RET must be FULL or HDRS")
            out["ret"] = ret
        elif keyword == "ENVID":
            envid = _need_value(keyword, value, lineno)
            xtext_decode(envid)
            if len(envid) > MAX_ENVID:
                raise EnvelopeError(f"line {lineno}: ENVID longer than {MAX_ENVID}")
            out["envid"] = envid
        elif keyword == "AUTH":
            auth = xtext_decode(_need_value(keyword, value, lineno))
            out["auth"] = parse_path(auth, allow_null=True, utf8=True)
        elif keyword == "BODY":
            body = _need_value(keyword, value, lineno).upper()
            if body not in ("7BIT", "8BITMIME"):
                raise EnvelopeError(f"line {lineno}: BODY must be 7BIT or 8BITMIME")
            out["body"] = body
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise EnvelopeError(f"line {lineno}: SMTPUTF8 takes no value")
            out["smtputf8"] = True
        elif keyword == "REQUIRETLS":
            if value is not None:
                raise EnvelopeError(f"line {lineno}: REQUIRETLS takes no value")
            out["requiretls"] = True
        elif keyword == "SIZE":
            size = _need_value(keyword, value, lineno)
            # isascii: str.isdigit() also takes "²" and "٣", which int() refuses or reads.
            if not (size.isascii() and size.isdigit()) or len(size) > 20:
                raise EnvelopeError(f"line {lineno}: SIZE must be a number")
            out["size"] = int(size)
        else:
            raise EnvelopeError(f"line {lineno}: unknown MAIL parameter {keyword}")
    return out


def _rcpt(path: str, params: dict[str, str | None], lineno: int, utf8: bool) -> Recipient:
    address = parse_path(path, allow_null=False, utf8=utf8)
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for keyword, value in params.items():
        if keyword == "NOTIFY":
            words = tuple(w.upper() for w in _need_value(keyword, value, lineno).split(","))
            valid = words == (NOTIFY_NEVER,) or (
                set(words) <= NOTIFY_KEYWORDS and len(set(words)) == len(words)
            )
            if not valid:
                raise EnvelopeError(
                    f"line {lineno}: NOTIFY must be NEVER or a list of SUCCESS,FAILURE,DELAY"
                )
            notify = words
        elif keyword == "ORCPT":
            orcpt = _need_value(keyword, value, lineno)
            addr_type, semi, xtext = orcpt.partition(";")
            if not semi or not _KEYWORD.match(addr_type) or len(orcpt) > MAX_ORCPT:
                raise EnvelopeError(f"line {lineno}: ORCPT must be addr-type;xtext")
            xtext_decode(xtext)
        else:
            raise EnvelopeError(f"line {lineno}: unknown RCPT parameter {keyword}")
    return Recipient(address=address, notify=notify, orcpt=orcpt)


# --- single SMTP commands (the listener's) ---------------------------------------------


def parse_mail_command(line: bytes) -> tuple[str, dict[str, object]]:
    """`MAIL FROM:<a@b> K=V` as a client sends it -> (bare sender, parameters by the
    spool file's rules: keys ret, envid, auth, body, smtputf8, size, requiretls)."""
    verb, path, params = _split_command(line, 1)
    if verb != "MAIL":
        raise EnvelopeError("expected MAIL FROM")
    mail = _mail_params(_unique(params, 1), 1)
    return parse_path(path, allow_null=True, utf8=bool(mail.get("smtputf8"))), mail


def parse_rcpt_command(line: bytes, *, utf8: bool) -> Recipient:
    """`RCPT TO:<a@b> NOTIFY=.. ORCPT=..` as a client sends it -> Recipient."""
    verb, path, params = _split_command(line, 1)
    if verb != "RCPT":
        raise EnvelopeError("expected RCPT TO")
    return _rcpt(path, _unique(params, 1), 1, utf8)


def envelope_of(sender: str, mail: dict[str, object],
                recipients: tuple[Recipient, ...]) -> Envelope:
    """The Envelope of a sender, parse_mail_command's parameters and recipients."""
    return Envelope(
        sender=sender, recipients=recipients, ret=_opt_str(mail.get("ret")),
        envid=_opt_str(mail.get("envid")), auth=_opt_str(mail.get("auth")),
        body=_opt_str(mail.get("body")), smtputf8=bool(mail.get("smtputf8")),
        size=_opt_int(mail.get("size")), requiretls=bool(mail.get("requiretls")),
    )


# --- whole files ----------------------------------------------------------------------


def _next_line(raw: bytes, start: int) -> tuple[bytes, int]:
    """The line starting at `start` without its end, and where the next one starts."""
    end = raw.find(b"\n", start)
    if end < 0:
        return raw[start:], len(raw)
    line = raw[start:end]
    return (line[:-1] if line.endswith(b"\r") else line), end + 1


def _find_terminator(raw: bytes, start: int) -> tuple[int, int, bool]:
    """(end of the message data, position after the `.` line, whether a line of the data
    after its first starts with a dot); (-1, -1, True) if there is no `.` line.

    The `.` line must end with a line end (contract §1): a file that stops right after
    a `.` may have been cut after a dot-stuffed line ("..x" cut to "."), so it is
    incomplete, not finished. A writer following the tmp/new protocol always ends it.
    """
    if raw.startswith(b".\n", start) or raw.startswith(b".\r\n", start):
        return start, raw.find(b"\n", start) + 1, False
    position = start
    while True:
        found = raw.find(b"\n.", position)
        if found < 0:
            return -1, -1, True
        after = found + 2
        # Every "\n." before `found` was skipped, so there was one iff we moved on.
        if raw.startswith(b"\n", after):
            return found + 1, after + 1, position != start
        if raw.startswith(b"\r\n", after):
            return found + 1, after + 2, position != start
        position = after


def parse_bsmtp(raw: bytes) -> Message:
    """Parse one Batch SMTP transaction; raise EnvelopeError with a one-line reason."""
    if not raw or raw.isspace():  # as `not raw.strip()`, without copying the file
        raise EnvelopeError("empty file")
    position = 0
    lineno = 0
    sender: str | None = None
    mail: dict[str, object] = {}
    recipients: list[Recipient] = []
    while True:
        if position >= len(raw):
            raise EnvelopeError("no DATA command")
        line, position = _next_line(raw, position)
        lineno += 1
        word = line.strip().upper()
        if not word:
            continue
        if word == b"DATA":
            break
        if _is_greeting(word) and sender is None and not recipients:
            continue
        verb, path, param_list = _split_command(line, lineno)
        params = _unique(param_list, lineno)
        if verb == "MAIL":
            if sender is not None:
                raise EnvelopeError(f"line {lineno}: a second MAIL command")
            mail = _mail_params(params, lineno)
            sender = parse_path(path, allow_null=True, utf8=bool(mail.get("smtputf8")))
        else:
            if sender is None:
                raise EnvelopeError(f"line {lineno}: RCPT before MAIL")
            recipients.append(_rcpt(path, params, lineno, bool(mail.get("smtputf8"))))
    if sender is None:
        raise EnvelopeError("no MAIL command")
    if not recipients:
        raise EnvelopeError("no RCPT command")
    data_end, after, stuffed = _find_terminator(raw, position)
    if data_end < 0:
        raise EnvelopeError(
            "message does not end with a line holding a single '.' and a line end")
    trailer = raw[after:].strip().upper()
    if trailer not in (b"", b"QUIT"):
        raise EnvelopeError("unexpected text after the final '.'")
    data = _unstuff(raw[position:data_end], stuffed)
    envelope = Envelope(
        sender=sender,
        recipients=tuple(recipients),
        ret=_opt_str(mail.get("ret")),
        envid=_opt_str(mail.get("envid")),
        auth=_opt_str(mail.get("auth")),
        body=_opt_str(mail.get("body")),
        smtputf8=bool(mail.get("smtputf8")),
        size=_opt_int(mail.get("size")),
        requiretls=bool(mail.get("requiretls")),
    )
    return Message(envelope=envelope, data=data)


def _is_greeting(word: bytes) -> bool:
    """An optional leading HELO/EHLO line (contract §1) is ignored."""
    return word.startswith((b"HELO ", b"EHLO ")) or word in (b"HELO", b"EHLO")


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def unstuff(block: bytes) -> bytes:
    """Dot-stuffed lines with any line ends -> message bytes with CRLF (RFC 5321 §4.5.2)."""
    return _unstuff(block, stuffed=True)


def _unstuff(block: bytes, stuffed: bool) -> bytes:
    """unstuff(); `stuffed` False promises that no LF in `block` is followed by a dot
    (parse_bsmtp knows from its search for the `.` line), which saves a pass."""
    if not block:
        return b""
    # C-speed scans pick the cheap case: all LF (a plain replace), all CRLF (nothing to
    # do); only a real mix needs the substitution.
    if b"\r" not in block:
        data = block.replace(b"\n", b"\r\n")
    elif _BARE_LF.search(block):
        data = _BARE_LF.sub(b"\r\n", block)
    else:
        data = block
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    # A dot at the start of any line (after any LF) is removed: bytes.replace does in
    # one pass what a MULTILINE `^\.` substitution does, several times faster. Line
    # ends above only turn LF into CRLF and add one at the end: no new "\n." appears.
    unstuffed = data.replace(b"\n.", b"\n") if stuffed else data
    return unstuffed[1:] if unstuffed.startswith(b".") else unstuffed


def dot_stuff(data: bytes) -> bytes:
    """Message bytes (CRLF) -> transparent DATA block (RFC 5321 §4.5.2), without the `.`.

    Every line that starts with a dot gets another, after a bare LF as well as after
    CRLF: a receiver that takes a bare LF for a line end must not find an early
    end-of-data in the body (SMTP smuggling).
    """
    stuffed = data.replace(b"\n.", b"\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def normalise_line_ends(data: bytes) -> bytes:
    """Any mix of LF and CRLF -> CRLF, with a final CRLF unless empty."""
    data = _BARE_LF.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


# --- writing ---------------------------------------------------------------------------


def mail_parameters(envelope: Envelope) -> list[str]:
    """The MAIL parameters of an envelope, as they appear in a spool file."""
    params: list[str] = []
    if envelope.ret:
        params.append(f"RET={envelope.ret}")
    if envelope.envid:
        params.append(f"ENVID={envelope.envid}")
    if envelope.auth is not None:
        params.append(f"AUTH={xtext_encode('<' + envelope.auth + '>')}")
    if envelope.body:
        params.append(f"BODY={envelope.body}")
    if envelope.smtputf8:
        params.append("SMTPUTF8")
    if envelope.size is not None:
        params.append(f"SIZE={envelope.size}")
    if envelope.requiretls:
        params.append("REQUIRETLS")
    return params


def rcpt_parameters(recipient: Recipient) -> list[str]:
    params: list[str] = []
    if recipient.notify:
        params.append("NOTIFY=" + ",".join(recipient.notify))
    if recipient.orcpt:
        params.append(f"ORCPT={recipient.orcpt}")
    return params


def serialise_bsmtp(message: Message) -> bytes:
    """The spool file for a message; parse_bsmtp(serialise_bsmtp(m)) == m."""
    env = message.envelope
    lines = [" ".join([f"MAIL FROM:<{env.sender}>", *mail_parameters(env)])]
    for rcpt in env.recipients:
        lines.append(" ".join([f"RCPT TO:<{rcpt.address}>", *rcpt_parameters(rcpt)]))
    lines.append("DATA")
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    return head + dot_stuff(normalise_line_ends(message.data)) + b".\r\n"


# --- headers --------------------------------------------------------------------------


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its blank line, body) of CRLF message bytes (RFC 5322 §2.1)."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def header_lines(data: bytes) -> list[str]:
    """The header's physical lines without line ends, decoded leniently."""
    header, _ = split_header(data)
    text = header.decode("utf-8", errors="replace")
    return [line for line in text.split("\r\n") if line]
