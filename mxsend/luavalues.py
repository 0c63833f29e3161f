"""Lua values into Python and back: the typed boundary of the policy (contract §4).

Pure functions only. The worker sends each Actions field as a (type, value) pair where
the value is nil, a boolean, a number or a string (bytes); anything else arrives as its
type name and becomes `Opaque`. Every field is read by a small reader that returns its
Python type or raises FieldError, and the readers' results build FileActions and
ServerActions field by field, so nothing untyped reaches those values.

VPOP3's reading rules (flags, Priority) and the rule that an unreadable setting never
weakens what the script asked for are docs/policy.md's; the names of the fields come
from mxsend/actions.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from mxsend.actions import (
    FILE_FIELDS,
    LUA_NAME,
    SERVER_FIELDS,
    TIMEOUT_FIELDS,
    FileActions,
    ServerActions,
    Timeouts,
)
from mxsend.addresses import validate_mailbox
from mxsend.dkim import normalise_domain
from mxsend.envelope import split_header
from mxsend.errors import EnvelopeError

PRIORITY_MIN, PRIORITY_MAX = 1, 100
# A timeout longer than a day is a typo, not a policy (RFC 5321 §4.5.3.2 suggests minutes).
MAX_SMTP_TIMEOUT = 86400.0
# HeaderData and HeaderLines cover at most this much of the header (contract §4): the
# size of Postfix's header_size_limit. RFC 5322 §2.1.1 bounds lines, not the header, so
# a file without a blank line would otherwise send its whole body to the worker as
# "header" on every call.
HEADER_LIMIT = 100 * 1024

T = TypeVar("T")
Fault = tuple[str, str]  # (field, what is wrong and what is used instead)


@dataclass(frozen=True, slots=True)
class Opaque:
    """A Lua value that is not nil, boolean, number or string (a table, a function)."""

    kind: str


class FieldError(ValueError):
    """One Actions field the script set to something unusable."""


LuaValue = None | bool | int | float | bytes | str | Opaque
LuaFields = dict[str, LuaValue]


# --- the header the script sees ----------------------------------------------------------


def script_header(data: bytes) -> bytes:
    """The header block (with its blank line) of CRLF message bytes, cut at HEADER_LIMIT.

    A longer header is cut after its last complete line within the limit; only the
    first HEADER_LIMIT + 4 bytes are ever looked at.
    """
    head = data[: HEADER_LIMIT + 4]
    block, _ = split_header(head)
    if len(block) <= HEADER_LIMIT:
        return block
    end = block.rfind(b"\r\n", 0, HEADER_LIMIT)
    return block[: end + 2] if end >= 0 else b""


def script_header_lines(lines: Sequence[str]) -> list[str]:
    """Header lines as far as HEADER_LIMIT bytes reach (CRLF counted per line)."""
    kept: list[str] = []
    size = 0
    for line in lines:
        size += len(line.encode("utf-8", errors="surrogateescape")) + 2
        if size > HEADER_LIMIT:
            break
        kept.append(line)
    return kept


# --- readers: one Lua value -> one Python value --------------------------------------------


def lua_time(epoch: float | None) -> str:
    """Epoch seconds -> `YYYYMMDDHHMMSS` in local time, as VPOP3 passes times; None -> ""."""
    if epoch is None:
        return ""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(epoch))


def _decode(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="strict")
    return value


def _number(value: object) -> float | None:
    """A Lua number, or a string Lua's tonumber() would accept; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, bytes | str):
        try:
            text = _decode(value).strip()
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        except ValueError:
            return None
    return None


_FALSE_WORDS = frozenset({"0", "false", "no"})
_TRUE_WORDS = frozenset({"1", "true", "yes"})


