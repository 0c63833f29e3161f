"""The receiving domain's TLS policy in one delivery (contract §8; docs/tls.md).

`TlsGuard` is what delivery.py holds: per domain `domain()`, per MX host `host()`, the
Actions preset for ServerDetails (`preset`), the `tls_policy_override` event when a
script lowers them (`check_override`), the REQUIRETLS verdict on an open session
(`session_problem`) and the TLS-RPT record of each session (`record`,
`record_session`). The checks of the handshake itself (DANE, forceTLS, verifyCert) are in
smtp_setup.py; the decisions are in
tlspolicy.py, requiretls.py and mta_sts.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from mxsend.actions import ServerActions
from mxsend.config import Config
from mxsend.destination import Destination
from mxsend.envelope import Message, header_lines
from mxsend.log import event, get_logger
from mxsend.requiretls import CertCheck, requiretls_verdict
from mxsend.tls import certificate_names, name_matches
from mxsend.tlspolicy import (
    DANE,
    MTA_STS,
    NONE,
    DomainTls,
    HostTls,
    TlsPolicies,
    preset_actions,
    weakened,
)
from mxsend.tlsrpt import POLICY_NONE, Failure
from mxsend.tlsrpt_store import TlsRptStore

log = get_logger()

# RFC 8460 §4.3 result types delivery reports (the policy fetch's are mta_sts_cache's).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERT_HOST_MISMATCH = "certificate-host-mismatch"
CERT_EXPIRED = "certificate-expired"
CERT_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"

# Only a header that names the field can waive anything (RFC 8689 §5); this saves
# splitting every message's header into lines for the common case.
_TLS_REQUIRED = re.compile(rb"^tls-required[ \t]*:", re.IGNORECASE | re.MULTILINE)


class Session(Protocol):
    """smtp.SmtpConnection: what the TLS policy looks at on an open session."""

    @property
    def destination(self) -> Destination: ...
    @property
    def actions(self) -> ServerActions: ...
    @property
    def tls_version(self) -> str | None: ...
    @property
    def dane_verified(self) -> bool: ...
    @property
    def extensions(self) -> Collection[str]: ...
    def peer_certificates(self) -> Sequence[bytes]: ...


def waiver_lines(data: bytes) -> Sequence[str]:
    """The header lines when the header has a TLS-Required field, else none."""
    end = data.find(b"\r\n\r\n")
    if _TLS_REQUIRED.search(data, 0, end if end >= 0 else len(data)) is None:
        return ()
    return header_lines(data)


def cert_check(host: HostTls, actions: ServerActions, mx_host: str, *, tls: bool,
               dane_verified: bool) -> CertCheck:
    """How this session's certificate was authenticated (RFC 8689 §4.2.1 step 3)."""
    if not tls:
        return CertCheck.NONE
    if dane_verified:
        return CertCheck.DANE
    # Only the MX host itself counts as the reference identity, not a script's pattern.
    named = actions.check_cert_name.lower().rstrip(".") == mx_host.lower().rstrip(".")
    if actions.verify_cert and named:
        return CertCheck.MTA_STS if host.policy == MTA_STS else CertCheck.PKIX
    return CertCheck.NONE


def overridden(host: HostTls, returned: ServerActions) -> bool:
    """Did the script lower what this host's policy demands?"""
    if host.policy == NONE:
        return False
    return weakened(preset_actions(ServerActions(), host), returned)


@lru_cache(maxsize=4)
def _trust_anchors(ca_file: Path | None) -> tuple[Any, ...]:
    """The certificates of `smtp.ca_file`, or of the system store, parsed once."""
    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    path = str(ca_file) if ca_file is not None else (paths.cafile or paths.openssl_cafile)
    with open(path, "rb") as handle:
        return tuple(x509.load_pem_x509_certificates(handle.read()))


def _anchored(certs: Sequence[Any], anchors: Sequence[Any], now: datetime) -> bool:
    """Is there a signed, in-date path from the leaf to one of `anchors`?

    A plain issuer walk (name and signature), enough for what testing mode reports; the
    enforcing check is OpenSSL's, in the handshake itself.
    """
    from cryptography.exceptions import InvalidSignature

    pool = [*certs[1:], *anchors]
    current = certs[0]
    for _ in range(len(pool) + 1):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            return False
        for issuer in pool:
            if issuer.subject != current.issuer:
                continue
            try:
                current.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):
                continue
            if any(issuer == anchor for anchor in anchors):
                return True
            current = issuer
            break
        else:
            return False
    return False


