"""The VPOP3-compatible delivery policy: CheckFile and ServerDetails (contract §4).

The operator's `mxout.lua` runs in a worker process (luasandbox.py, Lua 5.2 through
lupa) so that a call stuck in C can be abandoned by killing the worker; see
docs/policy.md for that decision and its measured cost. This module is the daemon's
side: it builds each call's request, hands it to script_calls.py (batching, the
worker and its failures; policy_worker.py is the async channel with a deadline on
every send and receive), reads the script's Actions back through luavalues.py, and
reloads the script when it changes.

Faults never cost mail: a missing function, a nil or wrongly typed return, a runtime
error, a timeout, memory exhaustion or a dead worker is one `script_error` event and the
Actions as passed in. A bad single field is one `script_error` and a value that never
weakens what the script asked for (luavalues.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from mxsend.actions import FileActions, ServerActions, ServerParameters
from mxsend.config import Config
from mxsend.envelope import Message
from mxsend.hooks import BadReturnPath, full_response, lua_list, replacement, return_path
from mxsend.hostname import helo_name
from mxsend.log import event
from mxsend.luavalues import (
    Fault,
    check_file_reply,
    file_actions_to_lua,
    lua_time,
    script_header,
    script_header_lines,
    server_actions_to_lua,
    server_details_reply,
)
from mxsend.script_file import LOAD, SCRIPT_ERROR, ScriptFile
from mxsend.server_rules import ServerRules, hook_results
from mxsend.watch import Watcher

__all__ = ["LOAD", "CheckFileRequest", "Policy", "ReturnPathRequest", "lua_time",
           "return_path_request"]

CHECKFILE = "CheckFile"
SERVERDETAILS = "ServerDetails"
RETURNCODEHANDLER = "ReturnCodeHandler"
MODIFYRETURNPATH = "ModifyReturnPath"
# VPOP3 8.8's hooks are optional: a script without them is no error (contract §9).
OPTIONAL_HOOKS = frozenset({RETURNCODEHANDLER, MODIFYRETURNPATH})
MXOUT_FUNCTIONS = (CHECKFILE, SERVERDETAILS, RETURNCODEHANDLER, MODIFYRETURNPATH)
# Distinct ServerDetails answers remembered, already read back into ServerActions.
RESULT_CACHE_SIZE = 1024


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
    dkim_domain: str = ""  # Actions.DKIMDomain in: Signer.dkim_domain(header) (contract §7)


@dataclass(frozen=True, slots=True)
class ReturnPathRequest:
    """What ModifyReturnPath is told about one transaction (contract §9)."""

    computed: str  # the sender after returnAddressModifier ("" for <>)
    mail_from: str  # the envelope sender as queued
    original: str  # the sender the message was accepted with (the same in mxsend)
    auth: str  # AUTH= of the envelope, "" if none
    recipients: tuple[str, ...]  # this transaction's recipients
    created: float  # epoch seconds -> CreationTime YYYYMMDDHHMMSS
    data: bytes  # the message; its header becomes Headers (the header's lines)
    sender_ip: str  # "": mxsend does not know who submitted the message
    subject: str
    all_recipients: tuple[str, ...]  # every recipient of the message


def return_path_request(message: Message, recipients: Sequence[str], computed: str,
                        created: float) -> ReturnPathRequest:
    """ModifyReturnPath's arguments for one transaction of `message` to `recipients`.

    The daemon (delivery.py) and `check-script` build it the same way, so what the
    operator sees is what the daemon asks.
    """
    env = message.envelope
    header = message.data.split(b"\r\n\r\n", 1)[0]
    subject = ""
    for line in header.split(b"\r\n"):
        if line[:8].lower() == b"subject:":
            subject = line[8:].strip().decode("utf-8", errors="replace")
            break
    return ReturnPathRequest(
        computed=computed, mail_from=env.sender, original=env.sender, auth=env.auth or "",
        recipients=tuple(recipients), created=created, data=message.data, sender_ip="",
        subject=subject, all_recipients=tuple(r.address for r in env.recipients))


def _lua_text(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


class Policy(ScriptFile):
    """The operator's mxout.lua, as the daemon uses it (and its mxserverrules.lua)."""

    def __init__(self, config: Config) -> None:
        self._defaults = ServerActions(helo_name=helo_name(config.smtp.helo_name))
        self._defaults_lua: tuple[ServerActions, tuple[object, ...]] | None = None
        self._file_defaults_lua = file_actions_to_lua(FileActions())
        self._server_results: dict[tuple[ServerActions, tuple[object, ...]],
                                   tuple[ServerActions, list[Fault]]] = {}
        super().__init__(config, config.script.path, functions=MXOUT_FUNCTIONS,
                         optional=OPTIONAL_HOOKS, log_missing=True)
        # Contract §9: the second script, in its own sandbox and worker.
        self.rules: ServerRules | None = ServerRules.of(config)

    # -- public --------------------------------------------------------------------------

    def default_server_actions(self) -> ServerActions:
        """The Actions ServerDetails is given: HELOname = smtp.helo_name or the FQDN."""
        return self._defaults

    async def check_file(self, request: CheckFileRequest,
                         dkim_domains: frozenset[str] = frozenset()) -> FileActions:
        [actions] = await self.check_files([request], dkim_domains)
        return actions

    async def check_files(self, requests: Sequence[CheckFileRequest],
                          dkim_domains: frozenset[str] = frozenset(),
                          urgent: Container[str] = ()) -> list[FileActions]:
        """CheckFile for many messages: sent to the worker together, answered in order.

        One round trip for a batch instead of one per message: the scan loop asks for
        every message it is about to queue at once (contract §4 semantics unchanged,
        each call is its own CheckFile with its own timeout and faults). `dkim_domains`:
        the domains a DKIMDomain out may name (`Signer.domains`); `urgent`: the queue
        ids whose calls go first (new mail's, script_calls.ScriptCalls.call).
        """
        if not self.has_script:
            return [FileActions(dkim_domain=r.dkim_domain) for r in requests]
        results = await asyncio.gather(*(
            self._calls.call(CHECKFILE, request.queue_id, self._check_message(request),
                             urgent=request.queue_id in urgent)
            for request in requests))
        actions_list = []
        for request, values in zip(requests, results, strict=True):
            given = FileActions(dkim_domain=request.dkim_domain)
            if values is None:
                actions_list.append(given)
                continue
            actions, faults = check_file_reply(values, given, dkim_domains)
            self._log_faults(CHECKFILE, request.queue_id, faults)
            actions_list.append(actions)
        return actions_list

    async def server_details(
        self, queue_id: str, params: ServerParameters, header_lines: Sequence[str],
        preset: Callable[[ServerActions], ServerActions] | None = None, *,
        urgent: bool = False,
    ) -> ServerActions:
        """ServerDetails; `preset` turns the defaults into what the TLS policy demands;
        `urgent`: new mail's, its call goes first."""
        defaults = self._defaults if preset is None else preset(self._defaults)
        if not self.has_script or self._calls.known_missing(SERVERDETAILS):
            return defaults
        message = (
            "server", self.timeout, params.authsender.encode(), params.originator.encode(),
            params.server.encode(), params.domain.encode(), params.length, params.connid,
            params.connection.encode(), params.tlspolicy.encode(),
            "\r\n".join(script_header_lines(header_lines)).encode(
                "utf-8", errors="surrogateescape"),
            self._defaults_to_lua(defaults),
        )
        values = await self._calls.call(SERVERDETAILS, queue_id, message, urgent=urgent)
        if values is None:
            return defaults
        # A script answers the same few Actions over and over (per server, per size
        # class): reading them back field by field each time was most of this call's
        # cost. The faults are logged per call all the same, as each call is its own.
        key = (defaults, values)
        try:
            actions, faults = self._server_results[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value, read it afresh
            actions, faults = server_details_reply(values, defaults)
            if len(self._server_results) >= RESULT_CACHE_SIZE:
                self._server_results.clear()
            with contextlib.suppress(TypeError):
                self._server_results[key] = (actions, faults)
        self._log_faults(SERVERDETAILS, queue_id, faults)
        return actions

    # -- VPOP3 8.8 hooks (contract §9; meanings in hooks.py) ------------------------------

    @property
    def has_reply_hook(self) -> bool:
        """The script (may) define ReturnCodeHandler; without it, no call per reply."""
        return self.defines(RETURNCODEHANDLER)

    async def return_code(self, queue_id: str, command: str, code: int, text: str
                          ) -> tuple[int, str] | None:
        """ReturnCodeHandler: the replacement (code, text), or None to keep the reply."""
        if not self.has_reply_hook:
            return None
        full, last = full_response(code, text)
        values = await self._calls.call(RETURNCODEHANDLER, queue_id, (
            "reply", self.timeout, command.encode(), _lua_text(full), _lua_text(last)))
        if values is None:
            return None
        return replacement(hook_results(values)[0])

    async def modify_return_path(self, queue_id: str, request: ReturnPathRequest
                                 ) -> str | None:
        """ModifyReturnPath: the new envelope sender, or None to keep the computed one.

        An answer that is not a valid address is a script_error and None (hooks.py).
        """
        if not self.defines(MODIFYRETURNPATH):
            return None
        values = await self._calls.call(MODIFYRETURNPATH, queue_id, (
            "returnpath", self.timeout, _lua_text(request.computed),
            _lua_text(request.mail_from), _lua_text(request.original),
            _lua_text(request.auth), lua_list(request.recipients),
            lua_time(request.created).encode(), script_header(request.data),
            len(request.data), _lua_text(request.sender_ip), _lua_text(request.subject),
            lua_list(request.all_recipients)))
        if values is None:
            return None
        result = hook_results(values)[0]
        try:
            return return_path(result)
        except BadReturnPath as exc:
            event(SCRIPT_ERROR, queue_id, function=MODIFYRETURNPATH,
                  error=f"{exc}; using {request.computed or '<>'}")
            return None

    # -- lifecycle: both scripts together ----------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """SIGHUP with the same script path: new timeouts and defaults, then reload().

        The HELO default comes from smtp.helo_name and the limits from [script]; a new
        memory cap needs a new worker, which the next call starts with the good script.
        """
        self._reconfigure(config)
        self._defaults = ServerActions(helo_name=helo_name(config.smtp.helo_name))
        rules = self.rules
        if rules is not None and rules.path == config.script.server_rules_path:
            rules._reconfigure(config)
        else:
            if rules is not None:
                rules.close()
            self.rules = ServerRules.of(config)
            if self.rules is not None and self._watching is not None:
                self.rules.watch(self._watching[0])
        self.reload()

    def reload(self) -> None:
        super().reload()
        if self.rules is not None:
            self.rules.reload()

    def watch(self, watcher: Watcher) -> None:
        super().watch(watcher)
        if self.rules is not None:
            self.rules.watch(watcher)

    def stop_watching(self) -> None:
        super().stop_watching()
        if getattr(self, "rules", None) is not None:
            assert self.rules is not None
            self.rules.stop_watching()

    def close(self) -> None:
        super().close()
        if self.rules is not None:
            self.rules.close()

    # -- requests ------------------------------------------------------------------------

    def _check_message(self, request: CheckFileRequest) -> tuple[object, ...]:
        return (
            "check", self.timeout, request.filename.encode(), request.size,
            lua_time(request.creation_time).encode(), request.retries,
            lua_time(request.last_try_time).encode(), request.return_path.encode(),
            "\n".join(request.recipients).encode(), script_header(request.data),
            file_actions_to_lua(FileActions(dkim_domain=request.dkim_domain))
            if request.dkim_domain else self._file_defaults_lua,
        )

    def _defaults_to_lua(self, defaults: ServerActions) -> tuple[object, ...]:
        if self._defaults_lua is None or self._defaults_lua[0] is not defaults:
            self._defaults_lua = (defaults, server_actions_to_lua(defaults))
        return self._defaults_lua[1]

    @staticmethod
    def _log_faults(function: str, queue_id: str, faults: Sequence[Fault]) -> None:
        ScriptFile.log_faults(function, queue_id, faults)