def vpop3_flag(value: object) -> bool:
    """VPOP3's reading of a flag: `0`, `"0"`, `false`, `"false"`, `"no"` are false.

    Other numbers and `true` are true; "1", "true", "yes" and other numeric strings are
    read the same way. Anything else (a table, "maybe") raises FieldError.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, bytes | str):
        try:
            word = _decode(value).strip().lower()
        except UnicodeDecodeError:
            raise FieldError("not a flag: invalid UTF-8") from None
        if word in _FALSE_WORDS:
            return False
        if word in _TRUE_WORDS:
            return True
        number = _number(word)
        if number is not None:
            return number != 0
        raise FieldError(f"not a flag: {word[:40]!r}")
    raise FieldError(f"not a flag: {_kind(value)}")


def clamp_priority(value: object) -> int:
    """Priority 1..100 (contract §4), clamped; fractions round down."""
    number = _number(value)
    if number is None:
        raise FieldError(f"must be a number, got {_kind(value)}")
    if math.isnan(number):
        raise FieldError("is not a number (NaN, such as 0/0)")
    if number == math.inf:
        return PRIORITY_MAX
    if number == -math.inf:
        return PRIORITY_MIN
    return max(PRIORITY_MIN, min(PRIORITY_MAX, math.floor(number)))


def text_value(value: object) -> str:
    """A string (or a number, as Lua's tostring would write it) for logging."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _lua_number_text(value)
    raise FieldError(f"expected a string, got {_kind(value)}")


def _lua_number_text(value: float) -> str:
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def wire_string(value: object) -> str:
    """A string that will reach the SMTP wire: UTF-8 without CR, LF or other controls.

    RFC 5321 §2.3.8: CR and LF only ever end a command; one inside a value would let a
    script inject commands (style.md point 10).
    """
    if not isinstance(value, bytes | str):
        raise FieldError(f"expected a string, got {_kind(value)}")
    try:
        text = _decode(value)
    except UnicodeDecodeError:
        raise FieldError("not valid UTF-8") from None
    for char in text:
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise FieldError(f"contains the control character {char!r}")
    return text


def helo_name(value: object) -> str:
    """EHLO/HELO argument (RFC 5321 §4.1.1.1): a domain or an address literal, ASCII."""
    text = wire_string(value)
    if not text:
        raise FieldError("is empty")
    if not text.isascii() or " " in text:
        raise FieldError(f"is not a domain or address literal: {text[:60]!r}")
    return text


def return_address(value: object) -> str:
    """A return path as a bare address; `<x>` is accepted, `""`/`<>` is the null path."""
    text = wire_string(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        return ""
    try:
        return validate_mailbox(text, utf8=True)
    except EnvelopeError as exc:
        raise FieldError(str(exc)) from None


def thumbprint(value: object) -> str:
    """checkCertThumbprint: hex SHA-1 (40) or SHA-256 (64), spaces and colons allowed."""
    text = wire_string(value)
    digits = text.replace(":", "").replace(" ", "")
    if digits and (len(digits) not in (40, 64) or any(c not in "0123456789abcdefABCDEF"
                                                        for c in digits)):
        raise FieldError("is not 40 or 64 hex digits")
    return text


def modifier(value: object) -> int:
    """returnAddressModifier: 0 as queued, 1 defaultReturnAddress, 2 nullReturnAddress."""
    number = _number(value)
    if number is None or number not in (0.0, 1.0, 2.0):
        raise FieldError("must be 0, 1 or 2")
    return int(number)


def smtp_timeout(value: object) -> float:
    number = _number(value)
    if number is None or not 0 < number <= MAX_SMTP_TIMEOUT:
        raise FieldError(f"must be a number of seconds in (0, {MAX_SMTP_TIMEOUT:g}]")
    return number


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, Opaque):
        return value.kind
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, bytes | str):
        return "string"
    return type(value).__name__


# --- Actions out of Lua -----------------------------------------------------------------


def _read(fields: LuaFields, name: str, reader: Callable[[LuaValue], T], default: T,
          faults: list[Fault], label: str = "") -> T:
    """One field through its reader; nil (the script removed it) means the default."""
    value = fields.get(name)
    if value is None:
        return default
    try:
        return reader(value)
    except FieldError as exc:
        faults.append((label or name, f"{exc}; using the default"))
        return default


def dkim_domain_reader(domains: frozenset[str]) -> Callable[[LuaValue], str]:
    """DKIMDomain out (contract §7): "" (do not sign) or the `domain` of a configured key."""

    def read(value: LuaValue) -> str:
        if not isinstance(value, bytes | str):
            raise FieldError(f"expected a string, got {_kind(value)}")
        try:
            domain = normalise_domain(_decode(value))
        except UnicodeDecodeError:
            raise FieldError("not valid UTF-8") from None
        if domain and domain not in domains:
            raise FieldError(f"no [[dkim.key]] has the domain {domain[:80]!r}")
        return domain

    return read


