"""The config sections of the round-two features: `[[dkim.key]]` (contract §7), `[tls]`
(§8), `[listen]` and `[metrics]` (§10), and `log.debug_peers`.

Kept out of config.py, as config_shaping.py is; config.py builds `Config` from these
parsers and re-exports the dataclasses, so callers still import them from
`mxsend.config`. Errors name the dotted key, as everywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from mxsend.config_values import (
    IpNetwork,
    Section,
    dns_name,
    int_range,
    listen_address,
    networks,
    path_converter,
    positive_duration,
    to_bool,
    to_str,
)
from mxsend.errors import ConfigError

# Contract §7: signed when present; `from` is listed once more than it occurs
# ("oversigned", RFC 6376 §8.15) so that a From: added later breaks the signature.
DKIM_DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post",
)
DKIM_CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
_HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 §3.6.8 ftext


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One `[[dkim.key]]` table (contract §7); the key file is read by `dkim_keys`."""

    domain: str
    selector: str
    key_file: Path
    headers: tuple[str, ...] = DKIM_DEFAULT_HEADERS
    canonicalization: str = "relaxed/relaxed"


@dataclass(frozen=True, slots=True)
class DkimConfig:
    keys: tuple[DkimKey, ...] = ()


# RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next command.
LISTEN_IDLE_TIMEOUT = 300.0
LOOPBACK_NETWORKS: tuple[IpNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """The SMTP listener (contract §10); `address` "" is off."""

    address: str = ""
    networks: tuple[IpNetwork, ...] = LOOPBACK_NETWORKS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    idle_timeout: float = LISTEN_IDLE_TIMEOUT
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (contract §10); `listen` "" is off."""

    listen: str = ""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The receiving domain's TLS policy (contract §8)."""

    mta_sts: bool = True  # RFC 8461
    dane: bool = False  # RFC 7672; dns.nameservers must be a local validating resolver
    tlsrpt: bool = False  # RFC 8460 aggregate reports
    report_from: str = ""  # envelope sender and From: of TLS-RPT reports


def debug_peers(value: object, key: str) -> tuple[str, ...]:
    """Host names, `.domain` (every host under it), addresses or CIDR networks."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of host names or addresses, got {value!r}")
    peers: list[str] = []
    for item in value:
        text = to_str(item, key).strip()
        try:
            peers.append(str(ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            pass
        suffix = text.startswith(".")
        name = dns_name(text[1:] if suffix else text, key)
        peers.append("." + name if suffix else name)
    return tuple(peers)


def _dkim_headers(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of header names, got {value!r}")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _HEADER_NAME_RE.match(item):
            raise ConfigError(f"{key}: not a header field name: {item!r}")
        if item.lower() not in names:
            names.append(item.lower())
    if "from" not in names:  # RFC 6376 §5.4: "The From header field MUST be signed"
        raise ConfigError(f"{key}: must include from (RFC 6376 §5.4)")
    return tuple(names)


def _canonicalization(value: object, key: str) -> str:
    text = to_str(value, key).strip().lower()
    if text in ("relaxed", "simple"):  # RFC 6376 §3.5 c=: a lone value is the header's
        text += "/simple"
    if text not in DKIM_CANONICALIZATIONS:
        raise ConfigError(
            f"{key}: expected one of {', '.join(DKIM_CANONICALIZATIONS)}, got {value!r}"
        )
    return text


def dkim_section(table: object, base: Path | None) -> DkimConfig:
    s = Section("dkim", table, base)
    s.seen.add("key")
    entries = s.table.get("key", [])
    s.finish()
    if not isinstance(entries, list):
        raise ConfigError("dkim.key: expected [[dkim.key]] tables")
    keys: list[DkimKey] = []
    for index, entry in enumerate(entries):
        k = Section(f"dkim.key[{index}]", entry, base)
        for required in ("domain", "selector", "key_file"):
            if required not in k.table:
                raise ConfigError(f"{k.key(required)}: required")
        key = DkimKey(
            domain=k.get("domain", "", dns_name),
            selector=k.get("selector", "", dns_name),
            key_file=k.get("key_file", Path(), path_converter(base, empty_is_none=False)),
            headers=k.get("headers", DKIM_DEFAULT_HEADERS, _dkim_headers),
            canonicalization=k.get("canonicalization", "relaxed/relaxed", _canonicalization),
        )
        k.finish()
        if any((key.domain, key.selector) == (o.domain, o.selector) for o in keys):
            raise ConfigError(f"{k.key('selector')}: {key.selector} is configured twice "
                              f"for {key.domain}")
        keys.append(key)
    return DkimConfig(keys=tuple(keys))


def listen_section(s: Section, defaults: ListenConfig, base: Path | None) -> ListenConfig:
    path = path_converter(base, empty_is_none=True)
    listen = ListenConfig(
        address=s.get("address", defaults.address, listen_address),
        networks=s.get("networks", defaults.networks, networks),
        tls_cert=s.get("tls_cert", defaults.tls_cert, path),
        tls_key=s.get("tls_key", defaults.tls_key, path),
        idle_timeout=s.get("idle_timeout", defaults.idle_timeout, positive_duration),
        max_connections=s.get("max_connections", defaults.max_connections,
                              int_range(1, 100_000)),
    )
    s.finish()
    if (listen.tls_cert is None) != (listen.tls_key is None):
        missing = "listen.tls_key" if listen.tls_key is None else "listen.tls_cert"
        raise ConfigError(f"{missing}: tls_cert and tls_key go together (both or neither)")
    return listen


def _report_from(value: object, key: str) -> str:
    """An address for TLS-RPT reports: `local@domain`, no brackets, no spaces."""
    text = to_str(value, key)
    if text and not re.fullmatch(r"[^\s@<>]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text):
        raise ConfigError(f"{key}: expected an address such as tlsrpt@example.com, got {text!r}")
    return text


def metrics_section(s: Section, defaults: MetricsConfig) -> MetricsConfig:
    metrics = MetricsConfig(listen=s.get("listen", defaults.listen, listen_address))
    s.finish()
    return metrics


def tls_section(s: Section, defaults: TlsConfig) -> TlsConfig:
    tls = TlsConfig(
        mta_sts=s.get("mta_sts", defaults.mta_sts, to_bool),
        dane=s.get("dane", defaults.dane, to_bool),
        tlsrpt=s.get("tlsrpt", defaults.tlsrpt, to_bool),
        report_from=s.get("report_from", defaults.report_from, _report_from),
    )
    s.finish()
    if tls.tlsrpt and not tls.report_from:
        raise ConfigError("tls.report_from: required when tls.tlsrpt is true")
    return tls
