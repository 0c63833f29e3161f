"""`mxsend queue suspended` and `mxsend queue resume DEST` (contract §9).

A suspension is a file in the spool's `suspended/` folder (limiter.py), which every
daemon of the spool reads; with `cluster.redis`, also a key every host reads. `resume`
removes both, so the destination takes mail again on every daemon within a moment
(limiter.Limiter.RECHECK, shaper.CLUSTER_SUSPENSION_RECHECK).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from typing import Protocol

from mxsend.cluster import Cluster
from mxsend.commands.queue_read import report_unreadable
from mxsend.config import Config
from mxsend.limiter import Suspension, read_suspensions, remove_suspension
from mxsend.shaper import suspended_reason
from mxsend.spool import Spool

EXIT_OK = 0
EXIT_FAILED = 1


class _Out(Protocol):
    def line(self, text: str = "") -> None: ...


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def merge(local: list[Suspension], remote: list[tuple[str, float, str]] | None,
          now: float) -> list[Suspension]:
    """The spool's suspensions and the cluster's, one per destination (the later end)."""
    found = {s.destination: s for s in local}
    for destination, left, reply in remote or ():
        other = found.get(destination)
        if other is None or other.until < now + left:
            found[destination] = Suspension(destination, now + left, reply)
    return sorted(found.values(), key=lambda s: s.destination)


async def _cluster_call(config: Config, resume: str | None
                        ) -> tuple[list[tuple[str, float, str]] | None, bool | None]:
    cluster = Cluster(config.shaping.cluster.redis)
    try:
        if resume is not None:
            return None, await cluster.resume(resume)
        return await cluster.suspensions(), None
    finally:
        await cluster.close()


def suspended(spool: Spool, args: argparse.Namespace, config: Config, now: float,
              out: _Out) -> int:
    remote = None
    if config.shaping.cluster.redis:
        remote, _ = asyncio.run(_cluster_call(config, None))
        if remote is None:
            print(f"mxsend: the cluster ({config.shaping.cluster.redis}) cannot be reached; "
                  "showing this spool's suspensions only", file=sys.stderr)
    found = merge(read_suspensions(spool.root, now), remote, now)
    if args.json:
        out.line(json.dumps({"suspended": [
            {"destination": s.destination, "until": round(s.until, 3), "reply": s.reply}
            for s in found]}, ensure_ascii=False, indent=2))
        return EXIT_OK
    if not found:
        out.line("nothing is suspended")
    for s in found:
        out.line(f"{s.destination}  until {_iso(s.until)} ({s.until - now:.0f}s)  {s.reply}")
    return EXIT_OK


def resume(spool: Spool, args: argparse.Namespace, config: Config, now: float,
           out: _Out) -> int:
    destination: str = args.destination.strip()
    lifted = remove_suspension(spool.root, destination)
    if config.shaping.cluster.redis:
        _, removed = asyncio.run(_cluster_call(config, destination))
        if removed is None:
            print(f"mxsend: the cluster ({config.shaping.cluster.redis}) cannot be reached: "
                  f"{destination} stays suspended on other hosts", file=sys.stderr)
            return EXIT_FAILED
        lifted = lifted or removed
    if not lifted:
        print(f"mxsend: {destination} is not suspended", file=sys.stderr)
        return EXIT_FAILED
    # Daemons forget what they knew of suspensions on a rescan request: first that, then
    # the waiting mail made due (and a rescan to pick it up at once).
    spool.request_rescan()
    made = _make_waiting_due(spool, destination, now)
    spool.request_rescan()
    out.line(f"{destination}: resumed ({made} waiting message{'s' * (made != 1)} due now)")
    return EXIT_OK


def _make_waiting_due(spool: Spool, destination: str, now: float) -> int:
    """The queued messages that wait for this destination's suspension: due now."""
    reason = suspended_reason(destination)
    made = 0
    unreadable: list[str] = []
    for state, where in list(spool.entries(unreadable)):
        if where != "queue" or state.last_error != reason or state.next_try <= now:
            continue
        claim = spool.claim(state.id)
        if claim is None:
            continue   # a daemon has it: it looks at the destination again itself
        current = spool.read(claim)
        # Not an attempt: attempts and the schedule position stay as they were.
        spool.release(claim, dataclasses.replace(current, next_try=now))
        made += 1
    report_unreadable(unreadable)  # the daemon retries those on its own schedule
    return made