def file_actions_from_lua(fields: LuaFields, given: FileActions | None = None,
                          dkim_domains: frozenset[str] = frozenset(),
                          ) -> tuple[FileActions, list[Fault]]:
    """CheckFile's returned Actions -> FileActions and the faults found on the way.

    `given` is what CheckFile was passed: a DKIMDomain that cannot be used (not a
    string, or a domain no key has) keeps its value, so a typo never stops signing.
    """
    faults: list[Fault] = []
    defaults = FileActions()
    given = given or defaults
    name = LUA_NAME
    actions = FileActions(
        skip_send=_read(fields, name["skip_send"], vpop3_flag, defaults.skip_send, faults),
        force_last_try=_read(fields, name["force_last_try"], vpop3_flag,
                             defaults.force_last_try, faults),
        priority=_read(fields, name["priority"], clamp_priority, defaults.priority, faults),
        reason=_read(fields, name["reason"], text_value, defaults.reason, faults),
        dkim_domain=_read(fields, name["dkim_domain"], dkim_domain_reader(dkim_domains),
                          given.dkim_domain, faults),
    )
    _restate(faults, name["dkim_domain"], f"keeping {given.dkim_domain!r}")
    return actions, faults


_PINS = ("check_cert_name", "check_cert_thumbprint")


def _restate(faults: list[Fault], name: str, outcome: str) -> None:
    """Replace "using the default" in `name`'s fault with what is done instead."""
    for index, (field, problem) in enumerate(faults):
        if field == name:
            faults[index] = (field, problem.replace("using the default", outcome))


def _timeouts_from_lua(timeouts: LuaFields | Opaque | None, defaults: Timeouts,
                       faults: list[Fault]) -> Timeouts:
    if timeouts is None:
        return defaults
    if isinstance(timeouts, Opaque):
        faults.append(("timeouts", f"must be a table, got {timeouts.kind}; using the default"))
        return defaults

    def read(name: str) -> float:
        default: float = getattr(defaults, name)
        return _read(timeouts, name, smtp_timeout, default, faults, label=f"timeouts.{name}")

    return Timeouts(
        connect=read("connect"), greeting=read("greeting"), ehlo=read("ehlo"),
        starttls=read("starttls"), mail=read("mail"), rcpt=read("rcpt"), data=read("data"),
        datablock=read("datablock"), dataend=read("dataend"),
    )


def server_actions_from_lua(
    fields: LuaFields, timeouts: LuaFields | Opaque | None, defaults: ServerActions,
) -> tuple[ServerActions, list[Fault]]:
    """ServerDetails' returned Actions -> ServerActions and the faults found on the way.

    A field that cannot be read is a fault and takes the value given in, except where
    that would weaken what the script asked for (docs/policy.md, "Fields that cannot
    be read"): an unreadable forceTLS or verifyCert counts as on; an unreadable pin
    makes the attempt fail temporarily (`unusable`), never unpinned; a
    returnAddressModifier whose target is not a valid address sends the envelope
    sender as queued, never `<>` (RFC 5321 §4.5.5 keeps the null path for reports).
    """
    faults: list[Fault] = []
    name = LUA_NAME

    def flag(attr: str) -> bool:
        default: bool = getattr(defaults, attr)
        return _read(fields, name[attr], vpop3_flag, default, faults)

    def text(attr: str, reader: Callable[[LuaValue], str]) -> str:
        default: str = getattr(defaults, attr)
        return _read(fields, name[attr], reader, default, faults)

    actions = ServerActions(
        try_esmtp=flag("try_esmtp"),
        try_tls=flag("try_tls"),
        helo_name=text("helo_name", helo_name),
        use_batv=flag("use_batv"),
        allow_dsn=flag("allow_dsn"),
        force_tls=flag("force_tls"),
        verify_cert=flag("verify_cert"),
        check_cert_name=text("check_cert_name", wire_string),
        check_cert_thumbprint=text("check_cert_thumbprint", thumbprint),
        return_address_modifier=_read(fields, name["return_address_modifier"], modifier,
                                      defaults.return_address_modifier, faults),
        default_return_address=text("default_return_address", return_address),
        null_return_address=text("null_return_address", return_address),
        timeouts=_timeouts_from_lua(timeouts, defaults.timeouts, faults),
    )
    return _never_weaker(actions, faults), faults


