"""What the Lua policy decides, as immutable values (contract §4), and VPOP3's names.

policy.py produces these from the script's Actions tables; the scheduler reads
FileActions and smtp.py reads ServerActions. Keeping them here lets both sides depend on
plain values instead of on each other.

The tables at the end are the one source of the names a script writes (`SkipSend`,
`tryTLS`, ...): luavalues.py reads the Actions back by them, the policy worker is given
them at start (sandbox.lua repeats none), and the CLI shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class FileActions:
    """CheckFile's verdict for one attempt of one message."""

    skip_send: bool = False
    force_last_try: bool = False
    priority: int = 50  # 1..100, 100 first
    reason: str = ""
    # Contract §7: in, the `domain` of the DKIM key(s) that will sign ("" none); out,
    # "" skips signing, another configured domain signs with its key(s).
    dkim_domain: str = ""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase SMTP client timeouts in seconds (RFC 5321 §4.5.3.2)."""

    connect: float = 60.0
    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    ehlo: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0  # §4.5.3.2.2 MAIL: 5 minutes
    rcpt: float = 300.0  # §4.5.3.2.3 RCPT: 5 minutes
    data: float = 120.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    datablock: float = 180.0  # §4.5.3.2.5 data block: 3 minutes
    dataend: float = 600.0  # §4.5.3.2.6 DATA termination: 10 minutes


@dataclass(frozen=True, slots=True)
class ServerActions:
    """ServerDetails' verdict for sending one message to one server.

    Equal values mean a pooled connection may be reused (contract §4).
    """

    try_esmtp: bool = True
    try_tls: bool = True
    helo_name: str = ""
    use_batv: bool = False
    allow_dsn: bool = True
    force_tls: bool = False
    verify_cert: bool = False
    check_cert_name: str = ""
    check_cert_thumbprint: str = ""
    return_address_modifier: int = 0  # 0 as queued, 1 default_return_address, 2 null_...
    default_return_address: str = ""
    null_return_address: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Non-empty: the script asked for a protection that could not be read (a pin with a
    # CR in it, say); the attempt to this server fails temporarily before connecting,
    # never unpinned or in plaintext (docs/policy.md, "Fields that cannot be read").
    unusable: str = ""

    @property
    def requires_tls(self) -> bool:
        """Any certificate check implies forceTLS: a plaintext retry would protect nothing."""
        return bool(
            self.force_tls
            or self.verify_cert
            or self.check_cert_name
            or self.check_cert_thumbprint
            or self.unusable
        )


@dataclass(frozen=True, slots=True)
class ServerParameters:
    """The `Parameters` table passed to ServerDetails."""

    authsender: str  # AUTH= of the envelope, "" if none
    originator: str  # the envelope sender, "" for <>
    server: str  # the MX host name being connected to
    domain: str  # the recipients' domain
    length: int  # message size in bytes
    connid: int  # a number identifying this delivery connection (also `connnid`)
    connection: str  # "host[ip]:port" of the connection
    tlspolicy: str = "none"  # "dane", "mta-sts", "requiretls" or "none" (contract §8)


# Attribute -> VPOP3's name, in the order the values cross to and from the Lua worker.
FILE_FIELDS: tuple[tuple[str, str], ...] = (
    ("skip_send", "SkipSend"),
    ("force_last_try", "ForceLastTry"),
    ("priority", "Priority"),
    ("reason", "Reason"),
    ("dkim_domain", "DKIMDomain"),
)
SERVER_FIELDS: tuple[tuple[str, str], ...] = (
    ("try_esmtp", "tryESMTP"),
    ("try_tls", "tryTLS"),
    ("helo_name", "HELOname"),
    ("use_batv", "useBATV"),
    ("allow_dsn", "allowDSN"),
    ("force_tls", "forceTLS"),
    ("verify_cert", "verifyCert"),
    ("check_cert_name", "checkCertName"),
    ("check_cert_thumbprint", "checkCertThumbprint"),
    ("return_address_modifier", "returnAddressModifier"),
    ("default_return_address", "defaultReturnAddress"),
    ("null_return_address", "nullReturnAddress"),
)
# The `timeouts` sub-table: VPOP3 uses the attribute names themselves.
TIMEOUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Timeouts))
LUA_NAME: dict[str, str] = dict(FILE_FIELDS + SERVER_FIELDS)
