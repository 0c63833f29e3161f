"""The script's calls: one worker at a time, calls batched per round trip (contract §4).

Policy (policy.py) decides what to ask and reads the answers; this class gets the
questions to the worker and the answers back. It keeps the versions of the script (the
one the worker runs and the one waiting to be loaded), the worker process
(policy_worker.Worker), and the rules for a worker that fails:

* A call that is not answered within its deadline means the worker is stuck in C: it
  is killed, the call and those behind it in its round get None (their defaults),
  each with a `script_error`, and the next call starts a fresh worker.
* A message whose calls got the worker killed MAX_STUCK_PER_MESSAGE times is not given
  to the script again until a new version loads (docs/policy.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mxsend.log import event
from mxsend.luavalues import field_names, text_value
from mxsend.policy_worker import Worker, WorkerGone, WorkerStuck

# Calls sent to the worker before reading replies (see ScriptCalls._call_many).
CALL_CHUNK = 16
# Each hang that the Lua hook cannot stop costs a worker restart; a message that
# caused this many is answered with defaults until the script changes.
MAX_STUCK_PER_MESSAGE = 2
STUCK_MEMORY = 10_000  # queue ids remembered for that, oldest forgotten first

SCRIPT_ERROR = "script_error"
LOAD = "load"

Call = tuple[str, str, tuple[object, ...]]  # (function, queue id, request)
Values = tuple[object, ...]
_Queued = tuple[Call, "asyncio.Future[Values | None]"]


@dataclass(frozen=True, slots=True)
class Script:
    """One version of the script's source."""

    path: Path
    source: bytes
    version: int

    @property
    def chunkname(self) -> str:
        # "@path" makes Lua name the file in messages: "/etc/mxout.lua:3: ...".
        return f"@{self.path}"


