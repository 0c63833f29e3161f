"""Postfix's smtp-sink on loopback, counting messages with -c, as the baseline did."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from bench_lib.procstat import proc_cpu

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (loopback only)."""
    assert host.startswith("127."), "the benchmark only uses loopback"
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Sink:
    """A fresh smtp-sink per measurement, so its counters start at zero.

    With -c it writes "sess=N quit=N mesg=N" records, each ended by CR, after every
    session end, QUIT and end of DATA; the last complete record is the count.
    """

    def __init__(self, out: Path, port: int | None = None, backlog: int = 1000) -> None:
        self.out_path = out
        self.port = port or free_port()
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._probe_sessions = 0

    def start(self) -> Sink:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        args = [exe, "-c"]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]  # required as root; the socket is opened first
        args += [f"{HOST}:{self.port}", str(self.backlog)]
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # bounded wait until it accepts connections
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"smtp-sink did not come up on {HOST}:{self.port}") from None
                time.sleep(0.05)
        deadline = time.monotonic() + 5
        while self.count()["sess"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the probe connection is one session with no message
        self._probe_sessions = self.count()["sess"]
        return self

    def count(self) -> dict[str, int]:
        """The last complete counter record, e.g. {"sess": 3, "quit": 3, "mesg": 5}."""
        try:
            with open(self.out_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 256))
                tail = handle.read()
        except FileNotFoundError:
            return {"sess": 0, "quit": 0, "mesg": 0}
        # the text after the last CR may be a record still being written
        for record in reversed(tail.split(b"\r")[:-1]):
            try:
                parsed = {
                    k.decode(): int(v) for k, v in (kv.split(b"=") for kv in record.split())
                }
            except ValueError:
                continue
            if {"sess", "quit", "mesg"} <= parsed.keys():
                return parsed
        return {"sess": 0, "quit": 0, "mesg": 0}

    def mesg(self) -> int:
        return self.count()["mesg"]

    def sessions(self) -> int:
        """SMTP sessions so far, not counting start()'s readiness probe."""
        return self.count()["sess"] - self._probe_sessions

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)[0] if self.proc and self.proc.poll() is None else 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