def _never_weaker(actions: ServerActions, faults: list[Fault]) -> ServerActions:
    """Where a field's fallback would weaken the connection, the stronger outcome."""
    failed = {field for field, _ in faults}
    if LUA_NAME["force_tls"] in failed:
        actions = replace(actions, force_tls=True)
        _restate(faults, LUA_NAME["force_tls"], "taken as on")
    if LUA_NAME["verify_cert"] in failed:
        actions = replace(actions, verify_cert=True)
        _restate(faults, LUA_NAME["verify_cert"], "taken as on")
    bad_pins = [LUA_NAME[attr] for attr in _PINS if LUA_NAME[attr] in failed]
    if bad_pins:
        actions = replace(actions, force_tls=True, unusable=(
            f"the script's {' and '.join(bad_pins)} cannot be used"))
        for pin in bad_pins:
            _restate(faults, pin, "no attempt to this server until the script is fixed")
    chosen = actions.return_address_modifier
    target = {1: "default_return_address", 2: "null_return_address"}.get(chosen)
    if target is not None and (LUA_NAME[target] in failed or (
            target == "default_return_address" and not actions.default_return_address)):
        faults.append(("returnAddressModifier", (
            f"{chosen} names {LUA_NAME[target]}, which is not a valid address;"
            " the envelope sender as queued is used")))
        actions = replace(actions, return_address_modifier=0)
    return actions


# --- Actions into Lua ----------------------------------------------------------------------


def _lua_value(value: object) -> object:
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def file_actions_to_lua(actions: FileActions) -> tuple[object, ...]:
    """FileActions -> the Actions-in values in FILE_FIELDS order (flags as booleans)."""
    return tuple(getattr(actions, attr) if isinstance(getattr(actions, attr), bool)
                 else _lua_value(getattr(actions, attr)) for attr, _ in FILE_FIELDS)


def server_actions_to_lua(actions: ServerActions) -> tuple[object, ...]:
    """ServerActions -> the flat Actions-in values (SERVER_FIELDS, then TIMEOUT_FIELDS)."""
    return (tuple(_lua_value(getattr(actions, attr)) for attr, _ in SERVER_FIELDS)
            + tuple(_lua_value(getattr(actions.timeouts, name)) for name in TIMEOUT_FIELDS))


def field_names() -> tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]:
    """The names the worker's Lua side uses, given to it with every script it loads."""
    return (tuple(lua.encode() for _, lua in FILE_FIELDS),
            tuple(lua.encode() for _, lua in SERVER_FIELDS),
            tuple(name.encode() for name in TIMEOUT_FIELDS))


# --- replies of the worker -----------------------------------------------------------------


_PRIMITIVE_KINDS = frozenset({b"nil", b"boolean", b"number", b"string"})


def _as_value(value: object) -> LuaValue:
    if value is None or isinstance(value, bool | int | float | bytes | str):
        return value
    return Opaque(type(value).__name__)  # never sent by the worker; kept opaque


def pairs_to_fields(values: Sequence[object], names: Sequence[str]) -> LuaFields:
    """(type, value) pairs from the worker -> {name: value}, Opaque for non-primitives."""
    fields: LuaFields = {}
    for index, name in enumerate(names):
        kind = values[2 * index]
        value = values[2 * index + 1]
        fields[name] = _as_value(value) if kind in _PRIMITIVE_KINDS else Opaque(
            text_value(_as_value(kind)))
    return fields


def check_file_reply(values: Sequence[object], given: FileActions | None = None,
                     dkim_domains: frozenset[str] = frozenset(),
                     ) -> tuple[FileActions, list[Fault]]:
    """("ok", nil, (type, value) per FILE_FIELDS) -> FileActions and faults."""
    return file_actions_from_lua(pairs_to_fields(values[2:], [lua for _, lua in FILE_FIELDS]),
                                 given, dkim_domains)


def server_details_reply(values: Sequence[object], defaults: ServerActions
                         ) -> tuple[ServerActions, list[Fault]]:
    """("ok", timeouts' type, pairs per SERVER_FIELDS then TIMEOUT_FIELDS) -> ServerActions."""
    names = [lua for _, lua in SERVER_FIELDS]
    fields = pairs_to_fields(values[2 : 2 + 2 * len(names)], names)
    timeout_kind = text_value(_as_value(values[1]))
    timeouts: LuaFields | Opaque | None
    if timeout_kind == "table":
        timeouts = pairs_to_fields(values[2 + 2 * len(names) :], TIMEOUT_FIELDS)
    elif timeout_kind == "nil":
        timeouts = None
    else:
        timeouts = Opaque(timeout_kind)
    return server_actions_from_lua(fields, timeouts, defaults)
