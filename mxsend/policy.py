"""The VPOP3-compatible delivery policy: CheckFile and ServerDetails (contract §4).

The operator's `mxout.lua` runs in a worker process (mxsend/luasandbox.py, Lua 5.2
through lupa) so that a call stuck in C can be abandoned by killing the worker; see
docs/policy.md for that decision and its measured cost. This module is the daemon's
side: it marshals requests, enforces the hard deadline, and reads the script's Actions
back with VPOP3's rules through the small pure functions below.

Faults never cost mail: a missing function, a nil or wrongly typed return, a runtime
error, a timeout, memory exhaustion or a dead worker is one `script_error` event and the
Actions as passed in. A bad single field (a CR in HELOname, a Priority that is not a
number) is one `script_error` and that field's default; the rest of the Actions stand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxsend import luasandbox
from mxsend.actions import FileActions, ServerActions, ServerParameters, Timeouts
from mxsend.config import Config
from mxsend.envelope import split_header, validate_mailbox
from mxsend.errors import EnvelopeError
from mxsend.log import event, get_logger
from mxsend.watch import Watcher

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 1, 100, 50
# A call that outlives script.timeout by this much is stuck in C (the Lua hook would
# have fired): the worker is killed. At least half a second so a busy machine's
# scheduling noise does not kill a worker that was about to answer.
MIN_GRACE = 0.5
# Starting a worker (a Python interpreter importing lupa) is slow on a loaded machine.
STARTUP_TIMEOUT = 30.0
# Replies usually arrive within tens of microseconds: spin this long for one, then
# sleep in poll() this long, before paying for the event loop's reader machinery.
SPIN_WAIT = 0.0003
# Calls sent to the worker before reading replies (see Policy._call_many).
CALL_CHUNK = 16
FAST_WAIT = 0.002
# A timeout longer than a day is a typo, not a policy (RFC 5321 §4.5.3.2 suggests minutes).
MAX_SMTP_TIMEOUT = 86400.0
# Editors write a file in several steps; reload once things settle.
RELOAD_SETTLE = 0.1

SCRIPT_ERROR = "script_error"
CHECKFILE = "CheckFile"
SERVERDETAILS = "ServerDetails"
LOAD = "load"
# Distinct ServerDetails answers remembered, already read back into ServerActions.
RESULT_CACHE_SIZE = 1024


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckFileRequest:
    """Everything CheckFile is told about one message (contract §4)."""

    queue_id: str  # for log events
    filename: str  # path of the message file (Lua `Filename`)
    size: int  # len(message data) (Lua `Size`)
    creation_time: float  # epoch seconds -> YYYYMMDDHHMMSS local time
    retries: int  # attempts so far
    last_try_time: float | None  # None -> ""
    return_path: str  # "" for the null sender
    recipients: tuple[str, ...]  # pending bare addresses
    data: bytes  # message bytes (CRLF); only the header part is read


@dataclass(frozen=True, slots=True)
class Opaque:
    """A Lua value that is not nil, boolean, number or string (a table, a function)."""

    kind: str


class FieldError(ValueError):
    """One Actions field the script set to something unusable."""


@dataclass(frozen=True, slots=True)
class _Script:
    path: Path
    source: bytes
    version: int

    @property
    def chunkname(self) -> str:
        # "@path" makes Lua name the file in messages: "/etc/mxout.lua:3: ...".
        return f"@{self.path}"


# --- pure: Lua values in and out ------------------------------------------------------


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
    if number is None or math.isnan(number):
        raise FieldError(f"Priority must be a number, got {_kind(value)}")
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


Fault = tuple[str, str]  # (field, problem) for a script_error event


def _read(
    fields: dict[str, object], name: str, reader: Callable[[object], Any], default: Any,
    faults: list[Fault], label: str = "",
) -> Any:
    """One field through its reader; nil (the script removed it) means the default."""
    value = fields.get(name)
    if value is None:
        return default
    try:
        return reader(value)
    except FieldError as exc:
        faults.append((label or name, f"{exc}; using the default"))
        return default


def file_actions_from_lua(fields: dict[str, object]) -> tuple[FileActions, list[Fault]]:
    """CheckFile's returned Actions -> FileActions and the faults found on the way."""
    faults: list[Fault] = []
    base = FileActions()
    actions = FileActions(
        skip_send=_read(fields, "SkipSend", vpop3_flag, base.skip_send, faults),
        force_last_try=_read(fields, "ForceLastTry", vpop3_flag, base.force_last_try, faults),
        priority=_read(fields, "Priority", clamp_priority, base.priority, faults),
        reason=_read(fields, "Reason", text_value, base.reason, faults),
    )
    return actions, faults


