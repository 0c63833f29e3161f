"""What the serving process runs beside the daemon: the SMTP listener and /metrics.

The serving process is the one systemd or the container runtime sees: the supervisor
when `queue.processes > 1`, else the only daemon. One listener per spool instance is
enough (it is not the bottleneck: docs/listener.md) and the supervisor never restarts,
so a daemon that dies does not drop the connections of the MTAs relaying to it. Both
start before the daemons: the metrics directory is in the environment they inherit,
and the address is bound before READY. `run --once` starts neither.
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from typing import Any

from mxsend import metrics
from mxsend.config import Config
from mxsend.errors import ConfigError


async def serving(config: Config, main: Coroutine[Any, Any, int], *, serve: bool) -> int:
    """Run `main` (the daemon or the supervisor) with the listener and metrics on."""
    if not serve or not (config.listen.address or config.metrics.listen):
        return await main
    server: metrics.MetricsServer | None = None
    listener = None
    try:
        if config.metrics.listen:
            server = metrics.start_metrics_server(config)
        if config.listen.address:
            from mxsend.listener import start_listener

            listener = await start_listener(config)
    except (ConfigError, OSError) as exc:
        main.close()
        if server is not None:
            await server.close()
        print(f"mxsend: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    try:
        return await main
    finally:
        if listener is not None:
            await listener.close()
        if server is not None:
            await server.close()
