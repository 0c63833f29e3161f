"""systemd's sd_notify protocol without a dependency (sd_notify(3), "NOTIFY_SOCKET").

The service manager passes a datagram socket path in $NOTIFY_SOCKET; a leading "@" means
the Linux abstract namespace. Outside systemd the variable is unset and every call is a
no-op, so the daemon can call these unconditionally.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
# A daemon process started by mxsend's own supervisor (queue.processes > 1) tells it,
# not systemd, that it is ready: one byte on this inherited pipe.
READY_FD_ENV = "MXSEND_READY_FD"


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get(NOTIFY_ENV, "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send e.g. "READY=1"; True if a service manager was told."""
    address = _address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop on a manager that is not reading: a state it
            # misses is better than a daemon that hangs (a full buffer is EAGAIN).
            sock.setblocking(False)
            sock.connect(address)
            sock.send(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None if not asked."""
    usec = environ.get(WATCHDOG_ENV, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000


def notify_ready(environ: Mapping[str, str] = os.environ) -> None:
    """READY=1 to systemd, or one byte to the supervisor that started this process."""
    fd = environ.get(READY_FD_ENV, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"R")
            os.close(int(fd))
        except OSError:
            pass
        return
    notify("READY=1", environ)
