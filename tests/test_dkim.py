"""DKIM signing: RFC 6376 §3.4.6's canonicalisation example, key choice, and signatures
checked by dkimpy's verifier against keys published in a real DNS server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dkim as dkimpy
import dns.resolver
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given
from hypothesis import strategies as st

from mxsend.config import DKIM_DEFAULT_HEADERS
from mxsend.dkim import (
    canon_body,
    canon_header,
    choose_keys,
    describe,
    existing_signers,
    from_domain,
    header_fields,
    sign,
    signed_header_names,
    signing_domain,
    split_message,
)
from mxsend.dkim_keys import PrivateKey, SigningKey, generate_key, txt_record
from tests.fixtures.dns_server import DnsTestServer

NOW = 1_796_000_000.0

MESSAGE = (
    b"Received: from app by host; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
    b"From: Alice Example <alice@mail.example.com>\r\n"
    b"To: bob@example.org,\r\n carol@example.net\r\n"
    b"Subject:  Quarterly   report \r\n\tcontinued\r\n"
    b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <20261207100000.1@mail.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: not signed\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n"
    b"\r\n"
    b"the\tfigures are  attached.\r\n"
    b"\r\n"
    b"\r\n"
)

_KEY_CACHE: dict[str, PrivateKey] = {}


def private(kind: str) -> PrivateKey:
    """One RSA-2048 and one Ed25519 key for the whole module (RSA generation is slow)."""
    if kind not in _KEY_CACHE:
        _KEY_CACHE[kind] = generate_key(kind)
    return _KEY_CACHE[kind]


def signing_key(
    domain: str, selector: str, kind: str = "rsa", canonicalization: str = "relaxed/relaxed",
    headers: tuple[str, ...] = DKIM_DEFAULT_HEADERS,
) -> SigningKey:
    return SigningKey(domain, selector, headers, canonicalization, private(kind))


def publish(server: DnsTestServer, key: SigningKey) -> None:
    record = txt_record(key.private)
    # A TXT string holds at most 255 octets (RFC 1035 §3.3.14): split as zone tools do.
    server.add_txt(f"{key.selector}._domainkey.{key.domain}",
                   *[record[i : i + 255] for i in range(0, len(record), 255)])


def txt_lookup(server: DnsTestServer) -> Callable[..., bytes | None]:
    """dkimpy's TXT lookup (its `dnsfunc`), asking the test DNS server over the wire."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup


