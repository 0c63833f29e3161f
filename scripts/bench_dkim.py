#!/usr/bin/env python3
"""Cost of one DKIM signature per message: mxsend.dkim vs dkimpy (docs/dkim.md).

    PYTHONPATH=. .venv/bin/python scripts/bench_dkim.py [--rounds 200]

For RSA-2048 and Ed25519, on a ~4 KB and a ~50 KB message, it times:

- `mxsend`: mxsend.dkim.sign (our RFC 6376 §3.4 canonicalisation, `cryptography`,
  i.e. OpenSSL, for the signature);
- `dkimpy`: dkim.sign (its canonicalisation, its pure-Python RSA, PyNaCl for Ed25519);
- `sig only`: the bare signature operation through `cryptography`, to show how much of
  each figure is the key operation and how much the canonicalisation and hashing.

Each figure is the median of `--rounds` timed calls, in microseconds per message. Every
signature made is first checked with dkimpy's verifier, so a fast wrong answer cannot
win. Needs the test extra (dkimpy, pynacl).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mxsend.config import DKIM_DEFAULT_HEADERS
from mxsend.dkim import sign
from mxsend.dkim_keys import PrivateKey, SigningKey, generate_key, txt_record

DOMAIN = "example.com"


def message(size: int) -> bytes:
    header = (
        b"From: Alice Example <alice@example.com>\r\nTo: bob@example.org\r\n"
        b"Subject: Your monthly statement is ready\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <20261207100000.12345@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"List-Unsubscribe: <mailto:unsubscribe@example.com>\r\n\r\n"
    )
    line = b"Lorem ipsum dolor sit amet,  consectetur adipiscing elit, sed do eiusmod \r\n"
    body = line * max(1, -(-(size - len(header)) // len(line)))  # at least `size` in all
    return header + body


def median_us(call: Callable[[], object], rounds: int) -> float:
    call()  # warm caches
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def dkimpy_private(key: PrivateKey) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return base64.b64encode(raw)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def bare_signature(key: PrivateKey) -> Callable[[], bytes]:
    data = b"x" * 600  # about the size of the canonical signed header fields
    if isinstance(key, rsa.RSAPrivateKey):
        return lambda: key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return lambda: key.sign(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    records: dict[str, bytes] = {}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode())

    print(f"{'key':<10}{'message':>9}{'mxsend µs':>12}{'dkimpy µs':>12}{'sig only µs':>13}")
    for kind in ("rsa", "ed25519"):
        private = generate_key(kind)
        selector = f"{kind}1"
        records[f"{selector}._domainkey.{DOMAIN}."] = txt_record(private).encode()
        key = SigningKey(DOMAIN, selector, DKIM_DEFAULT_HEADERS, "relaxed/relaxed", private)
        algorithm = b"ed25519-sha256" if kind == "ed25519" else b"rsa-sha256"
        for size in (4 * 1024, 50 * 1024):
            msg = message(size)
            ours = sign(msg, [key], time.time())
            theirs = dkimpy.sign(msg, selector.encode(), DOMAIN.encode(), dkimpy_private(private),
                                 signature_algorithm=algorithm,
                                 canonicalize=(b"relaxed", b"relaxed"))
            for signed in (ours + msg, theirs + msg):
                if not dkimpy.verify(signed, dnsfunc=dnsfunc):
                    print(f"{kind} {size}: a signature did not verify", file=sys.stderr)
                    return 1
            mine = median_us(lambda m=msg, k=key: sign(m, [k], time.time()), args.rounds)
            pem = dkimpy_private(private)
            ref = median_us(
                lambda m=msg, p=pem, s=selector, a=algorithm: dkimpy.sign(
                    m, s.encode(), DOMAIN.encode(), p, signature_algorithm=a,
                    canonicalize=(b"relaxed", b"relaxed")),
                args.rounds,
            )
            bare = median_us(bare_signature(private), args.rounds)
            label = "RSA-2048" if kind == "rsa" else "Ed25519"
            print(f"{label:<10}{len(msg) // 1024:>7}KB{mine:>12.0f}{ref:>12.0f}{bare:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
