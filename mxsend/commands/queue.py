"""`mxsend queue ACTION` (contract §2, §10): inspect and change the queue.

Safe while daemons run on the same spool: a message is changed only after claiming it
with the same atomic rename the daemon uses, so the two never work on one message at
once. A message in flight cannot be claimed; the command says so, and the operator
tries again when the attempt is over. Reading (`list`, `show`, `cat`, `stats`) claims
nothing. `flush`, `delete`, `bounce`, `hold` and `release` take several ids, `ALL`, or
`-` (ids on standard input), as Postfix's postsuper does.

Exit codes: 0 done, 1 something named could not be done (unknown id, in flight, spool
trouble), each with one line on stderr; also 1 when a listing or an ALL skipped state
files it could not read (each named on stderr; the rest is still shown or done). Usage
and config errors (2) are cli.py's. A closed standard output (`| head`) ends the output
quietly; the work goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import operator
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from mxsend import bounce
from mxsend.commands import queue_suspended
from mxsend.commands.queue_args import ALL, STDIN
from mxsend.commands.queue_format import (
    LIST_HEADER,
    StateView,
    column_widths,
    envelope_document,
    format_span,
    message_document,
    message_rows,
    one_line,
    selection,
    shape_lines,
    shape_rows,
    show_lines,
    table_lines,
)
from mxsend.commands.queue_read import (
    fold_listed,
    fold_states,
    report_unreadable,
    stats_shares,
    without_cyclic_gc,
)
from mxsend.config import Config
from mxsend.config_values import parse_duration
from mxsend.envelope import Message, Recipient
from mxsend.errors import ConfigError, MxsendError
from mxsend.hostname import helo_name
from mxsend.log import event, setup_logging
from mxsend.queue_state import MessageState, RecipientState, RecipientStatus
from mxsend.spool import Claim, Spool, id_problem

EXIT_OK = 0
EXIT_FAILED = 1

# RFC 3463 §3.1: X.0.0, "other undefined status": no code says "cancelled by the operator".
OPERATOR_STATUS = "5.0.0"
OPERATOR_REASON = "delivery cancelled by the mail system operator"


class _Refused(Exception):
    """One line for stderr, and exit 1."""


class Output:
    """Standard output that a closed pipe (`| head`) silences instead of breaking."""

    def __init__(self) -> None:
        self.closed = False

    def line(self, text: str = "") -> None:
        if not self.closed:
            try:
                sys.stdout.write(text + "\n")
            except BrokenPipeError:
                self._silence()

    def lines(self, lines: Iterable[str], batch: int = 4096) -> None:
        """line() for each, written `batch` at a time (a million lines for a big queue)."""
        it = iter(lines)
        while not self.closed:
            block = list(itertools.islice(it, batch))
            if not block:
                return
            self.line("\n".join(block))

    def data(self, raw: bytes) -> None:
        if not self.closed:
            try:
                sys.stdout.flush()
                sys.stdout.buffer.write(raw)
            except BrokenPipeError:
                self._silence()

    def finish(self) -> None:
        if not self.closed:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.closed = True
        # What is still buffered would be written again at exit, to the closed pipe, and
        # Python would print that error: stdout becomes /dev/null instead (as the Python
        # docs' note on SIGPIPE does).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


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
                reason += f"; the last attempt got: {one_line(rcpt.response)}"
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


# --- finding and claiming ------------------------------------------------------------------


def _spool(config: Config) -> Spool:
    if not config.spool.path.is_dir():
        raise _Refused(f"spool.path: {config.spool.path} is not a directory")
    return Spool.configured(config.spool)


def _not_found(spool: Spool, id: str) -> _Refused:
    if not id_problem(id) and (spool.root / "new" / id).exists():
        return _Refused(f"{id} is waiting in new/ for a daemon to accept it")
    return _Refused(f"no message {id} in the queue")


def _in_flight(id: str) -> _Refused:
    return _Refused(f"{id} is being delivered right now; try again when the attempt ends")


def _claim(spool: Spool, id: str) -> Claim:
    """Claim a queued or held message; _Refused says why not."""
    if spool.find(id) is None:
        raise _not_found(spool, id)
    claim = spool.claim(id) or spool.claim_held(id)
    if claim is None:
        if spool.find(id) is None:
            raise _Refused(f"{id} left the queue (delivered or removed) just now")
        raise _in_flight(id)
    return claim


def _named(ids: list[str]) -> list[str] | None:
    """The ids named: from the command line, standard input for `-`; None for ALL."""
    words: list[str] = []
    for word in ids:
        words += sys.stdin.read().split() if word == STDIN else [word]
    if ALL in words:
        return None
    return list(dict.fromkeys(words))  # each once, in the order given


def _each(spool: Spool, args: argparse.Namespace, out: Output,
          act: Callable[[str], str], folders: tuple[str, ...], noun: str) -> int:
    """Apply `act` to each message named (ALL: each in `folders`); one line each.

    A message of ALL that is in flight is skipped and counted; a named one that cannot
    be done is one line on stderr, and the exit code 1 once all are tried.
    """
    named = _named(args.ids)
    if named is not None:
        failed = 0
        for id in named:
            try:
                out.line(act(id))
            except (_Refused, MxsendError) as exc:
                print(f"mxsend: {exc}", file=sys.stderr)
                failed += 1
        return EXIT_FAILED if failed else EXIT_OK
    done = busy = 0
    unreadable: list[str] = []
    for state, where in list(spool.entries(unreadable)):
        if where not in folders:
            busy += where == "active"
            continue
        try:
            out.line(act(state.id))
            done += 1
        except _Refused:
            busy += 1  # claimed by a daemon (or gone) meanwhile
    note = f" ({busy} in flight, not touched)" if busy else ""
    out.line(f"-- {done} message{'s' * (done != 1)} {noun}{note}")
    return EXIT_FAILED if report_unreadable(unreadable) else EXIT_OK


# --- reading -------------------------------------------------------------------------------


def _list(spool: Spool, args: argparse.Namespace, config: Config, now: float,
          out: Output) -> int:
    older = parse_duration(args.older_than, "--older-than") if args.older_than else None
    chosen = selection(args.domain, args.sender, older)

    # Each share of the queue (read in parallel when big) into sortable results.
    def documents(entries: Iterable[tuple[MessageState, str]]) -> list[tuple[Any, ...]]:
        return [(s.created, s.id, message_document(s, w, now)) for s, w in entries
                if chosen.takes(s, now)]

    # The table needs only what list_summary reads, without the JSON decoder; one flat
    # tuple per row, (created, ID, AGE, ...), and the share's column widths (a million
    # rows: less to pickle, and the widths are measured in parallel too).
    def rows(entries: Iterable[tuple[StateView, str]]) -> tuple[list[int], list[tuple[Any, ...]]]:
        found = [(s.created, *row) for s, w in entries if chosen.takes(s, now)
                 for row in message_rows(s, w, now, chosen)]
        return column_widths(found, first=1) if found else [], found

    with without_cyclic_gc():
        if args.json:
            folded = fold_states(spool.root, documents)
            found = sorted(itertools.chain.from_iterable(folded.results),
                           key=operator.itemgetter(0, 1))
            _print_documents([item[2] for item in found], spool.incoming(), out)
            return EXIT_FAILED if report_unreadable(folded.unreadable) else EXIT_OK
        shares, unreadable = fold_listed(spool.root, rows)
        widths = [max(column) for column in zip(
            column_widths([LIST_HEADER]), *(share[0] for share in shares if share[1]),
            strict=True)]
        # Sorting is stable: a message's rows stay in their order.
        found = sorted(itertools.chain.from_iterable(share[1] for share in shares),
                       key=operator.itemgetter(0, 1))
        _print_rows(found, widths, spool.incoming(), out)
        return EXIT_FAILED if report_unreadable(unreadable) else EXIT_OK


def _print_documents(documents: list[dict[str, Any]], incoming: list[str], out: Output
                     ) -> None:
    # One message per line, by json's C encoder (`indent` takes its pure-Python one:
    # minutes for a million messages); still one JSON document.
    encode = json.JSONEncoder(ensure_ascii=False).encode
    last = len(documents) - 1
    out.line('{"messages": [')
    out.lines(encode(doc) + ("," if i < last else "") for i, doc in enumerate(documents))
    out.line(f'], "incoming": {encode(incoming)}}}')


def _print_rows(found: list[tuple[Any, ...]], widths: list[int], incoming: list[str],
                out: Output) -> None:
    """The table of (created, ID, AGE, ...) rows; a line for files not yet accepted."""
    if found:
        out.lines(table_lines([LIST_HEADER, *(row[1:] for row in found)], widths=widths))
        if out.closed:
            return
        messages = len({row[1] for row in found})
        out.line(f"-- {messages} message{'s' * (messages != 1)}, "
                 f"{len(found)} recipient{'s' * (len(found) != 1)} pending")
    elif not incoming:
        out.line("The queue is empty.")
    # Files not yet accepted have no state to show, but an operator whose daemon is down
    # must not be told the queue is empty while new/ fills up.
    if incoming:
        out.line(f"-- {len(incoming)} file{'s' * (len(incoming) != 1)} in new/ "
                 "waiting for a daemon to accept them")


def _show(spool: Spool, args: argparse.Namespace, config: Config, now: float,
          out: Output) -> int:
    found = spool.find(args.id)
    if found is None:
        raise _not_found(spool, args.id)
    state, where = found
    try:
        message: Message | None = spool.load_message(state.id)
    except MxsendError:
        message = None  # gone meanwhile or unreadable: the state is still worth showing
    if args.json:
        doc = message_document(state, where, now)
        doc["envelope"] = envelope_document(message) if message else None
        out.line(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        for line in show_lines(state, where, now, message):
            out.line(line)
    return EXIT_OK


def _cat(spool: Spool, args: argparse.Namespace, config: Config, now: float,
         out: Output) -> int:
    found = spool.find(args.id)
    if found is None:
        raise _not_found(spool, args.id)
    try:
        message = spool.load_message(args.id)
    except MxsendError as exc:
        raise _Refused(f"{args.id}: cannot read the message: {exc}") from None
    # After DATA, CRLF line ends, not dot-stuffed, with its DKIM-Signature once signed
    # (contract §10): the bytes every attempt sends.
    out.data((found[0].dkim_fields or "").encode("ascii") + message.data)
    return EXIT_OK


def _stats(spool: Spool, args: argparse.Namespace, config: Config, now: float,
           out: Output) -> int:
    with without_cyclic_gc():
        shares, unreadable = stats_shares(spool.root, now)
        domains = shape_rows(shares)
    if args.json:
        out.line(json.dumps({"domains": domains}, ensure_ascii=False, indent=2))
    else:
        for line in shape_lines(domains):
            out.line(line)
    return EXIT_FAILED if report_unreadable(unreadable) else EXIT_OK


# --- changing ------------------------------------------------------------------------------


def _flush(spool: Spool, args: argparse.Namespace, config: Config, now: float,
           out: Output) -> int:
    named = _named(args.ids)
    if named is None or not args.ids:
        return _flush_all(spool, now, out)
    failed = 0
    for id in named:
        try:
            found = spool.find(id)
            if found is not None and found[1] == "hold":
                raise _Refused(f"{id} is on hold; `mxsend queue release {id}` first")
            claim = _claim(spool, id)
            made = _make_due(spool, claim, now)
            out.line(f"{id}: due now" if made else f"{id}: due already")
        except (_Refused, MxsendError) as exc:
            print(f"mxsend: {exc}", file=sys.stderr)
            failed += 1
    spool.request_rescan()
    return EXIT_FAILED if failed else EXIT_OK


def _flush_all(spool: Spool, now: float, out: Output) -> int:
    made = due = busy = held = 0
    unreadable: list[str] = []
    for state, where in list(spool.entries(unreadable)):
        if where == "hold":
            held += 1
        elif where == "active":
            busy += 1
        elif state.next_try <= now:
            due += 1  # claiming it would only get in the daemon's way
        else:
            claim = spool.claim(state.id)
            if claim is None:
                busy += 1  # taken by a daemon meanwhile
            elif _make_due(spool, claim, now):
                made += 1
            else:
                due += 1
    spool.request_rescan()
    others = [f"{due} due already" if due else "", f"{busy} in flight" if busy else "",
              f"{held} on hold" if held else ""]
    note = ", ".join(o for o in others if o)
    out.line(f"{made} message{'s' * (made != 1)} made due now" + (f" ({note})" if note else ""))
    return EXIT_FAILED if report_unreadable(unreadable) else EXIT_OK


def _make_due(spool: Spool, claim: Claim, now: float) -> bool:
    """Release the message due now; whether that changed its next try."""
    state = spool.read(claim)
    # A flush is not an attempt: attempts and the schedule position stay as they were.
    spool.release(claim, dataclasses.replace(state, next_try=min(state.next_try, now)))
    return state.next_try > now


def _delete(spool: Spool, args: argparse.Namespace, config: Config, now: float,
            out: Output) -> int:
    def delete(id: str) -> str:
        spool.delete(_claim(spool, id))
        return f"{id}: deleted"

    return _each(spool, args, out, delete, ("queue", "hold"), "deleted")


def _bounce(spool: Spool, args: argparse.Namespace, config: Config, now: float,
            out: Output) -> int:
    return _each(spool, args, out, lambda id: _bounce_one(spool, id, config, now),
                 ("queue", "hold"), "bounced")


def _bounce_one(spool: Spool, id: str, config: Config, now: float) -> str:
    claim = _claim(spool, id)
    state = spool.read(claim)
    try:
        message = spool.load_message(claim.id)
    except MxsendError as exc:
        spool.release(claim, state)
        raise _Refused(f"{id}: cannot read the message to bounce it: {exc}") from None
    final, reported = operator_bounce(state, message, now)
    reporting_mta = helo_name(config.smtp.helo_name)
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
              tls=None, dsn=rcpt.dsn, response=rcpt.response, attempt=state.attempts,
              dkim=state.dkim)
    if bounce_id is not None:
        event("bounce", claim.id, bounce_id=bounce_id, recipients=[r.address for r in reported])
    spool.complete(claim, final)
    report = f"report {bounce_id} queued" if bounce_id else "no report (" + (
        "null sender" if not state.sender else "NOTIFY asked for none") + ")"
    return f"{id}: {len(newly)} recipient{'s' * (len(newly) != 1)} bounced; {report}"


def _hold(spool: Spool, args: argparse.Namespace, config: Config, now: float,
          out: Output) -> int:
    def hold(id: str) -> str:
        found = spool.find(id)
        if found is None:
            raise _not_found(spool, id)
        if found[1] == "hold":
            return f"{id}: on hold already"
        if spool.hold(id) is None:
            if spool.find(id) is None:
                raise _Refused(f"{id} left the queue (delivered or removed) just now")
            raise _in_flight(id)
        return f"{id}: on hold"

    return _each(spool, args, out, hold, ("queue",), "put on hold")


def _release(spool: Spool, args: argparse.Namespace, config: Config, now: float,
             out: Output) -> int:
    def release(id: str) -> str:
        state = spool.unhold(id)
        if state is None:
            if spool.find(id) is None:
                raise _not_found(spool, id)
            raise _Refused(f"{id} is not on hold")
        spool.request_rescan()
        wait = state.next_try - now
        when = "due now" if wait <= 0 else f"next try in {format_span(wait)}"
        return f"{id}: released, {when}"

    return _each(spool, args, out, release, ("hold",), "released")


_ACTIONS: dict[str, Callable[[Spool, argparse.Namespace, Config, float, Output], int]] = {
    "list": _list,
    "show": _show,
    "cat": _cat,
    "stats": _stats,
    "flush": _flush,
    "delete": _delete,
    "bounce": _bounce,
    "hold": _hold,
    "release": _release,
    "suspended": queue_suspended.suspended,
    "resume": queue_suspended.resume,
}


def run(args: argparse.Namespace, config: Config) -> int:
    setup_logging(config.log.format, config.log.level)
    out = Output()
    spool: Spool | None = None
    try:
        spool = _spool(config)
        return _ACTIONS[args.queue_command](spool, args, config, time.time(), out)
    except ConfigError:
        raise  # bad usage: cli.py's one line and exit 2
    except (_Refused, MxsendError) as exc:
        print(f"mxsend: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        out.finish()
        if spool is not None:
            # Our heartbeat and empty private folders go; nothing is held after a command.
            spool.retire()
