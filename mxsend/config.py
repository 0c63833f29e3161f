"""Configuration: TOML loaded once into frozen dataclasses, validated up front.

Every problem is one ConfigError whose message starts with the dotted key, so the CLI
can print one line and exit 2. Relative paths are resolved against the directory of the
config file that names them (contract §3).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mxsend.config_shaping import SECTIONS as SHAPING_SECTIONS
from mxsend.config_shaping import ShapingConfig, shaping_from_mapping
from mxsend.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/mxsend/mxsend.toml")
CONFIG_ENV = "MXSEND_CONFIG"

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?B?)\s*$", re.IGNORECASE)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_duration(value: object, key: str) -> float:
    """`30`, `30s`, `5m`, `2h`, `5d` -> seconds. Booleans are not numbers here."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    else:
        raise ConfigError(f"{key}: expected a duration such as 30s or 5m, got {value!r}")
    if not math.isfinite(seconds):  # TOML has inf and nan
        raise ConfigError(f"{key}: expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object, key: str) -> int:
    """`1024`, `64KB`, `50MB`, `1GB` -> bytes (binary multiples, as Postfix operators expect)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 50MB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match.group(2).upper()
        if unit and not unit.endswith("B"):
            unit += "B"
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"{key}: expected a size such as 50MB, got {value!r}")
    if size < 0:
        raise ConfigError(f"{key}: a size cannot be negative, got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = Path("/var/spool/mxsend")
    max_message_size: int = 50 * 1024**2
    keep_sent: bool = False
    # The group the spool's folders and files belong to, as a gid; None: the daemon's
    # own group (docs/spool.md, "Permissions").
    group: int | None = None


@dataclass(frozen=True, slots=True)
class ScriptConfig:
    path: Path = Path("/etc/mxsend/mxout.lua")
    timeout: float = 1.0
    memory: int = 64 * 1024**2
    # Contract §9: VPOP3 8.8's mxserverrules.lua (None: no such script) and the
    # ConnectionId / ConnectionName globals both scripts see.
    server_rules_path: Path | None = None
    connection_id: int = 0
    connection_name: str = ""


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0
    ipv6: bool = True


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    port: int = 25
    helo_name: str = ""
    source_address: str = ""
    ca_file: Path | None = None
    max_connections: int = 100
    max_connections_per_domain: int = 10
    # Contract §10: loopback, private and similar networks an operator lets mail go to.
    allowed_destinations: tuple[IpNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class QueueConfig:
    scan_interval: float = 30.0
    retry: tuple[float, ...] = (300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    shutdown_grace: float = 30.0
    # Daemon processes sharing the spool (and the smtp limits); "auto" by default.
    processes: int = field(default_factory=lambda: auto_processes())


@dataclass(frozen=True, slots=True)
class BatvConfig:
    key_file: Path | None = None


# Contract §7: signed when present; `from` is listed once more than it occurs
# ("oversigned", RFC 6376 §8.15) so that a From: added later breaks the signature.
DKIM_DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post",
)
DKIM_CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
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


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"
    level: str = "info"
    # SMTP transcripts for these servers (host names, .parent domains, IPs, networks),
    # as Postfix's debug_peer_list: docs/operations.md.
    debug_peers: tuple[str, ...] = ()


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


@dataclass(frozen=True, slots=True)
class Config:
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    script: ScriptConfig = field(default_factory=ScriptConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    batv: BatvConfig = field(default_factory=BatvConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)  # §9: shapes, rules, cluster
    source: Path | None = None  # the file this came from; None for built-in defaults


T = TypeVar("T")


class _Section:
    """Reads one TOML table, remembering which keys were consumed."""

    def __init__(self, name: str, table: object, base: Path | None) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: expected a table, got {type(table).__name__}")
        self.name = name
        self.table: Mapping[str, Any] = table
        self.base = base
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, default: T, convert: Callable[[object, str], T]) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        return convert(self.table[key], self.key(key))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _group(value: object, key: str) -> int | None:
    """A group name or number -> gid; "" -> None (the daemon's own group)."""
    import grp  # only here: `mxsend enqueue` loads config on every call

    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        text = _str(value, key)
    if not text:
        return None
    if text.isdigit():
        # A number needs no entry in /etc/group (a container's numeric gid).
        if int(text) >= 2**32 - 1:
            raise ConfigError(f"{key}: group id {text} out of range")
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: no such group {text!r}") from None


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{key}: control characters are not allowed")
    return value


def _int_range(low: int, high: int) -> Callable[[object, str], int]:
    def convert(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be between {low} and {high}, got {value}")
        return value

    return convert


# `processes = "auto"`: one daemon per usable core, at most this many. Each daemon is
# an interpreter and a Lua worker (~55 MB), and the connection limits are split among
# them, so past a few the memory grows faster than the throughput.
AUTO_PROCESSES_MAX = 4


def usable_cpus() -> int:
    """Cores this process may run on: its affinity, and a cgroup v2 quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, _, period = handle.read().strip().partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except OSError:
        pass
    return max(1, cpus)


def auto_processes() -> int:
    """`processes = "auto"`: one daemon per usable core, within AUTO_PROCESSES_MAX."""
    return min(usable_cpus(), AUTO_PROCESSES_MAX)


def _processes(value: object, key: str) -> int:
    if isinstance(value, str) and value.lower() == "auto":
        return auto_processes()
    if isinstance(value, str):
        raise ConfigError(f'{key}: expected a whole number or "auto", got {value!r}')
    return _int_range(1, 64)(value, key)


def _choice(*choices: str) -> Callable[[object, str], str]:
    def convert(value: object, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return convert


def _nameservers(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of addresses, got {value!r}")
    servers: list[str] = []
    for item in value:
        text = _str(item, key)
        try:
            split_host_port(text, 53)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        servers.append(text)
    return tuple(servers)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`1.2.3.4`, `1.2.3.4:5353`, `[::1]:5353`, `::1` -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not _is_port(rest[1:]):
                raise ValueError(f"bad port in {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not _is_port(port_text):
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def _networks(value: object, key: str) -> tuple[IpNetwork, ...]:
    """A list of CIDR strings ("127.0.0.0/8", "::1/128"; a bare address is a /32 or /128)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of networks (CIDR), got {value!r}")
    networks: list[IpNetwork] = []
    for item in value:
        text = _str(item, key)
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not a network (CIDR)") from None
    return tuple(networks)


def _is_port(text: str) -> bool:
    # isascii: str.isdigit() also takes "٣", which int() reads as 3.
    return text.isascii() and text.isdigit() and len(text) <= 5


def _listen_address(value: object, key: str) -> str:
    """"" (off) or `ip:port` / `[ipv6]:port`: a port is required, there is no default."""
    text = _str(value, key)
    if not text:
        return text
    if not (text.startswith("[") and "]:" in text) and text.count(":") != 1:
        raise ConfigError(f"{key}: expected ip:port or [ipv6]:port, got {text!r}")
    try:
        split_host_port(text, 0)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return text


def _source_address(value: object, key: str) -> str:
    text = _str(value, key)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an IP address or \"\", got {text!r}") from None
    return text


def _positive_size(value: object, key: str) -> int:
    size = parse_size(value, key)
    if size <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return size


def _retry(value: object, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of durations, got {value!r}")
    intervals = tuple(parse_duration(item, key) for item in value)
    if any(interval <= 0 for interval in intervals):
        raise ConfigError(f"{key}: retry intervals must be positive")
    return intervals


def _positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return seconds


def _path_converter(base: Path | None, *, empty_is_none: bool) -> Callable[[object, str], Any]:
    def convert(value: object, key: str) -> Path | None:
        text = _str(value, key)
        if not text:
            if empty_is_none:
                return None
            raise ConfigError(f"{key}: a path is required")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" with no such user, or no $HOME
            raise ConfigError(f"{key}: cannot expand {text!r}") from None
        if not path.is_absolute() and base is not None:
            path = Path(os.path.normpath(base / path))
        return path

    return convert


def _dns_name(value: object, key: str) -> str:
    """A domain or selector: dot-separated DNS labels, lowercased, A-labels for IDNs."""
    text = _str(value, key).strip().rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        raise ConfigError(f"{key}: not a valid domain name: {value!r}") from None
    labels = text.split(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ConfigError(f"{key}: not a valid domain name: {value!r}")
    return text


def _debug_peers(value: object, key: str) -> tuple[str, ...]:
    """Host names, `.domain` (every host under it), addresses or CIDR networks."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of host names or addresses, got {value!r}")
    peers: list[str] = []
    for item in value:
        text = _str(item, key).strip()
        try:
            peers.append(str(ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            pass
        suffix = text.startswith(".")
        name = _dns_name(text[1:] if suffix else text, key)
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
    text = _str(value, key).strip().lower()
    if text in ("relaxed", "simple"):  # RFC 6376 §3.5 c=: a lone value is the header's
        text += "/simple"
    if text not in DKIM_CANONICALIZATIONS:
        raise ConfigError(
            f"{key}: expected one of {', '.join(DKIM_CANONICALIZATIONS)}, got {value!r}"
        )
    return text


def _dkim(table: object, base: Path | None) -> DkimConfig:
    s = _Section("dkim", table, base)
    s.seen.add("key")
    entries = s.table.get("key", [])
    s.finish()
    if not isinstance(entries, list):
        raise ConfigError("dkim.key: expected [[dkim.key]] tables")
    keys: list[DkimKey] = []
    for index, entry in enumerate(entries):
        k = _Section(f"dkim.key[{index}]", entry, base)
        for required in ("domain", "selector", "key_file"):
            if required not in k.table:
                raise ConfigError(f"{k.key(required)}: required")
        key = DkimKey(
            domain=k.get("domain", "", _dns_name),
            selector=k.get("selector", "", _dns_name),
            key_file=k.get("key_file", Path(), _path_converter(base, empty_is_none=False)),
            headers=k.get("headers", DKIM_DEFAULT_HEADERS, _dkim_headers),
            canonicalization=k.get("canonicalization", "relaxed/relaxed", _canonicalization),
        )
        k.finish()
        if any((key.domain, key.selector) == (o.domain, o.selector) for o in keys):
            raise ConfigError(f"{k.key('selector')}: {key.selector} is configured twice "
                              f"for {key.domain}")
        keys.append(key)
    return DkimConfig(keys=tuple(keys))


def load_config(path: Path | None) -> Config:
    """Load and validate a config file; None gives the built-in defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config: {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: {exc}") from None
    except UnicodeDecodeError:  # TOML is UTF-8 (TOML 1.0 "Spec")
        raise ConfigError(f"config: {path}: not valid UTF-8") from None
    return config_from_mapping(data, base=path.resolve().parent, source=path)


def config_from_mapping(
    data: Mapping[str, Any], *, base: Path | None = None, source: Path | None = None
) -> Config:
    """Validate an already-parsed TOML document."""
    known = {"spool", "script", "dns", "smtp", "queue", "batv", "log", "dkim", "listen",
             "metrics", "tls", *SHAPING_SECTIONS}
    for name in data:
        if name not in known:
            raise ConfigError(f"{name}: unknown section")
    defaults = Config()

    def section(name: str) -> _Section:
        return _Section(name, data.get(name, {}), base)

    s = section("spool")
    spool = SpoolConfig(
        path=s.get("path", defaults.spool.path, _path_converter(base, empty_is_none=False)),
        max_message_size=s.get(
            "max_message_size", defaults.spool.max_message_size, _positive_size
        ),
        keep_sent=s.get("keep_sent", defaults.spool.keep_sent, _bool),
        group=s.get("group", defaults.spool.group, _group),
    )
    s.finish()

    s = section("script")
    script = ScriptConfig(
        path=s.get("path", defaults.script.path, _path_converter(base, empty_is_none=False)),
        timeout=s.get("timeout", defaults.script.timeout, _positive_duration),
        memory=s.get("memory", defaults.script.memory, _positive_size),
        server_rules_path=s.get("server_rules_path", defaults.script.server_rules_path,
                                _path_converter(base, empty_is_none=True)),
        connection_id=s.get("connection_id", defaults.script.connection_id,
                            _int_range(0, 2**31 - 1)),
        connection_name=s.get("connection_name", defaults.script.connection_name, _str),
    )
    s.finish()

    s = section("dns")
    dns = DnsConfig(
        nameservers=s.get("nameservers", defaults.dns.nameservers, _nameservers),
        timeout=s.get("timeout", defaults.dns.timeout, _positive_duration),
        ipv6=s.get("ipv6", defaults.dns.ipv6, _bool),
    )
    s.finish()

    s = section("smtp")
    smtp = SmtpConfig(
        port=s.get("port", defaults.smtp.port, _int_range(1, 65535)),
        helo_name=s.get("helo_name", defaults.smtp.helo_name, _str),
        source_address=s.get("source_address", defaults.smtp.source_address, _source_address),
        ca_file=s.get("ca_file", defaults.smtp.ca_file, _path_converter(base, empty_is_none=True)),
        max_connections=s.get(
            "max_connections", defaults.smtp.max_connections, _int_range(1, 100_000)
        ),
        max_connections_per_domain=s.get(
            "max_connections_per_domain",
            defaults.smtp.max_connections_per_domain,
            _int_range(1, 100_000),
        ),
        allowed_destinations=s.get(
            "allowed_destinations", defaults.smtp.allowed_destinations, _networks
        ),
    )
    s.finish()

    s = section("queue")
    queue = QueueConfig(
        scan_interval=s.get("scan_interval", defaults.queue.scan_interval, _positive_duration),
        retry=s.get("retry", defaults.queue.retry, _retry),
        max_age=s.get("max_age", defaults.queue.max_age, _positive_duration),
        delay_warning=s.get("delay_warning", defaults.queue.delay_warning, parse_duration),
        shutdown_grace=s.get("shutdown_grace", defaults.queue.shutdown_grace, parse_duration),
        processes=s.get("processes", defaults.queue.processes, _processes),
    )
    s.finish()

    s = section("batv")
    batv = BatvConfig(
        key_file=s.get(
            "key_file", defaults.batv.key_file, _path_converter(base, empty_is_none=True)
        ),
    )
    s.finish()

    s = section("log")
    log = LogConfig(
        format=s.get("format", defaults.log.format, _choice("text", "json")),
        level=s.get("level", defaults.log.level, _choice("debug", "info", "warning", "error")),
        debug_peers=s.get("debug_peers", defaults.log.debug_peers, _debug_peers),
    )
    s.finish()

    dkim = _dkim(data.get("dkim", {}), base)

    listen = _listen_section(section("listen"), defaults.listen, base)
    s = section("metrics")
    metrics = MetricsConfig(listen=s.get("listen", defaults.metrics.listen, _listen_address))
    s.finish()

    s = section("tls")
    tls = TlsConfig(
        mta_sts=s.get("mta_sts", defaults.tls.mta_sts, _bool),
        dane=s.get("dane", defaults.tls.dane, _bool),
        tlsrpt=s.get("tlsrpt", defaults.tls.tlsrpt, _bool),
        report_from=s.get("report_from", defaults.tls.report_from, _report_from),
    )
    s.finish()
    if tls.tlsrpt and not tls.report_from:
        raise ConfigError("tls.report_from: required when tls.tlsrpt is true")

    shaping = shaping_from_mapping(data, parse_duration)

    return Config(
        spool=spool, script=script, dns=dns, smtp=smtp, queue=queue, batv=batv, log=log,
        dkim=dkim, listen=listen, metrics=metrics, tls=tls, shaping=shaping, source=source,
    )


def _listen_section(s: _Section, defaults: ListenConfig, base: Path | None) -> ListenConfig:
    path = _path_converter(base, empty_is_none=True)
    listen = ListenConfig(
        address=s.get("address", defaults.address, _listen_address),
        networks=s.get("networks", defaults.networks, _networks),
        tls_cert=s.get("tls_cert", defaults.tls_cert, path),
        tls_key=s.get("tls_key", defaults.tls_key, path),
        idle_timeout=s.get("idle_timeout", defaults.idle_timeout, _positive_duration),
        max_connections=s.get("max_connections", defaults.max_connections,
                              _int_range(1, 100_000)),
    )
    s.finish()
    if (listen.tls_cert is None) != (listen.tls_key is None):
        missing = "listen.tls_key" if listen.tls_key is None else "listen.tls_cert"
        raise ConfigError(f"{missing}: tls_cert and tls_key go together (both or neither)")
    return listen


def _report_from(value: object, key: str) -> str:
    """An address for TLS-RPT reports: `local@domain`, no brackets, no spaces."""
    text = _str(value, key)
    if text and not re.fullmatch(r"[^\s@<>]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text):
        raise ConfigError(f"{key}: expected an address such as tlsrpt@example.com, got {text!r}")
    return text


def config_path(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The lookup order of contract §2: -c, $MXSEND_CONFIG, /etc/mxsend/mxsend.toml, none."""
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None
