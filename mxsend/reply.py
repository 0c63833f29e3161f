"""SMTP replies: the one parser, from bytes on the wire to `Reply` values. Pure.

`take_reply` cuts one complete reply off a receive buffer (RFC 5321 §4.2.1: `250-` lines
continue, `250 ` ends); `parse_reply` splits an RFC 3463 enhanced status code off its
text. Every reply mxsend reads, greeting included, goes through these two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 §4.5.3.1.5 says 512 octets per reply line. A hostile server gets more room
# than that but not unbounded memory: a line may be 8 KiB, the unread replies 32 KiB,
# and we keep 4 KiB of text per reply.
MAX_REPLY_TEXT = 4096
MAX_REPLY_LINE = 8192
MAX_REPLY_BUFFER = 32768
# What we carry around (logs, DSNs) is capped again, more tightly.
MAX_RESPONSE_TEXT = 1000
# RFC 3463 §2: class "." subject "." detail; the class must match the reply's first digit.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply; multi-line text joined with newlines, enhanced code split off."""

    code: int
    message: str
    enhanced: str | None

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def dsn(self) -> str:
        return self.enhanced or default_dsn(self.code)

    def __str__(self) -> str:
        """`550 5.1.1 no such user`, on one line."""
        text = " ".join(self.message.split())
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if text:
            parts.append(text)
        return truncate(" ".join(parts))


def truncate(text: str, limit: int = MAX_RESPONSE_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_dsn(code: int | None) -> str:
    """An enhanced code for a reply that gave none (RFC 3463 §3.1: x.0.0, other)."""
    if code is None:
        return "4.0.0"
    if code == 421:
        return "4.4.2"  # RFC 3463 §3.5: service not available / connection dropped
    cls = code // 100
    return f"{cls}.0.0" if cls in (2, 4, 5) else "4.0.0"


def parse_reply(code: int, text: str) -> Reply:
    """Split an RFC 3463 enhanced status code off the reply text when it matches the code."""
    text = text[:MAX_REPLY_TEXT]
    if "\n" not in text:
        # One line, nearly every reply: the same result without the list work.
        first = text.strip()
        match = _ENHANCED.match(first)
        if match and str(code)[:1] == match.group(1):
            return Reply(code=code, message=truncate(first[match.end():].strip()),
                         enhanced=f"{match.group(1)}.{int(match.group(2))}."
                                  f"{int(match.group(3))}")
        return Reply(code=code, message=truncate(first), enhanced=None)
    lines = text.split("\n")
    first = lines[0].strip()
    match = _ENHANCED.match(first)
    enhanced: str | None = None
    if match and str(code)[:1] == match.group(1):
        enhanced = f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
        # RFC 2034 §3: every line of a multi-line reply repeats the code; drop each.
        lines = [_ENHANCED.sub("", line.strip(), count=1) for line in lines]
    message = "\n".join(line.strip() for line in lines).strip()
    return Reply(code=code, message=truncate(message), enhanced=enhanced)


def take_reply(buffer: bytearray) -> tuple[int, str] | None:
    """Take one complete reply off the front of `buffer` (RFC 5321 §4.2.1); None if
    it has not all arrived. Multi-line text is joined with newlines.

    Raises ValueError for a line that is too long or does not start with three digits.
    """
    start = 0
    code = b""
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            if len(buffer) - start > MAX_REPLY_LINE:
                raise ValueError("reply line too long")
            return None
        if end - start >= MAX_REPLY_LINE:
            raise ValueError("reply line too long")
        line = bytes(buffer[start:end + 1])
        code = line[:3]
        if not code.isdigit():
            text = line.decode("utf-8", "replace").strip()
            raise ValueError(f"malformed reply line: {text!r}")
        lines.append(line[4:].strip(b" \t\r\n"))
        start = end + 1
        if line[3:4] != b"-":
            break
    del buffer[:start]
    return int(code), b"\n".join(lines).decode("utf-8", "surrogateescape")
