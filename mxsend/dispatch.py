"""Dispatch: due messages are claimed, checked by the script and queued for a worker.

The ready window bounds how many claimed messages wait for a worker at once: enough to
order by priority, few enough that 100,000 due messages do not all sit in memory. A
claim is an atomic rename (another process may win it); CheckFile then decides for the
whole batch in one call to the script's worker, before any of it is queued, so that
with one free worker the highest Priority really goes first (contract §4).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from mxsend import schedule
from mxsend.actions import FileActions
from mxsend.delivery_event import attempt_info
from mxsend.dkim_spool import domain_in
from mxsend.envelope import Message, header_lines
from mxsend.errors import MxsendError
from mxsend.log import event, get_logger
from mxsend.policy import CheckFileRequest
from mxsend.record import Recorder
from mxsend.runtime import Runtime
from mxsend.spool import Accepted, Claim, MessageState

log = get_logger()

READY_WINDOW_PER_WORKER = 4
READY_WINDOW_MIN = 256


def ready_window(workers: int) -> int:
    """How many claimed messages may wait for `workers` delivery workers."""
    return max(READY_WINDOW_MIN, READY_WINDOW_PER_WORKER * workers)


def priority_key(priority: int, sequence: int) -> tuple[int, int]:
    """Highest Priority first (clamped to 1..100, contract §4), then in the order the
    plan handed them over (which alternates new mail and the queue, plan.py).

    Not "oldest first": in a retry sweep every queued message is older than new mail,
    and with a steady supply of them a new message waited for the whole sweep (9 s for
    30,000 in scripts/bench; issue 16 item 7). In dispatch order it waits for at most
    the jobs already in the ready window."""
    return -max(1, min(100, priority)), sequence


@dataclass(order=True, slots=True)
class Job:
    """A claimed message waiting for a worker; ordered by `priority_key`."""

    sort_key: tuple[int, int]
    claim: Claim = field(compare=False)
    state: MessageState = field(compare=False)
    message: Message = field(compare=False)
    actions: FileActions = field(compare=False)


class Dispatcher:
    def __init__(self, rt: Runtime, recorder: Recorder, fresh: dict[str, Accepted]) -> None:
        self._rt = rt
        self._recorder = recorder
        self._fresh = fresh  # intake's accepted messages: no need to read them back
        self.jobs: asyncio.PriorityQueue[Job] = asyncio.PriorityQueue()
        self._sequence = itertools.count()

    def ready_window(self) -> int:
        return ready_window(self._rt.config.smtp.max_connections)

    def room(self) -> int:
        return self.ready_window() - self.jobs.qsize()

    async def dispatch_due(self, stopping: asyncio.Event | None = None) -> int:
        """Claim due messages, ask CheckFile, and hand the batch to the workers at once."""
        rt = self._rt
        room = self.room()
        if room <= 0:
            return 0
        loaded: list[tuple[Claim, MessageState, Message]] = []
        for queue_id in rt.plan.take_due(time.time(), room, rt.claimed):
            if stopping is not None and stopping.is_set():
                rt.plan.schedule(queue_id, time.time())
                continue
            claimed = await self._claim(queue_id)
            if claimed is not None:
                loaded.append(claimed)
        if not loaded:
            return 0
        assert rt.policy is not None
        verdicts = await rt.policy.check_files([
            CheckFileRequest(
                queue_id=claim.id,
                filename=rt.spool.message_file(claim.id),
                size=len(message.data),
                creation_time=state.created,
                retries=state.attempts,
                last_try_time=state.last_try,
                return_path=message.envelope.sender,
                recipients=tuple(r.address for r in state.pending()),
                data=message.data,
                dkim_domain=domain_in(rt.signer, state, message.data),
            )
            for claim, state, message in loaded
        ], rt.signer.domains)
        skipped = []
        for (claim, state, message), actions in zip(loaded, verdicts, strict=True):
            if actions.skip_send:
                # Not an attempt: released for the next scan (contract §4 SkipSend).
                event("skipped", claim.id, reason=actions.reason)
                skipped.append(self._recorder.release_untouched(
                    claim, state, delay=rt.config.queue.scan_interval))
                continue
            key = priority_key(actions.priority, next(self._sequence))
            self.jobs.put_nowait(Job(key, claim, state, message, actions))
        await asyncio.gather(*skipped)
        return len(loaded) - len(skipped)

    async def drain(self) -> None:
        """Shutdown: claimed but not started goes back to the queue untouched, due at once."""
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            await self._recorder.release_untouched(job.claim, job.state)
            self.jobs.task_done()

    async def _claim(self, queue_id: str) -> tuple[Claim, MessageState, Message] | None:
        """Claim a due message and load it; None if another process has it or it expired."""
        rt = self._rt
        fresh = self._fresh.pop(queue_id, None)
        claim = rt.spool.claim(queue_id)
        if claim is None:
            return None  # another process has it
        rt.claimed.add(queue_id)
        try:
            if fresh is not None:
                state, message = fresh.state, fresh.message
            else:
                state = rt.spool.read(claim)
                message = rt.spool.load_message(queue_id)
        except MxsendError as exc:
            log.error("message %s unreadable, retried later: %s", queue_id, exc)
            await self._recorder.release_untouched(claim, None,
                                                   delay=rt.config.queue.retry[0])
            return None
        now = time.time()
        if schedule.expired(state.created, now, rt.config.queue.max_age):
            info = attempt_info(message.envelope, header_lines(message.data),
                                attempt=state.attempts, created=state.created, started=now)
            expired = self._recorder.give_up(queue_id, state, schedule.GiveUp.EXPIRED, now,
                                             info)
            await self._recorder.finish(claim, expired, message, now, before=state,
                                        next_try=None)
            return None
        return claim, state, message
