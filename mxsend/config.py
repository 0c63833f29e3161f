"""Configuration: TOML loaded once into frozen dataclasses, validated up front.

Every problem is one ConfigError whose message starts with the dotted key, so the CLI
can print one line and exit 2. Relative paths are resolved against the directory of the
config file that names them (contract §3).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxsend.config_features import (
    DKIM_DEFAULT_HEADERS,
    DkimConfig,
    DkimKey,
    ListenConfig,
    MetricsConfig,
    TlsConfig,
    debug_peers,
    dkim_section,
    listen_section,
    metrics_section,
    tls_section,
)
from mxsend.config_shaping import SECTIONS as SHAPING_SECTIONS
from mxsend.config_shaping import ShapingConfig, shaping_from_mapping
from mxsend.config_values import (
    IpNetwork,
    Section,
    choice,
    int_range,
    nameservers,
    networks,
    parse_duration,
    path_converter,
    positive_duration,
    positive_size,
    source_address,
    to_bool,
    to_str,
)
from mxsend.errors import ConfigError

# The one place callers import Config and its sections from: the feature sections live
# in config_features (and config_shaping), the value grammar in config_values.
__all__ = [
    "AUTO_PROCESSES_MAX", "CONFIG_ENV", "DEFAULT_CONFIG_PATH", "DKIM_DEFAULT_HEADERS",
    "BatvConfig", "Config", "DkimConfig", "DkimKey", "DnsConfig", "ListenConfig",
    "LogConfig", "MetricsConfig", "QueueConfig", "ScriptConfig", "ShapingConfig",
    "SmtpConfig", "SpoolConfig", "TlsConfig", "auto_processes", "config_from_mapping",
    "config_path", "load_config", "usable_cpus",
]

DEFAULT_CONFIG_PATH = Path("/etc/mxsend/mxsend.toml")
CONFIG_ENV = "MXSEND_CONFIG"


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


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"
    level: str = "info"
    # SMTP transcripts for these servers (host names, .parent domains, IPs, networks),
    # as Postfix's debug_peer_list: docs/operations.md.
    debug_peers: tuple[str, ...] = ()


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


def _group(value: object, key: str) -> int | None:
    """A group name or number -> gid; "" -> None (the daemon's own group)."""
    import grp  # only here: `mxsend enqueue` loads config on every call

    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        text = to_str(value, key)
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
    return int_range(1, 64)(value, key)


def _retry(value: object, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of durations, got {value!r}")
    intervals = tuple(parse_duration(item, key) for item in value)
    if any(interval <= 0 for interval in intervals):
        raise ConfigError(f"{key}: retry intervals must be positive")
    return intervals


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

    def section(name: str) -> Section:
        return Section(name, data.get(name, {}), base)

    s = section("spool")
    spool = SpoolConfig(
        path=s.get("path", defaults.spool.path, path_converter(base, empty_is_none=False)),
        max_message_size=s.get(
            "max_message_size", defaults.spool.max_message_size, positive_size
        ),
        keep_sent=s.get("keep_sent", defaults.spool.keep_sent, to_bool),
        group=s.get("group", defaults.spool.group, _group),
    )
    s.finish()

    s = section("script")
    script = ScriptConfig(
        path=s.get("path", defaults.script.path, path_converter(base, empty_is_none=False)),
        timeout=s.get("timeout", defaults.script.timeout, positive_duration),
        memory=s.get("memory", defaults.script.memory, positive_size),
        server_rules_path=s.get("server_rules_path", defaults.script.server_rules_path,
                                path_converter(base, empty_is_none=True)),
        connection_id=s.get("connection_id", defaults.script.connection_id,
                            int_range(0, 2**31 - 1)),
        connection_name=s.get("connection_name", defaults.script.connection_name, to_str),
    )
    s.finish()

    s = section("dns")
    dns = DnsConfig(
        nameservers=s.get("nameservers", defaults.dns.nameservers, nameservers),
        timeout=s.get("timeout", defaults.dns.timeout, positive_duration),
        ipv6=s.get("ipv6", defaults.dns.ipv6, to_bool),
    )
    s.finish()

    s = section("smtp")
    smtp = SmtpConfig(
        port=s.get("port", defaults.smtp.port, int_range(1, 65535)),
        helo_name=s.get("helo_name", defaults.smtp.helo_name, to_str),
        source_address=s.get("source_address", defaults.smtp.source_address, source_address),
        ca_file=s.get("ca_file", defaults.smtp.ca_file, path_converter(base, empty_is_none=True)),
        max_connections=s.get(
            "max_connections", defaults.smtp.max_connections, int_range(1, 100_000)
        ),
        max_connections_per_domain=s.get(
            "max_connections_per_domain",
            defaults.smtp.max_connections_per_domain,
            int_range(1, 100_000),
        ),
        allowed_destinations=s.get(
            "allowed_destinations", defaults.smtp.allowed_destinations, networks
        ),
    )
    s.finish()

    s = section("queue")
    queue = QueueConfig(
        scan_interval=s.get("scan_interval", defaults.queue.scan_interval, positive_duration),
        retry=s.get("retry", defaults.queue.retry, _retry),
        max_age=s.get("max_age", defaults.queue.max_age, positive_duration),
        delay_warning=s.get("delay_warning", defaults.queue.delay_warning, parse_duration),
        shutdown_grace=s.get("shutdown_grace", defaults.queue.shutdown_grace, parse_duration),
        processes=s.get("processes", defaults.queue.processes, _processes),
    )
    s.finish()

    s = section("batv")
    batv = BatvConfig(
        key_file=s.get(
            "key_file", defaults.batv.key_file, path_converter(base, empty_is_none=True)
        ),
    )
    s.finish()

    s = section("log")
    log = LogConfig(
        format=s.get("format", defaults.log.format, choice("text", "json")),
        level=s.get("level", defaults.log.level, choice("debug", "info", "warning", "error")),
        debug_peers=s.get("debug_peers", defaults.log.debug_peers, debug_peers),
    )
    s.finish()

    dkim = dkim_section(data.get("dkim", {}), base)

    listen = listen_section(section("listen"), defaults.listen, base)
    metrics = metrics_section(section("metrics"), defaults.metrics)
    tls = tls_section(section("tls"), defaults.tls)

    shaping = shaping_from_mapping(data, parse_duration)

    return Config(
        spool=spool, script=script, dns=dns, smtp=smtp, queue=queue, batv=batv, log=log,
        dkim=dkim, listen=listen, metrics=metrics, tls=tls, shaping=shaping, source=source,
    )


def config_path(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The lookup order of contract §2: -c, $MXSEND_CONFIG, /etc/mxsend/mxsend.toml, none."""
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None
