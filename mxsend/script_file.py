"""One Lua script file as the daemon keeps it: read, compiled, reloaded when it changes.

Both of the operator's scripts live this way (contract §4, §9): `mxout.lua`
(policy.Policy) and `mxserverrules.lua` (server_rules.ServerRules). Each has its own
worker process and sandbox (script_calls.ScriptCalls), the same limits
(`script.timeout`, `script.memory`), the same globals (`ConnectionId`,
`ConnectionName`), and reloads through the daemon's one watch.Watcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from mxsend.config import Config
from mxsend.log import event, get_logger
from mxsend.luasandbox import read_script
from mxsend.script_calls import Script, ScriptCalls, Values
from mxsend.watch import Watcher

# A call that outlives script.timeout by this much is stuck in C (the Lua hook would
# have fired): the worker is killed. At least half a second so a busy machine's
# scheduling noise does not kill a worker that was about to answer.
MIN_GRACE = 0.5
# Editors write a file in several steps; reload once things settle.
RELOAD_SETTLE = 0.1

SCRIPT_ERROR = "script_error"
LOAD = "load"


def hard_timeout(timeout: float) -> float:
    return timeout + max(MIN_GRACE, timeout)


def script_globals(config: Config) -> tuple[int, bytes]:
    """ConnectionId and ConnectionName (contract §9), as the worker is given them."""
    return (config.script.connection_id,
            config.script.connection_name.encode("utf-8", errors="surrogateescape"))


class ScriptFile:
    """A script at `path`, its versions, its worker, and its reloads."""

    def __init__(self, config: Config, path: Path, *, functions: Sequence[str],
                 optional: frozenset[str], log_missing: bool) -> None:
        self.config = config
        self.path = path
        self.timeout = config.script.timeout
        self.hard_timeout = hard_timeout(config.script.timeout)
        self._calls = ScriptCalls(config.script.memory, self.timeout, self.hard_timeout,
                                  globals_=script_globals(config), functions=functions,
                                  optional=optional)
        self._log_missing = log_missing
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

    @property
    def has_script(self) -> bool:
        return self._calls.has_script

    def defines(self, function: str) -> bool:
        """False when the script is known not to define `function` (no call needed)."""
        return self._calls.has_script and self._calls.defines(function)

    async def call(self, function: str, queue_id: str, message: Values) -> Values | None:
        return await self._calls.call(function, queue_id, message)

    def _reconfigure(self, config: Config) -> None:
        """New limits and globals; a new memory cap or new globals need a new worker."""
        restart = (config.script.memory != self.config.script.memory
                   or script_globals(config) != self._calls.globals)
        self.config = config
        self.timeout = config.script.timeout
        self.hard_timeout = hard_timeout(config.script.timeout)
        self._calls.timeout, self._calls.hard_timeout = self.timeout, self.hard_timeout
        self._calls.memory = config.script.memory
        self._calls.globals = script_globals(config)
        if restart:
            self._calls.kill_worker()

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
        if source is None and error is None and self._log_missing \
                and not self.path.exists() and not self.has_script \
                and not self._missing_logged:
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

    @staticmethod
    def log_faults(function: str, queue_id: str, faults: Sequence[tuple[str, str]]) -> None:
        for name, problem in faults:
            event(SCRIPT_ERROR, queue_id, function=function, error=f"{name}: {problem}")
