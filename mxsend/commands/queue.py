"""`mxsend queue list | show ID | flush [ID] | delete ID | bounce ID` (contract §2).

Safe while daemons run on the same spool: a message is changed only after claiming it
with the same atomic rename the daemon uses, so the two never work on one message at
once. A message in flight cannot be claimed; the command says so and exits 1, and the
operator tries again when the attempt is over. Reading (`list`, `show`) claims nothing.

Exit codes: 0 done, 1 nothing done (unknown id, in flight, spool trouble), each with one
line on stderr. Usage and config errors (2) are cli.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from mxsend import bounce
from mxsend.config import Config
from mxsend.envelope import Message, Recipient
from mxsend.errors import MxsendError
from mxsend.log import event, setup_logging
from mxsend.spool import (
    Claim,
    MessageState,
    RecipientState,
    RecipientStatus,
    Spool,
    id_problem,
)

EXIT_OK = 0
EXIT_FAILED = 1

# RFC 3463 §3.1: X.0.0, "other undefined status": no code says "cancelled by the operator".
OPERATOR_STATUS = "5.0.0"
OPERATOR_REASON = "delivery cancelled by the mail system operator"


class _Refused(Exception):
    """One line for stderr, and exit 1."""


# --- pure formatting -----------------------------------------------------------------------


def format_span(seconds: float) -> str:
    """A compact duration for a table: 45s, 5m, 2h13m, 3d4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def format_next_try(state: MessageState, where: str, now: float) -> str:
    if where == "active":
        return "in flight"
    if state.next_try <= now:
        return "due"
    return f"in {format_span(state.next_try - now)}"


def format_time(timestamp: float | None) -> str:
    """Local time, as the operator's other tools (journalctl, ls) show it."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns separated by two spaces; the last column is not padded."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
                   row[-1]]).rstrip()
        for row in rows
    ]


def list_rows(entries: Sequence[tuple[MessageState, str]], now: float) -> list[list[str]]:
    rows = [["ID", "AGE", "SENDER", "ATTEMPTS", "NEXT TRY", "PENDING", "LAST ERROR"]]
    for state, where in entries:
        pending = [r.address for r in state.pending()]
        rows.append([
            state.id,
            format_span(now - state.created),
            f"<{state.sender}>",
            str(state.attempts),
            format_next_try(state, where, now),
            ",".join(pending) or "-",
            _one_line(state.last_error) or "-",
        ])
    return rows


def state_document(state: MessageState, where: str, now: float) -> dict[str, Any]:
    """The JSON form of a message's state; times are seconds since the epoch."""
    return {
        "id": state.id,
        "state": "in-flight" if where == "active" else "queued",
        "created": state.created,
        "age": round(now - state.created, 3),
        "sender": state.sender,
        "size": state.size,
        "attempts": state.attempts,
        "last_try": state.last_try,
        "next_try": state.next_try,
        "last_error": state.last_error,
        "pending": [r.address for r in state.pending()],
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "dsn": r.dsn,
                "response": r.response,
                "relay": r.relay,
                "remote_mta": r.remote_mta,
                "last_attempt": r.last_attempt or None,
                "delay_notified": r.delay_notified,
            }
            for r in state.recipients
        ],
    }


def envelope_document(message: Message) -> dict[str, Any]:
    env = message.envelope
    return {
        "ret": env.ret,
        "envid": env.envid,
        "auth": env.auth,
        "body": env.body,
        "smtputf8": env.smtputf8,
        "notify": {r.address: list(r.notify) if r.notify else None for r in env.recipients},
        "orcpt": {r.address: r.orcpt for r in env.recipients if r.orcpt},
    }


def show_lines(state: MessageState, where: str, now: float, message: Message | None) -> list[str]:
    status = "in flight (being delivered now)" if where == "active" else "queued"
    rows = [
        ["id:", state.id],
        ["state:", status],
        ["created:", f"{format_time(state.created)} ({format_span(now - state.created)} ago)"],
        ["sender:", f"<{state.sender}>"],
        ["size:", f"{state.size} bytes"],
        ["attempts:", str(state.attempts)],
        ["last try:", format_time(state.last_try)],
        ["next try:", f"{format_time(state.next_try)} ({format_next_try(state, where, now)})"],
        ["last error:", _one_line(state.last_error) or "-"],
    ]
    if message is not None:
        env = message.envelope
        params = [f"RET={env.ret}" if env.ret else "", f"ENVID={env.envid}" if env.envid else "",
                  "SMTPUTF8" if env.smtputf8 else "", f"BODY={env.body}" if env.body else ""]
        rows.append(["envelope:", " ".join(p for p in params if p) or "-"])
    lines = table(rows)
    lines.append("recipients:")
    notify = {r.address: r for r in message.envelope.recipients} if message else {}
    recipient_rows = []
    for rcpt in state.recipients:
        original = notify.get(rcpt.address)
        recipient_rows.append([
            "  " + rcpt.address,
            rcpt.status.value,
            rcpt.dsn or "-",
            rcpt.relay or "-",
            "NOTIFY=" + ",".join(original.notify) if original and original.notify else "-",
            _one_line(rcpt.response) or "-",
        ])
    lines += table(recipient_rows)
    return lines


