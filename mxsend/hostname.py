"""This host's name in SMTP: the HELO/EHLO argument and the DSN Reporting-MTA.

One home for the default (`smtp.helo_name`, else the machine's FQDN), so that the
greeting, the reports and the CLI all say the same name.
"""

from __future__ import annotations

import socket
from collections.abc import Callable


def helo_name(configured: str, fqdn: Callable[[], str] = socket.getfqdn) -> str:
    """`smtp.helo_name` if set, else the machine's fully qualified name."""
    return configured or fqdn()


def helo_name_problem(configured: str, name: str) -> str | None:
    """Why the name we would greet with gets rejected, or None if it looks right.

    RFC 5321 §4.1.1.1 asks for the client's FQDN (or an address literal); receivers
    commonly refuse a bare host name or `localhost` (Postfix's
    reject_non_fqdn_helo_hostname). Only the default can be wrong without the operator
    having chosen it, so only the default is checked.
    """
    if configured:
        return None
    if "." not in name or name.lower().startswith("localhost"):
        return (f"smtp.helo_name is not set and this machine's name {name!r} is not a "
                "fully qualified domain name: receivers may reject the greeting; "
                "set smtp.helo_name")
    return None
