"""Recording what an attempt did: the state it leaves and the reports it owes.

The pure half folds outcomes into a message's state (`apply_outcomes`, `give_up`) and
says which DSNs a change of state owes the sender (`reports_owed`, which the queue
CLI's `bounce` uses too). `Recorder` is the thin I/O half: it queues those reports,
then records the state durably, and logs the contract's `delivery` and `bounce`
events.

Rules (contract §1, §2; RFC 3461 §4.1):

- A DSN is queued before the state that owes it is recorded: a crash in between
  repeats a report, it never loses one.
- A failure report that cannot be queued (a full disk) leaves its recipients pending,
  so the bounce and its report are tried again with the message.
- A relayed recipient was accepted: it is never sent again, report or not.
- A DELAY notice goes out once per recipient that asked for it, after
  `queue.delay_warning`; a recipient is marked notified only once it is queued.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from mxsend import bounce, metrics, schedule
from mxsend.delivery_event import AttemptInfo, given_up_fields
from mxsend.envelope import Envelope, Message, Recipient, serialise_bsmtp
from mxsend.errors import MxsendError, Phase
from mxsend.log import event, get_logger
from mxsend.outcome import DeliveryStatus, RecipientOutcome
from mxsend.runtime import Runtime
from mxsend.spool import Claim, MessageState, RecipientState, RecipientStatus, Spool

log = get_logger()

_STATUS = {
    DeliveryStatus.SENT: RecipientStatus.SENT,
    DeliveryStatus.BOUNCED: RecipientStatus.BOUNCED,
    DeliveryStatus.DEFERRED: RecipientStatus.PENDING,
}


def apply_outcomes(
    state: MessageState, outcomes: Iterable[RecipientOutcome], now: float
) -> MessageState:
    """Fold per-recipient outcomes into the message state; a final recipient stays."""
    by_address = {outcome.address: outcome for outcome in outcomes}
    recipients = []
    for rcpt in state.recipients:
        outcome = by_address.get(rcpt.address)
        if outcome is None or rcpt.status is not RecipientStatus.PENDING:
            recipients.append(rcpt)
            continue
        recipients.append(dataclasses.replace(
            rcpt, status=_STATUS[outcome.status], response=outcome.response,
            dsn=outcome.dsn, relay=outcome.relay or "", remote_mta=outcome.remote_mta or "",
            last_attempt=now,
        ))
    errors = [o.response for o in by_address.values() if o.status is DeliveryStatus.DEFERRED]
    return dataclasses.replace(
        state, recipients=tuple(recipients),
        last_error=errors[0] if errors else state.last_error,
    )


_GIVE_UP_REASONS = {
    schedule.GiveUp.FORCED: "the last try (ForceLastTry) failed",
    schedule.GiveUp.EXPIRED: "message expired in the queue",
}


def give_up(state: MessageState, reason: schedule.GiveUp, now: float) -> MessageState:
    """Every pending recipient becomes bounced, keeping its last reply if it had one."""
    text = _GIVE_UP_REASONS[reason]
    recipients = tuple(
        dataclasses.replace(
            rcpt,
            status=RecipientStatus.BOUNCED,
            response=f"{text}; last reply: {rcpt.response}" if rcpt.response else text,
            dsn=schedule.give_up_status(reason, rcpt.dsn or None),
            last_attempt=rcpt.last_attempt or now,
        )
        if rcpt.status is RecipientStatus.PENDING
        else rcpt
        for rcpt in state.recipients
    )
    return dataclasses.replace(state, recipients=recipients)


@dataclass(frozen=True, slots=True)
class OwedReport:
    """One DSN an attempt owes: its kind and the recipients it reports on."""

    action: bounce.DsnAction
    recipients: tuple[bounce.DsnRecipient, ...]


def newly_bounced(before: MessageState, after: MessageState) -> list[RecipientState]:
    """Recipients pending in `before` and bounced in `after`."""
    was = {r.address: r.status for r in before.recipients}
    return [r for r in after.recipients
            if r.status is RecipientStatus.BOUNCED
            and was.get(r.address) is RecipientStatus.PENDING]


def reports_owed(
    before: MessageState,
    after: MessageState,
    envelope: Envelope,
    now: float,
    *,
    relayed: Collection[str] = (),
    phases: Mapping[str, Phase] | None = None,
    delay_warning: float = 0.0,
    max_age: float = 0.0,
) -> list[OwedReport]:
    """The DSNs the change from `before` to `after` owes, by kind, in the order queued.

    - FAILED for each recipient that went from pending to bounced;
    - RELAYED for each address in `relayed` (accepted by a server without the DSN
      extension, RFC 3461 §4.1);
    - DELAYED for pending recipients not yet notified, once `delay_warning` seconds
      have passed since the message was queued (0: never), while `after` is not final.

    Each is filtered by the recipient's NOTIFY (bounce.wants_report); a kind nobody
    wants is left out. `phases` gives the SMTP command each address's reply answered in
    this attempt (for the text "RCPT TO to mx1... said"); a recipient without one (given
    up on, or refused before any server) is reported without it.
    """
    originals = {r.address: r for r in envelope.recipients}
    phases = phases or {}
    owed: list[OwedReport] = []

    def add(action: bounce.DsnAction, rcpts: Iterable[RecipientState]) -> None:
        reported = tuple(
            _dsn_recipient(rcpt, originals[rcpt.address], action, phases.get(rcpt.address),
                           schedule.expires_at(after.created, max_age)
                           if action is bounce.DsnAction.DELAYED else None)
            for rcpt in rcpts
            if rcpt.address in originals
            and bounce.wants_report(originals[rcpt.address], action)
        )
        if reported:
            owed.append(OwedReport(action, reported))

    add(bounce.DsnAction.FAILED, newly_bounced(before, after))
    add(bounce.DsnAction.RELAYED, [r for r in after.recipients if r.address in relayed])
    if not after.is_final() and schedule.delay_warning_due(after.created, now, delay_warning,
                                                           already=False):
        add(bounce.DsnAction.DELAYED, [r for r in after.pending() if not r.delay_notified])
    return owed


def _dsn_recipient(rcpt: RecipientState, original: Recipient, action: bounce.DsnAction,
                   phase: Phase | None, will_retry_until: float | None) -> bounce.DsnRecipient:
    return bounce.DsnRecipient(
        address=rcpt.address,
        orcpt=original.orcpt,
        action=action,
        status=rcpt.dsn or ("2.0.0" if action is bounce.DsnAction.RELAYED else "5.0.0"),
        remote_mta=rcpt.remote_mta or None,
        # A server's reply is typed smtp; a local reason (null MX, expiry) gets
        # bounce.py's own diagnostic type, so every report says why.
        diagnostic=rcpt.response or None,
        last_attempt=rcpt.last_attempt or None,
        will_retry_until=will_retry_until,
        phase=phase,
    )


def _with_status(state: MessageState, addresses: Collection[str],
                 **changes: object) -> MessageState:
    return dataclasses.replace(state, recipients=tuple(
        dataclasses.replace(r, **changes) if r.address in addresses else r  # type: ignore[arg-type]
        for r in state.recipients
    ))


def recover_claims(spool: Spool, retry: Sequence[float], stale_after: float,
                   now: float) -> list[tuple[str, float]]:
    """Blocking: take back the claims of processes that died, counting the attempt.

    Counting it backs off a message that kills its daemon every time it is tried,
    instead of crashing in a loop. Returns (queue id, next try) of each one recovered.
    """
    recovered = []
    for queue_id in spool.recover(stale_after, now):
        claim = spool.claim(queue_id)
        if claim is None:
            continue
        try:
            state = spool.read(claim)
            attempts = state.attempts + 1
            next_try = schedule.next_try(retry, attempts, now)
            spool.release(claim, dataclasses.replace(
                state, attempts=attempts, last_try=now, next_try=next_try,
                last_error=state.last_error or "interrupted by a process that stopped",
            ))
        except MxsendError as exc:
            log.error("could not record the recovery of %s: %s", queue_id, exc)
            continue
        recovered.append((queue_id, next_try))
    return recovered


class Recorder:
    """Records the end of a claim: released untouched, or finished with its reports."""

    def __init__(self, rt: Runtime, reporting_mta: str) -> None:
        self._rt = rt
        self.reporting_mta = reporting_mta

    async def release_untouched(
        self, claim: Claim, state: MessageState | None, delay: float = 0.0
    ) -> None:
        """Give a claim back without counting an attempt."""
        rt = self._rt
        try:
            if state is None:
                state = rt.spool.read(claim)
            released = dataclasses.replace(state, next_try=time.time() + delay)
            await rt.committer.run(rt.spool.release_steps(claim, released))
            rt.plan.schedule(claim.id, released.next_try)
        except MxsendError as exc:
            # The claim stays in active/ and comes back through recovery after restart.
            log.error("could not release %s: %s", claim.id, exc)
        finally:
            rt.claimed.discard(claim.id)

    def give_up(
        self, queue_id: str, state: MessageState, reason: schedule.GiveUp, now: float,
        info: AttemptInfo | None = None,
    ) -> MessageState:
        """Bounce what is still pending, with a `delivery` event each (relay null)."""
        final = give_up(state, reason, now)
        for rcpt in newly_bounced(state, final):
            event("delivery", queue_id, **given_up_fields(
                rcpt.address, rcpt.dsn, rcpt.response, info, state.attempts, now,
                state.created, state.dkim))
        return final

    async def finish(
        self,
        claim: Claim,
        state: MessageState,
        message: Message,
        now: float,
        *,
        before: MessageState,
        next_try: float | None,
        relayed: Collection[str] = (),
        phases: Mapping[str, Phase] | None = None,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        """Queue the DSNs this attempt owes, then record the state durably.

        `on_recorded` is called as soon as the outcome is durable, ahead of the spool
        operation's tidying (Committer.run); never if it did not become durable.
        """
        rt = self._rt
        queue = rt.config.queue
        try:
            for report in reports_owed(before, state, message.envelope, now, relayed=relayed,
                                       phases=phases, delay_warning=queue.delay_warning,
                                       max_age=queue.max_age):
                queued = await self._queue_report(claim.id, message, state, report, now)
                if report.action is bounce.DsnAction.FAILED and not queued:
                    unreported = {r.address for r in newly_bounced(before, state)}
                    state = _with_status(state, unreported, status=RecipientStatus.PENDING)
                elif report.action is bounce.DsnAction.DELAYED and queued:
                    notified = {r.address for r in report.recipients}
                    state = _with_status(state, notified, delay_notified=True)
            if state.is_final():
                await rt.committer.run(rt.spool.complete_steps(claim, state),
                                       on_recorded=on_recorded)
                metrics.delivery(now - state.created)  # its last recipient is final
            else:
                if next_try is None:
                    next_try = schedule.next_try(queue.retry, state.attempts, now)
                await rt.committer.run(rt.spool.release_steps(
                    claim, dataclasses.replace(state, next_try=next_try)),
                    on_recorded=on_recorded)
                rt.plan.schedule(claim.id, next_try)
        except MxsendError as exc:
            log.error("could not record the outcome of %s: %s", claim.id, exc)
        finally:
            rt.claimed.discard(claim.id)

    async def _queue_report(self, queue_id: str, message: Message, state: MessageState,
                            report: OwedReport, now: float) -> bool:
        """Queue one report; False if it could not be."""
        try:
            dsn = bounce.build_dsn(
                original=message, queue_id=queue_id, recipients=report.recipients,
                reporting_mta=self.reporting_mta, arrival=state.created, now=now,
                message_id_domain=self.reporting_mta,
            )
            if dsn is None:
                return True  # nobody to report to (the null sender)
            spool = self._rt.spool
            bounce_id = await self._rt.committer.run(spool.enqueue_steps(serialise_bsmtp(dsn)))
        except MxsendError as exc:
            log.error("could not queue the %s report for %s: %s", report.action, queue_id, exc)
            return False
        except Exception:
            # A bug in building the report must not turn into a failed attempt: the
            # recipients already sent would then be sent again.
            log.exception("could not build the %s report for %s", report.action, queue_id)
            return False
        event("bounce", queue_id, bounce_id=bounce_id,
              recipients=[r.address for r in report.recipients],
              kind=bounce.REPORT_KIND[report.action])
        self._rt.wake.set()
        return True
