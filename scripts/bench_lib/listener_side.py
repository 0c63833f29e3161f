"""Pricing the features: the SMTP listener as the way in (`--listener`) and the config
sections the other feature options add (`--shape`).

`--listener`: `mxsend run` (the live daemon, not --once) with `[listen]` on a free
loopback port; once it is READY, Postfix's `smtp-source` submits N messages into the
listener, one smtp-source per recipient domain (it takes one recipient address; the
domains are the workload's four), each with SOURCE_SESSIONS sessions reusing their
connection (-d). The clock runs from the first smtp-source's start until the sink has
counted every message: messages/s end to end, submission, spool, delivery. CPU is the
daemon's process tree's (supervisor, daemons, Lua workers) over that window;
smtp-source's own CPU is reported apart. smtp-source sends one recipient per message
and a fixed payload of `-l` bytes (the workload's mean, 3 KB), so this workload is not
the mixed one: compare it with itself, with and without the other options.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_lib.mxsend_side import daemon, log_summary, spool_leftovers, write_config
from bench_lib.procstat import Window, wait_until
from bench_lib.sink import HOST, Sinks, free_port
from bench_lib.workload import DOMAINS, SENDER

SOURCE_SESSIONS = 5  # per domain: 20 connections into the listener in all
PAYLOAD = 3072


def shape_toml(redis_url: str, max_connections: int = 1000,
               rate: str = "100000/s") -> str:
    """One [[shape]] over every MX host, counted in the [cluster] Redis.

    It prices the machinery (a lease per connection, GCRA slots reserved on Redis),
    so its limits are far above what the run reaches and never hold a message back.
    Shapes match MX host names, not addresses: `*` covers the sinks' names.
    """
    return ("\n[[shape]]\n"
            'name = "bench"\n'
            'hosts = ["*"]\n'
            f"max_connections = {max_connections}\n"
            f'rate = "{rate}"\n'
            "\n[cluster]\n"
            f'redis = "{redis_url}"\n')


def listen_toml(port: int) -> str:
    return f'\n[listen]\naddress = "{HOST}:{port}"\n'


def _source_split(n: int) -> list[int]:
    per, extra = divmod(n, len(DOMAINS))
    return [per + (1 if i < extra else 0) for i in range(len(DOMAINS))]


def run_listener(n: int, workdir: Path, nameserver: str, timeout: float, *,
                 sink_hosts: list[str] | None = None, mta_sts: bool = True,
                 extra_toml: str = "") -> dict[str, Any]:
    spool = workdir / "spool-listener"
    for sub in ("tmp", "new"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    port = free_port()
    log = workdir / "mxsend-listener.log"
    res: dict[str, Any] = {"n": n, "payload": PAYLOAD, "sessions": SOURCE_SESSIONS * 4}
    with Sinks(workdir, "sink-listener", sink_hosts or [HOST]) as sink:
        config = write_config(workdir / "mxsend-listener.toml", spool=spool,
                              sink_port=sink.port, nameserver=nameserver, mta_sts=mta_sts,
                              extra_toml=listen_toml(port) + extra_toml)
        with daemon(config, workdir, log, timeout) as (proc, _t_start, _t_ready):
            sources: list[subprocess.Popen[bytes]] = []
            try:
                with Window(proc.pid, sink) as window:
                    for domain, count in zip(DOMAINS, _source_split(n), strict=True):
                        if count:
                            sources.append(subprocess.Popen(
                                [exe, "-d", "-s", str(SOURCE_SESSIONS), "-m", str(count),
                                 "-l", str(PAYLOAD), "-M", "bench.localdomain", "-f",
                                 SENDER, "-t", f"user@{domain}", f"{HOST}:{port}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE))
                    source_cpu = 0.0
                    deadline = time.monotonic() + timeout
                    for src in sources:
                        _pid, status, usage = os.wait4(src.pid, 0)
                        src.returncode = os.waitstatus_to_exitcode(status)
                        source_cpu += usage.ru_utime + usage.ru_stime
                    t_submitted = time.perf_counter()
                    wait_until(lambda: sink.mesg() >= n, deadline,
                               lambda: f"sink has {sink.mesg()} of {n}", interval=0.02)
                    window.end()
            finally:
                for src in sources:
                    if src.poll() is None:
                        src.kill()
                        src.wait()
            errors = [src.stderr.read().decode(errors="replace")[:300]
                      for src in sources if src.stderr is not None and src.returncode]
            for src in sources:
                if src.stderr is not None:
                    src.stderr.close()
        res.update(window.figures(n))
        res.update({"submit_s": t_submitted - window.t0, "smtp_source_cpu_s": source_cpu,
                    "source_errors": errors})
    res["leftovers"] = spool_leftovers(spool)
    res["log"] = log_summary(log)
    res["ok"] = res["sink_counted"] == n and not res["leftovers"] and not errors
    return res
