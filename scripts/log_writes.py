"""What the buffered log writer buys: write(2) calls to stderr and CPU per message.

    PYTHONPATH=. .venv/bin/python scripts/log_writes.py [--messages 2000] [--runs 3]

Drops N one-recipient messages to an address literal (no DNS) into a fresh spool, runs
`mxsend run --once` against a receiver on 127.0.0.2 with `log.format = "json"`,
`log.level = "info"`, first with the plain stream handler (one write per line, as
before), then with the buffered writer, and prints for each: write(2) calls on fd 2
per message (counted by strace in a separate run, since strace slows everything) and
the daemon's CPU seconds (user + system) per message, median of --runs. A small script
on purpose: the machine is shared, the full `scripts/bench` is not for this.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"

# The daemon with the writer forced on or off (the product always buffers `run`).
RUNNER = """
import sys
import mxsend.commands.run as run
setup = run.setup_logging
run.setup_logging = lambda *a, **k: setup(*a, **{**k, "buffered": sys.argv[1] == "on"})
from mxsend.cli import main
sys.exit(main(["-c", sys.argv[2], "run", "--once"]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def prepare(directory: Path, port: int, count: int) -> Path:
    spool = directory / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    for folder in ("tmp", "new"):
        (spool / folder).mkdir(parents=True)
    for n in range(count):
        data = (f"MAIL FROM:<a@src.test>\r\nRCPT TO:<b{n}@[{HOST}]>\r\nDATA\r\n"
                f"From: a@src.test\r\nMessage-ID: <{n}@src.test>\r\nSubject: {n}\r\n\r\n"
                f"hello\r\n.\r\n").encode()
        (spool / "tmp" / f"m{n:06d}").write_bytes(data)
        os.rename(spool / "tmp" / f"m{n:06d}", spool / "new" / f"m{n:06d}")
    config = directory / "mxsend.toml"
    config.write_text(f"""
[spool]
path = "{spool}"
[script]
path = "{directory / 'none.lua'}"
[smtp]
port = {port}
helo_name = "mxsend.test"
allowed_destinations = ["127.0.0.0/8"]
[queue]
processes = 1
[log]
format = "json"
level = "info"
""")
    return config


def run_once(config: Path, mode: str, strace: bool) -> tuple[float, int]:
    """(CPU seconds of the daemon, writes to fd 2 or -1 without strace)."""
    trace = Path(tempfile.mktemp(prefix="mxsend-strace-"))
    prefix = ["strace", "-f", "-e", "trace=write", "-o", str(trace)] if strace else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([*prefix, sys.executable, "-c", RUNNER, mode, str(config)], cwd=REPO,
                   stderr=subprocess.PIPE, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not strace:
        return cpu, -1
    writes = sum(1 for line in trace.read_text().splitlines()
                 if re.search(r"\bwrite\(2,", line))
    trace.unlink()
    return cpu, writes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.smtp_receiver", "--host", HOST, "--port",
         str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="mxsend-logw-") as tmp:
            directory = Path(tmp)
            for mode in ("off", "on"):
                _, writes = run_once(prepare(directory, port, args.messages), mode, True)
                # Start-up and exit (imports, the policy worker) are not per message.
                idle = statistics.median(run_once(prepare(directory, port, 0), mode, False)[0]
                                         for _ in range(args.runs))
                cpus = [run_once(prepare(directory, port, args.messages), mode, False)[0]
                        for _ in range(args.runs)]
                cpu = statistics.median(cpus) - idle
                print(f"buffered={mode}: {writes / args.messages:.2f} writes to stderr per "
                      f"message, {cpu / args.messages * 1000:.3f} ms CPU per message "
                      f"(runs: {', '.join(f'{c:.2f}s' for c in cpus)}; start-up and exit "
                      f"{idle:.2f}s)", flush=True)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
