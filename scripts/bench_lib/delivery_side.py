"""mxsend's delivery phase alone (`--mxsend-mode delivery`): the work Postfix's side does.

The baseline's "delivery" mode (../shared/reference/postfix-baseline/REPORT.md, "the number
to compare an outbound delivery daemon against") parks the N messages in Postfix's
deferred queue, starts Postfix, and times from `postqueue -f` until the sink has every
message and the queue is empty. This is the same for mxsend:

1. the N messages are queued through mxsend's own Spool API and deferred a week
   (deferred_side.park_deferred: `attempts = 1`, as Postfix's deferred queue files have
   one failed attempt);
2. `mxsend run` starts on that spool and the harness waits for READY=1 (Postfix started
   and reloaded);
3. the clock starts; every parked message is made due as the bench's deferred part does
   (its file's mtime, its next try, set to now; synced; control/rescan touched: the
   harness's work, inside the wall time as `postqueue -f` is inside Postfix's);
4. the clock stops when the sink has counted every transaction and queue/, active/ and
   msg/ are empty (Postfix: "every queue directory is empty").

CPU is the daemon tree's (supervisor, daemons, Lua workers) difference across the timed
phase, from /proc, as Postfix's. `log.level` is "info", mxsend's default: a `delivery`
line per recipient, as Postfix logs a `status=sent` line per recipient.

Both sides then do the same work: read a queued message, run the policy, deliver it,
record it and remove it. The `run --once` figure (`--mxsend-mode from-new`) also times
mxsend's start-up and the acceptance of every message from new/, which Postfix's delivery
mode leaves out (Postfix's acceptance is its smtpd and cleanup, not timed there).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench_lib.deferred_side import make_all_due, park_deferred
from bench_lib.mxsend_side import daemon, log_summary, spool_leftovers, write_config
from bench_lib.procstat import Window, wait_until
from bench_lib.sink import HOST, Sinks
from bench_lib.workload import Msg

# mxsend's own log level by default; Postfix logs every delivery too.
LOG_LEVEL = "info"


def _drained(spool: Path) -> bool:
    """No message left queued, in flight or in msg/ (dot-files aside)."""
    for sub in ("queue", "msg"):
        with os.scandir(spool / sub) as it:
            if any(not e.name.startswith(".") for e in it):
                return False
    for owner in os.scandir(spool / "active"):
        with os.scandir(owner.path) as it:
            if any(not e.name.startswith(".") for e in it):
                return False
    return True


def run_delivery(msgs: list[Msg], workdir: Path, nameserver: str, timeout: float,
                 processes: int | str = "auto", sink_hosts: list[str] | None = None,
                 mta_sts: bool = True, extra_toml: str = "", dkim: list[dict[str, object]]
                 | None = None) -> dict[str, Any]:
    spool = workdir / "spool-delivery"
    if spool.exists():
        raise RuntimeError(f"{spool} exists: use a fresh --workdir")
    t = time.perf_counter()
    parked = park_deferred(spool, msgs)
    expected = sum(m.domains for m in msgs)
    res: dict[str, Any] = {
        "mode": "delivery", "n": len(msgs), "rcpts": sum(len(m.rcpts) for m in msgs),
        "bytes": sum(len(m.data) for m in msgs), "expected_transactions": expected,
        "fill_s": time.perf_counter() - t, "parked": parked, "log_level": LOG_LEVEL,
    }
    log = workdir / "mxsend-delivery.log"
    with Sinks(workdir, "sink-delivery", sink_hosts or [HOST]) as sink:
        config = write_config(workdir / "mxsend-delivery.toml", spool=spool,
                              sink_port=sink.port, nameserver=nameserver,
                              processes=processes, mta_sts=mta_sts, extra_toml=extra_toml,
                              dkim=dkim, log_level=LOG_LEVEL)
        with daemon(config, workdir, log, timeout) as (proc, t_start, t_ready):
            res["start_to_ready_s"] = t_ready - t_start
            if sink.mesg() != 0:
                raise RuntimeError("mxsend delivered a parked message before the flush")
            # ---- timed phase
            with Window(proc.pid, sink) as window:
                res["made_due"] = make_all_due(spool)
                deadline = time.monotonic() + timeout
                t_sink = wait_until(lambda: sink.mesg() >= expected, deadline, lambda: (
                    f"sink has {sink.mesg()} of {expected}; spool {spool_leftovers(spool)}"))
                wait_until(lambda: _drained(spool), deadline,
                           lambda: f"spool not empty: {spool_leftovers(spool)}")
                window.end()
            res.update(window.figures(len(msgs)))
            res["wall_to_sink_s"] = t_sink - window.t0
            # no daemon died on the way (it is stopped by SIGTERM as the block ends)
            res["running_at_end"] = proc.poll() is None
        res["sink_sessions"] = sink.sessions()  # pooled sessions end at the daemon's stop
    res["leftovers"] = spool_leftovers(spool)
    res["log"] = log_summary(log)
    sent = res["log"]["statuses"].get("sent", 0)
    # every recipient logged as sent (a `delivery` line with status=sent each)
    res["ok"] = (res["running_at_end"] and res["sink_counted"] == expected
                 and not res["leftovers"] and sent == res["rcpts"])
    return res
