"""The policy worker: runs the operator's Lua script in its own process.

Why a process: a Lua count hook stops runaway *Lua* code (loops, recursion, inside
coroutines too), but not a C function that never returns, such as a string pattern
with nested `.-` over a long subject or a read from a FIFO. The only way to abandon such
a call is to kill what runs it; killing a thread is not possible, so the script runs
here and the daemon (mxsend/policy.py) kills and replaces this process when a call
overruns its deadline. docs/policy.md has the measurements behind the choice.

This file is started by file path with `python -I`, so it imports nothing from mxsend:
it must stay self-contained (stdlib and lupa only). Framing on the socket: a 4-byte
big-endian length, then a `marshal` payload of plain tuples (no pickle: nothing the
daemon receives can run code).

Requests and replies:
    ("load", source: bytes, chunkname: str, timeout: float, names, globals, functions)
        -> ("loaded", error: str | None, prints: list[str], defined: bytes)
        names: the VPOP3 field names (CheckFile's, ServerDetails', the timeouts'), as
        three tuples of bytes; they come from mxsend/actions.py, the one place they
        are written. globals: (ConnectionId: int, ConnectionName: bytes), set before
        the top level runs. functions: the function names the daemon may call, comma
        separated; `defined` is those the script defines (after its top level ran).
    ("check", timeout, filename, size, ctime, retries, lasttry, return_path,
              recipients, header_block, defaults: tuple)          (strings as bytes)
        -> ("result", values: tuple, prints: list[str])
    ("server", timeout, authsender, originator, server, domain, length, connid,
               connection, tlspolicy, header_lines, defaults: tuple)
        -> ("result", values: tuple, prints: list[str])
    ("reply", timeout, last_command, full_response, last_line)     (ReturnCodeHandler)
    ("returnpath", timeout, computed, mail_from, original, auth, recipients,
                   ctime, header_block, size, sender_ip, subject, all_recipients)
    ("rule", timeout, function, domain, retries, size, server, default)
        -> ("result", values: tuple, prints: list[str]); values: status, then (type,
           value) of the first two results (a table as its array part joined by "\n").
At start the worker sends ("ready",).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import lupa.lua52 as lua52

SANDBOX_LUA = Path(__file__).with_name("sandbox.lua")
_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
IDLE_SPIN = 0.0002  # seconds a worker spins for the next request before sleeping


def _deny_attribute(obj: object, name: object, is_setting: bool) -> object:
    """lupa attribute_filter: no attribute of any Python object is reachable from Lua."""
    raise AttributeError("access to Python objects is not allowed")


def new_runtime(memory: int) -> Any:
    """A Lua 5.2 state with no way back into Python (contract §4 sandbox)."""
    return lua52.LuaRuntime(
        encoding=None,  # Lua strings are bytes: headers reach the script unchanged
        register_eval=False,
        register_builtins=False,
        attribute_filter=_deny_attribute,
        unpack_returned_tuples=False,
        max_memory=memory or None,
    )


def compile_check(source: bytes, chunkname: str) -> str | None:
    """Compile without running; the Lua error ("file:line: message") or None.

    Safe to call in the daemon itself: nothing of the script executes.
    """
    runtime = lua52.LuaRuntime(
        encoding=None, register_eval=False, register_builtins=False,
        attribute_filter=_deny_attribute,
    )
    compiler = runtime.eval("function(s, n) local f, e = load(s, n, 't', {}) return e end")
    error = compiler(source, chunkname.encode())
    return None if error is None else _full_path(_text(error), chunkname)


def _full_path(error: str, chunkname: str) -> str:
    """Lua shortens a long chunk name to "...tail"; put the whole path back."""
    path = chunkname[1:]
    if error.startswith("..."):
        tail, sep, rest = error[3:].partition(":")
        if sep and path.endswith(tail):
            return f"{path}:{rest}"
    return error


def read_script(path: Path) -> tuple[bytes | None, str | None]:
    """(source, None) if the script compiles; (None, error) if not; (None, None) if absent.

    The error is one line as Lua writes it (`/etc/mxsend/mxout.lua:4: ...`). Nothing of
    the script runs. `mxsend run` uses this to refuse to start on a broken script.
    """
    try:
        source = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    error = compile_check(source, f"@{path}")
    return (None, error) if error is not None else (source, None)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _values(result: object) -> tuple[object, ...]:
    """lupa returns several Lua results as a tuple and a single one as itself."""
    return result if isinstance(result, tuple) else (result,)


class LuaHost:
    """One script version in one Lua state, plus the sandbox of sandbox.lua."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self._host: Any = None
        self._orphan_prints: list[str] = []

    @property
    def loaded(self) -> bool:
        return self._host is not None

    def load(self, source: bytes, chunkname: str, timeout: float,
             names: tuple[tuple[bytes, ...], ...],
             globals_: tuple[int, bytes] = (0, b""), functions: bytes = b""
             ) -> tuple[str | None, bytes]:
        """Run the script's top level in a fresh state; keep the old one on failure.

        Returns (error or None, the names among `functions` the script defines).
        """
        try:
            runtime = new_runtime(self.memory)
            host = runtime.execute(SANDBOX_LUA.read_bytes())
            host[b"set_fields"](*(b",".join(group) for group in names))
            host[b"set_globals"](*globals_)
            ok, *error = _values(host[b"load"](source, chunkname.encode(), timeout))
            defined = host[b"functions"](functions) if ok else b""
            prints = self._prints_of(host)
        except lua52.LuaError as exc:
            return f"cannot load the script: {_text(exc)}", b""
        self._orphan_prints.extend(prints)
        if not ok:
            return (_text(error[0]) if error else "the script failed to load"), b""
        self._host = host
        return None, bytes(defined)

    @staticmethod
    def _prints_of(host: Any) -> list[str]:
        joined, count = host[b"take_prints"]()
        if not count:
            return []
        return [_text(line) for line in joined.split(b"\0")]

    def take_prints(self) -> list[str]:
        prints = self._orphan_prints
        self._orphan_prints = []
        if self._host is not None:
            prints.extend(self._prints_of(self._host))
        return prints

    def _call(self, name: str, *args: object) -> tuple[tuple[object, ...], list[str]]:
        """(values, prints). The host functions return only nil, booleans, numbers and
        strings (sandbox.lua), so the values need no conversion to cross to the daemon."""
        if self._host is None:
            return ("missing",), self.take_prints()
        try:
            nprints, *values = self._host[name.encode()](*args)
        except lua52.LuaMemoryError:
            return ("error", "not enough memory"), self.take_prints()
        except lua52.LuaError as exc:
            return ("error", _text(exc)), self.take_prints()
        return tuple(values), (self.take_prints() if nprints else [])

    def check_file(self, *args: object) -> tuple[tuple[object, ...], list[str]]:
        return self._call("check_file", *args)

    def server_details(self, *args: object) -> tuple[tuple[object, ...], list[str]]:
        return self._call("server_details", *args)

    def hook(self, kind: str, *args: object) -> tuple[tuple[object, ...], list[str]]:
        """One of the VPOP3 8.8 hooks (contract §9), by request kind."""
        return self._call(_HOOKS[kind], *args)


