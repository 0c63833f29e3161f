"""The arguments of `mxsend queue ACTION` (contract §2, §10); argparse only.

Kept apart from commands/queue.py so that building the parser (on every mxsend call,
`enqueue` included) loads nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

# Words that name messages instead of an id, as Postfix's postsuper takes them.
ALL = "ALL"  # every message the action applies to
STDIN = "-"  # ids on standard input, one per line (or separated by spaces)

_IDS_HELP = "queue ids; ALL for every message; - to read ids from standard input"


def add_queue_actions(actions: argparse._SubParsersAction[Any],
                      finish: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add each action's parser to `actions`; `finish(parser)` adds the shared flags."""

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text)
        finish(parser)
        return parser

    listing = action("list", "one line per pending recipient, with its own last reply")
    listing.add_argument("--domain", metavar="DOMAIN",
                         help="only recipients at DOMAIN (case-insensitive)")
    listing.add_argument("--sender", metavar="ADDRESS",
                         help="only messages from ADDRESS (\"<>\" for the null sender)")
    listing.add_argument("--older-than", metavar="AGE", dest="older_than",
                         help="only messages queued longer ago than AGE (30m, 2h, 1d)")
    listing.add_argument("--json", action="store_true", help="one JSON document")

    show = action("show", "show one message's state")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON document")

    cat = action("cat", "print the message as it will be sent (CRLF, not dot-stuffed)")
    cat.add_argument("id", metavar="ID")

    stats = action("stats", "pending recipients by destination domain and age (qshape)")
    stats.add_argument("--json", action="store_true", help="one JSON document")

    flush = action("flush", "make messages due now (default: ALL)")
    flush.add_argument("ids", metavar="ID", nargs="*", help=_IDS_HELP)
    for name, help_text in (
        ("delete", "remove messages without a bounce"),
        ("bounce", "give up on messages and bounce them"),
        ("hold", "put messages on hold: never attempted until released"),
        ("release", "release held messages into the queue"),
    ):
        parser = action(name, help_text)
        parser.add_argument("ids", metavar="ID", nargs="+", help=_IDS_HELP)

    suspended = action("suspended", "destinations a reply rule suspended, and until when")
    suspended.add_argument("--json", action="store_true", help="one JSON document")
    resume = action("resume", "lift a destination's suspension on every daemon (and host)")
    resume.add_argument("destination", metavar="DEST",
                        help="the destination as `queue suspended` lists it")
