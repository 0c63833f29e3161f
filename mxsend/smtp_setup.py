"""An SMTP session's set-up: connect, greeting, EHLO/HELO, STARTTLS (RFC 5321, 3207, 7672).

`open_session` makes the one connection to a destination (after `destination.refusal`
let it, contract §10), reads the greeting, says EHLO (or HELO), and starts TLS as the
script's actions and the DANE policy say: the certificate checks (name, thumbprint,
TLSA records) run before anything of a message is sent, and EHLO is said again under
TLS (RFC 3207 §4.2). It returns the wire and what was learnt; `smtp.SmtpConnection`
takes it from there.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from aiosmtplib.esmtp import parse_esmtp_extensions

from mxsend import dane as dane_checks
from mxsend.actions import ServerActions
from mxsend.destination import Destination, refusal
from mxsend.errors import (
    DeliveryError,
    DestinationRefused,
    Phase,
    TemporaryFailure,
)
from mxsend.reply import parse_reply
from mxsend.smtp_io import (
    ReplyHook,
    ask,
    cause,
    failure_from_reply,
    in_phase,
    read_reply,
)
from mxsend.smtp_rules import ClientSettings, choose_helo
from mxsend.tls import (
    CertificateCheckFailed,
    TlsFailure,
    check_certificate,
    client_context,
    handshake_result_type,
)
from mxsend.transcript import tap
from mxsend.wire import Wire

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"  # RFC 8460 §4.3.1


class HandshakeFailed(TemporaryFailure):
    """The TLS handshake after STARTTLS failed; plaintext may be retried (contract §4)."""


@dataclass(frozen=True, slots=True)
class Session:
    """A session past its set-up, ready for MAIL."""

    wire: Wire
    extensions: dict[str, str]  # offered in the last EHLO reply, keys in lower case
    tls_version: str | None  # None: plaintext
    tls_cipher: str | None
    # As Postfix's "Verified TLS connection" (the `delivery` event, contract §10): the
    # chain (verifyCert: CERT_REQUIRED against smtp.ca_file or the store), a pinned
    # thumbprint that matched, or TLSA records that matched (RFC 7672 §3.1). A name
    # alone (checkCertName) on an unverified chain proves nothing.
    verified: bool
    dane_verified: bool  # the chain was authenticated by TLSA records (RFC 7672 §3)


async def open_session(
    destination: Destination,
    actions: ServerActions,
    settings: ClientSettings,
    *,
    allow_tls: bool = True,
    reply_hook: ReplyHook | None = None,
    dane: dane_checks.DanePolicy | None = None,
) -> Session:
    """Connect, read the greeting, EHLO/HELO and STARTTLS as the actions say.

    `dane`: with usable TLSA records (REQUIRED), the presented chain must match
    them (RFC 7672 §3), whatever the actions say about the CA store.

    Raises DeliveryError; DestinationRefused before connecting to an address that
    contract §10 keeps out; HandshakeFailed when a plaintext retry is allowed;
    TlsFailure when required TLS failed.
    """
    dane_required = dane is not None and dane.tls_required
    host = destination.name
    timeouts = actions.timeouts
    helo = choose_helo(actions, settings)
    refused = refusal(destination.ip, settings.allowed_destinations)
    if refused is not None:
        # RFC 3463 §3.8: X.7.0, other security status: a policy, not the network.
        raise DestinationRefused(refused, dsn="4.7.0", phase=Phase.CONNECT, host=host)
    with in_phase(Phase.CONNECT, host):
        sock = await _connect_socket(destination, settings.source_address, timeouts.connect)
        try:
            wire = await Wire.connect(sock, tap(destination, settings.debug_peers))
        except BaseException:
            sock.close()
            raise
    try:
        greeting = await read_reply(wire, Phase.GREETING, timeouts.greeting, host, reply_hook)
        if greeting.code != 220:
            raise failure_from_reply(greeting, Phase.GREETING, host)
        extensions = await _hello(wire, actions, helo, host, reply_hook)
        tls_version: str | None = None
        if dane_required and not tls_version_possible(allow_tls, actions):
            raise TlsFailure("DANE: TLS required but not attempted (the script)",
                             result_type=STARTTLS_NOT_SUPPORTED, host=host)
        if allow_tls and (actions.try_tls or actions.requires_tls):
            tls_version, extensions = await _starttls(
                wire, extensions, destination, actions, settings, helo, reply_hook,
                dane=dane if dane_required else None)
        elif actions.requires_tls:
            raise TemporaryFailure(
                "TLS required but not attempted", dsn="4.7.4", phase=Phase.STARTTLS,
                host=host,
            )
    except BaseException:
        wire.close()
        raise
    cipher: str | None = None
    verified = dane_required
    if tls_version is not None:
        ssl_object = wire.extra("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            suite = ssl_object.cipher()
            cipher = suite[0] if suite else None
            verified = (verified or ssl_object.context.verify_mode == ssl.CERT_REQUIRED
                        or bool(actions.check_cert_thumbprint))
    return Session(wire, extensions, tls_version, cipher, verified, dane_required)


def tls_version_possible(allow_tls: bool, actions: ServerActions) -> bool:
    """Will STARTTLS be tried at all on this connection?"""
    return allow_tls and (actions.try_tls or actions.requires_tls)


async def _connect_socket(destination: Destination, source: str, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket, bound to `smtp.source_address` if set."""
    family = socket.AF_INET6 if ":" in destination.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source:
            source_is_v6 = ":" in source
            if source_is_v6 == (family == socket.AF_INET6):
                sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (destination.ip, destination.port)), seconds)
    except BaseException:
        sock.close()
        raise
    return sock


