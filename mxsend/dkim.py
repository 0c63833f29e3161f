"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463). Pure.

Input is the message as it will be sent: header, blank line, body, CRLF line ends, not
dot-stuffed. Output is the DKIM-Signature field(s), folded, each ending in CRLF, to be
sent before the first line of the header (contract §7). Time is passed in. Nothing here
logs or touches the disk; keys come loaded (`dkim_keys.load_keys`).

Rules (contract §7):

- The key(s) whose `domain` is the longest match of the From: domain (that domain or a
  parent of it) sign; several keys with that same `domain` all sign (dual signatures,
  typically RSA and Ed25519). No match: nothing is signed.
- A key whose `d=` and `s=` already sign the message (a DKIM-Signature in the header)
  does not sign again.
- `h=` lists each configured header field as many times as it occurs (every instance is
  signed, RFC 6376 §5.4.2) and `from` once more ("oversigned", §8.15: a From: added in
  transit then breaks the signature). Absent fields other than from are not listed.
- `l=` is never used (§8.2: it lets anyone append content); `t=` is set; no `x=`.

The canonicalisation is ours (§3.4), checked against the examples of §3.4.6 and against
dkimpy's verifier in tests/test_dkim.py; docs/dkim.md gives the measurements that chose
it over dkimpy.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from mxsend.config import DkimKey
from mxsend.dkim_keys import SigningKey, load_keys

_WSP_RUN = re.compile(rb" [ \t]+|\t[ \t]*")  # only runs that change: a lone SP stays
_SPACES = re.compile(rb"  +")  # starts with a literal, so re scans for it at C speed
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_TAG_SPLIT = re.compile(rb"\s*;\s*")
_FOLD_WIDTH = 76

# --- canonicalisation (RFC 6376 §3.4) ----------------------------------------------


def canon_header(field: bytes, kind: str) -> bytes:
    """One header field, with its CRLF, canonicalised (`simple` §3.4.1, `relaxed` §3.4.2)."""
    if kind == "simple":
        return field
    name, _, value = field.partition(b":")
    value = _FOLD.sub(b"", value)  # unfold: CRLF followed by WSP
    if value.endswith(b"\r\n"):
        value = value[:-2]
    value = _WSP_RUN.sub(b" ", value).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def canon_body(body: bytes, kind: str) -> bytes:
    """The body canonicalised (`simple` §3.4.3, `relaxed` §3.4.4)."""
    if kind == "relaxed":
        # WSP runs become one SP, then the SP left before each CRLF goes. Plain bytes
        # operations: a character-class regex over 50 KB costs ~1 ms (docs/dkim.md).
        body = body.replace(b"\t", b" ")
        if b"  " in body:
            body = _SPACES.sub(b" ", body)
        # A last line without CRLF keeps its trailing SP, as dkimpy's (the reference)
        # does; mxsend's messages always end in CRLF, so this never signs differently.
        body = body.replace(b" \r\n", b"\r\n")
    # Both: trailing empty lines are ignored, and a non-empty body ends in CRLF.
    end = len(body)
    while body.endswith(b"\r\n\r\n", 0, end):  # by index: no copy per empty line
        end -= 2
    body = body[:end]
    if body == b"\r\n":  # a body of empty lines only is empty
        body = b""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if not body and kind == "simple":
        return b"\r\n"  # §3.4.3: an empty body is a single CRLF; relaxed: empty (§3.4.4)
    return body


# --- message structure ---------------------------------------------------------------


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header including its last CRLF, body) at the first empty line (RFC 5322 §2.1)."""
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message if message.endswith(b"\r\n") else message + b"\r\n", b""
    return message[: end + 2], message[end + 4 :]


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The header's fields in order as (lowercased name, raw field with its CRLF)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        line += b"\r\n"
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        elif b":" in line:
            fields.append((line.split(b":", 1)[0].rstrip(b" \t").lower(), line))
    return fields


def _unfolded_value(raw: bytes) -> str:
    value = _FOLD.sub(b"", raw.split(b":", 1)[1]).strip()
    return value.decode("utf-8", "surrogateescape")


def normalise_domain(domain: str) -> str:
    """Lowercase, no trailing dot, IDNA A-labels where it has to convert."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return domain
    return domain


def from_domain(header: bytes) -> str | None:
    """The domain of the From: field (what DMARC aligns with, RFC 7489 §3.1), or None.

    None when there is no From:, more than one (RFC 5322 §3.6 allows one; DMARC §6.6.1
    rejects such mail), or its mailboxes are in different domains or have none.
    """
    froms = [raw for name, raw in header_fields(header) if name == b"from"]
    if len(froms) != 1:
        return None
    domains = {
        normalise_domain(address.rpartition("@")[2])
        for _, address in getaddresses([_unfolded_value(froms[0])])
        if "@" in address
    }
    if len(domains) != 1:
        return None
    domain = domains.pop()
    return domain or None


