"""MTA-STS (RFC 8461): discovery, policy parsing, MX matching and the per-host decision.

Pure parts (tested with tables): `parse_txt`, `parse_policy`, `mx_matches`, `decide`.
The I/O (TXT lookup, HTTPS fetch, the durable cache in the spool) is in mta_sts_cache.py.

The decision for one MX host (RFC 8461 §4, §5):

| policy            | MX matches a pattern         | MX does not match            |
|-------------------|------------------------------|------------------------------|
| none / no policy  | as before                    | as before                    |
| testing           | as before; failures reported | as before; failure reported  |
| enforce           | TLS required, PKIX verified, | not used (temporary failure  |
|                   | certificate names the host   | if no host is left)          |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: about one year
POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
POLICY_HOST_PREFIX = "mta-sts."
TXT_PREFIX = "_mta-sts."

# RFC 8461 §3.1 ABNF.
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 §3.2 ABNF: field names and values.
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_POLICY_EXT_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+\.?")
_WSP = " \t"


class PolicyError(ValueError):
    """A policy or TXT record that RFC 8461 does not allow; the message says what."""


class Mode(Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (RFC 8461 §3.2), with the TXT id it was fetched under."""

    mode: Mode
    mx: tuple[str, ...]  # patterns, lower case, no trailing dot
    max_age: int
    id: str = ""
    text: str = ""  # as served, for the cache and TLS-RPT's policy-string


def parse_txt(records: Sequence[str]) -> str:
    """The policy id from the TXT records at `_mta-sts.<domain>` (RFC 8461 §3.1).

    Records not starting with `v=STSv1;` are discarded; anything but exactly one left,
    or one that is malformed, means "no MTA-STS policy available" (PolicyError).
    """
    candidates = [r for r in records if r.startswith("v=STSv1") and _after_version_ok(r)]
    if len(candidates) != 1:
        raise PolicyError(f"{len(candidates)} v=STSv1 TXT records, not one")
    fields = [f.strip(_WSP) for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    ident = ""
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            raise PolicyError(f"malformed field {item!r}")
        if name == "id":
            if ident or not _TXT_ID.fullmatch(value):
                raise PolicyError(f"bad id {value!r}")
            ident = value
        elif not (_TXT_EXT_NAME.fullmatch(name) and _TXT_EXT_VALUE.fullmatch(value)):
            raise PolicyError(f"malformed field {item!r}")
    if not ident:
        raise PolicyError("no id= field")
    return ident


def _after_version_ok(record: str) -> bool:
    rest = record[len("v=STSv1") :].lstrip(_WSP)
    return rest.startswith(";")


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """Parse a policy body (RFC 8461 §3.2): LF or CRLF lines, `key: value`.

    The first occurrence of a field wins, except `mx`, which may repeat. Extension keys
    are ignored. version, mode and max_age are required, and at least one mx unless the
    mode is `none`.
    """
    first: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        line = raw.rstrip(_WSP)
        if not line:
            continue  # the trailing line end, or blank lines that sloppy servers add
        key, colon, value = line.partition(":")
        value = value.strip(_WSP)
        if not colon or not _POLICY_KEY.fullmatch(key):
            raise PolicyError(f"line {number}: not a 'key: value' field")
        if key == "mx":
            pattern = value.lower()
            if not _MX_PATTERN.fullmatch(pattern):
                raise PolicyError(f"line {number}: bad mx pattern {value!r}")
            mx.append(pattern.rstrip("."))
        elif key in ("version", "mode", "max_age"):
            first.setdefault(key, value)
        elif not _POLICY_EXT_VALUE.fullmatch(value):
            raise PolicyError(f"line {number}: bad value for {key}")
    if first.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    try:
        mode = Mode(first.get("mode", ""))
    except ValueError:
        raise PolicyError(f"bad mode {first.get('mode', '')!r}") from None
    age = first.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError(f"bad max_age {age!r}")
    if int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age} is over {MAX_AGE_LIMIT}")
    if not mx and mode is not Mode.NONE:
        raise PolicyError("no mx patterns")
    return Policy(mode, tuple(mx), int(age), policy_id, text)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or `*.example.com` for exactly one more left-most label."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot and rest == pattern[2:])
    return host == pattern


@dataclass(frozen=True, slots=True)
class Decision:
    """What MTA-STS asks of the connection to one MX host."""

    allowed: bool  # the host may be used at all
    tls_required: bool  # STARTTLS required, never plaintext
    verify_name: str  # "" or the name the PKIX-verified certificate must carry
    mode: Mode | None = None  # None: no policy
    mx_mismatch: bool = False  # the host matches no pattern (reported in testing)

    @property
    def enforced(self) -> bool:
        return self.mode is Mode.ENFORCE


NO_POLICY = Decision(allowed=True, tls_required=False, verify_name="")


def decide(policy: Policy | None, mx_host: str) -> Decision:
    """The MTA-STS verdict for one MX host (RFC 8461 §4.1, §4.2, §5)."""
    if policy is None or policy.mode is Mode.NONE:
        return NO_POLICY
    host = mx_host.lower().rstrip(".")
    matches = any(mx_matches(pattern, host) for pattern in policy.mx)
    if policy.mode is Mode.TESTING:
        # §5: deliver as without a policy; failures are only reported (TLS-RPT).
        return Decision(True, False, "", Mode.TESTING, mx_mismatch=not matches)
    if not matches:
        return Decision(False, True, host, Mode.ENFORCE, mx_mismatch=True)
    return Decision(True, True, host, Mode.ENFORCE)
