"""`queue.processes > 1`: several daemon processes on one spool, under one supervisor.

The spool is built for processes that share it (claims are renames; a dead process's
claims are recovered), so using a second core is a matter of starting a second
daemon. The supervisor is what systemd or a container runtime sees: it starts the
daemons with an equal share of the connection limits, says READY=1 once all of them
are, forwards SIGTERM, SIGINT and SIGHUP, restarts a daemon that dies (not too often),
and exits when they have all exited.

systemd's watchdog (WatchdogSec=) hears WATCHDOG=1 from the supervisor only while every
daemon's heartbeat is fresh: a daemon whose loop is wedged or stopped stops beating,
the pings stop, and systemd restarts the service. The daemons beat at the watchdog's
ping interval (they inherit WATCHDOG_USEC, not the socket).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mxsend import heartbeat, sdnotify, summary
from mxsend.config import Config
from mxsend.log import get_logger

log = get_logger()

CHILD_ENV = "MXSEND_CHILD"  # "i/n": this process is daemon i of n
READY_TIMEOUT = 60.0
# A daemon that dies is restarted after this long; one that dies again within
# RESTART_WINDOW of its start counts against RESTART_LIMIT, after which the
# supervisor gives up and stops the rest (systemd's Restart= takes over).
RESTART_DELAY = 1.0
RESTART_WINDOW = 60.0
RESTART_LIMIT = 5


def child_position(child: str) -> tuple[int, int]:
    """(i, n) from `CHILD_ENV`'s "i/n"; (0, 1) for anything malformed."""
    index, _, total = child.partition("/")
    if not (index.isdigit() and total.isdigit() and 0 <= int(index) < int(total)):
        return 0, 1
    return int(index), int(total)


