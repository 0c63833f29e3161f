"""VPOP3 8.8's hooks as values (contract §9): what each one is given and what its answer
means. Pure: the calls themselves are policy.py's and server_rules.py's, the effects
delivery.py's and smtp.py's.

Where VPOP3's documentation is silent, mxsend decides (docs/shaping.md, "VPOP3 8.8
hooks"):

* ReturnCodeHandler's `LastCommand` is the command the reply answers as it went on the
  wire, without its argument: "CONNECT" for the greeting, "EHLO", "HELO", "STARTTLS",
  "MAIL FROM", "RCPT TO", "DATA" (the 354), "." (the reply to the end of the data),
  "RSET", "QUIT". `FullResponse` is the reply as the server sent it, every line with its
  code, CRLF between lines; `LastLine` its last line.
* A replacement is a string whose first three characters are digits: "450 4.2.0 later"
  or several lines ("450-a\\r\\n450 b"). Anything else keeps the server's reply.
* ModifyReturnPath's answer is validated like a returnAddressModifier target: a string
  that is not a valid RFC 5321 mailbox (a CR or LF in it, an empty one) is a
  script_error and the computed sender is used. It never turns into `<>`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mxsend.addresses import validate_mailbox
from mxsend.errors import EnvelopeError, Phase
from mxsend.luavalues import FieldError, vpop3_flag
from mxsend.wire import has_control

# Phase -> LastCommand, for replies whose command is fixed by the phase.
_COMMANDS = {
    Phase.GREETING: "CONNECT",
    Phase.STARTTLS: "STARTTLS",
    Phase.MAIL: "MAIL FROM",
    Phase.RCPT: "RCPT TO",
    Phase.DATA: "DATA",
    Phase.DATAEND: ".",
}
_REPLACEMENT = re.compile(r"^([0-9]{3})(?:[ -]|$)")
MAX_REPLACEMENT = 4096  # a reply the script writes is capped like one a server writes


class ListResult(str):
    """A Lua table returned by a hook: its array items joined by "\\n"."""

    __slots__ = ()


def command_of(phase: Phase, line: bytes = b"") -> str:
    """LastCommand for the reply to `line` (the command as written) in `phase`."""
    if line:
        verb = line.split(b" ", 1)[0].split(b"\r", 1)[0].decode("ascii", "replace").upper()
        if verb == "MAIL":
            return "MAIL FROM"
        if verb == "RCPT":
            return "RCPT TO"
        if verb:
            return verb
    return _COMMANDS.get(phase, phase.value.upper())


def full_response(code: int, text: str) -> tuple[str, str]:
    """(FullResponse, LastLine) of a reply read as (code, text lines joined by "\\n")."""
    lines = text.split("\n") if text else [""]
    rendered = [f"{code}-{line}" for line in lines[:-1]]
    last = f"{code} {lines[-1]}".rstrip() if lines[-1] else str(code)
    rendered.append(last)
    return "\r\n".join(rendered), last


def replacement(value: object) -> tuple[int, str] | None:
    """A ReturnCodeHandler answer as (code, text), or None to keep the server's reply.

    Only a string starting with three digits replaces the reply (contract §9). Its
    lines may carry the code each ("450-a\\r\\n450 b"); the text comes back as the
    wire parser gives it, lines joined by "\\n" without their codes.
    """
    if not isinstance(value, str) or isinstance(value, ListResult):
        return None  # a table is not a string, whatever its items say
    match = _REPLACEMENT.match(value)
    if match is None:
        return None
    code = int(match.group(1))
    lines = []
    # A final line end ends the last line; it starts no empty one.
    body = value[:MAX_REPLACEMENT].replace("\r\n", "\n").rstrip("\r\n")
    for raw in body.split("\n"):
        if raw[:3] == match.group(1) and raw[3:4] in (" ", "-", ""):
            raw = raw[4:]
        # Nothing the script returns may smuggle a control character into a log line
        # or a DSN; the code decides, the text is for people.
        lines.append("".join(c if c.isprintable() else " " for c in raw).strip())
    return code, "\n".join(lines)


class BadReturnPath(ValueError):
    """ModifyReturnPath returned something that cannot be a MAIL FROM address."""


def return_path(value: object) -> str | None:
    """ModifyReturnPath's answer: the new sender, None to keep the computed one.

    Raises BadReturnPath for a string that is not a valid mailbox (the caller logs a
    script_error and keeps the computed sender: never `<>`).
    """
    if value is None:
        return None
    if isinstance(value, ListResult):
        raise BadReturnPath("returned a table, not a string")
    if not isinstance(value, str):
        raise BadReturnPath(f"returned a {type(value).__name__}, not a string")
    chosen = value.strip()
    if chosen.startswith("<") and chosen.endswith(">"):
        chosen = chosen[1:-1].strip()
    if not chosen:
        raise BadReturnPath("returned an empty address (the null sender is not allowed"
                            " here)")
    if has_control(chosen, spaces=True):
        raise BadReturnPath(f"returned an address with a control character: {chosen!r}")
    try:
        validate_mailbox(chosen, utf8=True)
    except EnvelopeError as exc:
        raise BadReturnPath(f"returned an address that is not valid: {exc}") from None
    return chosen


# --- mxserverrules.lua -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmartHost:
    """One entry of GetOverrides' Servers: a host name or an address, maybe a port."""

    host: str  # a host name, or an IP address without brackets
    port: int | None  # None: smtp.port
    literal: bool  # host is an IP address (written "[ip]" or bare)

    @property
    def name(self) -> str:
        return f"[{self.host}]" if self.literal else self.host