@pytest.fixture
def dnsfunc(dns_server: DnsTestServer) -> Iterator[Callable[..., bytes | None]]:
    yield txt_lookup(dns_server)


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    count = sum(1 for name, _ in header_fields(split_message(message)[0])
                if name == b"dkim-signature")
    results = []
    for index in range(count):
        try:
            results.append(bool(dkimpy.DKIM(message).verify(idx=index, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:  # a body hash mismatch raises rather than returns
            results.append(False)
    return results


# --- canonicalisation: RFC 6376 §3.4.6 ------------------------------------------------

RFC_HEADER = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
RFC_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_relaxed_example_of_rfc6376_3_4_6() -> None:
    fields = [raw for _, raw in header_fields(RFC_HEADER)]
    assert [canon_header(f, "relaxed") for f in fields] == [b"a:X\r\n", b"b:Y Z\r\n"]
    assert canon_body(RFC_BODY, "relaxed") == b" C\r\nD E\r\n"


def test_simple_example_of_rfc6376_3_4_6() -> None:
    fields = [raw for _, raw in header_fields(RFC_HEADER)]
    assert b"".join(canon_header(f, "simple") for f in fields) == RFC_HEADER
    assert canon_body(RFC_BODY, "simple") == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize(
    ("body", "simple", "relaxed"),
    [
        (b"", b"\r\n", b""),  # §3.4.3 and §3.4.4 differ on the empty body
        (b"\r\n", b"\r\n", b""),
        (b"\r\n\r\n \r\n", b"\r\n\r\n \r\n", b""),  # " " is not empty to simple
        (b"x", b"x\r\n", b"x\r\n"),  # a missing final CRLF is added
        (b"x \t", b"x \t\r\n", b"x \r\n"),  # as dkimpy: a last line without CRLF
        (b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    ],
)
def test_body_edges(body: bytes, simple: bytes, relaxed: bytes) -> None:
    assert canon_body(body, "simple") == simple
    assert canon_body(body, "relaxed") == relaxed


# --- what signs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"From: a@Example.COM\r\n", "example.com"),
        (b"From: \"Smith, J\" <j@sub.example.com.>\r\n", "sub.example.com"),
        (b"From:\r\n Alice\r\n <alice@example.com>\r\n", "example.com"),
        (b"From: a@example.com, b@example.com\r\n", "example.com"),
        (b"From: a@example.com, b@example.org\r\n", None),  # which one would DMARC pick?
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", None),  # RFC 5322 §3.6: one
        (b"To: a@example.com\r\n", None),
        (b"From: undisclosed\r\n", None),
        ("From: a@bücher.example\r\n".encode(), "xn--bcher-kva.example"),
    ],
)
def test_from_domain(header: bytes, expected: str | None) -> None:
    assert from_domain(header) == expected


def test_longest_match_and_dual_keys() -> None:
    parent_rsa = signing_key("example.com", "r1")
    parent_ed = signing_key("example.com", "e1", "ed25519")
    child = signing_key("mail.example.com", "m1")
    keys = [parent_rsa, parent_ed, child]
    assert choose_keys(keys, "example.com") == [parent_rsa, parent_ed]
    assert choose_keys(keys, "news.example.com") == [parent_rsa, parent_ed]
    assert choose_keys(keys, "mail.example.com") == [child]
    assert choose_keys(keys, "a.mail.example.com") == [child]
    assert choose_keys(keys, "badexample.com") == []  # a suffix is not a parent domain
    assert choose_keys(keys, None) == []
    assert signing_domain(keys, "x.mail.example.com") == "mail.example.com"
    assert signing_domain(keys, "example.org") == ""


def test_dkim_domain_from_the_script_overrides_the_choice() -> None:
    parent = signing_key("example.com", "r1")
    other = signing_key("example.net", "n1")
    keys = [parent, other]
    assert choose_keys(keys, "example.com", "") == []  # the script said: do not sign
    assert choose_keys(keys, "example.com", "Example.NET") == [other]
    assert choose_keys(keys, "example.com", "unknown.example") == []


def test_h_lists_from_once_more_and_only_fields_present() -> None:
    fields = header_fields(split_message(MESSAGE)[0])
    names = signed_header_names(fields, DKIM_DEFAULT_HEADERS)
    assert names == ["from", "from", "to", "subject", "date", "message-id", "mime-version",
                     "content-type"]
    two_to = header_fields(b"To: a@b\r\nTo: c@d\r\n")
    assert signed_header_names(two_to, ("from", "to")) == ["from", "to", "to"]


def test_signature_tags() -> None:
    field = sign(MESSAGE, [signing_key("mail.example.com", "s2026")], NOW)
    assert field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; ")
    assert field.endswith(b"\r\n") and field.count(b"\r\n\r\n") == 0
    tags = existing_signers(field)
    assert tags == {("mail.example.com", "s2026")}
    unfolded = field.replace(b"\r\n\t", b"")
    assert b" t=1796000000;" in unfolded
    assert b"l=" not in unfolded.replace(b"bh=", b"") and b" x=" not in unfolded
    assert b"h=from:from:to:subject:date:message-id:mime-version:content-type;" in unfolded
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))  # RFC 5322 §2.1.1


def test_key_repr_hides_the_private_key() -> None:
    key = signing_key("example.com", "r1")
    assert "PrivateKey" not in repr(key) and "private" not in repr(key)
    assert describe([key, signing_key("example.com", "e1", "ed25519")]) == \
        "d=example.com s=r1,d=example.com s=e1"
    assert describe([]) is None


# --- verified by dkimpy against the published keys --------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]
)
def test_dkimpy_verifies(
    dns_server: DnsTestServer, dnsfunc: Callable[..., bytes | None], kind: str,
    canonicalization: str,
) -> None:
    key = signing_key("example.com", f"{kind}1", kind, canonicalization)
    publish(dns_server, key)
    signed = sign(MESSAGE, choose_keys([key], from_domain(MESSAGE)), NOW) + MESSAGE
    assert verify_all(signed, dnsfunc) == [True]