def _is_within(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def signing_domain(keys: Iterable[SigningKey], from_dom: str | None) -> str:
    """The configured `domain` that signs mail from `from_dom` (longest match), or "".

    This is CheckFile's `DKIMDomain` going in (contract §7).
    """
    if not from_dom:
        return ""
    matches = [key.domain for key in keys if _is_within(from_dom, key.domain)]
    return max(matches, key=len, default="")


def choose_keys(
    keys: Sequence[SigningKey], from_dom: str | None, dkim_domain: str | None = None
) -> list[SigningKey]:
    """The keys that sign: by the From: domain, or by CheckFile's `DKIMDomain` out.

    `dkim_domain` None: the longest match of `from_dom`. `""`: none (the script said
    skip). Another value: the keys configured with that `domain` (none if there is no
    such key; the caller decides whether that is worth a `script_error`).
    """
    wanted = signing_domain(keys, from_dom) if dkim_domain is None \
        else normalise_domain(dkim_domain)
    if not wanted:
        return []
    return [key for key in keys if key.domain == wanted]


def _tags(raw: bytes) -> dict[bytes, bytes]:
    value = _FOLD.sub(b"", raw.split(b":", 1)[1])
    tags: dict[bytes, bytes] = {}
    for part in _TAG_SPLIT.split(value.strip()):
        name, sep, tag_value = part.partition(b"=")
        if sep:
            tags.setdefault(name.strip().lower(), re.sub(rb"\s+", b"", tag_value))
    return tags


def existing_signers(header: bytes) -> set[tuple[str, str]]:
    """(d, s) of every DKIM-Signature already in the header, lowercased."""
    found: set[tuple[str, str]] = set()
    for name, raw in header_fields(header):
        if name == b"dkim-signature":
            tags = _tags(raw)
            d = tags.get(b"d", b"").decode("ascii", "replace").lower().rstrip(".")
            s = tags.get(b"s", b"").decode("ascii", "replace").lower()
            found.add((d, s))
    return found


# --- signing --------------------------------------------------------------------------


def signed_header_names(fields: Sequence[tuple[bytes, bytes]], wanted: Sequence[str]) -> list[str]:
    """The `h=` list: each wanted field once per occurrence, `from` once more (§8.15)."""
    counts: dict[str, int] = {}
    for raw_name, _ in fields:
        text = raw_name.decode("ascii", "replace")
        counts[text] = counts.get(text, 0) + 1
    names: list[str] = []
    for name in wanted:
        names.extend([name] * (counts.get(name, 0) + (1 if name == "from" else 0)))
    return names


def _selected_fields(fields: Sequence[tuple[bytes, bytes]], names: Sequence[str]) -> list[bytes]:
    """The fields `h=` names, each instance from the bottom up (§5.4.2); absent: skipped."""
    remaining: dict[bytes, list[bytes]] = {}
    for raw_name, raw in fields:
        remaining.setdefault(raw_name, []).append(raw)
    chosen: list[bytes] = []
    for name in names:
        stack = remaining.get(name.encode("ascii"))
        if stack:
            chosen.append(stack.pop())
    return chosen


def _fold_tags(tags: Sequence[bytes]) -> bytes:
    """`DKIM-Signature: t1; t2; ...; b=` folded at tag boundaries, colons of h=."""
    lines: list[bytes] = []
    line = b"DKIM-Signature:"
    for index, tag in enumerate(tags):
        piece = tag + (b";" if index < len(tags) - 1 else b"")
        parts = piece.split(b":") if tag.startswith(b"h=") else [piece]
        for number, part in enumerate(parts):
            text = part + (b":" if number < len(parts) - 1 else b"")
            gap = b"" if number > 0 else b" "
            if len(line) + len(gap) + len(text) > _FOLD_WIDTH and line.strip():
                lines.append(line)
                line, gap = b"\t", b""
            line += gap + text
    lines.append(line)
    return b"\r\n".join(lines)


def _fold_value(value: bytes, used: int) -> bytes:
    """A base64 value continued on tab-indented lines (FWS, which verifiers delete, §3.5)."""
    first = max(0, _FOLD_WIDTH - used)
    rest = [value[i : i + _FOLD_WIDTH - 1] for i in range(first, len(value), _FOLD_WIDTH - 1)]
    if first:
        return b"\r\n\t".join([value[:first], *rest])
    return b"\r\n\t" + b"\r\n\t".join(rest)


def _signature(key: SigningKey, data: bytes) -> bytes:
    private = key.private
    if isinstance(private, ed25519.Ed25519PrivateKey):
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the data (not the data itself).
        return private.sign(hashlib.sha256(data).digest())
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def sign_one(
    key: SigningKey, fields: Sequence[tuple[bytes, bytes]], body_hash: bytes, now: float
) -> bytes:
    """One DKIM-Signature field for `key`, folded, ending in CRLF (RFC 6376 §5)."""
    header_canon = key.canonicalization.partition("/")[0]
    names = signed_header_names(fields, key.headers)
    tags = [
        b"v=1",
        b"a=" + key.algorithm.encode("ascii"),
        b"c=" + key.canonicalization.encode("ascii"),
        b"d=" + key.domain.encode("ascii"),
        b"s=" + key.selector.encode("ascii"),
        b"t=%d" % int(now),
        b"h=" + ":".join(names).encode("ascii"),
        b"bh=" + base64.b64encode(body_hash),
        b"b=",
    ]
    unsigned = _fold_tags(tags)
    # §3.7: the selected fields, then this field with b= empty and without its CRLF.
    data = b"".join(canon_header(raw, header_canon) for raw in _selected_fields(fields, names))
    data += canon_header(unsigned + b"\r\n", header_canon)[:-2]
    b = base64.b64encode(_signature(key, data))
    used = len(unsigned.rsplit(b"\r\n", 1)[-1].expandtabs(8))
    return unsigned + _fold_value(b, used) + b"\r\n"


def body_hash(body: bytes, kind: str) -> bytes:
    """SHA-256 of the canonical body (§3.7), the `bh=` tag before base64."""
    return hashlib.sha256(canon_body(body, kind)).digest()


def sign(message: bytes, keys: Sequence[SigningKey], now: float) -> bytes:
    """The DKIM-Signature fields for `message` by `keys` (from `choose_keys`).

    Returns b"" when nothing is to be signed. Keys whose d= and s= already sign the
    message are left out. The result goes in front of the header, as is, on every
    attempt.
    """
    header, body = split_message(message)
    already = existing_signers(header)
    fields = header_fields(header)
    hashes_by_canon: dict[str, bytes] = {}
    out: list[bytes] = []
    for key in keys:
        if (key.domain, key.selector.lower()) in already:
            continue
        body_canon = key.canonicalization.partition("/")[2]
        if body_canon not in hashes_by_canon:
            hashes_by_canon[body_canon] = body_hash(body, body_canon)
        out.append(sign_one(key, fields, hashes_by_canon[body_canon], now))
    return b"".join(out)


def describe(keys: Iterable[SigningKey]) -> str | None:
    """The `dkim` value of the delivery event: `d=a s=b` joined with `,`, or None."""
    labels = [key.label for key in keys]
    return ",".join(labels) if labels else None


# --- the object the daemon is given -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signed:
    """What to store with a message's state before its first attempt (docs/dkim.md)."""

    fields: bytes  # DKIM-Signature field(s), CRLF-terminated ASCII; b"": not signed
    label: str | None  # the delivery event's `dkim`: "d=example.com s=s2026,...", or None


class Signer:
    """The configured keys, swapped whole on reload, and the two calls the daemon makes.

    `dkim_domain(header)` is CheckFile's `DKIMDomain` going in; `sign(message,
    dkim_domain, now)` is called once per message, before its first attempt, with the
    `DKIMDomain` CheckFile gave back. Pure apart from `reload`, which reads key files.
    """

    def __init__(self, keys: Sequence[SigningKey] = ()) -> None:
        self._keys: tuple[SigningKey, ...] = tuple(keys)

    @classmethod
    def from_config(cls, configs: tuple[DkimKey, ...]) -> tuple[Signer, tuple[str, ...]]:
        """Load the keys at start: (signer, warnings to log). DkimKeyError: exit 2."""
        loaded = load_keys(configs)
        return cls(loaded.keys), loaded.warnings

    def reload(self, configs: tuple[DkimKey, ...]) -> tuple[str, ...]:
        """Swap in new keys; on DkimKeyError the previous keys stay (contract §7)."""
        loaded = load_keys(configs)
        self._keys = loaded.keys
        return loaded.warnings

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        return self._keys

    @property
    def domains(self) -> frozenset[str]:
        """The configured `domain`s: what CheckFile's `DKIMDomain` out may name."""
        return frozenset(key.domain for key in self._keys)

    def choose(self, header: bytes, dkim_domain: str | None) -> list[SigningKey]:
        """The keys that would sign a message with this header (none already signed it).

        What `sign` uses, for `check-script --message` and for telling, without signing,
        that nothing will be signed.
        """
        if not self._keys:
            return []
        chosen = choose_keys(self._keys, from_domain(header), dkim_domain)
        already = existing_signers(header) if chosen else set()
        return [k for k in chosen if (k.domain, k.selector.lower()) not in already]

    def has_domain(self, domain: str) -> bool:
        """Whether a key is configured for `domain` (to tell a script's typo from "")."""
        wanted = normalise_domain(domain)
        return any(key.domain == wanted for key in self._keys)

    def dkim_domain(self, header: bytes) -> str:
        """CheckFile's `DKIMDomain` in: the `domain` of the key(s) that would sign, or ""."""
        return signing_domain(self._keys, from_domain(header)) if self._keys else ""

    def sign(self, message: bytes, dkim_domain: str | None, now: float) -> Signed:
        """Sign `message` (as sent, CRLF, not dot-stuffed) with the keys for `dkim_domain`.

        `dkim_domain` is CheckFile's `DKIMDomain` out: "" signs nothing, None chooses by
        the From: domain. CPU work (~0.1-0.8 ms, docs/dkim.md): call it off the loop's
        critical path, e.g. in an executor.
        """
        if not self._keys:
            return Signed(b"", None)
        chosen = self.choose(split_message(message)[0], dkim_domain)
        fields = sign(message, chosen, now)
        return Signed(fields, describe(chosen) if fields else None)