_SPLIT = re.compile(r"[\s,]+")


def smart_hosts(value: str) -> tuple[SmartHost, ...]:
    """GetOverrides' Servers (a table's items joined by "\\n", or the string returned):
    `host`, `host:port`, `[ip]`, `[ip]:port`, separated by spaces or commas.

    Raises ValueError naming the first entry that cannot be one.
    """
    return tuple(_smart_host(item) for item in _SPLIT.split(value.strip()) if item)


def _smart_host(item: str) -> SmartHost:
    port: int | None = None
    if item.startswith("["):
        inside, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not a server: {item!r}")
        host, literal = inside, True
        if inside.lower().startswith("ipv6:"):
            host = inside[5:]
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = item.rpartition(":")
        if not sep:
            host, port_text = item, None
        elif ":" in host:
            # A bare IPv6 address: "2001:db8::1" (no port can be told apart).
            host, port_text = item, None
        else:
            port_text = port_text_
        literal = _is_ip(host)
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"not a port in {item!r}")
        port = int(port_text)
    if literal:
        if not _is_ip(host):
            raise ValueError(f"not an IP address in {item!r}")
        host = str(ipaddress.ip_address(host))
    elif not re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?", host):
        raise ValueError(f"not a host name: {item!r}")
    return SmartHost(host.rstrip(".").lower() if not literal else host, port, literal)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Overrides:
    """GetOverrides' answer: servers to use instead of the MX (empty: the MX), and
    whether to go on at all (Continue == false: no MX and no address, temporary)."""

    servers: tuple[SmartHost, ...] = ()
    proceed: bool = True


def read_overrides(servers: object, proceed: object) -> Overrides:
    """GetOverrides' two results (None for nil, ListResult for a table) as Overrides.

    Only `false` itself stops (a Lua `Continue == false`); nil, a lone Servers and
    anything else go on. nil, false or an empty list keeps the MX records. Raises
    ValueError for Servers that cannot be a list of servers (the caller logs a
    script_error and uses the MX records).
    """
    if proceed is False:
        return Overrides(proceed=False)
    if servers is None or servers is False:
        return Overrides()
    if not isinstance(servers, str):
        raise ValueError(f"Servers is a {type(servers).__name__}, not a list or a string")
    return Overrides(servers=smart_hosts(servers))


@dataclass(frozen=True, slots=True)
class ServerVerdict:
    """CheckServer's answer for one server."""

    allowed: bool = True
    hold_minutes: float = 0.0  # > 0: hold the message that long, not an attempt


HOLD_CAP = 60.0 * 24 * 365  # minutes; a year, so "inf" is a long hold, not an overflow


def hold_minutes(value: object) -> float:
    """HoldMinutes: a positive number of minutes (a number or a numeric string), capped
    at HOLD_CAP; anything else (nil, a boolean, a table, NaN, zero, negative) 0: no hold.
    """
    if isinstance(value, bool | ListResult) or not isinstance(value, int | float | str):
        return 0.0
    try:
        minutes = float(value)
    except ValueError:
        return 0.0
    if math.isnan(minutes) or minutes <= 0:
        return 0.0
    return min(minutes, HOLD_CAP)


def allowed(value: object, default: bool) -> bool:
    """Allowed, read as a VPOP3 flag (0, "0", false, "false", "no" are false).

    nil, NaN, a table or a word that is no flag ("maybe") keeps DefaultResult: a script
    that says nothing clear changes nothing.
    """
    if value is None or isinstance(value, ListResult):
        return default
    if isinstance(value, float) and math.isnan(value):
        return default
    try:
        return vpop3_flag(value)
    except FieldError:
        return default


def read_verdict(allowed_: object, hold: object, default: bool = True) -> ServerVerdict:
    """CheckServer's two results as a ServerVerdict (a hold wins over Allowed: §9)."""
    return ServerVerdict(allowed=allowed(allowed_, default), hold_minutes=hold_minutes(hold))


def use_cache(value: object) -> bool:
    """GetCheckCache: only a clear false (a VPOP3 flag) resolves afresh."""
    return allowed(value, True)


def lua_list(items: Sequence[str]) -> bytes:
    """A list the sandbox turns into a 1-based Lua table (one item per line)."""
    return "\n".join(items).encode()
