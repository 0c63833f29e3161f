"""The value grammar of the config file: durations, sizes, addresses, networks, paths.

Converters take `(value, dotted_key)` and return the typed value or raise one
ConfigError whose message starts with the key; `Section` reads one TOML table with
them and refuses keys it did not read. Shared by config.py and config_features.py.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mxsend.errors import ConfigError

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


T = TypeVar("T")


class Section:
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


def to_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def to_str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{key}: control characters are not allowed")
    return value


def int_range(low: int, high: int) -> Callable[[object, str], int]:
    def convert(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be between {low} and {high}, got {value}")
        return value

    return convert


def choice(*choices: str) -> Callable[[object, str], str]:
    def convert(value: object, key: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return convert


def nameservers(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of addresses, got {value!r}")
    servers: list[str] = []
    for item in value:
        text = to_str(item, key)
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


def networks(value: object, key: str) -> tuple[IpNetwork, ...]:
    """A list of CIDR strings ("127.0.0.0/8", "::1/128"; a bare address is a /32 or /128)."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of networks (CIDR), got {value!r}")
    networks: list[IpNetwork] = []
    for item in value:
        text = to_str(item, key)
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not a network (CIDR)") from None
    return tuple(networks)


def _is_port(text: str) -> bool:
    # isascii: str.isdigit() also takes "٣", which int() reads as 3.
    return text.isascii() and text.isdigit() and len(text) <= 5


def listen_address(value: object, key: str) -> str:
    """"" (off) or `ip:port` / `[ipv6]:port`: a port is required, there is no default."""
    text = to_str(value, key)
    if not text:
        return text
    if not (text.startswith("[") and "]:" in text) and text.count(":") != 1:
        raise ConfigError(f"{key}: expected ip:port or [ipv6]:port, got {text!r}")
    try:
        split_host_port(text, 0)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return text


def source_address(value: object, key: str) -> str:
    text = to_str(value, key)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an IP address or \"\", got {text!r}") from None
    return text


def positive_size(value: object, key: str) -> int:
    size = parse_size(value, key)
    if size <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return size


def positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return seconds


def path_converter(base: Path | None, *, empty_is_none: bool) -> Callable[[object, str], Any]:
    def convert(value: object, key: str) -> Path | None:
        text = to_str(value, key)
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


_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def dns_name(value: object, key: str) -> str:
    """A domain or selector: dot-separated DNS labels, lowercased, A-labels for IDNs."""
    text = to_str(value, key).strip().rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        raise ConfigError(f"{key}: not a valid domain name: {value!r}") from None
    labels = text.split(".")
    if not text or len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ConfigError(f"{key}: not a valid domain name: {value!r}")
    return text

