"""`mxsend run [--once]`: the daemon in the foreground (or its supervisor)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from mxsend import batv, log, metrics
from mxsend.config import Config
from mxsend.errors import SpoolError
from mxsend.log import get_logger, setup_logging
from mxsend.luasandbox import read_script
from mxsend.services import serving
from mxsend.supervisor import CHILD_ENV, Supervisor, child_position, share_of

# The spool's I/O thread makes many short system calls, each followed by taking the
# GIL back from the event loop; at CPython's default 5 ms switch interval it queued
# behind the loop for most of that (docs/performance.md). 1 ms measured best.
SWITCH_INTERVAL = 0.001


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop where it is installed (a dependency on Linux), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        return _run(args, config)
    finally:
        log.flush()


def _process_name(child: str | None, config: Config) -> str | None:
    """The `process` field of every line: "i/n" for daemon i of n (from 1),
    "supervisor" for the supervisor, none for the only daemon (docs/operations.md)."""
    if child:
        index, count = child_position(child)
        return f"{index + 1}/{count}"
    return "supervisor" if config.queue.processes > 1 else None


def _run(args: argparse.Namespace, config: Config) -> int:
    child = os.environ.get(CHILD_ENV)
    setup_logging(config.log.format, config.log.level, buffered=True,
                  process=_process_name(child, config))
    # A script that does not compile would leave the daemon on defaults, silently
    # dropping rules such as a partner's forceTLS: refuse to start (exit 2, one line
    # naming the file and line as Lua does), before any daemon or supervisor starts.
    # A missing script is allowed: the built-in defaults, logged once (contract §4).
    for path in (config.script.path, config.script.server_rules_path):
        _, error = read_script(path) if path is not None else (None, None)
        if error is not None:
            print(f"mxsend: script does not compile: {error}", file=sys.stderr)
            return 2
    child = os.environ.get(CHILD_ENV)
    if not child and config.dkim.keys:
        # Likewise a DKIM key that cannot be read or parsed: exit 2 naming it (the
        # DkimKeyError reaches cli.main), once, before any daemon starts; its
        # warnings (a key others can read) are logged here for every daemon.
        from mxsend.dkim import Signer  # not the daemon's stack: the supervisor's memory

        for warning in Signer.from_config(config.dkim.keys)[1]:
            get_logger().warning("DKIM key %s", warning)
    position = (0, 1)
    if child:
        config = share_of(config, child)
        position = child_position(child)
        metrics.join_from_environment(config)  # the supervisor serves /metrics
    elif config.queue.processes > 1:
        if config.batv.key_file is not None:
            # A config error is one line from here, not one from every daemon.
            batv.load_key(config.batv.key_file)
        return _event_loop_runner()(
            serving(config, Supervisor(config, once=args.once).run(), serve=not args.once))
    # Imported here, not above: the supervisor never runs a daemon itself, and without
    # the delivery stack (DNS, SMTP, TLS, email) it is a third of a daemon's memory.
    from mxsend.scheduler import run_daemon

    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        daemon = run_daemon(config, once=args.once, position=position)
        # The listener and /metrics run in the supervisor, or in the only daemon.
        serve = not (args.once or child)
        return _event_loop_runner()(serving(config, daemon, serve=serve))
    except (SpoolError, OSError) as exc:
        # The spool is unusable (the daemon retried what it could): one clear line.
        log.flush()
        print(f"mxsend: {exc}", file=sys.stderr)
        return 1
