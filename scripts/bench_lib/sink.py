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

    def __init__(self, out: Path, port: int | None = None, backlog: int = 1000,
                 host: str = HOST, options: tuple[str, ...] = ()) -> None:
        assert host.startswith("127."), "the benchmark only uses loopback"
        self.host = host
        self.options = options  # e.g. ("-Q", "RCPT"): 421 and hang up at every recipient
        self.out_path = out
        self.port = port or free_port(host)
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._probe_sessions = 0

    def start(self) -> Sink:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        args = [exe, "-c", *self.options]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]  # required as root; the socket is opened first
        args += [f"{self.host}:{self.port}", str(self.backlog)]
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:  # bounded wait until it accepts connections
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"smtp-sink did not come up on {self.host}:{self.port}") from None
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


def common_free_port(hosts: list[str], tries: int = 50) -> int:
    """A port free on every one of `hosts` (the sinks of per-domain routing share one,
    as mxsend's smtp.port is one port for every destination)."""
    for _ in range(tries):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


class Sinks:
    """One smtp-sink per address, all on one port; counts are the sums.

    Per-domain routing (the default): each recipient domain has its own next hop, so
    Postfix splits a message's recipients by domain as mxsend does (one transaction per
    domain), and both sides spread their connections over the same four servers.
    """

    def __init__(self, workdir: Path, name: str, hosts: list[str], port: int | None = None
                 ) -> None:
        self.port = port or common_free_port(hosts)
        self.hosts = hosts
        self.sinks = [Sink(workdir / f"{name}-{i}.out", self.port, host=host)
                      for i, host in enumerate(hosts)]

    def start(self) -> Sinks:
        try:
            for sink in self.sinks:
                sink.start()
        except BaseException:
            self.stop()
            raise
        return self

    def count(self) -> dict[str, int]:
        total = {"sess": 0, "quit": 0, "mesg": 0}
        for sink in self.sinks:
            for key, value in sink.count().items():
                total[key] = total.get(key, 0) + value
        return total

    def mesg(self) -> int:
        return sum(sink.mesg() for sink in self.sinks)

    def sessions(self) -> int:
        return sum(sink.sessions() for sink in self.sinks)

    def cpu(self) -> float:
        return sum(sink.cpu() for sink in self.sinks)

    def stop(self) -> None:
        for sink in self.sinks:
            sink.stop()

    def __enter__(self) -> Sinks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sink_hosts(per_domain: bool, count: int) -> list[str]:
    """127.0.0.2, .3, ... one per domain; one-hop: the single 127.0.0.1."""
    return [f"127.0.0.{2 + i}" for i in range(count)] if per_domain else [HOST]