# ServerActions field <- Lua name, reader. Order matches sandbox.lua SERVER_FIELDS.
SERVER_FIELDS: tuple[tuple[str, str, Callable[[object], Any]], ...] = (
    ("try_esmtp", "tryESMTP", vpop3_flag),
    ("try_tls", "tryTLS", vpop3_flag),
    ("helo_name", "HELOname", helo_name),
    ("use_batv", "useBATV", vpop3_flag),
    ("allow_dsn", "allowDSN", vpop3_flag),
    ("force_tls", "forceTLS", vpop3_flag),
    ("verify_cert", "verifyCert", vpop3_flag),
    ("check_cert_name", "checkCertName", wire_string),
    ("check_cert_thumbprint", "checkCertThumbprint", thumbprint),
    ("return_address_modifier", "returnAddressModifier", modifier),
    ("default_return_address", "defaultReturnAddress", return_address),
    ("null_return_address", "nullReturnAddress", return_address),
)
_TIMEOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Timeouts))
_PINS = ("checkCertName", "checkCertThumbprint")
# Flags whose unreadable value is taken as on: off would be the weaker connection.
_FAIL_CLOSED_FLAGS = {"forceTLS": "force_tls", "verifyCert": "verify_cert"}
# returnAddressModifier -> the field it sends as MAIL FROM.
_MODIFIER_TARGETS = {1: ("defaultReturnAddress", "default_return_address"),
                     2: ("nullReturnAddress", "null_return_address")}


def _restate(faults: list[Fault], name: str, outcome: str) -> None:
    """Replace "using the default" in `name`'s fault with what is done instead."""
    for index, (field, problem) in enumerate(faults):
        if field == name:
            faults[index] = (field, problem.replace("using the default", outcome))


