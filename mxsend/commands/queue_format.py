"""What `mxsend queue` shows, as pure functions of the queue's states (time passed in).

`where` is where a state was found (Spool.entries): "queue", "hold" or "active" (in
flight). The JSON documents follow contract §2's M: the state's own fields come from
queue_state's codec, with what the operator needs on top.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, Protocol

from mxsend.envelope import Message, domain_of
from mxsend.queue_state import MessageState, recipient_document

# qshape(1)'s default age buckets, in minutes since the message arrived: each count is
# of recipients at most that old (and older than the bucket before); the last, older.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
AGE_LABELS = (*(f"{m}m" for m in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}m+")


class RecipientView(Protocol):
    """What a list row shows of a recipient: a RecipientState, or queue_read's summary."""

    @property
    def address(self) -> str: ...
    @property
    def response(self) -> str: ...


class StateView(Protocol):
    """What a list row shows of a message: a MessageState, or queue_read's summary of
    its file, read without the JSON decoder for a big queue."""

    @property
    def id(self) -> str: ...
    @property
    def created(self) -> float: ...
    @property
    def sender(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def next_try(self) -> float: ...
    def pending(self) -> Sequence[RecipientView]: ...


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


def format_next_try(state: StateView, where: str, now: float) -> str:
    if where == "active":
        return "in flight"
    if where == "hold":
        return "on hold"
    if state.next_try <= now:
        return "due"
    return f"in {format_span(state.next_try - now)}"


def format_time(timestamp: float | None) -> str:
    """Local time, as the operator's other tools (journalctl, ls) show it."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def one_line(text: str) -> str:
    return " ".join(text.split())


def table(rows: Sequence[Sequence[str]], right: int = 0) -> list[str]:
    """Aligned columns separated by two spaces. Left-aligned, the last column is not
    padded; with `right`, the columns from that one on are right-aligned (numbers)."""
    return list(table_lines(rows, right))


def table_lines(rows: Sequence[Sequence[str]], right: int = 0,
                widths: Sequence[int] | None = None) -> Iterator[str]:
    """table(), one line at a time: a million rows are not also a million lines held.
    `widths`: the columns' (column_widths), when they are known already."""
    if not rows:
        return iter(())
    columns = len(rows[0])
    padded = columns if right else columns - 1
    if widths is None:
        widths = column_widths(rows)
    cells = [f"%{'' if right and i >= right else '-'}{width}s"
             for i, width in enumerate(widths[:padded])]
    # One format string: one C call per row, none per cell.
    layout = "  ".join(cells + ["%s"] * (columns - padded))
    return ((layout % tuple(row)).rstrip() for row in rows)


def column_widths(rows: Sequence[Sequence[Any]], first: int = 0) -> list[int]:
    """The longest text in each column, from column `first` on."""
    return [max(map(len, map(itemgetter(i), rows))) for i in range(first, len(rows[0]))]


# --- selecting -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """`queue list`'s filters; None: any."""

    domain: str | None = None  # recipients at this domain (lower case)
    sender: str | None = None  # "" for the null sender (lower case)
    older_than: float | None = None  # seconds since acceptance

    def takes(self, state: StateView, now: float) -> bool:
        if self.sender is not None and state.sender.lower() != self.sender:
            return False
        if self.older_than is not None and now - state.created <= self.older_than:
            return False
        return not self.domain or any(self.takes_recipient(r) for r in state.pending())

    def takes_recipient(self, recipient: RecipientView) -> bool:
        return not self.domain or domain_of(recipient.address).lower() == self.domain


def selection(domain: str | None, sender: str | None, older_than: float | None) -> Selection:
    """From the command line: `--sender "<>"` (or "") is the null sender."""
    if sender is not None:
        sender = sender.strip()
        sender = sender[1:-1] if sender.startswith("<") and sender.endswith(">") else sender
    return Selection(domain=domain.lower().rstrip(".") if domain else None,
                     sender=sender.lower() if sender is not None else None,
                     older_than=older_than)


# --- list ------------------------------------------------------------------------------------


LIST_HEADER = ("ID", "AGE", "SENDER", "RECIPIENT", "ATTEMPTS", "NEXT TRY", "LAST REPLY")


def message_rows(state: StateView, where: str, now: float,
                 chosen: Selection = Selection()) -> list[list[str]]:
    """`queue list`'s rows of one message: one per pending recipient, with that
    recipient's last reply."""
    age = format_span(now - state.created)
    sender = f"<{state.sender}>"
    attempts = str(state.attempts)
    next_try = format_next_try(state, where, now)
    return [[state.id, age, sender, rcpt.address, attempts, next_try,
             one_line(rcpt.response) or "-"]
            for rcpt in state.pending() if chosen.takes_recipient(rcpt)]


def message_document(state: MessageState, where: str, now: float) -> dict[str, Any]:
    """Contract §2's M: the state's fields, `held`, `next_try` null while held, and
    each recipient's `reply`; times are seconds since the epoch."""
    held = where == "hold" or state.held
    return {
        "id": state.id,
        "state": {"active": "in-flight", "hold": "held"}.get(where, "queued"),
        "held": held,
        "created": state.created,
        "age": round(now - state.created, 3),
        "sender": state.sender,
        "size": state.size,
        "attempts": state.attempts,
        "last_try": state.last_try,
        "next_try": None if held else state.next_try,
        "last_error": state.last_error,
        "pending": [r.address for r in state.pending()],
        "recipients": [
            {**recipient_document(r), "reply": r.response,
             "last_attempt": r.last_attempt or None}
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
    status = {"active": "in flight (being delivered now)",
              "hold": "on hold (released by `mxsend queue release`)"}.get(where, "queued")
    rows = [
        ["id:", state.id],
        ["state:", status],
        ["created:", f"{format_time(state.created)} ({format_span(now - state.created)} ago)"],
        ["sender:", f"<{state.sender}>"],
        ["size:", f"{state.size} bytes"],
        ["attempts:", str(state.attempts)],
        ["last try:", format_time(state.last_try)],
        ["next try:", f"{format_time(state.next_try)} ({format_next_try(state, where, now)})"],
        ["last error:", one_line(state.last_error) or "-"],
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
            one_line(rcpt.response) or "-",
        ])
    lines += table(recipient_rows)
    return lines


# --- stats (qshape) --------------------------------------------------------------------------


def age_label(age_seconds: float) -> str:
    """The bucket of a recipient `age_seconds` after its message arrived."""
    minutes = max(0.0, age_seconds) / 60
    return AGE_LABELS[bisect.bisect_left(AGE_BUCKETS, minutes)]


def shape(entries: Iterable[tuple[MessageState, str]], now: float) -> list[dict[str, Any]]:
    """Pending recipients by destination domain and age bucket, as qshape counts them:
    the domains with the most first (then by name). Held messages are left out, as
    qshape leaves out Postfix's hold queue by default."""
    return shape_rows([shape_counts(entries, now)])


def shape_counts(entries: Iterable[tuple[MessageState, str]], now: float
                 ) -> dict[str, dict[str, int]]:
    """shape()'s counts of one share of the queue: domain -> age label -> recipients."""
    return shape_count_summaries(
        ((s.created, [r.address for r in s.pending()]) for s, where in entries
         if where != "hold" and not s.held), now)


def shape_count_summaries(summaries: Iterable[tuple[float, Sequence[str]]], now: float
                          ) -> dict[str, dict[str, int]]:
    """shape_counts() from (created, pending recipient addresses) of messages not held."""
    counts: dict[str, dict[str, int]] = {}
    for created, pending in summaries:
        label = age_label(now - created)
        for address in pending:
            domain = domain_of(address).lower()
            ages = counts.get(domain)
            if ages is None:
                ages = counts[domain] = dict.fromkeys(AGE_LABELS, 0)
            ages[label] += 1
    return counts


def shape_rows(shares: Iterable[dict[str, dict[str, int]]]) -> list[dict[str, Any]]:
    """The counts of every share added up, as shape() returns them."""
    counts: dict[str, dict[str, int]] = {}
    for share in shares:
        for domain, ages in share.items():
            total = counts.setdefault(domain, dict.fromkeys(AGE_LABELS, 0))
            for label, n in ages.items():
                total[label] += n
    rows = [{"domain": d, "total": sum(a.values()), "ages": a} for d, a in counts.items()]
    return sorted(rows, key=lambda row: (-row["total"], row["domain"]))


def shape_lines(domains: list[dict[str, Any]]) -> list[str]:
    """qshape's table: a TOTAL row, then one row per domain, ages across."""
    header = ["", "T", *(label.replace("m", "") for label in AGE_LABELS)]
    total = ["TOTAL", str(sum(d["total"] for d in domains)),
             *(str(sum(d["ages"][label] for d in domains)) for label in AGE_LABELS)]
    rows = [header, total]
    rows += [[d["domain"], str(d["total"]), *(str(d["ages"][label]) for label in AGE_LABELS)]
             for d in domains]
    return table(rows, right=1)
