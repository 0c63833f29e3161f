"""The daemon's end of the policy worker: a process and an async channel to it.

Rules of this module:

* Nothing here blocks the event loop on the worker. Every send and every receive has a
  deadline measured from the worker's last sign of life (a byte it read from the socket
  or a frame it wrote); past it the worker counts as stuck (WorkerStuck) and is killed
  by the caller. A reply is read at once if it is already there, else on the loop's
  reader callback: no spinning and no blocking poll(), which on a busy daemon took CPU
  from the worker and stalled every other connection (docs/policy.md).
* While a send waits for room in the socket, replies are read into the buffer: the
  worker never blocks writing a reply while the daemon blocks writing a request.
* Starting the worker (a Python interpreter importing lupa) is awaited, never waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

from mxsend import luasandbox

# Starting a worker (a Python interpreter importing lupa) is slow on a loaded machine.
STARTUP_TIMEOUT = 30.0


class WorkerStuck(Exception):
    """The worker showed no sign of life in time: it is stuck in C or overloaded."""


class WorkerGone(Exception):
    """The worker process died or closed its socket."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Worker:
    """One luasandbox.py process and the socket to it."""

    def __init__(self, memory: int) -> None:
        parent, child = socket.socketpair()
        self.loaded_version: int | None = None
        self.ready = False
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(Path(luasandbox.__file__)), str(child.fileno()),
             str(memory)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        child.close()
        self.channel = luasandbox.Channel(parent)

    async def start(self) -> None:
        """Wait (on the loop) for the worker's ("ready",)."""
        if not self.ready:
            await self.receive(STARTUP_TIMEOUT)
            self.ready = True

    async def send(self, message: tuple[object, ...], idle_limit: float) -> None:
        """Write one frame; WorkerStuck if the worker takes nothing for `idle_limit` s."""
        data = memoryview(luasandbox.frame(message))
        loop = asyncio.get_running_loop()
        sock = self.channel.sock
        deadline = time.monotonic() + idle_limit
        while data:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise WorkerGone(str(exc)) from None
            if sent:
                data = data[sent:]
                deadline = time.monotonic() + idle_limit
                continue
            # No room: wait for room, reading replies meanwhile (each one is progress).
            waiter: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock, _wake, waiter)
            loop.add_reader(sock, _wake, waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise WorkerStuck() from None
            finally:
                loop.remove_writer(sock)
                loop.remove_reader(sock)
            if self._fill():
                deadline = time.monotonic() + idle_limit

    def _fill(self) -> bool:
        """Read what is there; True if something was read."""
        try:
            if not self.channel.fill():
                raise WorkerGone("the policy worker exited")
        except BlockingIOError:
            return False
        except OSError as exc:
            raise WorkerGone(str(exc)) from None
        return True

    async def receive(self, idle_limit: float) -> object:
        """The next frame; WorkerStuck if none comes within `idle_limit` s."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + idle_limit
        while True:
            frame = self.channel.take()
            if frame is not None:
                return frame
            if deadline <= time.monotonic():
                raise WorkerStuck()
            if self._fill():
                continue
            # Let the loop serve other work until the worker answers.
            waiter: asyncio.Future[None] = loop.create_future()
            sock = self.channel.sock
            loop.add_reader(sock, _wake, waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise WorkerStuck() from None
            finally:
                loop.remove_reader(sock)
            self._fill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.channel.sock.close()

    def close(self) -> None:
        """The worker keeps nothing worth a graceful exit: it is killed, never waited on
        while it might be stuck in C."""
        self.kill()
