"""The daemon: the lifecycle over intake, the due plan, dispatch, workers and records.

Data flows one way: spool -> scheduler -> policy -> delivery (mx, smtp) -> outcome ->
spool. The parts (each in its own module, each testable alone):

- intake.py: files in new/ become queued messages (`queued`, `quarantined`);
- plan.py: what is in queue/ and when each is due (pure);
- dispatch.py: due -> claimed (an atomic rename; another process may win) ->
  CheckFile (`skipped`: released, not an attempt) -> the ready window, highest
  Priority first;
- attempt.py: the workers; one transaction per domain (`delivery`);
- record.py: the reports owed (`bounce`) and the durable record of each attempt.

This module runs them: the scan loop (woken by inotify on new/ and control/, and by a
full rescan every `queue.scan_interval` that catches what no event announced), the
heartbeat and recovery of dead processes' claims (liveness.py), SIGHUP reload and
SIGTERM shutdown.
The claim is the durable mark that an attempt started: if the process dies, the claim
is recovered by the next heartbeat of any process, and the attempt counted then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mxsend import batv, dkim_spool, sdnotify, summary, tlsrpt_daily
from mxsend.attempt import Workers
from mxsend.committer import Committer
from mxsend.config import Config, load_config
from mxsend.delivery import Deliverer
from mxsend.dispatch import Dispatcher
from mxsend.errors import ConfigError, MxsendError
from mxsend.hostname import helo_name, helo_name_problem
from mxsend.intake import Intake
from mxsend.liveness import Liveness
from mxsend.log import get_logger, observe, setup_logging, unobserve
from mxsend.mx import Resolver
from mxsend.policy import Policy
from mxsend.record import Recorder
from mxsend.rescan import Rescans
from mxsend.runtime import Runtime
from mxsend.shaper import Shaper
from mxsend.spool import GroupCommit, Spool
from mxsend.tlsdelivery import TlsGuard
from mxsend.watch import Watcher

log = get_logger()
T = TypeVar("T")

# One thread does the spool's waiting for the disk: batches make it enough, and more
# threads cost more in GIL hand-offs than they save (measured, docs/performance.md).
IO_THREADS = 1
# `run --once` stops after this many scans in a row fail (a daemon keeps trying).
SCAN_FAILURES_ONCE = 5


class Daemon:
    """`mxsend run`: owns the spool, the policy, the deliverer and the event loop's tasks.

    Spool I/O that waits for the disk runs on threads: listings and recovery on one I/O
    thread, and every operation that changes the spool through the Committer (its own
    thread), so that the operations of many messages share each barrier. Claims, reads
    and everything that decides stay on the event loop.
    """

    def __init__(self, config: Config, *, once: bool = False,
                 position: tuple[int, int] = (0, 1)) -> None:
        self.once = once
        self.position = position  # daemon i of n on this spool (queue.processes)
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="mxsend-spool")
        # The committer's runner may run for as long as operations keep coming: it has
        # a thread of its own, so that listings (new/, queue/) never wait behind it.
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="mxsend-commit")
        self._commit: GroupCommit | None = None
        spool = _spool(config)
        self.rt = Runtime(config, spool, Committer(spool, self._commit_thread))
        self.reporting_mta = helo_name(config.smtp.helo_name)
        self._stopping = asyncio.Event()
        self.rescans = Rescans(self.rt, self._listed)
        self._watcher: Watcher | None = None
        self._batv_key: bytes | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._shaper: Shaper | None = None
        self._assemble()

    def _assemble(self) -> None:
        """The parts, over the current runtime (again once the spool has group commit)."""
        rt = self.rt
        self.recorder = Recorder(rt, self.reporting_mta)
        self.intake = Intake(rt, self._spool_io, position=self.position, once=self.once)
        self.dispatcher = Dispatcher(rt, self.recorder, self.intake.fresh)
        self.workers = Workers(rt, self.dispatcher, self.recorder)
        self.liveness = Liveness(rt, self._spool_io)

    @property
    def config(self) -> Config:
        return self.rt.config

    async def _spool_io(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        self._batv_key = read_batv_key(config)
        # DKIM keys, once: commands/run.py has checked them (exit 2) and logged their
        # warnings before any daemon started.
        self.rt.signer = dkim_spool.load_signer(config, log_warnings=False)
        problem = helo_name_problem(config.smtp.helo_name, self.reporting_mta)
        if problem:
            log.warning("%s", problem)
        self.rt.spool.create_dirs()
        if GroupCommit.available():
            self._commit = GroupCommit(config.spool.path)
            spool = _spool(config, owner=self.rt.spool.owner, durable=self._commit)
            self.rt.spool = spool
            self.rt.committer = Committer(spool, self._commit_thread)
            self._assemble()
        self.rt.policy = Policy(config)
        self._shaper = Shaper.configured(
            config.shaping, config.spool.path, processes=config.queue.processes,
            per_domain=config.smtp.max_connections_per_domain)
        self.rt.deliverer = Deliverer(config, Resolver(config.dns), batv_key=self._batv_key,
                                      hooks=self.rt.policy, tls=TlsGuard(config),
                                      shaper=self._shaper)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        # A full disk must not keep the daemon from starting (nothing is lost by waiting):
        # the heartbeat, recovery and acceptance are retried until space returns.
        await self.liveness.beat()
        if not self.once:
            self._start_watching(loop)
        self.workers.start(config.smtp.max_connections)
        beating = asyncio.create_task(self.liveness.run(self._shaper))
        reporting = None if self.once else asyncio.create_task(tlsrpt_daily.run(
            lambda: self.rt.config, tlsrpt_daily.spool_enqueue, self._stopping))
        log.info("mxsend started: spool %s, %d workers", config.spool.path,
                 config.smtp.max_connections)
        try:
            await self._scan_loop()
        finally:
            await self.rescans.stop()
            await self._shutdown()
            for task in (beating, reporting):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._io.shutdown(wait=True)
            self.rescans.close()
            self._commit_thread.shutdown(wait=True)
            if self._commit is not None:
                self._commit.close()
        return 0

    async def _shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        self._stop_watching()
        await self.intake.settle()  # acceptances under way finish: their messages queue
        await self.dispatcher.drain()
        await self.workers.stop(self.config.queue.shutdown_grace)
        if self.rt.deliverer is not None:
            await self.rt.deliverer.close()
        if self._shaper is not None:
            await self._shaper.close()
        if self.rt.policy is not None:
            self.rt.policy.stop_watching()
            self.rt.policy.close()
        self.rt.spool.retire()
        log.info("mxsend stopped")

    def _reload(self) -> None:
        """SIGHUP: re-read the config and the script; what needs a restart is logged."""
        rt = self.rt
        config = rt.config
        batv_key = self._batv_key
        if config.source is not None:
            try:
                config = load_config(config.source)
                batv_key = read_batv_key(config)
            except ConfigError as exc:
                log.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
                config = rt.config
            else:
                if config.spool != rt.config.spool:
                    log.warning("SIGHUP: [spool] changes take effect at the next restart")
                    config = dataclasses.replace(config, spool=rt.config.spool)
        dkim_spool.reload_signer(rt.signer, config)
        if config == rt.config:
            if rt.policy is not None:
                rt.policy.reload()
            log.info("SIGHUP: script reloaded")
            return
        setup_logging(config.log.format, config.log.level)
        old_policy, old_deliverer = rt.policy, rt.deliverer
        if config.script.path == rt.config.script.path and old_policy is not None:
            old_policy.reconfigure(config)
            old_policy = None
        else:
            rt.policy = Policy(config)
            if self._watcher is not None:
                rt.policy.watch(self._watcher)
            if old_policy is not None:
                old_policy.stop_watching()
        rt.config = config
        self._batv_key = batv_key
        if self._shaper is not None:
            self._shaper.reconfigure(config.shaping)
        elif config.shaping.active:
            log.warning("SIGHUP: traffic shaping takes effect at the next restart")
        rt.deliverer = Deliverer(config, Resolver(config.dns), batv_key=batv_key,
                                 hooks=rt.policy, tls=TlsGuard(config), shaper=self._shaper)
        task = asyncio.get_running_loop().create_task(self._retire(old_policy, old_deliverer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.rescans.requested = True
        rt.wake.set()
        log.info("SIGHUP: configuration reloaded")

    async def _retire(self, policy: Policy | None, deliverer: Deliverer | None) -> None:
        """Close what SIGHUP replaced once the deliveries that still use it are done."""
        in_flight = list(self.workers.in_flight.values())
        if in_flight:
            await asyncio.wait(in_flight)
        if deliverer is not None:
            await deliverer.close()
        if policy is not None:
            policy.close()

    # --- watching ------------------------------------------------------------------

    def _start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        def arrived() -> None:
            self.intake.book.arrived = True
            self.rt.wake.set()

        def rescan() -> None:
            if self._shaper is not None:
                self._shaper.recheck()   # `queue resume` may have lifted a suspension
            self.rescans.requested = True
            self.rt.wake.set()

        root = self.config.spool.path
        self._watcher = Watcher(loop)
        self._watcher.add(root / "new", arrived)
        self._watcher.add(root / "control", rescan, touch=True)
        if self.rt.policy is not None:
            self.rt.policy.watch(self._watcher)

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    # --- the scan loop -------------------------------------------------------------

    def _listed(self) -> None:
        self.intake.book.arrived = True  # a rescan looks at new/ again too

    def _room(self) -> int:
        return self.dispatcher.room() - self.intake.waiting

    async def _scan_loop(self) -> None:
        ready_signalled = False
        failures = 0
        wake = self.rt.wake
        while not self._stopping.is_set():
            wake.clear()
            try:
                if self.rescans.wanted():
                    # The first rescan is part of starting (READY follows it), and
                    # --once decides from what it found.
                    if self.once or not ready_signalled:
                        await self.rescans.run()
                    else:
                        self.rescans.start()
                accepted = await self.intake.accept_incoming(self._room())
                dispatched = await self.dispatcher.dispatch_due(self._stopping)
                failures = 0
            except (MxsendError, OSError) as exc:
                # The disk said no (EIO, EMFILE, a full disk): nothing is lost, since
                # every message is still where the spool left it. Keep the daemon up
                # and try again, a little later each time; --once gives up after a few.
                failures += 1
                log.error("scan failed (%d in a row): %s", failures, exc)
                if self.once and failures >= SCAN_FAILURES_ONCE:
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(),
                                           min(30.0, 0.5 * 2**failures))
                continue
            if not ready_signalled:
                sdnotify.notify_ready()
                ready_signalled = True
            book = self.intake.book
            if self.once:
                if accepted or dispatched:
                    continue
                if (not self.dispatcher.jobs.empty() or self.workers.in_flight
                        or book.in_flight or self.dispatcher.busy):
                    # Woken by an acceptance finishing or by the workers; what they
                    # queue (DSNs, into new/) is looked for once the backlog is empty.
                    await self._sleep_until()
                    book.arrived = True
                    continue
                if book.arrived:
                    continue
                return
            if book.has_work() and self._room() > 0:
                continue
            await self._sleep_until()

    async def _sleep_until(self) -> None:
        """Until woken, or the next rescan or due message (whichever comes first)."""
        # A rescan running in the background wakes us when it is done: neither when the
        # next is due nor what the plan left out for it is a reason to wake meanwhile.
        rescanning = self.rescans.running
        timeout = self.rescans.seconds_to_next()
        # With the ready window full, due messages wait for the workers, who wake us
        # when it is half empty; only otherwise does the next due time matter, and the
        # queue's only while its share of the window has room.
        queue_open = self.dispatcher.queue_room() > 0 and not self.dispatcher.busy
        next_due = self.rt.plan.next_due(rest=not rescanning and queue_open, queue=queue_open)
        if next_due is not None and self._room() > 0:
            due_in = max(0.0, next_due - time.time())
            timeout = due_in if timeout is None else min(timeout, due_in)
        waits = [asyncio.ensure_future(self.rt.wake.wait()),
                 asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()


def _spool(config: Config, **kwargs: Any) -> Spool:
    return Spool.configured(config.spool, **kwargs)


def read_batv_key(config: Config) -> bytes | None:
    """The BATV secret if one is configured; read once at start and on SIGHUP."""
    if config.batv.key_file is None:
        return None
    return batv.load_key(config.batv.key_file)


async def run_daemon(config: Config, *, once: bool = False,
                     position: tuple[int, int] = (0, 1)) -> int:
    """The daemon; with `once`, its `summary` last (summary.py)."""
    if not once:
        return await Daemon(config, once=once, position=position).run()
    started = time.monotonic()
    tally = summary.Tally()
    observe(tally)
    try:
        code = await Daemon(config, once=once, position=position).run()
    finally:
        unobserve(tally)
    summary.report(tally, time.monotonic() - started)
    return code
