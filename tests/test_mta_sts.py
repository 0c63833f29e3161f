"""MTA-STS (RFC 8461): pure parsing and matching, and fetches from a real HTTPS server
whose host name is resolved through the real test DNS server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import trustme

from mxsend.config import config_from_mapping
from mxsend.errors import ConfigError
from mxsend.mta_sts import (
    NO_POLICY,
    Decision,
    Mode,
    Policy,
    PolicyError,
    decide,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mxsend.mta_sts_cache import FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID, MtaStsPolicies
from mxsend.tlsdns import TlsResolver
from tests.fixtures.dns_server import DnsTestServer
from tests.fixtures.https_server import HttpsServer, HttpsServers, https_servers  # noqa: F401

DOMAIN = "example.test"
POLICY_HOST = "mta-sts.example.test"
POLICY_TEXT = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\n"
    "mx: *.mail.example.test\r\nmax_age: 86400\r\n"
)


# --- TXT discovery (RFC 8461 §3.1) ------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1 ; id=abc ; ext=val"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),
    ],
)
def test_parse_txt_accepts(records: list[str], expected: str) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        ["v=STSv1; id=a", "v=STSv1; id=b"],  # two records: no policy
        ["v=STSv1"],  # no id
        ["v=STSv1; id="],
        ["v=STSv1; id=" + "a" * 33],  # over 32 characters
        ["v=STSv1; id=a-b"],  # id is ALPHA / DIGIT only
        ["v=STSv1; id=a; id=b"],
        ["v=STSv1x; id=a"],
        ["v=STSv1; junk"],
        ["V=STSV1; id=a"],  # %s: case-sensitive
    ],
)
def test_parse_txt_rejects(records: list[str]) -> None:
    with pytest.raises(PolicyError):
        parse_txt(records)


# --- the policy (RFC 8461 §3.2) --------------------------------------------------------


def test_parse_policy_crlf_and_lf_alike() -> None:
    crlf = parse_policy(POLICY_TEXT, "id1")
    lf = parse_policy(POLICY_TEXT.replace("\r\n", "\n"), "id1")
    assert crlf.mode is lf.mode is Mode.ENFORCE
    assert crlf.mx == lf.mx == ("mx1.example.test", "*.mail.example.test")
    assert crlf.max_age == 86400 and crlf.id == "id1"


def test_parse_policy_first_occurrence_wins_and_extensions_are_ignored() -> None:
    policy = parse_policy(
        "version: STSv1\nmode: testing\nmode: enforce\nmx: MX.Example.Test.\n"
        "max_age: 5\nx-ext: anything here\n"
    )
    assert policy.mode is Mode.TESTING and policy.mx == ("mx.example.test",)
    assert policy.max_age == 5


def test_parse_policy_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
        "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a*.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n<html>\n",
    ],
)
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_parse_policy_accepts_the_maximum_max_age() -> None:
    text = "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557600\n"
    assert parse_policy(text).max_age == 31557600


# --- MX matching (RFC 8461 §4.1) and the decision --------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mx1.example.test", "mx1.example.test", True),
        ("mx1.example.test", "MX1.Example.Test.", True),
        ("mx1.example.test", "mx2.example.test", False),
        ("*.example.test", "mx1.example.test", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", "mx1.example.test.evil", False),
        ("*.example.test", ".example.test", False),
    ],
)
def test_mx_matches(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


ENFORCE = Policy(Mode.ENFORCE, ("mx1.example.test", "*.mail.example.test"), 86400, "i")
TESTING = Policy(Mode.TESTING, ("mx1.example.test",), 86400, "i")
NONE = Policy(Mode.NONE, (), 86400, "i")


@pytest.mark.parametrize(
    ("policy", "host", "expected"),
    [
        (None, "anything.test", NO_POLICY),
        (NONE, "anything.test", NO_POLICY),
        (ENFORCE, "mx1.example.test",
         Decision(True, True, "mx1.example.test", Mode.ENFORCE)),
        (ENFORCE, "A.mail.example.test.",
         Decision(True, True, "a.mail.example.test", Mode.ENFORCE)),
        (ENFORCE, "evil.test",
         Decision(False, True, "evil.test", Mode.ENFORCE, mx_mismatch=True)),
        (TESTING, "mx1.example.test", Decision(True, False, "", Mode.TESTING)),
        (TESTING, "evil.test", Decision(True, False, "", Mode.TESTING, mx_mismatch=True)),
    ],
)
def test_decide(policy: Policy | None, host: str, expected: Decision) -> None:
    assert decide(policy, host) == expected


# --- fetching and caching with real servers ---------------------------------------------


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def policy_server(https_servers: HttpsServers, dns_server: DnsTestServer) -> HttpsServer:  # noqa: F811
    server = https_servers.start("127.0.0.2", names=(POLICY_HOST,))
    server.route("/.well-known/mta-sts.txt", body=POLICY_TEXT.encode())
    dns_server.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=one;"')
    dns_server.add_a(POLICY_HOST, "127.0.0.2")
    return server


def policies(
    spool: Path, dns_server: DnsTestServer, server: HttpsServer, **kwargs: object
) -> MtaStsPolicies:
    options: dict[str, object] = {"recheck": 0.0, "timeout": 2.0}
    options.update(kwargs)
    return MtaStsPolicies(
        spool, TlsResolver(dns_server.dns_config(ipv6=False)), ca_file=server.ca_file,
        port=server.port, **options,  # type: ignore[arg-type]
    )


async def test_valid_policy_is_fetched_and_cached_durably(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    sts = policies(tmp_path, dns_server, policy_server)
    result = await sts.lookup(DOMAIN)
    assert result.source == "fetched" and result.problem == ""
    assert result.policy is not None and result.policy.mode is Mode.ENFORCE
    assert result.policy.id == "one"
    [request] = policy_server.requests
    assert request.method == "GET" and request.headers["host"] == POLICY_HOST
    record = json.loads((tmp_path / "policy/mta-sts/example.test.json").read_text())
    assert record["id"] == "one" and record["policy"] == POLICY_TEXT
    # Same id: the cache answers, no second fetch.
    again = await sts.lookup(DOMAIN)
    assert again.source == "cache" and again.policy == result.policy
    assert len(policy_server.requests) == 1


async def test_recheck_interval_spares_dns_for_domains_without_policy(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    sts = policies(tmp_path, dns_server, policy_server, recheck=300.0)
    for _ in range(5):
        assert (await sts.lookup("nopolicy.test")).policy is None
    assert dns_server.query_count("_mta-sts.nopolicy.test", "TXT") == 1


async def test_id_change_refetches(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    sts = policies(tmp_path, dns_server, policy_server)
    await sts.lookup(DOMAIN)
    policy_server.route(
        "/.well-known/mta-sts.txt",
        body=POLICY_TEXT.replace("enforce", "testing").encode(),
    )
    dns_server.remove(f"_mta-sts.{DOMAIN}", "TXT")
    dns_server.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=two;"')
    result = await sts.lookup(DOMAIN)
    assert result.source == "fetched" and result.policy is not None
    assert result.policy.mode is Mode.TESTING and result.policy.id == "two"
    assert len(policy_server.requests) == 2


@pytest.mark.parametrize(
    ("route", "result_type", "words"),
    [
        ({"body": b"x" * (64 * 1024 + 1)}, FETCH_ERROR, "over 65536"),
        ({"status": 301, "headers": (("Location", "https://elsewhere.test/"),)},
         FETCH_ERROR, "redirects are not followed"),
        ({"status": 404}, FETCH_ERROR, "HTTP 404"),
        ({"content_type": "text/html", "body": POLICY_TEXT.encode()}, POLICY_INVALID,
         "text/html"),
        ({"body": b"version: STSv1\nmode: sometimes\n"}, POLICY_INVALID, "invalid policy"),
        ({"delay": 30.0, "body": POLICY_TEXT.encode()}, FETCH_ERROR, "within 0.5s"),
    ],
)
async def test_failed_fetch_without_cache_means_no_policy(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer,
    route: dict[str, object], result_type: str, words: str,
) -> None:
    policy_server.route("/.well-known/mta-sts.txt", **route)
    sts = policies(tmp_path, dns_server, policy_server, timeout=0.5)
    result = await sts.lookup(DOMAIN)
    assert result.policy is None and result.source == "none"
    assert result.result_type == result_type
    assert words in result.problem
    assert not (tmp_path / "policy/mta-sts/example.test.json").exists()


async def test_certificate_from_an_untrusted_ca_is_refused(
    tmp_path: Path, dns_server: DnsTestServer, https_servers: HttpsServers,  # noqa: F811
) -> None:
    rogue = https_servers.start("127.0.0.3", names=(POLICY_HOST,), ca=trustme.CA())
    rogue.route("/.well-known/mta-sts.txt", body=POLICY_TEXT.encode())
    dns_server.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=one;"')
    dns_server.add_a(POLICY_HOST, "127.0.0.3")
    result = await policies(tmp_path, dns_server, rogue).lookup(DOMAIN)
    assert result.policy is None and result.result_type == WEBPKI_INVALID
    assert "certificate" in result.problem
    assert rogue.requests == []


async def test_certificate_for_another_name_is_refused(
    tmp_path: Path, dns_server: DnsTestServer, https_servers: HttpsServers,  # noqa: F811
) -> None:
    wrong = https_servers.start("127.0.0.3", names=("mta-sts.other.test",))
    wrong.route("/.well-known/mta-sts.txt", body=POLICY_TEXT.encode())
    dns_server.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=one;"')
    dns_server.add_a(POLICY_HOST, "127.0.0.3")
    result = await policies(tmp_path, dns_server, wrong).lookup(DOMAIN)
    assert result.policy is None and result.result_type == WEBPKI_INVALID


async def test_policy_host_is_resolved_through_the_configured_nameserver(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    await policies(tmp_path, dns_server, policy_server).lookup(DOMAIN)
    assert dns_server.query_count(POLICY_HOST, "A") == 1


async def test_cache_survives_restart_when_policy_host_is_down(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    clock = Clock()
    first = policies(tmp_path, dns_server, policy_server, clock=clock)
    assert (await first.lookup(DOMAIN)).source == "fetched"
    # "Restart" with an attacker blocking the policy host and a new TXT id.
    policy_server.stop()
    dns_server.remove(f"_mta-sts.{DOMAIN}", "TXT")
    dns_server.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=two;"')
    clock.now += 3600
    second = policies(tmp_path, dns_server, policy_server, clock=clock)
    result = await second.lookup(DOMAIN)
    assert result.policy is not None and result.policy.mode is Mode.ENFORCE
    assert result.source == "cache" and "fetch failed" in result.problem
    # The TXT record disappears: the cached policy still applies until max_age.
    dns_server.remove(f"_mta-sts.{DOMAIN}", "TXT")
    assert (await second.lookup(DOMAIN)).policy == result.policy
    # After max_age it no longer does (§3.3: then deliver as with no policy).
    clock.now += 86400
    expired = await second.lookup(DOMAIN)
    assert expired.policy is None


async def test_damaged_cache_file_is_ignored(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    path = tmp_path / "policy/mta-sts/example.test.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    result = await policies(tmp_path, dns_server, policy_server).lookup(DOMAIN)
    assert result.source == "fetched"
    assert json.loads(path.read_text())["id"] == "one"


async def test_policy_close_to_expiry_is_refreshed(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    clock = Clock()
    sts = policies(tmp_path, dns_server, policy_server, clock=clock, refresh_before=3600.0)
    await sts.lookup(DOMAIN)
    clock.now += 86400 - 1800
    result = await sts.lookup(DOMAIN)
    assert result.source == "fetched" and len(policy_server.requests) == 2


async def test_unsafe_domain_is_not_a_file_name(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    result = await policies(tmp_path, dns_server, policy_server).lookup("../../etc")
    assert result.policy is None and "not a domain" in result.problem


# --- the [tls] section (contract §8) ------------------------------------------------------


def test_tls_config_defaults() -> None:
    tls = config_from_mapping({}).tls
    assert (tls.mta_sts, tls.dane, tls.tlsrpt, tls.report_from) == (True, False, False, "")


def test_tls_config_reads_its_keys() -> None:
    tls = config_from_mapping({"tls": {
        "mta_sts": False, "dane": True, "tlsrpt": True, "report_from": "tlsrpt@example.com",
    }}).tls
    assert (tls.mta_sts, tls.dane, tls.tlsrpt) == (False, True, True)
    assert tls.report_from == "tlsrpt@example.com"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"tlsrpt": True}, "tls.report_from"),
        ({"tlsrpt": True, "report_from": "not an address"}, "tls.report_from"),
        ({"dane": "yes"}, "tls.dane"),
        ({"mta_sts": 1}, "tls.mta_sts"),
        ({"mta-sts": True}, "tls.mta-sts"),
    ],
)
def test_tls_config_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        config_from_mapping({"tls": table})


async def test_concurrent_lookups_share_one_fetch(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    sts = policies(tmp_path, dns_server, policy_server)
    results = await asyncio.gather(*(sts.lookup(DOMAIN) for _ in range(5)))
    assert all(r.policy is not None for r in results)
    assert len(policy_server.requests) == 1
    assert dns_server.query_count(f"_mta-sts.{DOMAIN}", "TXT") == 1


async def test_memory_is_bounded_and_the_spool_still_answers(
    tmp_path: Path, dns_server: DnsTestServer, policy_server: HttpsServer
) -> None:
    sts = policies(tmp_path, dns_server, policy_server, max_domains=2, recheck=300.0)
    await sts.lookup(DOMAIN)
    await sts.lookup("a.test")
    await sts.lookup("b.test")  # evicts example.test from memory
    policy_server.stop()
    result = await sts.lookup(DOMAIN)  # read back from the spool; same id: no fetch
    assert result.policy is not None and result.source == "cache"