def test_dkimpy_verifies_a_dual_signature(
    dns_server: DnsTestServer, dnsfunc: Callable[..., bytes | None]
) -> None:
    keys = [signing_key("example.com", "rsa2026"),
            signing_key("example.com", "ed2026", "ed25519")]
    for key in keys:
        publish(dns_server, key)
    fields = sign(MESSAGE, choose_keys(keys, from_domain(MESSAGE)), NOW)
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in fields and b"a=ed25519-sha256" in fields
    assert verify_all(fields + MESSAGE, dnsfunc) == [True, True]


def test_a_changed_message_fails(
    dns_server: DnsTestServer, dnsfunc: Callable[..., bytes | None]
) -> None:
    """The verifier is not vacuous: an added From: or a changed body fails.

    (dkimpy also refuses a second From: by itself, so the oversigning that guards against
    it, RFC 6376 §8.15, is checked on h= above.)
    """
    key = signing_key("example.com", "r1")
    publish(dns_server, key)
    signed = sign(MESSAGE, [key], NOW) + MESSAGE
    assert verify_all(signed, dnsfunc) == [True]
    added_from = b"From: mallory@example.com\r\n" + signed
    assert verify_all(added_from, dnsfunc) == [False]
    assert verify_all(signed.replace(b"figures", b"Figures"), dnsfunc) == [False]


def test_empty_body_and_header_only_message(
    dns_server: DnsTestServer, dnsfunc: Callable[..., bytes | None]
) -> None:
    key = signing_key("example.com", "e1", "ed25519")
    publish(dns_server, key)
    for message in (b"From: a@example.com\r\nSubject: x\r\n\r\n", b"From: a@example.com\r\n"):
        assert verify_all(sign(message, [key], NOW) + message, dnsfunc) == [True]


def test_same_bytes_on_every_call() -> None:
    """RSA PKCS#1 v1.5 and Ed25519 are deterministic: a re-sign after a crash is harmless."""
    keys = [signing_key("example.com", "r1"), signing_key("example.com", "e1", "ed25519")]
    assert sign(MESSAGE, keys, NOW) == sign(MESSAGE, keys, NOW)


def test_not_signed_again_with_the_same_d_and_s() -> None:
    rsa_key = signing_key("example.com", "r1")
    ed_key = signing_key("example.com", "e1", "ed25519")
    once = sign(MESSAGE, [rsa_key], NOW) + MESSAGE
    again = sign(once, [rsa_key, ed_key], NOW + 60)
    assert again.count(b"DKIM-Signature:") == 1 and b"s=e1;" in again
    assert sign(again + once, [rsa_key, ed_key], NOW) == b""


def test_an_unrelated_signature_does_not_stop_signing() -> None:
    key = signing_key("example.com", "r1")
    foreign = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=other; b=abc\r\n"
    assert sign(foreign + MESSAGE, [key], NOW).startswith(b"DKIM-Signature:")


# --- the same canonical form as dkimpy, the reference implementation -----------------------

_WSP_TEXT = st.lists(
    st.sampled_from([b"a", b"Z", b" ", b"\t", b"  ", b"\r\n", b"\r\n\r\n", b".", b"\xc3\xa9"]),
    max_size=40,
).map(b"".join)


@given(_WSP_TEXT)
def test_body_canonicalisation_matches_dkimpy(body: bytes) -> None:
    for kind, reference in (("relaxed", Relaxed), ("simple", Simple)):
        assert canon_body(body, kind) == reference.canonicalize_body(body), kind


@given(st.sampled_from([b"Subject", b"X-Tag", b"from"]), _WSP_TEXT)
def test_header_canonicalisation_matches_dkimpy(name: bytes, value: bytes) -> None:
    # A field value never holds a CRLF that is not followed by WSP (that would end it).
    value = value.replace(b"\r\n", b"\r\n ")
    raw = name + b":" + value + b"\r\n"
    for kind, reference in (("relaxed", Relaxed), ("simple", Simple)):
        [(ref_name, ref_value)] = reference.canonicalize_headers([(name, value + b"\r\n")])
        assert canon_header(raw, kind) == ref_name + b":" + ref_value, kind