class ScriptCalls:
    """The worker that runs the script, and the calls waiting for it."""

    def __init__(self, memory: int, timeout: float, hard_timeout: float, *,
                 globals_: tuple[int, bytes] = (0, b""),
                 functions: Sequence[str] = (), optional: frozenset[str] = frozenset()
                 ) -> None:
        self.memory = memory
        # ConnectionId / ConnectionName (contract §9), set before each version loads.
        self.globals = globals_
        # The functions the daemon may call; the worker says which a version defines.
        self._functions = b",".join(name.encode() for name in functions)
        # Hooks a script need not define (VPOP3 8.8's): missing is silent, not an error.
        self._optional = optional
        self._defined: dict[int, frozenset[str]] = {}
        self.timeout = timeout  # script.timeout, told to the Lua hook
        self.hard_timeout = hard_timeout  # past this the worker is stuck in C
        self._good: Script | None = None  # the version the worker runs
        self._pending: Script | None = None  # compiled, not yet run in a worker
        self._worker: Worker | None = None
        self._lock = asyncio.Lock()
        # Calls waiting for the worker: new mail's first (see call()), then the rest.
        self._queued_calls: tuple[list[_Queued], list[_Queued]] = ([], [])
        self._caller: asyncio.Task[None] | None = None
        self._missing_functions: set[tuple[int, str]] = set()
        self._stuck: OrderedDict[str, int] = OrderedDict()  # queue id -> worker kills

    @property
    def has_script(self) -> bool:
        return self._good is not None or self._pending is not None

    @property
    def worker(self) -> Worker | None:
        return self._worker

    def newest_source(self) -> bytes | None:
        current = self._pending or self._good
        return current.source if current is not None else None

    def offer(self, script: Script) -> None:
        """A new version: loaded into the worker before the next call (or by load())."""
        self._pending = script
        self._stuck.clear()  # a new version may not hang where the old one did

    async def load(self) -> bool:
        """Load the pending version into the worker now; True if it is active."""
        pending = self._pending
        if pending is None:
            return False
        async with self._lock:
            try:
                await self._ready_worker()
            except (WorkerStuck, WorkerGone) as exc:
                self.kill_worker()
                event(SCRIPT_ERROR, None, function=LOAD, error=self._worker_problem(exc))
                return False
        return self._good is pending

    def kill_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    def _spawn(self) -> Worker:
        if self._worker is None:
            self._worker = Worker(self.memory)
        return self._worker

    async def _ready_worker(self) -> Worker:
        """The worker, started and running the newest version that loads (lock held)."""
        worker = self._spawn()
        await worker.start()
        wanted: list[Script] = []
        if worker.loaded_version is None and self._good is not None:
            wanted.append(self._good)
        if self._pending is not None:
            wanted.append(self._pending)
            self._pending = None
        for script in wanted:
            await worker.send(("load", script.source, script.chunkname, self.timeout,
                               field_names(), self.globals, self._functions),
                              self.hard_timeout)
            reply = await worker.receive(self.hard_timeout)
            self._loaded(worker, script, reply)
        return worker

    def _loaded(self, worker: Worker, script: Script, reply: object) -> None:
        """Handle the worker's answer to loading `script`."""
        assert isinstance(reply, tuple)
        _, error, prints, defined = reply
        self._log_prints(None, prints)
        if error is None:
            self._defined = {script.version: frozenset(
                name for name in text_value(defined).split(",") if name)}
        if error is not None:
            event(SCRIPT_ERROR, None, function=LOAD, error=error, level=logging.ERROR)
            if worker.loaded_version is None and self._good is script:
                self._good = None
            return
        worker.loaded_version = script.version
        self._good = script

    async def call(self, function: str, queue_id: str, message: Values, *,
                   urgent: bool = False) -> Values | None:
        """One call; its values on success, None after logging a script_error.

        Calls made while others are with the worker wait and go together in the next
        round of up to CALL_CHUNK (see _call_many), so concurrent deliveries asking
        ServerDetails share round trips instead of queueing one by one behind a lock.
        `urgent` calls (new mail's) go first in the next round: during a retry sweep of
        a big queue the worker has hundreds of the sweep's calls waiting, and new mail
        waited for all of them (issue 16 item 7).
        """
        if self._stuck.get(queue_id, 0) >= MAX_STUCK_PER_MESSAGE:
            event(SCRIPT_ERROR, queue_id, function=function, error=(
                f"the script hung {MAX_STUCK_PER_MESSAGE} times on this message; it is not"
                " asked about it again until the script changes; using the defaults"))
            return None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[object, ...] | None] = loop.create_future()
        self._queued_calls[0 if urgent else 1].append(((function, queue_id, message), done))
        if self._caller is None or self._caller.done():
            self._caller = loop.create_task(self._send_queued())
        return await done

    def _next_round(self) -> list[_Queued]:
        """Up to CALL_CHUNK waiting calls, urgent ones first."""
        batch: list[_Queued] = []
        for queued in self._queued_calls:
            taken = queued[:CALL_CHUNK - len(batch)]
            del queued[:len(taken)]
            batch += taken
        return batch

    async def _send_queued(self) -> None:
        while any(self._queued_calls):
            batch = self._next_round()
            calls = [call for call, _ in batch]
            try:
                results = await self._call_many(calls)
            except Exception as exc:
                # Not the script's fault (a bug, a broken pipe we did not foresee):
                # every caller still gets its defaults, none waits forever.
                self.kill_worker()
                for function, queue_id, _ in calls:
                    event(SCRIPT_ERROR, queue_id, function=function,
                          error=f"policy worker failed: {exc!r}")
                results = [None] * len(batch)
            for (_, done), values in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(values)

    async def _call_many(self, calls: Sequence[Call]) -> list[tuple[object, ...] | None]:
        """Send calls in chunks, read the replies in order; None where a call failed.

        The worker answers one call at a time, so each reply's deadline runs from the
        previous reply: a call queued behind others is not charged for their time. A
        chunk is small enough that its requests (headers capped at 100 KB each) fit the
        worker's pace; a send that finds no room waits on the loop with a deadline.
        """
        results: list[tuple[object, ...] | None] = [None] * len(calls)
        async with self._lock:
            answered = 0
            try:
                worker = await self._ready_worker()
                if worker.loaded_version is None:
                    return results  # no version of the script could be loaded
                for start in range(0, len(calls), CALL_CHUNK):
                    chunk = calls[start : start + CALL_CHUNK]
                    for _, _, message in chunk:
                        await worker.send(message, self.hard_timeout)
                    for index in range(start, start + len(chunk)):
                        reply = await worker.receive(self.hard_timeout)
                        function, queue_id, _ = calls[index]
                        results[index] = self._interpret(function, queue_id, worker, reply)
                        answered = index + 1
            except (WorkerStuck, WorkerGone) as exc:
                self.kill_worker()
                if answered < len(calls) and isinstance(exc, WorkerStuck):
                    self._count_stuck(calls[answered][1])
                for function, queue_id, _ in calls[answered:]:
                    event(SCRIPT_ERROR, queue_id, function=function,
                          error=self._worker_problem(exc))
        return results

    def _count_stuck(self, queue_id: str) -> None:
        """The call for `queue_id` was in progress when the worker had to be killed."""
        self._stuck[queue_id] = self._stuck.pop(queue_id, 0) + 1
        while len(self._stuck) > STUCK_MEMORY:
            self._stuck.popitem(last=False)

    def _interpret(self, function: str, queue_id: str, worker: Worker, reply: object
                   ) -> tuple[object, ...] | None:
        """A reply's values on success; None after logging its script_error."""
        assert isinstance(reply, tuple)
        _, values, prints = reply
        self._log_prints(queue_id, prints)
        if values[0] == b"ok":
            return tuple(values)
        status = text_value(values[0])
        if status == "missing" and function in self._optional:
            return None  # contract §9: a script without the hook is no error
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

    def defines(self, function: str) -> bool:
        """Whether the script may define `function`: False only when the running
        version is known not to (told at load), so that an optional hook it lacks
        costs no round trip. A version not yet loaded may define anything."""
        good = self._good
        if self._pending is not None:
            return True
        if good is None:
            return False
        defined = self._defined.get(good.version)
        return defined is None or function in defined

    def known_missing(self, function: str) -> bool:
        """The running script version has no such function: no need to ask the worker.

        Many VPOP3 scripts define only CheckFile; their ServerDetails then costs nothing
        per message. A new version (reload) is asked again.
        """
        good = self._good
        return (good is not None and self._pending is None
                and (good.version, function) in self._missing_functions)

    def _worker_problem(self, exc: Exception) -> str:
        if isinstance(exc, WorkerStuck):
            return (f"no answer within {self.hard_timeout:g}s (stuck in a C function such"
                    " as a string pattern); the script worker was killed and will be"
                    " restarted")
        return f"the script worker died ({exc}); it will be restarted"

    def _log_prints(self, queue_id: str | None, prints: Sequence[str]) -> None:
        for line in prints:
            event("script_log", queue_id, message=line)


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
