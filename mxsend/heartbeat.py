"""Heartbeats: how a daemon proves it is alive, and how others judge it.

Each daemon refreshes owners/<owner> in the spool from its event loop (Spool.heartbeat)
every INTERVAL seconds, or more often when systemd's watchdog asks for it; the file
holds `boot_id pidns pid` (spool.process_identity). A wedged or stopped loop stops
beating, so the file's age is the loop's health:

- another daemon takes back a process's claims once its beat is STALE_AFTER old;
- `mxsend health` fails when no daemon beats, or when any beat is older than MAX_AGE;
- the supervisor pings systemd's watchdog only while each of its daemons beats.

This module is small on purpose: `health` and the supervisor import it, never the
daemon's delivery stack.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

INTERVAL = 5.0
# The margin covers a loop stalled by a slow disk; a claim is only ever recovered from
# a process that stopped beating.
STALE_AFTER = 60.0
# Three missed beats: slack for a busy machine, still well inside Docker's interval.
MAX_AGE = 3 * INTERVAL


def interval(watchdog: float | None) -> float:
    """Seconds between beats: INTERVAL, or the watchdog's ping interval if shorter."""
    return min(INTERVAL, watchdog) if watchdog else INTERVAL


@dataclass(frozen=True, slots=True)
class Beat:
    owner: str
    pid: int | None  # from the file's content; None if unreadable
    mtime: float


def read_beats(spool: Path) -> list[Beat]:
    """The heartbeat files in `spool`/owners; none if the folder does not exist."""
    beats = []
    try:
        with os.scandir(spool / "owners") as it:
            entries = list(it)
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            mtime = entry.stat().st_mtime
            with open(entry.path) as handle:
                parts = handle.read().split()
        except OSError:
            continue  # removed meanwhile: a clean exit
        pid = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None
        beats.append(Beat(entry.name, pid, mtime))
    return sorted(beats, key=lambda b: b.owner)


def stale(beats: Iterable[Beat], now: float, max_age: float = MAX_AGE) -> list[Beat]:
    """The beats older than `max_age`."""
    return [b for b in beats if b.mtime < now - max_age]


def all_fresh(beats: Iterable[Beat], pids: Collection[int], now: float,
              max_age: float) -> bool:
    """Does every process in `pids` have a beat no older than `max_age`?

    A process with no beat at all (not started yet, or unable to write one) is not
    fresh: the watchdog is told only what is known to be alive.
    """
    newest: dict[int, float] = {}
    for beat in beats:
        if beat.pid is not None:
            newest[beat.pid] = max(beat.mtime, newest.get(beat.pid, 0.0))
    return all(newest.get(pid, float("-inf")) >= now - max_age for pid in pids)