def share(total: int, index: int, count: int) -> int:
    """Daemon `index` of `count`'s part of a limit: the parts add up to `total` exactly
    (the first `total % count` get one more), and none is below 1 (a daemon with no
    connection could deliver nothing, so more daemons than the limit exceed it)."""
    return max(1, total // count + (1 if index < total % count else 0))


def share_of(config: Config, child: str) -> Config:
    """The config of daemon i of n: its share of the smtp connection limits."""
    index, n = child_position(child)
    smtp = config.smtp
    return replace(config, smtp=replace(
        smtp,
        max_connections=share(smtp.max_connections, index, n),
        max_connections_per_domain=share(smtp.max_connections_per_domain, index, n),
    ))


@dataclass(slots=True)
class _Child:
    index: int
    process: asyncio.subprocess.Process
    started: float
    failures: int = 0


class Supervisor:
    def __init__(self, config: Config, *, once: bool) -> None:
        self.config = config
        self.once = once
        self.count = config.queue.processes
        self._stopping = asyncio.Event()
        self._children: dict[int, _Child] = {}
        self._beating = True
        # run --once: the read end of each daemon's summary pipe (summary.py).
        self._summaries: list[int] = []

    def _command(self) -> list[str]:
        source = self.config.source
        # Without a file the daemons read the same built-in defaults as we did.
        config = ["-c", str(Path(source).resolve())] if source is not None else []
        command = [sys.executable, "-m", "mxsend", *config, "run"]
        return [*command, "--once"] if self.once else command

    async def _start(self, index: int, failures: int = 0) -> bool:
        """Start daemon `index`; True once it reports ready, False if it died first."""
        read_end, write_end = os.pipe()
        # WATCHDOG_USEC stays: it sets the daemon's heartbeat interval. Without the
        # socket and WATCHDOG_PID, the daemon itself tells systemd nothing.
        env = {k: v for k, v in os.environ.items()
               if k not in (sdnotify.NOTIFY_ENV, "WATCHDOG_PID")}
        env[CHILD_ENV] = f"{index}/{self.count}"
        env[sdnotify.READY_FD_ENV] = str(write_end)
        passed = [write_end]
        if self.once:
            summary_read, summary_write = os.pipe()
            self._summaries.append(summary_read)
            env[summary.SUMMARY_FD_ENV] = str(summary_write)
            passed.append(summary_write)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(), env=env, pass_fds=passed, stdin=asyncio.subprocess.DEVNULL)
        finally:
            for fd in passed:
                os.close(fd)
        self._children[index] = _Child(index, process, time.monotonic(), failures)
        loop = asyncio.get_running_loop()
        try:
            # One byte when that daemon has scanned the spool; EOF if it died first.
            ready = await asyncio.wait_for(loop.run_in_executor(None, os.read, read_end, 1),
                                           READY_TIMEOUT)
        except TimeoutError:
            log.warning("daemon %d did not report ready in %.0fs", index, READY_TIMEOUT)
            return True  # slow, not dead: it is watched like the others from now on
        finally:
            os.close(read_end)
        return ready == b"R"

    def _signal_all(self, signum: int) -> None:
        for child in self._children.values():
            if child.process.returncode is None:
                child.process.send_signal(signum)

    def _stop(self, signum: int) -> None:
        self._stopping.set()
        self._signal_all(signum)

    async def run(self) -> int:
        started = time.monotonic()
        try:
            return await self._run()
        finally:
            if self.once:
                # Every daemon has exited (their lines are all out): the one summary, last.
                totals = summary.add(summary.read_report(fd) for fd in self._summaries)
                summary.log_summary(totals, time.monotonic() - started)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        started = await asyncio.gather(*(self._start(i) for i in range(self.count)))
        if not all(started) and not self._stopping.is_set():
            # A daemon that cannot even start (its own log line says why) will not do
            # better restarted: stop the others and fail, as a single daemon would.
            log.error("a daemon failed to start; stopping")
            self._stop(signal.SIGTERM)
            await asyncio.gather(*(c.process.wait() for c in self._children.values()))
            return 1
        sdnotify.notify("READY=1")
        log.info("mxsend supervisor: %d daemon processes on %s", self.count,
                 self.config.spool.path)
        watchdog = sdnotify.watchdog_interval()
        codes: dict[int, int] = {}
        while self._children:
            waits = {asyncio.ensure_future(c.process.wait()): c
                     for c in self._children.values()}
            done, pending = await asyncio.wait(waits, timeout=watchdog,
                                               return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            if watchdog is not None and self._all_beating(watchdog):
                sdnotify.notify("WATCHDOG=1")
            for waiter in done:
                child = waits[waiter]
                code = waiter.result()
                del self._children[child.index]
                if self._stopping.is_set() and code in (-signal.SIGTERM, -signal.SIGINT):
                    code = 0  # stopped by the signal we forwarded before it could catch it
                if self.once or self._stopping.is_set() or code == 0:
                    codes[child.index] = code  # ended for good: its code counts
                    continue
                if not await self._restart(child, code):
                    codes[child.index] = code
        sdnotify.notify("STOPPING=1")
        return 0 if all(code == 0 for code in codes.values()) else 1

    def _all_beating(self, watchdog: float) -> bool:
        """Is every running daemon's heartbeat fresh? Logs when that changes."""
        pids = [c.process.pid for c in self._children.values() if c.process.returncode is None]
        # Three beats at the daemons' interval: slack for a busy machine, and still
        # inside systemd's timeout (two ping intervals) once a daemon stops.
        max_age = 3 * heartbeat.interval(watchdog)
        fresh = heartbeat.all_fresh(heartbeat.read_beats(self.config.spool.path), pids,
                                    time.time(), max_age)
        if fresh != self._beating:
            if fresh:
                log.info("every daemon's heartbeat is fresh again: watchdog pings resume")
            else:
                log.error("a daemon's heartbeat is older than %.0fs: watchdog pings stop",
                          max_age)
            self._beating = fresh
        return fresh

    async def _restart(self, child: _Child, code: int) -> bool:
        """Start a dead daemon again; False if it dies too often (then all stop)."""
        failures = child.failures + 1 if time.monotonic() - child.started < RESTART_WINDOW \
            else 0
        if failures >= RESTART_LIMIT:
            log.error("daemon %d keeps dying (exit %d); stopping the others", child.index, code)
            self._stop(signal.SIGTERM)
            return False
        log.error("daemon %d exited with %d; restarting it", child.index, code)
        await asyncio.sleep(RESTART_DELAY)
        if self._stopping.is_set():
            return True  # stopping anyway: the restart is moot, not a failure
        if not await self._start(child.index, failures):
            log.error("daemon %d died again while starting", child.index)
        return True
