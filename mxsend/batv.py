"""BATV `prvs=` signing and verification (draft-levine-smtp-batv-01 §4). Pure.

A signed return path is ``prvs=KDDDSSSSSS=local@domain``:

- ``K``: one decimal digit, the key number (so keys can rotate, §4.1);
- ``DDD``: three decimal digits, the day the tag expires, counted in days since
  1970-01-01 UTC, modulo 1000 (§4.2);
- ``SSSSSS``: six hex digits, the first three octets of HMAC-SHA1 over the
  hash-source ``K DDD orig-mailbox`` (§4.3).

Time is passed in (`now`, seconds since the epoch) so that everything here is a plain
function of its arguments. The key never appears in a repr, a log or an error.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from mxsend.errors import ConfigError

DAY = 86400
# §4.2: the draft suggests a lifetime of about a week; bounces arrive within days.
DEFAULT_LIFETIME_DAYS = 7
_PRVS = re.compile(r"^prvs=([0-9])([0-9]{3})([0-9a-fA-F]{6})=(.+@.+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BatvKey:
    """A BATV secret; `repr` never shows it."""

    secret: bytes
    number: int = 0

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("BATV key is empty")
        if not 0 <= self.number <= 9:
            raise ValueError("BATV key number must be a single digit")

    def __repr__(self) -> str:
        return f"BatvKey(number={self.number}, secret=<{len(self.secret)} bytes>)"


@dataclass(frozen=True, slots=True)
class Verified:
    """The result of checking a prvs= address."""

    valid: bool
    address: str  # the original mailbox (the input itself if it was not prvs=)
    reason: str  # "" when valid


def load_key(path: Path | None) -> bytes:
    """The secret from `batv.key_file` (surrounding whitespace stripped)."""
    if path is None:
        raise ConfigError("batv.key_file: required when a script sets useBATV")
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"batv.key_file: {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"batv.key_file: {path}: the file is empty")
    return secret


def day_number(now: float) -> int:
    return int(now // DAY)


def _signature(key: BatvKey, digits: str, mailbox: str) -> str:
    # §4.3: hash-source = K DDD orig-mailbox. The domain is case-insensitive, so it is
    # lower-cased before hashing; the local part is kept as given (RFC 5321 §2.4).
    local, _, domain = mailbox.rpartition("@")
    source = f"{key.number}{digits}{local}@{domain.lower()}".encode()
    return hmac.new(key.secret, source, hashlib.sha1).hexdigest()[:6]


def is_signed(address: str) -> bool:
    return _PRVS.match(address) is not None


def sign(address: str, key: BatvKey, now: float, lifetime_days: int = DEFAULT_LIFETIME_DAYS) -> str:
    """`local@domain` -> `prvs=KDDDSSSSSS=local@domain`; `""` (null sender) stays `""`."""
    if not address:
        return ""  # §3: the null path has nothing to protect and must stay null
    if is_signed(address):
        return address
    if "@" not in address:
        raise ValueError(f"not an address: {address!r}")
    digits = f"{(day_number(now) + lifetime_days) % 1000:03d}"
    return f"prvs={key.number}{digits}{_signature(key, digits, address)}={address}"


def verify(address: str, keys: dict[int, BatvKey] | BatvKey, now: float,
           lifetime_days: int = DEFAULT_LIFETIME_DAYS) -> Verified:
    """Check the tag of a prvs= address at time `now`."""
    match = _PRVS.match(address)
    if match is None:
        return Verified(False, address, "not a prvs= address")
    number, digits, signature, mailbox = (
        int(match.group(1)), match.group(2), match.group(3).lower(), match.group(4)
    )
    table = keys if isinstance(keys, dict) else {keys.number: keys}
    key = table.get(number)
    if key is None:
        return Verified(False, mailbox, f"unknown key number {number}")
    if not hmac.compare_digest(_signature(key, digits, mailbox), signature):
        return Verified(False, mailbox, "bad signature")
    # §4.2: DDD is modulo 1000, so compare distances on that circle: the tag is good
    # from the day it was made (expiry - lifetime) up to and including its expiry day.
    remaining = (int(digits) - day_number(now)) % 1000
    if remaining > lifetime_days:
        return Verified(False, mailbox, "expired")
    return Verified(True, mailbox, "")