def server_actions_from_lua(
    fields: dict[str, object], timeouts: dict[str, object] | Opaque | None,
    defaults: ServerActions,
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
    values: dict[str, Any] = {}
    for attr, lua_name, reader in SERVER_FIELDS:
        values[attr] = _read(fields, lua_name, reader, getattr(defaults, attr), faults)
    failed = {name for name, _ in faults}
    for lua_name, attr in _FAIL_CLOSED_FLAGS.items():
        if lua_name in failed:
            values[attr] = True
            _restate(faults, lua_name, "taken as on")
    bad_pins = [name for name in _PINS if name in failed]
    if bad_pins:
        values["force_tls"] = True
        values["unusable"] = f"the script's {' and '.join(bad_pins)} cannot be used"
        for name in bad_pins:
            _restate(faults, name, "no attempt to this server until the script is fixed")
    target = _MODIFIER_TARGETS.get(values["return_address_modifier"])
    if target is not None:
        lua_name, attr = target
        if lua_name in failed or (attr == "default_return_address" and not values[attr]):
            faults.append(("returnAddressModifier", (
                f"{values['return_address_modifier']} names {lua_name}, which is not a"
                " valid address; the envelope sender as queued is used")))
            values["return_address_modifier"] = 0
    if isinstance(timeouts, Opaque) or (timeouts is not None and not isinstance(timeouts, dict)):
        faults.append(("timeouts", f"must be a table, got {_kind(timeouts)}"))
        timeouts = None
    timeout_values: dict[str, Any] = {}
    for name in _TIMEOUT_FIELDS:
        fallback = getattr(defaults.timeouts, name)
        if timeouts is None:
            timeout_values[name] = fallback
        else:
            timeout_values[name] = _read(
                timeouts, name, smtp_timeout, fallback, faults, label=f"timeouts.{name}"
            )
    return ServerActions(**values, timeouts=Timeouts(**timeout_values)), faults


def _lua_flag(value: bool) -> int:
    return 1 if value else 0


def _lua_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def server_actions_to_lua(actions: ServerActions) -> tuple[object, ...]:
    """ServerActions -> the flat Actions-in values (SERVER_FIELDS, then timeouts)."""
    out: list[object] = []
    for attr, _, _ in SERVER_FIELDS:
        value = getattr(actions, attr)
        if isinstance(value, bool):
            out.append(_lua_flag(value))
        elif isinstance(value, str):
            out.append(value.encode())
        else:
            out.append(value)
    out.extend(_lua_number(getattr(actions.timeouts, name)) for name in _TIMEOUT_FIELDS)
    return tuple(out)


_PRIMITIVE_KINDS = frozenset({b"nil", b"boolean", b"number", b"string"})


def _pairs(values: Sequence[object], names: Sequence[str]) -> dict[str, object]:
    """(type, value) pairs from the worker -> {name: value} with Opaque for non-primitives."""
    fields: dict[str, object] = {}
    for index, name in enumerate(names):
        kind = values[2 * index]
        value = values[2 * index + 1]
        fields[name] = value if kind in _PRIMITIVE_KINDS else Opaque(text_value(kind))
    return fields


# --- the worker process ----------------------------------------------------------------


class WorkerStuck(Exception):
    """The worker did not answer in time: it is stuck in C or overloaded."""


class WorkerGone(Exception):
    """The worker process died or closed its socket."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Worker:
    """One luasandbox.py process and the socket to it."""

    def __init__(self, memory: int) -> None:
        parent, child = socket.socketpair()
        self.loaded_version: int | None = None
        self.ready = False
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(Path(luasandbox.__file__)), str(child.fileno()),
             str(memory)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        child.close()
        self.channel = luasandbox.Channel(parent)

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.channel.send(message)
        except OSError as exc:
            raise WorkerGone(str(exc)) from None

    def _fill(self) -> bool:
        """Read what is there; True if something was read."""
        try:
            if not self.channel.fill():
                raise WorkerGone("the policy worker exited")
        except BlockingIOError:
            return False
        except OSError as exc:
            raise WorkerGone(str(exc)) from None
        return True

    def _spin(self, seconds: float) -> bool:
        """Try to read for up to `seconds` without sleeping; True if data arrived.

        Sleeping in poll() and being woken costs tens of microseconds on a virtual
        machine, more than a typical script call; spinning briefly is cheaper.
        """
        end = time.perf_counter() + seconds
        while not self._fill():
            if time.perf_counter() >= end:
                return False
            # On a busy machine the worker may be waiting for this very CPU.
            os.sched_yield()
        return True

    def _poll(self, seconds: float) -> bool:
        # poll, not select: a busy daemon has descriptors above select's FD_SETSIZE.
        return bool(self.channel.poller.poll(max(0, math.ceil(seconds * 1000))))

    def receive_sync(self, deadline: float) -> object:
        while True:
            frame = self.channel.take()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerStuck()
            if self._poll(remaining):
                self._fill()

    async def receive(self, deadline: float) -> object:
        loop = asyncio.get_running_loop()
        while True:
            frame = self.channel.take()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerStuck()
            if self._spin(min(SPIN_WAIT, remaining)):
                continue
            if self._poll(min(FAST_WAIT, remaining)):
                self._fill()
                continue
            # Slow path: let the loop serve other work until the worker answers.
            waiter: asyncio.Future[None] = loop.create_future()
            sock = self.channel.sock
            loop.add_reader(sock, _wake, waiter)
            try:
                await asyncio.wait_for(waiter, deadline - time.monotonic())
            except TimeoutError:
                raise WorkerStuck() from None
            finally:
                loop.remove_reader(sock)
            self._fill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.channel.sock.close()

    def close(self) -> None:
        self.channel.sock.close()  # EOF: the worker leaves its loop
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


# --- the policy -------------------------------------------------------------------------


class Policy:
    """The operator's mxout.lua, as the daemon uses it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.script.path
        self.timeout = config.script.timeout
        self.hard_timeout = config.script.timeout + max(MIN_GRACE, config.script.timeout)
        self._defaults = ServerActions(helo_name=config.smtp.helo_name or socket.getfqdn())
        self._defaults_lua: tuple[ServerActions, tuple[object, ...]] | None = None
        self._server_results: dict[tuple[ServerActions, tuple[object, ...]],
                                   tuple[ServerActions, list[Fault]]] = {}
        self._good: _Script | None = None  # the version the worker runs
        self._pending: _Script | None = None  # compiled, not yet run in a worker
        self._version = 0
        self._worker: _Worker | None = None
        self._lock = asyncio.Lock()
        self._queued_calls: list[tuple[str, str, tuple[object, ...],
                                       asyncio.Future[tuple[object, ...] | None]]] = []
        self._caller: asyncio.Task[None] | None = None
        self._missing_logged = False
        self._missing_functions: set[tuple[int, str]] = set()
        self._watching: tuple[Watcher, int] | None = None
        self.reads = 0  # times the script file was read (reload), for tests and bench
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self.reload()

    # -- public --------------------------------------------------------------------------

    @property
    def has_script(self) -> bool:
        return self._good is not None or self._pending is not None

    def default_server_actions(self) -> ServerActions:
        """The Actions ServerDetails is given: HELOname = smtp.helo_name or the FQDN."""
        return self._defaults

    async def check_file(self, request: CheckFileRequest) -> FileActions:
        [actions] = await self.check_files([request])
        return actions

    async def check_files(self, requests: Sequence[CheckFileRequest]) -> list[FileActions]:
        """CheckFile for many messages: sent to the worker together, answered in order.

        One round trip for a batch instead of one per message: the scan loop asks for
        every message it is about to queue at once (contract §4 semantics unchanged,
        each call is its own CheckFile with its own timeout and faults).
        """
        if not self.has_script:
            return [FileActions() for _ in requests]
        results = await asyncio.gather(*(
            self._call(CHECKFILE, request.queue_id, _check_message(request, self.timeout))
            for request in requests))
        actions_list = []
        for request, values in zip(requests, results, strict=True):
            if values is None:
                actions_list.append(FileActions())
                continue
            fields = _pairs(values[2:], ("SkipSend", "ForceLastTry", "Priority", "Reason"))
            actions, faults = file_actions_from_lua(fields)
            self._log_faults(CHECKFILE, request.queue_id, faults)
            actions_list.append(actions)
        return actions_list

    async def server_details(
        self, queue_id: str, params: ServerParameters, header_lines: Sequence[str]
    ) -> ServerActions:
        defaults = self._defaults
        if not self.has_script or self._known_missing(SERVERDETAILS):
            return defaults
        message = (
            "server", self.timeout, params.authsender.encode(), params.originator.encode(),
            params.server.encode(), params.domain.encode(), params.length, params.connid,
            params.connection.encode(),
            "\r\n".join(header_lines).encode("utf-8", errors="surrogateescape"),
            self._defaults_to_lua(defaults),
        )
        values = await self._call(SERVERDETAILS, queue_id, message)
        if values is None:
            return defaults
        # A script answers the same few Actions over and over (per server, per size
        # class): reading them back field by field each time was most of this call's
        # cost. The faults are logged per call all the same, as each call is its own.
        key = (defaults, values)
        try:
            actions, faults = self._server_results[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value, read it afresh
            actions, faults = self._read_server_details(values, defaults)
            if len(self._server_results) >= RESULT_CACHE_SIZE:
                self._server_results.clear()
            with contextlib.suppress(TypeError):
                self._server_results[key] = (actions, faults)
        self._log_faults(SERVERDETAILS, queue_id, faults)
        return actions

    def _defaults_to_lua(self, defaults: ServerActions) -> tuple[object, ...]:
        if self._defaults_lua is None or self._defaults_lua[0] is not defaults:
            self._defaults_lua = (defaults, server_actions_to_lua(defaults))
        return self._defaults_lua[1]

    @staticmethod
    def _read_server_details(values: tuple[object, ...], defaults: ServerActions
                             ) -> tuple[ServerActions, list[Fault]]:
        names = [lua for _, lua, _ in SERVER_FIELDS]
        fields = _pairs(values[2 : 2 + 2 * len(names)], names)
        timeout_kind = text_value(values[1])
        timeouts: dict[str, object] | Opaque | None
        if timeout_kind == "table":
            timeouts = _pairs(values[2 + 2 * len(names) :], _TIMEOUT_FIELDS)
        elif timeout_kind == "nil":
            timeouts = None
        else:
            timeouts = Opaque(timeout_kind)
        return server_actions_from_lua(fields, timeouts, defaults)

    def reconfigure(self, config: Config) -> None:
        """SIGHUP with the same script path: new timeouts and defaults, then reload().

        The HELO default comes from smtp.helo_name and the limits from [script]; a new
        memory cap needs a new worker, which the next call starts with the good script.
        """
        memory_changed = config.script.memory != self.config.script.memory
        self.config = config
        self.timeout = config.script.timeout
        self.hard_timeout = config.script.timeout + max(MIN_GRACE, config.script.timeout)
        self._defaults = ServerActions(helo_name=config.smtp.helo_name or socket.getfqdn())
        if memory_changed:
            self._kill_worker()
        self.reload()

    def reload(self) -> bool:
        """Re-read the script; True if a new version is active (or will be at next call).

        A version that does not compile, or whose top level fails, is logged as
        script_error (function="load") and the previous one stays.
        """
        self.reads += 1
        try:
            source = self.path.read_bytes()
        except FileNotFoundError:
            if not self.has_script and not self._missing_logged:
                get_logger().warning(
                    "script %s not found: using the built-in defaults", self.path
                )
                self._missing_logged = True
            # An editor replacing the file by rename leaves it missing for a moment;
            # the version in use stays.
            return False
        except OSError as exc:
            event(SCRIPT_ERROR, None, function=LOAD, error=f"{self.path}: {exc.strerror}")
            return False
        current = self._pending or self._good
        if current is not None and current.source == source:
            return False
        self._version += 1
        script = _Script(self.path, source, self._version)
        error = luasandbox.compile_check(source, script.chunkname)
        if error is not None:
            event(SCRIPT_ERROR, None, function=LOAD, error=error)
            return False
        self._pending = script
        self._missing_logged = False
        if self._lock.locked():
            return True  # a call is waiting on the worker; the next call loads it
        return self._load_pending_sync()

    def watch(self, watcher: Watcher) -> None:
        """Reload when the script is written or renamed into place (one reload per change).

        Only closed writes and renames count (watch.py): the reload's own read of the
        file is no change, so it never schedules another reload.
        """
        self.stop_watching()
        self._loop = asyncio.get_running_loop()
        try:
            token = watcher.add(self.path.parent, self._file_changed, name=self.path.name)
        except OSError as exc:
            get_logger().warning("the script %s is not watched for changes: %s",
                                 self.path, exc)
            return
        self._watching = (watcher, token)

    def stop_watching(self) -> None:
        watching, self._watching = self._watching, None
        if watching is not None:
            watcher, token = watching
            watcher.remove(token)
        if self._reload_handle is not None:
            self._reload_handle.cancel()
            self._reload_handle = None

    def close(self) -> None:
        self._closed = True
        self.stop_watching()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    # -- reload plumbing -------------------------------------------------------------------

    def _file_changed(self) -> None:
        if self._closed or self._loop is None:
            return
        # Editors write in several steps; reload once things settle.
        if self._reload_handle is not None:
            self._reload_handle.cancel()
        self._reload_handle = self._loop.call_later(RELOAD_SETTLE, self._reload_now)

    def _reload_now(self) -> None:
        self._reload_handle = None
        if not self._closed and self.reload():
            get_logger().info("script %s changed: reloaded", self.path)

    # -- the worker ----------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(self.config.script.memory)
        return self._worker

    def _kill_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    def _load_pending_sync(self) -> bool:
        """Run the pending version's top level now (startup, reload when idle)."""
        worker = self._spawn()
        try:
            if not worker.ready:
                worker.receive_sync(time.monotonic() + STARTUP_TIMEOUT)
                worker.ready = True
            if worker.loaded_version is None and self._good is not None:
                self._load_into(worker, self._good, None, sync=True)
            pending, self._pending = self._pending, None
            if pending is None:
                return False
            return self._load_into(worker, pending, None, sync=True)
        except (WorkerStuck, WorkerGone) as exc:
            self._kill_worker()
            event(SCRIPT_ERROR, None, function=LOAD, error=_worker_problem(exc, self))
            return False

    def _load_into(self, worker: _Worker, script: _Script, reply: object, *, sync: bool) -> bool:
        """Handle a load reply (sync: send and wait here). True if the script is active."""
        if sync:
            worker.send(("load", script.source, script.chunkname, self.timeout))
            reply = worker.receive_sync(time.monotonic() + self.hard_timeout)
        assert isinstance(reply, tuple)
        _, error, prints = reply
        self._log_prints(None, prints)
        if error is not None:
            event(SCRIPT_ERROR, None, function=LOAD, error=error)
            if worker.loaded_version is None:
                self._good = None if self._good is script else self._good
            return False
        worker.loaded_version = script.version
        self._good = script
        return True

    async def _ensure_loaded(self, worker: _Worker) -> None:
        if not worker.ready:
            await worker.receive(time.monotonic() + STARTUP_TIMEOUT)
            worker.ready = True
        wanted: list[_Script] = []
        if worker.loaded_version is None and self._good is not None:
            wanted.append(self._good)
        if self._pending is not None:
            wanted.append(self._pending)
            self._pending = None
        for script in wanted:
            worker.send(("load", script.source, script.chunkname, self.timeout))
            reply = await worker.receive(time.monotonic() + self.hard_timeout)
            self._load_into(worker, script, reply, sync=False)

    async def _call(self, function: str, queue_id: str, message: tuple[object, ...]
                    ) -> tuple[object, ...] | None:
        """One call; its values on success, None after logging a script_error.

        Calls made while others are with the worker wait and go together in the next
        round (see _call_many), so concurrent deliveries asking ServerDetails share
        round trips instead of queueing one by one behind a lock.
        """
        done: asyncio.Future[tuple[object, ...] | None] = (
            asyncio.get_running_loop().create_future())
        self._queued_calls.append((function, queue_id, message, done))
        if self._caller is None or self._caller.done():
            self._caller = asyncio.get_running_loop().create_task(self._send_queued())
        return await done

    async def _send_queued(self) -> None:
        while self._queued_calls:
            batch, self._queued_calls = self._queued_calls, []
            try:
                results = await self._call_many([(f, q, m) for f, q, m, _ in batch])
            except Exception as exc:
                # Not the script's fault (a bug, a broken pipe we did not foresee):
                # every caller still gets its defaults, none waits forever.
                self._kill_worker()
                for function, queue_id, _, _ in batch:
                    event(SCRIPT_ERROR, queue_id, function=function,
                          error=f"policy worker failed: {exc!r}")
                results = [None] * len(batch)
            for (_, _, _, done), values in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(values)

    async def _call_many(self, calls: Sequence[tuple[str, str, tuple[object, ...]]]
                         ) -> list[tuple[object, ...] | None]:
        """Send calls in chunks, read the replies in order; None where a call failed.

        The worker answers one call at a time, so each reply's deadline runs from the
        previous reply: a call queued behind others is not charged for their time. A
        chunk is small enough that the requests never fill the socket while the worker
        waits to send replies nobody reads yet.
        """
        results: list[tuple[object, ...] | None] = [None] * len(calls)
        async with self._lock:
            worker: _Worker | None = None
            answered = 0
            try:
                worker = self._spawn()
                await self._ensure_loaded(worker)
                if worker.loaded_version is None:
                    return results  # no version of the script could be loaded
                for start in range(0, len(calls), CALL_CHUNK):
                    chunk = calls[start : start + CALL_CHUNK]
                    for _, _, message in chunk:
                        worker.send(message)
                    for index in range(start, start + len(chunk)):
                        reply = await worker.receive(time.monotonic() + self.hard_timeout)
                        function, queue_id, _ = calls[index]
                        results[index] = self._interpret(function, queue_id, worker, reply)
                        answered = index + 1
            except (WorkerStuck, WorkerGone) as exc:
                self._kill_worker()
                for function, queue_id, _ in calls[answered:]:
                    event(SCRIPT_ERROR, queue_id, function=function,
                          error=_worker_problem(exc, self))
        return results

    def _interpret(self, function: str, queue_id: str, worker: _Worker, reply: object
                   ) -> tuple[object, ...] | None:
        """A reply's values on success; None after logging its script_error."""
        assert isinstance(reply, tuple)
        _, values, prints = reply
        self._log_prints(queue_id, prints)
        if values[0] == b"ok":
            return tuple(values)
        status = text_value(values[0])
        if status == "missing":
            # VPOP3 scripts often define only CheckFile: say so once per version, not
            # once per message.
            key = (worker.loaded_version or 0, function)
            if key in self._missing_functions:
                return None
            self._missing_functions.add(key)
        event(SCRIPT_ERROR, queue_id, function=function, error=_status_message(
            function, status, values[1] if len(values) > 1 else None, self.timeout))
        return None

    def _known_missing(self, function: str) -> bool:
        """The running script version has no such function: no need to ask the worker.

        Many VPOP3 scripts define only CheckFile; their ServerDetails then costs nothing
        per message. A new version (reload) is asked again.
        """
        good = self._good
        return (good is not None and self._pending is None
                and (good.version, function) in self._missing_functions)

    def _log_prints(self, queue_id: str | None, prints: Sequence[str]) -> None:
        for line in prints:
            event("script_log", queue_id, message=line)

    @staticmethod
    def _log_faults(function: str, queue_id: str, faults: Sequence[Fault]) -> None:
        for name, problem in faults:
            event(SCRIPT_ERROR, queue_id, function=function,
                  error=f"{name}: {problem}")


def _check_message(request: CheckFileRequest, timeout: float) -> tuple[object, ...]:
    header_block, _ = split_header(request.data)
    return (
        "check", timeout, request.filename.encode(), request.size,
        lua_time(request.creation_time).encode(), request.retries,
        lua_time(request.last_try_time).encode(), request.return_path.encode(),
        "\n".join(request.recipients).encode(), header_block,
    )


def _status_message(function: str, status: str, detail: object, timeout: float) -> str:
    if status == "missing":
        return f"the script defines no function {function}"
    if status == "nil":
        return f"{function} returned nil"
    if status == "type":
        return f"{function} returned a {text_value(detail)}, not the Actions table"
    if status == "timeout":
        return f"{function} did not finish within {timeout:g}s"
    return text_value(detail) if detail is not None else f"{function} failed"


def _worker_problem(exc: Exception, policy: Policy) -> str:
    if isinstance(exc, WorkerStuck):
        return (f"no answer within {policy.hard_timeout:g}s (stuck in a C function such as"
                " a string pattern); the script worker was killed and will be restarted")
    return f"the script worker died ({exc}); it will be restarted"
