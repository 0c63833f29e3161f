"""mxsend with a big deferred queue (`--parts deferred`): issue 16 item 7's figures.

The parked messages are queued through mxsend's own Spool API and deferred a week, to
recipients in PARKED_DOMAIN, whose MX is a sink that answers every RCPT with 421. The
daemon then starts on that spool and the harness records: start to READY, the PSS sum of
every process (supervisor, daemons, Lua workers) at READY and its peak over the run,
the latency of new messages (p50, p99), how long `mxsend queue stats` and `queue list`
take, and, with a sweep, the latency of new messages while every parked message is
made due at once (`mxsend queue flush`) and attempted again: the retry sweep must not
starve new mail. (The sweep is started by setting every parked file's mtime, its next
try, to now and touching control/rescan: the queue after an outage of the destination.)

`--parked-spool DIR` keeps the parked spool outside the work directory and reuses it
when it is there already (parking a million messages takes a quarter of an hour).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from unittest import mock

from bench_lib.dnsserver import PARKED_DOMAIN, PARKED_HOST
from bench_lib.mxsend_side import (
    _latency_stats,
    daemon,
    latencies,
    log_summary,
    mxsend_exe,
    spool_leftovers,
    write_config,
)
from bench_lib.procstat import TreeMonitor, tree_sample, tree_vm
from bench_lib.sink import HOST, Sink, Sinks, common_free_port
from bench_lib.workload import Msg, drop_message, iter_messages, to_bsmtp

HOLD_S = 7 * 86400


def parked_messages(count: int) -> Iterable[Msg]:
    return iter_messages(count, seed=11, domains=(PARKED_DOMAIN,))


def park_deferred(spool: Path, msgs: Iterable[Msg], hold_s: float = HOLD_S) -> int:
    """Queue every message through mxsend's own Spool API, then defer it `hold_s`.

    The spool's fsyncs are switched off while filling (this is fixture data; one
    os.sync() at the end makes it durable) so 100,000 messages take seconds, not minutes.
    """
    import mxsend.durable as durable_mod  # the project's venv, imported only here
    import mxsend.spool as spool_mod

    for sub in ("tmp", "new"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    handle = spool_mod.Spool(spool, owner="bench-filler")
    handle.create_dirs()
    count = 0
    # mxsend.spool makes every OS call through the `os` module, so patching os.fsync
    # (for this process, while filling) reaches all of them.
    with mock.patch("os.fsync", lambda fd: None), \
            mock.patch.object(durable_mod, "fsync_dir", lambda path: None):
        now = time.time()
        for i, msg in enumerate(msgs):
            name = f"D{i:08d}"
            drop_message(spool, name, to_bsmtp(msg), sync_dir=False)
            accepted = handle.accept(name, now)
            if not isinstance(accepted, spool_mod.Accepted):
                raise RuntimeError(f"the spool did not accept {name}: {accepted}")
            claim = handle.claim(name)
            if claim is None:
                raise RuntimeError(f"could not claim {name}")
            state = dataclasses.replace(
                handle.read(claim), attempts=1, last_try=now, next_try=now + hold_s,
                last_error="451 4.3.0 parked by scripts/bench",
            )
            handle.release(claim, state)
            count += 1
        handle.retire()
    os.sync()
    return count


def count_queued(spool: Path) -> int:
    """State files waiting in queue/ (any depth: the layout may fan out)."""
    return sum(sum(1 for f in files if not f.startswith("."))
               for _root, _dirs, files in os.walk(spool / "queue"))


def prepare(spool: Path, count: int) -> dict[str, Any]:
    """Park `count` messages in `spool`, or reuse it if a previous run parked them."""
    marker = spool.with_name(spool.name + ".parked.json")
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("count") == count:
            return {"park_s": None, "reused": True, "domain": info.get("domain")}
        raise RuntimeError(f"{spool} holds {info.get('count')} parked messages, not {count}")
    if spool.exists():
        raise RuntimeError(f"{spool} exists but has no {marker.name}: use a fresh path")
    t = time.perf_counter()
    park_deferred(spool, parked_messages(count))
    marker.write_text(json.dumps({"count": count, "domain": PARKED_DOMAIN}) + "\n")
    return {"park_s": time.perf_counter() - t, "reused": False, "domain": PARKED_DOMAIN}


def make_all_due(spool: Path) -> dict[str, Any]:
    """The week has passed: every parked message due now (its queue/ file's mtime is its
    next try), synced, then control/rescan touched, as `mxsend queue flush` does. Not `queue
    flush` itself, which claims, rewrites and releases each message (three barriers
    each: the better part of an hour for a million)."""
    t = time.perf_counter()
    now = time.time()
    count = 0
    for folder, _dirs, files in os.walk(spool / "queue"):
        for name in files:
            if not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(os.path.join(folder, name), (now, now))
                    count += 1
    # A million utime() calls leave a million dirty inodes: the daemons' next barrier (a
    # syncfs) would write them all back (about 2 s here) and bill it to a new message.
    # They are the harness's writes, flushed like the parking's (one sync) before timing.
    synced = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - synced
    (spool / "control").mkdir(exist_ok=True)
    (spool / "control" / "rescan").touch()
    return {"wall_s": time.perf_counter() - t, "made_due": count, "sync_s": sync_s}


def _wait_for_session(tarpit: Sink, before: int, timeout: float, since: float) -> float:
    """Seconds from `since` until the tarpit saw a session after its first `before`."""
    deadline = time.monotonic() + timeout
    while tarpit.sessions() <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no parked message attempted after {timeout:.0f}s")
        time.sleep(0.05)
    return time.perf_counter() - since


def timed_command(config: Path, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run `mxsend -c CONFIG ARGS` to a file; wall time, exit code and output lines."""
    t = time.perf_counter()
    with open(out, "wb") as handle:
        proc = subprocess.run([mxsend_exe(), "-c", str(config), *args], stdin=subprocess.DEVNULL,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)
    wall = time.perf_counter() - t
    with open(out, "rb") as handle:
        lines = sum(1 for _ in handle)
    return {"wall_s": wall, "exit_code": proc.returncode, "lines": lines}