# Request kind -> the sandbox.lua host function that answers it.
_HOOKS = {"reply": "return_code", "returnpath": "modify_return_path", "rule": "server_rule"}


# --- the worker process --------------------------------------------------------------


def frame(message: tuple[Any, ...]) -> bytes:
    """One message as it goes on the socket: length, then marshal payload."""
    payload = marshal.dumps(message)
    return _HEADER.pack(len(payload)) + payload


class Channel:
    """Length-prefixed marshal frames over a non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = bytearray()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def take(self) -> object | None:
        if len(self.buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.buffer)
        if size > MAX_FRAME:
            raise ValueError("frame too large")
        end = _HEADER.size + size
        if len(self.buffer) < end:
            return None
        frame: object = marshal.loads(bytes(self.buffer[_HEADER.size : end]))
        del self.buffer[:end]
        return frame

    def fill(self) -> bool:
        """Read what is there; False at EOF. BlockingIOError if nothing is there."""
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def send(self, message: tuple[Any, ...]) -> None:
        """Blocking send: the worker's side, where waiting for the daemon is right."""
        data = memoryview(frame(message))
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                self.poller.modify(self.sock, select.POLLOUT)
                self.poller.poll()
                self.poller.modify(self.sock, select.POLLIN)
                continue
            data = data[sent:]

    def receive(self, spin: float) -> object | None:
        """The next frame, or None at EOF.

        Spins for `spin` seconds before sleeping: the daemon asks in bursts (a queue
        scan checks many messages) and being woken from sleep costs more than a call
        on a virtual machine (docs/policy.md).
        """
        end = time.perf_counter() + spin
        while True:
            frame = self.take()
            if frame is not None:
                return frame
            try:
                if not self.fill():
                    return None
                continue
            except BlockingIOError:
                pass
            if time.perf_counter() < end:
                os.sched_yield()  # the daemon may be waiting for this very CPU
                continue
            self.poller.poll()


def _die_with_parent() -> None:
    """If the daemon dies while we are stuck in C, the kernel kills us too (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def serve(channel: Channel, memory: int) -> None:
    host = LuaHost(memory)
    channel.send(("ready",))
    while True:
        request = channel.receive(IDLE_SPIN)
        if request is None:
            return
        assert isinstance(request, tuple)
        kind = request[0]
        if kind == "load":
            _, source, chunkname, timeout, names, globals_, functions = request
            error, defined = host.load(source, chunkname, timeout, names, globals_,
                                       functions)
            channel.send(("loaded", error, host.take_prints(), defined))
        elif kind == "check":
            *args, defaults = request[1:]
            values, prints = host.check_file(*args, *defaults)
            channel.send(("result", values, prints))
        elif kind == "server":
            *args, defaults = request[1:]
            values, prints = host.server_details(*args, *defaults)
            channel.send(("result", values, prints))
        elif kind in _HOOKS:
            values, prints = host.hook(kind, *request[1:])
            channel.send(("result", values, prints))
        else:
            channel.send(("result", ("error", f"unknown request {kind!r}"), []))


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal reaches the whole process group; the daemon decides when we
    # stop (it closes the socket), so a half-finished call is never cut by the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    fd, memory = int(argv[1]), int(argv[2])
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        serve(Channel(sock), memory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