# --- bouncing ------------------------------------------------------------------------------


def operator_bounce(
    state: MessageState, message: Message, now: float
) -> tuple[MessageState, list[bounce.DsnRecipient]]:
    """Every pending recipient bounced by the operator; the report lines NOTIFY allows.

    The last error, if any, goes into the report's diagnostic so the sender learns why
    the message was stuck as well as that it was given up.
    """
    originals = _envelope_recipients(state, message)
    recipients: list[RecipientState] = []
    reported: list[bounce.DsnRecipient] = []
    for rcpt, original in zip(state.recipients, originals, strict=True):
        if rcpt.final:
            recipients.append(rcpt)
            continue
        recipients.append(dataclasses.replace(
            rcpt, status=RecipientStatus.BOUNCED, dsn=OPERATOR_STATUS, response=OPERATOR_REASON
        ))
        if original is not None and bounce.wants_report(original, bounce.DsnAction.FAILED):
            reason = OPERATOR_REASON
            if rcpt.response:
                reason += f"; the last attempt got: {_one_line(rcpt.response)}"
            reported.append(bounce.DsnRecipient(
                address=rcpt.address,
                orcpt=original.orcpt,
                action=bounce.DsnAction.FAILED,
                status=OPERATOR_STATUS,
                remote_mta=None,
                diagnostic=f"X-mxsend; {reason}",
                last_attempt=rcpt.last_attempt or None,
            ))
    return dataclasses.replace(state, recipients=tuple(recipients)), reported


def _envelope_recipients(state: MessageState, message: Message) -> list[Recipient | None]:
    """The envelope recipient behind each state recipient (same order, same addresses)."""
    envelope = list(message.envelope.recipients)
    if [r.address for r in envelope] == [r.address for r in state.recipients]:
        return list(envelope)
    by_address = {r.address: r for r in envelope}
    return [by_address.get(r.address) for r in state.recipients]


# --- commands ------------------------------------------------------------------------------


def _spool(config: Config) -> Spool:
    if not config.spool.path.is_dir():
        raise _Refused(f"spool.path: {config.spool.path} is not a directory")
    return Spool(
        config.spool.path,
        keep_sent=config.spool.keep_sent,
        max_message_size=config.spool.max_message_size,
    )


def _not_found(spool: Spool, id: str) -> _Refused:
    if not id_problem(id) and (spool.root / "new" / id).exists():
        return _Refused(f"{id} is waiting in new/ for a daemon to accept it")
    return _Refused(f"no message {id} in the queue")


def _claim(spool: Spool, id: str) -> Claim:
    found = spool.find(id)
    if found is None:
        raise _not_found(spool, id)
    claim = spool.claim(id)
    if claim is None:
        if spool.find(id) is None:
            raise _Refused(f"{id} left the queue (delivered or removed) just now")
        raise _Refused(f"{id} is being delivered right now; try again when the attempt ends")
    return claim


def _list(spool: Spool, args: argparse.Namespace, config: Config, now: float) -> int:
    entries = sorted(spool.entries(), key=lambda e: (e[0].created, e[0].id))
    # Files not yet accepted have no state to show, but an operator whose daemon is down
    # must not be told the queue is empty while new/ fills up.
    incoming = spool.incoming()
    if args.json:
        doc = {"messages": [state_document(s, w, now) for s, w in entries],
               "incoming": incoming}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return EXIT_OK
    if entries:
        for line in table(list_rows(entries, now)):
            print(line)
        pending = sum(len(s.pending()) for s, _ in entries)
        print(f"-- {len(entries)} message{'s' * (len(entries) != 1)}, "
              f"{pending} recipient{'s' * (pending != 1)} pending")
    elif not incoming:
        print("The queue is empty.")
    if incoming:
        print(f"-- {len(incoming)} file{'s' * (len(incoming) != 1)} in new/ "
              "waiting for a daemon to accept them")
    return EXIT_OK


