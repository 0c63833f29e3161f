"""DKIM keys: loading, generation and the DNS record to publish (RFC 6376 §3.6.1, RFC 8463).

A key file is PEM, PKCS#8 (`BEGIN PRIVATE KEY`) or traditional (`BEGIN RSA PRIVATE
KEY`), RSA of at least 1024 bits (RFC 8301 §3.2 makes 1024 the floor verifiers accept)
or Ed25519. Nothing here logs: a key that cannot be used raises DkimKeyError naming it,
and a key file others can read comes back as a warning for the caller to log, the way
OpenSSH warns about an unprotected private key.

The private key never appears in a repr, an error or a warning.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mxsend.config import DkimKey
from mxsend.errors import ConfigError

RSA_MIN_BITS = 1024  # RFC 8301 §3.2: verifiers must not accept smaller keys
RSA_MAX_BITS = 8192
DEFAULT_RSA_BITS = 2048
_MAX_KEY_FILE = 64 * 1024  # a PEM key is a few KB; anything bigger is not a key

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(ConfigError):
    """A DKIM key file cannot be read or used; the message names the key, never its bytes."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A configured key with its private half loaded; what `dkim.sign` works with."""

    domain: str
    selector: str
    headers: tuple[str, ...]
    canonicalization: str  # "header/body", e.g. "relaxed/relaxed"
    private: PrivateKey = field(repr=False, compare=False)

    @property
    def algorithm(self) -> str:
        """The `a=` tag: RFC 6376 §3.3.2 rsa-sha256, RFC 8463 §3 ed25519-sha256."""
        return "ed25519-sha256" if isinstance(self.private, ed25519.Ed25519PrivateKey) \
            else "rsa-sha256"

    @property
    def label(self) -> str:
        """`d=example.com s=s2026`: how logs and the delivery event name this key."""
        return f"d={self.domain} s={self.selector}"

    def __repr__(self) -> str:
        return (f"SigningKey(domain={self.domain!r}, selector={self.selector!r}, "
                f"algorithm={self.algorithm!r})")


@dataclass(frozen=True, slots=True)
class LoadedKeys:
    """The result of loading `[[dkim.key]]`: the keys, and warnings for the caller to log."""

    keys: tuple[SigningKey, ...] = ()
    warnings: tuple[str, ...] = ()


def _name(index: int, key: DkimKey) -> str:
    return f"dkim.key[{index}] ({key.domain} {key.selector}): {key.key_file}"


def parse_private_key(data: bytes) -> PrivateKey:
    """A PEM private key (PKCS#8 or traditional) -> the key; ValueError says why not."""
    if b"ENCRYPTED" in data:
        raise ValueError("the key is encrypted; mxsend needs it unencrypted (mode 0600)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography's message names the PEM problem, never the key material.
        raise ValueError(f"not a PEM private key ({exc})") from None
    except Exception:  # unsupported algorithm and the like
        raise ValueError("not a usable PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(
                f"RSA key of {key.key_size} bits; at least {RSA_MIN_BITS} (RFC 8301 §3.2)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError("not an RSA or Ed25519 key: DKIM signs with those only (RFC 8463 §2)")


def read_key_file(path: Path) -> tuple[PrivateKey, str | None]:
    """Read and parse a key file -> (key, warning or None). OSError/ValueError on failure."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise ValueError("too big to be a key file")
    warning = None
    if info.st_mode & 0o077:
        # OpenSSH refuses such a key ("UNPROTECTED PRIVATE KEY FILE"); we warn, so a
        # deploy that got the mode wrong still signs rather than failing unsigned mail.
        warning = (f"permissions {stat.S_IMODE(info.st_mode):04o} are too open: the key "
                   "can be read by others; chmod 600 it")
    return parse_private_key(data), warning


def load_keys(configs: tuple[DkimKey, ...]) -> LoadedKeys:
    """Load every `[[dkim.key]]`. The first one that fails raises DkimKeyError naming it.

    At start the caller exits 2 on the error; on reload it keeps the keys it had.
    """
    keys: list[SigningKey] = []
    warnings: list[str] = []
    for index, config in enumerate(configs):
        try:
            private, warning = read_key_file(config.key_file)
        except OSError as exc:
            raise DkimKeyError(f"{_name(index, config)}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise DkimKeyError(f"{_name(index, config)}: {exc}") from None
        if warning:
            warnings.append(f"{_name(index, config)}: {warning}")
        keys.append(SigningKey(
            domain=config.domain, selector=config.selector, headers=config.headers,
            canonicalization=config.canonicalization, private=private,
        ))
    return LoadedKeys(tuple(keys), tuple(warnings))


def generate_key(kind: str, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    """A new RSA (65537, `bits`) or Ed25519 private key."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind != "rsa":
        raise ValueError(f"unknown key type {kind!r}")
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise ValueError(f"RSA bits must be between {RSA_MIN_BITS} and {RSA_MAX_BITS}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: what `dkim keygen` writes (mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def txt_record(key: PrivateKey) -> str:
    """The TXT data to publish at `SELECTOR._domainkey.DOMAIN`, one line.

    RSA: `p=` is the DER SubjectPublicKeyInfo (RFC 6376 §3.6.1, as every signer and
    verifier uses it). Ed25519: `p=` is the raw 32-byte public key (RFC 8463 §4).
    """
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        kind = "ed25519"
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        kind = "rsa"
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


def write_new_key(path: Path, key: PrivateKey) -> None:
    """Create `path` (never overwrite) with mode 0600, durably: write, fsync, fsync dir."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits off, never added; be exact
        data = private_pem(key)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent if str(path.parent) else Path("."), os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
