"""Where an SMTP connection may go (contract §10, Destinations). Pure.

A domain's owner chooses its MX records, so any sender could point mxsend at a service
on the machine or the internal network (`MX 0 localhost.`, `user@[10.0.0.5]`). As
Postfix and KumoMTA do, mxsend never connects to a loopback, unspecified, link-local,
multicast or private address unless `smtp.allowed_destinations` lists a network holding
it. `refusal()` decides; `smtp_setup.open_session`, the one place a connection is made
(MX hosts, address literals, smart hosts), enforces it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mxsend.config_values import IpNetwork


@dataclass(frozen=True, slots=True)
class Destination:
    """One address of one MX host."""

    name: str  # the MX host name (or the address literal)
    ip: str
    port: int

    @property
    def relay(self) -> str:
        return f"{self.name}[{self.ip}]:{self.port}"


# What is refused unless allowed, and how the refusal names it.
RESTRICTED: tuple[tuple[str, IpNetwork], ...] = tuple(
    (kind, ipaddress.ip_network(network)) for kind, network in (
        ("a loopback", "127.0.0.0/8"),  # RFC 1122 §3.2.1.3
        ("a loopback", "::1/128"),  # RFC 4291 §2.5.3
        ("an unspecified", "0.0.0.0/8"),  # RFC 1122 §3.2.1.3: "this network" (Linux: local)
        ("an unspecified", "::/128"),  # RFC 4291 §2.5.2
        ("a link-local", "169.254.0.0/16"),  # RFC 3927
        ("a link-local", "fe80::/10"),  # RFC 4291 §2.5.6
        ("a multicast", "224.0.0.0/4"),  # RFC 5771
        ("a multicast", "ff00::/8"),  # RFC 4291 §2.7
        ("a private", "10.0.0.0/8"),  # RFC 1918
        ("a private", "172.16.0.0/12"),  # RFC 1918
        ("a private", "192.168.0.0/16"),  # RFC 1918
        ("a private", "fc00::/7"),  # RFC 4193, unique local
        ("a shared (carrier-grade NAT)", "100.64.0.0/10"),  # RFC 6598
    )
)


def refusal(ip: str, allowed: Sequence[IpNetwork]) -> str | None:
    """Why mxsend must not connect to `ip`, or None when it may.

    An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, RFC 4291 §2.5.5.2) reaches the IPv4
    address it holds, so it is judged as that address too.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    if any(candidate in network for candidate in candidates for network in allowed
           if candidate.version == network.version):
        return None
    for candidate in candidates:
        for kind, network in RESTRICTED:
            if candidate.version == network.version and candidate in network:
                return (f"{ip} is {kind} address, not listed in "
                        "smtp.allowed_destinations")
    return None
