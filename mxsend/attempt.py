"""The delivery workers: one attempt of one message at a time each.

A worker takes the next job, groups the pending recipients by domain, delivers each
group concurrently (one transaction per domain, contract §5), logs every outcome
(`delivery`), and hands the result to the Recorder, which queues the reports owed and
completes the message or releases it with its next try.

Duplicates: what a server accepted must be recorded before it can be lost. With
several domains in flight, each domain's accepted recipients are recorded as soon as
that domain finishes; the last domain is recorded with the attempt. Each domain's
`recorded` future (Deliverer.deliver) is resolved once its outcome is durable, so the
connection it used may not end its next message before then: at most one
accepted-but-unrecorded message per connection (contract §1). It is resolved in every
other case too (failure, cancellation, shutdown), so no connection waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable

from mxsend import dkim_spool, schedule
from mxsend.actions import ServerActions, ServerParameters
from mxsend.delivery_event import AttemptInfo, attempt_info, delivery_fields
from mxsend.dispatch import Dispatcher, Job
from mxsend.envelope import Message, Recipient, header_lines
from mxsend.errors import Phase
from mxsend.log import event, get_logger
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.record import Recorder, apply_outcomes
from mxsend.runtime import Runtime
from mxsend.spool import MessageState

log = get_logger()

# A message whose attempt was cut short by shutdown was no server's fault: it is due
# again at once, so the next start (or the other process sharing the spool) takes it.
INTERRUPTED_RETRY = 0.0

_Deliveries = dict[asyncio.Task[list[RecipientOutcome]], asyncio.Future[None]]


def group_by_domain(
    recipients: Iterable[Recipient], pending: set[str]
) -> dict[str, list[Recipient]]:
    """Pending recipients grouped by domain, in envelope order (one transaction each)."""
    groups: dict[str, list[Recipient]] = {}
    for recipient in recipients:
        if recipient.address in pending:
            groups.setdefault(recipient.domain, []).append(recipient)
    return groups


def bounce_phases(outcomes: Iterable[RecipientOutcome]) -> dict[str, Phase]:
    """The command each bounced recipient's reply answered, for its report's text."""
    return {o.address: o.phase for o in outcomes
            if o.status is DeliveryStatus.BOUNCED and o.phase is not None}


def split_waiting(outcomes: Iterable[RecipientOutcome]
                  ) -> tuple[list[RecipientOutcome], RecipientOutcome | None]:
    """The outcomes of recipients tried, and of those that had to wait for their
    destination (shaper.py) the one that may go soonest (None: none waited)."""
    tried = [o for o in outcomes if o.wait_until is None]
    waits = [o for o in outcomes if o.wait_until is not None]
    return tried, min(waits, key=lambda o: o.wait_until or 0.0, default=None)


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class Workers:
    def __init__(self, rt: Runtime, dispatcher: Dispatcher, recorder: Recorder) -> None:
        self._rt = rt
        self._dispatcher = dispatcher
        self._recorder = recorder
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, count: int) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(count)]

    async def stop(self, grace: float) -> None:
        """Let attempts under way finish for up to `grace` seconds, cut the rest short."""
        in_flight = list(self.in_flight.values())
        if in_flight:
            log.info("waiting up to %.0fs for %d deliveries", grace, len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for worker in self._tasks:
            worker.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        jobs = self._dispatcher.jobs
        while True:
            job = await self._dispatcher.next_job()
            try:
                attempt = asyncio.create_task(self._attempt(job))
                self.in_flight[job.claim.id] = attempt
                try:
                    await attempt
                except asyncio.CancelledError:
                    if not attempt.done():
                        raise  # the worker itself is being stopped
                except Exception:
                    # A bug, not a delivery problem: keep the message, keep the worker.
                    log.exception("attempt of %s failed unexpectedly", job.claim.id)
                    await self._recorder.release_untouched(
                        job.claim, None, delay=self._rt.config.queue.retry[0])
                finally:
                    self.in_flight.pop(job.claim.id, None)
                    self._rt.claimed.discard(job.claim.id)
            finally:
                jobs.task_done()
                if jobs.qsize() < self._dispatcher.ready_window() // 2:
                    self._rt.wake.set()

    async def _attempt(self, job: Job) -> None:
        """One attempt of one message; never loses the claim."""
        deliveries: _Deliveries = {}
        try:
            await self._run_attempt(job, deliveries)
        finally:
            _resolve(deliveries.values())

    async def _run_attempt(self, job: Job, deliveries: _Deliveries) -> None:
        claim, message, rt = job.claim, job.message, self._rt
        # DKIM (contract §7): signed once, durable before the first byte goes out.
        job.state = await dkim_spool.decide(rt, claim, job.state, message,
                                            job.actions.dkim_domain)
        started = time.time()
        state = dataclasses.replace(job.state, attempts=job.state.attempts + 1,
                                    last_try=started)
        headers = header_lines(message.data)
        info = attempt_info(message.envelope, headers, attempt=state.attempts,
                            created=state.created, started=started, dkim=state.dkim)
        # New mail's ServerDetails goes first at the script's worker (JobOrder's lane).
        deliveries.update(self._start_deliveries(claim.id, message, state, headers, info,
                                                 urgent=job.new_mail))
        running = set(deliveries)
        outcomes: list[RecipientOutcome] = []
        # What may be recorded before the attempt ends: only what servers accepted. A
        # bounce is recorded together with its DSN at the end, or not at all; the
        # attempt itself is counted at the end, or by recovery after a crash.
        durable = job.state
        try:
            while running:
                if len(running) == 1:
                    # The common case, one domain: no wait() machinery for one task. Its
                    # exception is _collect's to report; a cancellation of ours reaches
                    # it through this await and the handler below.
                    with contextlib.suppress(Exception):
                        await next(iter(running))
                    done, running = running, set()
                else:
                    done, running = await asyncio.wait(running,
                                                       return_when=asyncio.FIRST_COMPLETED)
                finished = self._collect(claim.id, done, info)
                outcomes += finished
                if not running:
                    break  # the record at the end covers everything
                sent = [o for o in finished if o.status is DeliveryStatus.SENT]
                if sent:
                    durable = apply_outcomes(durable, sent, time.time())
                    # Other domains are still in flight, maybe for minutes: what this one
                    # accepted is made durable now, so a crash cannot send it twice
                    # (contract §1: the duplicate window is only reply-to-record).
                    await rt.committer.run(rt.spool.update_steps(claim, durable))
                _resolve(deliveries[task] for task in done)
        except asyncio.CancelledError:
            # Shutdown cut the attempt short. What a server already accepted is recorded
            # (it must never be sent again); the rest is a temporary failure, due again
            # at once after restart (contract §2, SIGTERM).
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            sent = [o for o in self._collect(claim.id, running, info)
                    if o.status is DeliveryStatus.SENT]
            await self._recorder.release_untouched(
                claim, apply_outcomes(durable, sent, time.time()), delay=INTERRUPTED_RETRY)
            raise
        # Each connection's next end of data waits for its message's record (contract
        # §1): resolved as soon as the record is durable, not after the spool's tidying.
        await self._record(job, state, outcomes, info,
                           on_recorded=lambda: _resolve(deliveries.values()))

    async def _record(self, job: Job, state: MessageState,
                      outcomes: list[RecipientOutcome], info: AttemptInfo,
                      on_recorded: Callable[[], None] | None = None) -> None:
        """The end of an attempt: the next try or giving up, then the Recorder."""
        config = self._rt.config
        now = time.time()
        outcomes, waiting = split_waiting(outcomes)
        wait_until = waiting.wait_until if waiting is not None else None
        if waiting is not None and wait_until is not None and not outcomes:
            # Every destination made it wait (contract §9: a shape, a suspension, or
            # the server rules' hold or skip): not an attempt; back when its destination
            # is expected to take it, with the reason for `queue list` (and `queue
            # resume`, which makes it due). Nothing was recorded mid-way, since only a
            # server's acceptance is.
            event("skipped", job.claim.id, reason=waiting.response)
            await self._recorder.release_untouched(
                job.claim, dataclasses.replace(job.state, last_error=waiting.response),
                delay=max(0.0, wait_until - now))
            return
        state = apply_outcomes(state, outcomes, now)
        relayed = {o.address for o in outcomes
                   if o.status is DeliveryStatus.SENT and o.dsn_relayed}
        next_try: float | None = None
        if state.pending():
            decision = schedule.after_temporary_failure(
                retry=config.queue.retry, attempts=state.attempts, created=state.created,
                now=now, max_age=config.queue.max_age,
                force_last_try=job.actions.force_last_try,
            )
            if decision.give_up is not None:
                state = self._recorder.give_up(job.claim.id, state, decision.give_up, now,
                                               info)
            next_try = decision.next_try
            if wait_until is not None and next_try is not None:
                next_try = min(next_try, wait_until)
        await self._recorder.finish(job.claim, state, job.message, now, before=job.state,
                                    next_try=next_try, relayed=relayed,
                                    phases=bounce_phases(outcomes), on_recorded=on_recorded)

    def _collect(
        self, queue_id: str, tasks: Iterable[asyncio.Task[list[RecipientOutcome]]],
        info: AttemptInfo,
    ) -> list[RecipientOutcome]:
        """The outcomes of finished domain tasks, each logged as a `delivery` event."""
        outcomes: list[RecipientOutcome] = []
        for task in tasks:
            if not task.done() or task.cancelled():
                continue
            if task.exception() is not None:
                # A bug, not a delivery problem: those recipients stay pending.
                log.error("delivery of %s failed unexpectedly: %r", queue_id, task.exception())
                continue
            outcomes += task.result()
        if any(outcome.eight_bit_unadvertised for outcome in outcomes):
            # Contract §5: 8-bit data to a server without 8BITMIME is sent anyway, noted.
            log.warning("message %s has 8-bit data; a server did not offer 8BITMIME", queue_id)
        now = time.time()
        for outcome in outcomes:
            if outcome.wait_until is not None:
                continue  # not an attempt (contract §9): no `delivery` event
            event("delivery", queue_id, **delivery_fields(outcome, info, now))
        return outcomes

    def _start_deliveries(
        self, queue_id: str, message: Message, state: MessageState, headers: list[str],
        info: AttemptInfo, *, urgent: bool = False,
    ) -> _Deliveries:
        """One task per recipient domain, each with the future its record resolves."""
        policy, deliverer = self._rt.policy, self._rt.deliverer
        assert deliverer is not None and policy is not None
        pending = {r.address for r in state.pending()}
        sent = dkim_spool.as_sent(message, state)  # the same bytes on every attempt

        async def server_details(params: ServerParameters,
                                 preset: Callable[[ServerActions], ServerActions]
                                 ) -> ServerActions:
            return await policy.server_details(queue_id, params, headers, preset,
                                               urgent=urgent)

        loop = asyncio.get_running_loop()
        deliveries: _Deliveries = {}
        for domain, recipients in group_by_domain(message.envelope.recipients,
                                                  pending).items():
            recorded: asyncio.Future[None] = loop.create_future()
            task = asyncio.create_task(deliverer.deliver(
                queue_id, sent, recipients, domain, server_details, recorded=recorded,
                attempt=info))
            deliveries[task] = recorded
        return deliveries