def run_deferred(count: int, probes: list[Msg], workdir: Path, nameserver: str,
                 timeout: float, *, sink_hosts: list[str] | None = None,
                 parked_spool: Path | None = None, sweep: bool = True,
                 processes: int | str = "auto") -> dict[str, Any]:
    spool = parked_spool or workdir / "spool-deferred"
    res: dict[str, Any] = {"deferred": count, "spool": str(spool)}
    res.update(prepare(spool, count))
    res["queued_before_start"] = count_queued(spool)
    sweep = sweep and res.get("domain") == PARKED_DOMAIN
    hosts = sink_hosts or [HOST]
    port = common_free_port([*hosts, PARKED_HOST])
    log = workdir / "mxsend-deferred.log"
    tarpit = Sink(workdir / "sink-parked.out", port, host=PARKED_HOST, options=("-Q", "RCPT"))
    with Sinks(workdir, "sink-deferred", hosts, port=port) as sink, tarpit:
        config = write_config(workdir / "mxsend-deferred.toml", spool=spool,
                              sink_port=sink.port, nameserver=nameserver, processes=processes)
        with daemon(config, workdir, log, timeout) as (proc, t_start, t_ready):
            monitor = TreeMonitor(proc.pid, progress=sink.mesg, interval=0.5)
            monitor.start()
            try:
                tree_ready = tree_sample(proc.pid)
                rss_ready = tree_vm(proc.pid)
                values = latencies(sink, spool, probes, "P")
                stats = timed_command(config, ["queue", "stats"], workdir / "stats.out",
                                      timeout)
                listing = timed_command(config, ["queue", "list"], workdir / "list.out",
                                        timeout)
                during: list[float] = []
                flush: dict[str, Any] = {}
                sessions0 = tarpit.sessions()
                attempting: list[float] = []
                if sweep:
                    flush = make_all_due(spool)
                    t_sweep = time.perf_counter()
                    # first while the daemons list the queue again (a rescan: seconds)...
                    during = latencies(sink, spool, probes, "S")
                    # ...then once they attempt the parked messages (the tarpit's first
                    # session), while they go on doing so
                    flush["attempts_began_s"] = _wait_for_session(tarpit, sessions0, timeout,
                                                                  t_sweep)
                    attempting = latencies(sink, spool, probes, "T")
                    flush["sweep_s"] = time.perf_counter() - t_sweep
                    # the parked messages attempted meanwhile (one session each at most)
                    flush["tarpit_sessions"] = tarpit.sessions() - sessions0
                rss_after = tree_vm(proc.pid)
                cpu_after = tree_sample(proc.pid)["cpu"]
            finally:
                peak = monitor.stop()
        res.update({
            "start_to_ready_s": t_ready - t_start,
            "cpu_to_ready_s": tree_ready["cpu"],
            "rss_at_ready_mb": rss_ready.get("VmRSS", 0) / 2**20,
            "pss_sum_at_ready_mb": tree_ready["pss"] / 2**20,  # every process
            "nproc_at_ready": tree_ready["nproc"],
            "peak_pss_sum_mb": peak.pss / 2**20,
            "rss_after_probes_mb": rss_after.get("VmRSS", 0) / 2**20,
            "peak_rss_mb": rss_after.get("VmHWM", 0) / 2**20,
            "cpu_total_s": cpu_after,
            "probe_latency": _latency_stats(values),
            "queue_stats": stats,
            "queue_list": listing,
            "sweep": flush,
            "sweep_probe_latency": _latency_stats(during) if during else None,
            "sweep_attempting_probe_latency": (_latency_stats(attempting) if attempting
                                               else None),
            "sink_counted": sink.mesg(),
            "timeline": peak.timeline,
        })
    left = spool_leftovers(spool)
    res["leftovers"] = left
    res["log"] = log_summary(log)
    probes_sent = (3 if sweep else 1) * sum(m.domains for m in probes)
    # the probes went out, and nothing parked was sent or lost
    res["ok"] = (res["sink_counted"] == probes_sent
                 and res["queued_before_start"] == count
                 and count_queued(spool) == count and set(left) <= {"queue", "msg"}
                 and stats["exit_code"] == 0 and listing["exit_code"] == 0)
    with contextlib.suppress(OSError):
        (workdir / "list.out").unlink()  # a million lines: the count is kept
    return res
