"""The deterministic message workload and the writers' side of the mxsend spool.

The shape is the Postfix baseline's "mixed" workload: each message is 2048-4096 bytes of
RFC 5322 data (uniform), 1 and 2 recipients alternating, recipient domains rotating over
four .test domains, body text drawn from a fixed pseudo-random word pool. Seeded, so a
given N always gives the same bytes on both sides.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("example.test", "shop.test", "news.test", "billing.test")
SENDER = "bench-sender@bench.invalid"
MIN_SIZE, MAX_SIZE = 2048, 4096


@dataclass(frozen=True, slots=True)
class Msg:
    sender: str
    rcpts: tuple[str, ...]
    data: bytes  # the RFC 5322 message, LF line ends, not dot-stuffed

    @property
    def domains(self) -> int:
        """SMTP transactions a direct-MX sender needs: one per recipient domain."""
        return len({r.rsplit("@", 1)[1].lower() for r in self.rcpts})


def _text_pool(seed: int = 12345, size: int = 300_000) -> bytes:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    lines: list[str] = []
    line = ""
    total = 0
    while total < size:
        word = rng.choice(words)
        if len(line) + len(word) + 1 > 72:
            lines.append(line)
            total += len(line) + 1
            line = word
        else:
            line = f"{line} {word}" if line else word
    return ("\n".join(lines) + "\n").encode()


def make_messages(n: int, *, seed: int = 1, same_domain: bool = False,
                  start: int = 0) -> list[Msg]:
    """N messages; `same_domain` puts both recipients of a message in one domain.

    Every third message carries `Precedence: bulk`, which bench_mxout.lua's CheckFile
    reads (a header lookup that changes the priority).
    """
    return list(iter_messages(n, seed=seed, same_domain=same_domain, start=start))


def iter_messages(n: int, *, seed: int = 1, same_domain: bool = False, start: int = 0,
                  domains: tuple[str, ...] = DOMAINS) -> Iterator[Msg]:
    """make_messages() one at a time (a million parked messages are 3 GB as a list)."""
    rng = random.Random(seed)
    pool = _text_pool()
    for i in range(start, start + n):
        nrcpt = 1 + (i % 2)
        target = rng.randint(MIN_SIZE, MAX_SIZE)
        rcpts = tuple(
            f"user{i}-{k}@{domains[(i + (0 if same_domain else k)) % len(domains)]}"
            for k in range(nrcpt)
        )
        header = (
            f"From: Bench <{SENDER}>\n"
            f"To: {', '.join(rcpts)}\n"
            f"Subject: bench message {i}\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\n"
            f"Message-ID: <bench.{seed}.{i}@bench.invalid>\n"
            + ("Precedence: bulk\n" if i % 3 == 0 else "")
            + "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\n\n"
        ).encode()
        body_len = max(200, target - len(header))
        offset = rng.randrange(0, len(pool) - body_len - 100)
        offset = pool.index(b"\n", offset) + 1  # start and end on line boundaries
        body = pool[offset : offset + body_len]
        body = body[: body.rindex(b"\n") + 1]
        yield Msg(SENDER, rcpts, header + body)


def to_bsmtp(msg: Msg) -> bytes:
    """One Batch SMTP transaction (contract §1); the data dot-stuffed, LF line ends."""
    lines = [f"MAIL FROM:<{msg.sender}>".encode()]
    lines += [f"RCPT TO:<{r}>".encode() for r in msg.rcpts]
    lines.append(b"DATA")
    head = "\n".join(x.decode() for x in lines).encode() + b"\n"
    body = msg.data
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\n.", b"\n..")
    return head + body + b".\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_message(spool: Path, name: str, raw: bytes, *, sync_dir: bool = True) -> None:
    """The writers' protocol: create in tmp/, write, fsync, rename into new/."""
    tmp = spool / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, spool / "new" / name)
    if sync_dir:
        _fsync_dir(spool / "new")


def fill_spool(spool: Path, msgs: Iterable[Msg], prefix: str = "B") -> int:
    """Write every message into new/ (names sort in workload order); returns the count."""
    for sub in ("tmp", "new"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    count = 0
    for i, msg in enumerate(msgs):
        drop_message(spool, f"{prefix}{i:08d}", to_bsmtp(msg), sync_dir=False)
        count += 1
    _fsync_dir(spool / "new")
    return count
