"""The project's loopback DNS server (tests/fixtures/dns_server.py) as a child process."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_lib.workload import DOMAINS

MX_HOST = "mx.sink.test"  # one-hop: every domain's MX, like Postfix's relay route
# The big deferred queue's messages go here: a sink that answers every RCPT with 421
# and hangs up, so a retry sweep of the whole queue is real attempts that defer again
# (deferred_side.py).
PARKED_DOMAIN = "parked.test"
PARKED_HOST = "127.0.0.9"


def zone_text(domains: tuple[str, ...] = DOMAINS, address: str = "127.0.0.1",
              addresses: list[str] | None = None) -> str:
    """The bench zone. `addresses` (one per domain): per-domain routing, domain i's MX
    is mx<i>.sink.test at addresses[i]; otherwise every MX is MX_HOST at `address`."""
    for a in [address, *(addresses or [])]:
        assert a.startswith("127."), "the benchmark only uses loopback"
    lines = [
        "$ORIGIN test.",
        "$TTL 3600",
        "@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300",
    ]
    if addresses:
        for i, (domain, addr) in enumerate(zip(domains, addresses, strict=True)):
            lines.append(f"{domain}. IN MX 10 mx{i}.sink.test.")
            lines.append(f"mx{i}.sink.test. IN A {addr}")
    else:
        lines += [f"{domain}. IN MX 10 {MX_HOST}." for domain in domains]
        lines.append(f"{MX_HOST}. IN A {address}")
    lines.append(f"{PARKED_DOMAIN}. IN MX 10 mx.{PARKED_DOMAIN}.")
    lines.append(f"mx.{PARKED_DOMAIN}. IN A {PARKED_HOST}")
    return "\n".join(lines) + "\n"


class DnsServer:
    def __init__(self, root: Path, workdir: Path, python: str = sys.executable,
                 addresses: list[str] | None = None, name: str = "bench") -> None:
        self.root = root
        self.zone = workdir / f"{name}.zone"
        self.addresses = addresses
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.nameserver = ""

    def start(self, timeout: float = 20.0) -> DnsServer:
        self.zone.write_text(zone_text(addresses=self.addresses))
        self.proc = subprocess.Popen(
            [self.python, "-m", "tests.fixtures.dns_server", "--zone", str(self.zone),
             "--host", "127.0.0.1", "--port", "0"],
            cwd=self.root, stdout=subprocess.PIPE, stderr=None,
            env={**os.environ, "PYTHONPATH": str(self.root)},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):  # it prints 127.0.0.1:PORT once listening
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the DNS server (tests.fixtures.dns_server) did not start")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    continue
                line += chunk
        self.nameserver = line.decode().strip().splitlines()[0]
        if not self.nameserver.startswith("127."):
            self.stop()
            raise RuntimeError(f"the DNS server is not on loopback: {self.nameserver!r}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
