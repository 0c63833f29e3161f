"""`log.debug_peers`: an SMTP transcript for the servers named, as Postfix's
debug_peer_list.

A peer is named by its MX host name (`mx1.example.org`, any case, a trailing dot
ignored), by a parent domain with a leading dot (`.example.org`: every host under it),
or by an address or network (`192.0.2.25`, `2001:db8::/32`). The transcript is one
`transcript` event per command sent and per reply read (wire.py decides what a line
is: message data is shown as its size, never its content; AUTH's argument is
redacted).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import partial

from mxsend.destination import Destination
from mxsend.log import transcript
from mxsend.wire import Transcript


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def is_debug_peer(name: str, ip: str, peers: Sequence[str]) -> bool:
    """Does a peer in `peers` (normalised by the config: lower case, no trailing dot)
    name this host or address?"""
    host = name.lower().rstrip(".")
    for peer in peers:
        network = _network(peer)
        if network is not None:
            try:
                if ipaddress.ip_address(ip) in network:
                    return True
            except ValueError:
                continue
        elif host == peer or (peer.startswith(".") and host.endswith(peer)):
            return True
    return False


def tap(destination: Destination, peers: Sequence[str]) -> Transcript | None:
    """The transcript writer for a connection to `destination`, or None."""
    if not peers or not is_debug_peer(destination.name, destination.ip, peers):
        return None
    return partial(_write, destination.relay)


def _write(relay: str, direction: str, line: str) -> None:
    transcript(relay, direction, line)