def _show(spool: Spool, args: argparse.Namespace, config: Config, now: float) -> int:
    found = spool.find(args.id)
    if found is None:
        raise _not_found(spool, args.id)
    state, where = found
    try:
        message: Message | None = spool.load_message(state.id)
    except MxsendError:
        message = None  # gone meanwhile or unreadable: the state is still worth showing
    if args.json:
        doc = state_document(state, where, now)
        doc["envelope"] = envelope_document(message) if message else None
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        for line in show_lines(state, where, now, message):
            print(line)
    return EXIT_OK


def _flush(spool: Spool, args: argparse.Namespace, config: Config, now: float) -> int:
    if args.id is not None:
        claim = _claim(spool, args.id)
        _make_due(spool, claim, now)
        spool.request_rescan()
        print(f"{args.id}: due now")
        return EXIT_OK
    flushed = busy = 0
    for state, where in list(spool.entries()):
        if where == "queue" and state.next_try <= now:
            continue  # due already; claiming it would only get in the daemon's way
        taken = spool.claim(state.id) if where == "queue" else None
        if taken is None:
            busy += where == "active"  # or gone meanwhile: nothing to flush
            continue
        _make_due(spool, taken, now)
        flushed += 1
    spool.request_rescan()
    note = f" ({busy} in flight already)" if busy else ""
    print(f"{flushed} message{'s' * (flushed != 1)} due now{note}")
    return EXIT_OK


def _make_due(spool: Spool, claim: Claim, now: float) -> None:
    state = spool.read(claim)
    # A flush is not an attempt: attempts and the schedule position stay as they were.
    spool.release(claim, dataclasses.replace(state, next_try=min(state.next_try, now)))


def _delete(spool: Spool, args: argparse.Namespace, config: Config, now: float) -> int:
    claim = _claim(spool, args.id)
    spool.delete(claim)
    print(f"{args.id}: deleted")
    return EXIT_OK


def _bounce(spool: Spool, args: argparse.Namespace, config: Config, now: float) -> int:
    claim = _claim(spool, args.id)
    state = spool.read(claim)
    try:
        message = spool.load_message(claim.id)
    except MxsendError as exc:
        spool.release(claim, state)
        raise _Refused(f"{args.id}: cannot read the message to bounce it: {exc}") from None
    final, reported = operator_bounce(state, message, now)
    reporting_mta = config.smtp.helo_name or socket.getfqdn()
    dsn = bounce.build_dsn(
        original=message, queue_id=claim.id, recipients=reported,
        reporting_mta=reporting_mta, arrival=state.created, now=now,
        message_id_domain=reporting_mta,
    )
    bounce_id = None
    if dsn is not None:
        try:
            # The report first, as the daemon does: a crash repeats a report, never loses one.
            bounce_id = spool.enqueue(dsn)
        except MxsendError:
            spool.release(claim, state)
            raise
    newly = [r for r, before in zip(final.recipients, state.recipients, strict=True)
             if not before.final]
    for rcpt in newly:
        event("delivery", claim.id, recipient=rcpt.address, status="bounced", relay=None,
              tls=None, dsn=rcpt.dsn, response=rcpt.response, attempt=state.attempts)
    if bounce_id is not None:
        event("bounce", claim.id, bounce_id=bounce_id, recipients=[r.address for r in reported])
    spool.complete(claim, final)
    report = f"report {bounce_id} queued" if bounce_id else "no report (" + (
        "null sender" if not state.sender else "NOTIFY asked for none") + ")"
    print(f"{args.id}: {len(newly)} recipient{'s' * (len(newly) != 1)} bounced; {report}")
    return EXIT_OK


_ACTIONS: dict[str, Callable[[Spool, argparse.Namespace, Config, float], int]] = {
    "list": _list,
    "show": _show,
    "flush": _flush,
    "delete": _delete,
    "bounce": _bounce,
}


def run(args: argparse.Namespace, config: Config) -> int:
    setup_logging(config.log.format, config.log.level)
    spool: Spool | None = None
    try:
        spool = _spool(config)
        return _ACTIONS[args.queue_command](spool, args, config, time.time())
    except _Refused as exc:
        print(f"mxsend: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except MxsendError as exc:
        print(f"mxsend: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if spool is not None:
            # Our heartbeat and empty private folders go; nothing is held after a command.
            spool.retire()