def pkix_result_type(chain: Sequence[bytes], mx_host: str, ca_file: Path | None,
                     now: datetime) -> str:
    """"" if the chain would pass MTA-STS's checks, else the RFC 8460 result type.

    For `mode: testing`, whose sessions are opportunistic: what enforce would have
    found is only reported (RFC 8461 §5).
    """
    from cryptography import x509

    if not chain:
        return CERT_NOT_TRUSTED
    host = mx_host.lower().rstrip(".")
    if not name_matches(host, certificate_names(chain[0])):
        return CERT_HOST_MISMATCH
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return CERT_NOT_TRUSTED
    leaf = certs[0]
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return CERT_EXPIRED
    try:
        anchors = _trust_anchors(ca_file)
    except (OSError, ValueError):
        return CERT_NOT_TRUSTED
    if any(leaf == anchor for anchor in anchors) or _anchored(certs, anchors, now):
        return ""
    return CERT_NOT_TRUSTED


class TlsGuard:
    """MTA-STS, DANE, REQUIRETLS and TLS-RPT around one Deliverer."""

    def __init__(self, config: Config, *, sts_port: int = 443,
                 policies: TlsPolicies | None = None) -> None:
        self.policies = policies or TlsPolicies(config, sts_port=sts_port)
        self.store = TlsRptStore(config.spool.path) if config.tls.tlsrpt else None
        self._ca_file = config.smtp.ca_file

    async def domain(self, domain: str, message: Message) -> DomainTls:
        dom = await self.policies.for_domain(
            domain, requiretls=message.envelope.requiretls,
            header_lines=waiver_lines(message.data))
        if dom.sts is not None and dom.sts.problem:
            log.debug("tls_policy %s: MTA-STS: %s (%s)", domain, dom.sts.problem,
                      dom.sts.source)
        return dom

    async def host(self, dom: DomainTls, mx_host: str) -> HostTls:
        return await self.policies.for_host(dom, mx_host)

    @staticmethod
    def preset(host: HostTls) -> Callable[[ServerActions], ServerActions]:
        """What ServerDetails' Actions become before the script sees them."""
        return lambda actions: preset_actions(actions, host)

    @staticmethod
    def check_override(queue_id: str, domain: str, server: str, host: HostTls,
                       returned: ServerActions) -> bool:
        """Contract §8: a script's exception is honoured, and logged. True: overridden."""
        if not overridden(host, returned):
            return False
        event("tls_policy_override", queue_id, logging.WARNING, domain=domain,
              server=server, policy=host.policy)
        return True

    @staticmethod
    def requiretls_problem(host: HostTls, actions: ServerActions, mx_host: str, *,
                           requiretls: bool, tls: bool, dane_verified: bool,
                           extensions: Sequence[str]) -> str:
        """"" when a message with REQUIRETLS may go on this session, else why not."""
        if not requiretls:
            return ""
        verdict = requiretls_verdict(
            True, mx_authenticated=host.mx_authenticated, tls_active=tls,
            cert_check=cert_check(host, actions, mx_host, tls=tls,
                                  dane_verified=dane_verified),
            ehlo_keywords=extensions)
        return verdict.reason

    @classmethod
    def session_problem(cls, host: HostTls, conn: Session) -> str:
        """"" when a REQUIRETLS message may go on this open session, else why not."""
        return cls.requiretls_problem(
            host, conn.actions, conn.destination.name, requiretls=True,
            tls=conn.tls_version is not None, dane_verified=conn.dane_verified,
            extensions=tuple(conn.extensions))

    def testing_result(self, host: HostTls, mx_host: str, *, tls: bool,
                       chain: Sequence[bytes]) -> str:
        """MTA-STS testing: the failure enforce would have had, for TLS-RPT only."""
        if host.mx_mismatch:
            return VALIDATION_FAILURE
        if not tls:
            return STARTTLS_NOT_SUPPORTED
        return pkix_result_type(chain, mx_host, self._ca_file, datetime.now(UTC))

    @property
    def reporting(self) -> bool:
        return self.store is not None

    async def record_session(self, host: HostTls, conn: Session) -> None:
        """TLS-RPT: a new session that passed the policy (testing: what enforce would say)."""
        if self.store is None or host.report is None:
            return
        dest = conn.destination
        result_type = ""
        if host.testing:
            result_type = self.testing_result(host, dest.name, tls=conn.tls_version is not None,
                                              chain=conn.peer_certificates())
        await self.record(host, dest.name, dest.ip, result_type)

    async def record(self, host: HostTls, mx_host: str, ip: str, result_type: str) -> None:
        """One session's TLS-RPT result (RFC 8460 §4.3), durably; never raises."""
        store = self.store
        report = host.report
        # Sessions to domains without a policy are not counted: a report says how a
        # policy fared, and an fsync per plain session would cost every message.
        if store is None or report is None or report.policy_type == POLICY_NONE:
            return
        failure = Failure(result_type, mx_host, ip) if result_type else None
        try:
            await asyncio.to_thread(store.record, dataclasses.replace(report, failure=failure))
        except (OSError, ValueError) as exc:
            log.warning("TLS-RPT: result for %s not recorded: %s", report.policy_domain, exc)


__all__ = ["DANE", "MTA_STS", "NONE", "TlsGuard", "cert_check", "overridden",
           "pkix_result_type", "waiver_lines"]