async def _hello(wire: Wire, actions: ServerActions, helo: str, host: str,
                 hook: ReplyHook | None = None) -> dict[str, str]:
    """EHLO, or HELO if tryESMTP is off or EHLO is refused (RFC 5321 §3.2).

    Returns the extensions offered, keys in lower case (none after HELO).
    """
    timeout = actions.timeouts.ehlo
    name = helo.encode("ascii")
    if actions.try_esmtp:
        code, text = await ask(wire, b"EHLO " + name + b"\r\n", Phase.EHLO, timeout, host,
                               hook)
        if code == 250:
            # The whole text, not the Reply's capped copy: a long list is still read.
            return parse_esmtp_extensions(text)[0]
        if code == 421 or not wire.alive:
            raise failure_from_reply(parse_reply(code, text), Phase.EHLO, host)
    code, text = await ask(wire, b"HELO " + name + b"\r\n", Phase.EHLO, timeout, host, hook)
    if code != 250:
        raise failure_from_reply(parse_reply(code, text), Phase.EHLO, host)
    return {}


async def _starttls(
    wire: Wire,
    extensions: dict[str, str],
    destination: Destination,
    actions: ServerActions,
    settings: ClientSettings,
    helo: str,
    hook: ReplyHook | None = None,
    *,
    dane: dane_checks.DanePolicy | None = None,
) -> tuple[str | None, dict[str, str]]:
    """STARTTLS when offered: the TLS version (None for plaintext) and the extensions.

    With `dane` (usable TLSA records), TLS is required and the chain must match them.
    """
    host = destination.name
    required = actions.requires_tls or dane is not None
    if "starttls" not in extensions:
        if required:
            # RFC 3463 X.7.4: security features not supported.
            raise TlsFailure("TLS required but the server does not offer STARTTLS",
                             result_type=STARTTLS_NOT_SUPPORTED, host=host, dsn="4.7.4")
        return None, extensions
    context = client_context(actions.verify_cert, settings.ca_file)
    timeout = actions.timeouts.starttls
    try:
        code, text = await ask(wire, b"STARTTLS\r\n", Phase.STARTTLS, timeout, host, hook)
    except DeliveryError as exc:
        raise _tls_failure(exc.message, exc.code, required, host,
                           STARTTLS_NOT_SUPPORTED) from exc
    if code != 220:
        if wire.alive and not required:
            # RFC 3207 §4: the server declined (454); carry on in plaintext.
            return None, extensions
        failure = failure_from_reply(parse_reply(code, text), Phase.STARTTLS, host)
        raise _tls_failure(failure.message, failure.code, required, host,
                           STARTTLS_NOT_SUPPORTED)
    # SNI is the MX host name, for DANE too (RFC 7672 §8.1).
    server_name = None if host.startswith("[") else host
    try:
        await wire.start_tls(context, server_name, timeout)
    except (OSError, ValueError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise _tls_failure(f"TLS handshake failed: {cause(exc)}", None, required,
                           host, handshake_result_type(exc)) from exc
    ssl_object = wire.extra("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        raise _tls_failure("TLS handshake left no TLS session", None, required, host,
                           "validation-failure")
    der = ssl_object.getpeercert(binary_form=True)
    try:
        check_certificate(der, name=actions.check_cert_name,
                          thumbprint=actions.check_cert_thumbprint)
    except CertificateCheckFailed as exc:
        # Nothing is sent on this connection (contract §4).
        raise TlsFailure(str(exc), result_type="certificate-host-mismatch",
                         host=host) from None
    if dane is not None:
        # RFC 7672 §3: the TLSA records, not the CA store, authenticate the server.
        verdict = dane_checks.verify_chain(dane.records, dane_checks.peer_chain(ssl_object),
                                           dane.names, datetime.now(UTC))
        if not verdict.ok:
            raise TlsFailure(f"DANE: {verdict.reason}", result_type="tlsa-invalid",
                             host=host)
    # RFC 3207 §4.2: forget what was learnt before TLS and say EHLO again.
    extensions = await _hello(wire, actions, helo, host, hook)
    return ssl_object.version() or "TLS", extensions


def _tls_failure(message: str, code: int | None, required: bool, host: str,
                 result_type: str) -> DeliveryError:
    if required:
        return TlsFailure(f"TLS required: {message}", code=code, host=host,
                          result_type=result_type)
    return HandshakeFailed(message, code=code, dsn="4.7.5", phase=Phase.STARTTLS, host=host)
