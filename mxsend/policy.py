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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mxsend.actions import FileActions, ServerActions, ServerParameters
from mxsend.config import Config
from mxsend.hostname import helo_name
from mxsend.log import event, get_logger
from mxsend.luasandbox import read_script
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
from mxsend.script_calls import Script, ScriptCalls
from mxsend.watch import Watcher

__all__ = ["CheckFileRequest", "Policy", "lua_time"]

# A call that outlives script.timeout by this much is stuck in C (the Lua hook would
# have fired): the worker is killed. At least half a second so a busy machine's
# scheduling noise does not kill a worker that was about to answer.
MIN_GRACE = 0.5
# Editors write a file in several steps; reload once things settle.
RELOAD_SETTLE = 0.1

SCRIPT_ERROR = "script_error"
CHECKFILE = "CheckFile"
SERVERDETAILS = "ServerDetails"
LOAD = "load"
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


class Policy:
    """The operator's mxout.lua, as the daemon uses it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.script.path
        self.timeout = config.script.timeout
        self.hard_timeout = config.script.timeout + max(MIN_GRACE, config.script.timeout)
        self._defaults = ServerActions(helo_name=helo_name(config.smtp.helo_name))
        self._defaults_lua: tuple[ServerActions, tuple[object, ...]] | None = None
        self._file_defaults_lua = file_actions_to_lua(FileActions())
        self._server_results: dict[tuple[ServerActions, tuple[object, ...]],
                                   tuple[ServerActions, list[Fault]]] = {}
        self._calls = ScriptCalls(config.script.memory, self.timeout, self.hard_timeout)
        self._version = 0
        self._missing_logged = False
        self._watching: tuple[Watcher, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_handle: asyncio.TimerHandle | None = None
        self._reloading: asyncio.Task[bool] | None = None
        self._closed = False
        self.reads = 0  # times the script file was read, for tests
        # Read and compile only: nothing of the script runs here, and the worker starts
        # (and runs the script's top level) at the first call, awaited on the loop.
        self._take(*self._read())

    # -- public --------------------------------------------------------------------------

    @property
    def has_script(self) -> bool:
        return self._calls.has_script

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
            self._calls.call(CHECKFILE, request.queue_id, self._check_message(request))
            for request in requests))
        actions_list = []
        for request, values in zip(requests, results, strict=True):
            if values is None:
                actions_list.append(FileActions())
                continue
            actions, faults = check_file_reply(values)
            self._log_faults(CHECKFILE, request.queue_id, faults)
            actions_list.append(actions)
        return actions_list

    async def server_details(
        self, queue_id: str, params: ServerParameters, header_lines: Sequence[str],
        preset: Callable[[ServerActions], ServerActions] | None = None,
    ) -> ServerActions:
        """ServerDetails; `preset` turns the defaults into what the TLS policy demands."""
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
        values = await self._calls.call(SERVERDETAILS, queue_id, message)
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

    def reconfigure(self, config: Config) -> None:
        """SIGHUP with the same script path: new timeouts and defaults, then reload().

        The HELO default comes from smtp.helo_name and the limits from [script]; a new
        memory cap needs a new worker, which the next call starts with the good script.
        """
        memory_changed = config.script.memory != self.config.script.memory
        self.config = config
        self.timeout = config.script.timeout
        self.hard_timeout = config.script.timeout + max(MIN_GRACE, config.script.timeout)
        self._defaults = ServerActions(helo_name=helo_name(config.smtp.helo_name))
        self._calls.timeout, self._calls.hard_timeout = self.timeout, self.hard_timeout
        self._calls.memory = config.script.memory
        if memory_changed:
            self._calls.kill_worker()
        self.reload()

    def reload(self) -> None:
        """SIGHUP or a changed file: load() in the background; returns at once.

        Reading, compiling and running the new version's top level all happen off the
        caller's path (a thread, then the worker), so a slow or stuck script never
        holds up the event loop.
        """
        if self._closed:
            return
        if self._reloading is not None and not self._reloading.done():
            self._reloading.add_done_callback(lambda _: self.reload())
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_logged())

    async def load(self) -> bool:
        """Re-read the script and run its top level in the worker; True if a new version
        is active. A version that does not compile, or whose top level fails, is a
        script_error (function="load") and the previous one stays.
        """
        source, error = await asyncio.to_thread(self._read)
        self._take(source, error)
        # Nothing pending (unchanged, absent or broken): the version in use stays.
        return await self._calls.load()

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
        if self._reloading is not None:
            self._reloading.cancel()
        self._calls.kill_worker()

    # -- reading the script ----------------------------------------------------------------

    def _read(self) -> tuple[bytes | None, str | None]:
        """(source, compile error) of the file as it is now (read_script)."""
        self.reads += 1
        source, error = read_script(self.path)
        if source is None and error is None and not self.path.exists() \
                and not self.has_script and not self._missing_logged:
            get_logger().warning("script %s not found: using the built-in defaults",
                                 self.path)
            self._missing_logged = True
        return source, error

    def _take(self, source: bytes | None, error: str | None) -> None:
        """Make a freshly read version pending if it is new and compiles."""
        if error is not None:
            event(SCRIPT_ERROR, None, function=LOAD, error=error, level=logging.ERROR)
            return
        if source is None:
            # Missing: an editor replacing the file by rename leaves it missing for a
            # moment; the version in use stays.
            return
        if self._calls.newest_source() == source:
            return
        self._version += 1
        self._calls.offer(Script(self.path, source, self._version))
        self._missing_logged = False

    async def _reload_logged(self) -> bool:
        loaded = await self.load()
        if loaded:
            get_logger().info("script %s reloaded (version %d)", self.path, self._version)
        return loaded

    def _file_changed(self) -> None:
        if self._closed or self._loop is None:
            return
        # Editors write in several steps; reload once things settle.
        if self._reload_handle is not None:
            self._reload_handle.cancel()
        self._reload_handle = self._loop.call_later(RELOAD_SETTLE, self._reload_now)

    def _reload_now(self) -> None:
        self._reload_handle = None
        self.reload()

    # -- requests ------------------------------------------------------------------------

    def _check_message(self, request: CheckFileRequest) -> tuple[object, ...]:
        return (
            "check", self.timeout, request.filename.encode(), request.size,
            lua_time(request.creation_time).encode(), request.retries,
            lua_time(request.last_try_time).encode(), request.return_path.encode(),
            "\n".join(request.recipients).encode(), script_header(request.data),
            self._file_defaults_lua,
        )

    def _defaults_to_lua(self, defaults: ServerActions) -> tuple[object, ...]:
        if self._defaults_lua is None or self._defaults_lua[0] is not defaults:
            self._defaults_lua = (defaults, server_actions_to_lua(defaults))
        return self._defaults_lua[1]

    @staticmethod
    def _log_faults(function: str, queue_id: str, faults: Sequence[Fault]) -> None:
        for name, problem in faults:
            event(SCRIPT_ERROR, queue_id, function=function, error=f"{name}: {problem}")
