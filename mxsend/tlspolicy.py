"""The receiving domain's TLS policy as one small object for delivery (contract §8).

Delivery calls, per recipient domain of an attempt, `TlsPolicies.for_domain(...)`, and
per MX host `TlsPolicies.for_host(...)`; `preset_actions` turns the host's policy into
the ServerActions that ServerDetails receives, and `weakened` says whether the script
lowered them (the `tls_policy_override` event). Precedence (RFC 8461 §2, contract §8):
DANE > MTA-STS > REQUIRETLS's PKIX requirement > the script's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from mxsend.actions import ServerActions
from mxsend.config import Config
from mxsend.dane import DaneLookup, DanePolicy, DaneState
from mxsend.mta_sts import Decision, decide
from mxsend.mta_sts_cache import MtaStsPolicies, PolicyLookup
from mxsend.requiretls import ignore_policy_failures
from mxsend.tlsdns import Status, TlsResolver
from mxsend.tlsrpt import POLICY_NONE, POLICY_STS, POLICY_TLSA, SessionResult

DANE = "dane"
MTA_STS = "mta-sts"
REQUIRETLS = "requiretls"
NONE = "none"


@dataclass(frozen=True, slots=True)
class DomainTls:
    """What applies to one domain for one message."""

    domain: str
    sts: PolicyLookup | None = None  # None: tls.mta_sts off or waived
    dane: DanePolicy | None = None  # set: applies to every host (insecure MX, failure)
    dane_possible: bool = False  # MX validated and tls.dane on: look up TLSA per host
    mx_secure: bool = False  # the MX answer was DNSSEC-validated (REQUIRETLS §4.2.1)
    requiretls: bool = False
    waived: bool = False  # `TLS-Required: No`: policies are not applied


@dataclass(frozen=True, slots=True)
class HostTls:
    """What applies to one MX host."""

    policy: str  # DANE, MTA_STS, REQUIRETLS or NONE (Parameters.tlspolicy, the log)
    allowed: bool = True  # False: MTA-STS enforce and the host matches no mx pattern
    tempfail: str = ""  # "": go on; else a temporary failure for this host (DANE bogus)
    force_tls: bool = False
    verify_cert: bool = False  # PKIX chain (MTA-STS, REQUIRETLS)
    check_cert_name: str = ""  # the MX host, for MTA-STS and REQUIRETLS
    dane: DanePolicy | None = None  # REQUIRED: check the chain with dane.verify_chain
    mx_authenticated: bool = False  # for requiretls_verdict
    report: SessionResult | None = None  # a TLS-RPT template (failure=None), or None
    testing: bool = False  # MTA-STS `mode: testing`: failures only reported (RFC 8461 §5)
    mx_mismatch: bool = False  # testing: the host matches no mx pattern (reported)

    @property
    def dane_required(self) -> bool:
        return self.dane is not None and self.dane.state is DaneState.REQUIRED


NO_POLICY = HostTls(NONE)


class TlsPolicies:
    """MTA-STS, DANE and REQUIRETLS lookups for delivery; one per daemon."""

    def __init__(self, config: Config, *, sts_port: int = 443) -> None:
        self._config = config
        self._resolver = TlsResolver(config.dns)
        self._sts = MtaStsPolicies(
            config.spool.path, self._resolver, ca_file=config.smtp.ca_file, port=sts_port
        ) if config.tls.mta_sts else None
        self._dane = DaneLookup(self._resolver, config.smtp.port) if config.tls.dane else None

    async def for_domain(
        self, domain: str, *, requiretls: bool = False, header_lines: Iterable[str] = ()
    ) -> DomainTls:
        """Once per domain per attempt, before the MX hosts are tried."""
        if ignore_policy_failures(requiretls, header_lines):
            return DomainTls(domain, waived=True)
        sts = await self._sts.lookup(domain) if self._sts is not None else None
        dane: DanePolicy | None = None
        mx_secure = False
        if self._dane is not None:
            dane = await self._dane.domain_secure(domain)
            mx_secure = dane is None
        elif requiretls:
            mx = await self._resolver.mx(domain)
            mx_secure = mx.secure and mx.status in (Status.OK, Status.NODATA)
        return DomainTls(domain, sts, dane, self._dane is not None and dane is None,
                         mx_secure, requiretls)

    async def for_host(self, domain_tls: DomainTls, mx_host: str) -> HostTls:
        """Once per MX host, before ServerDetails."""
        if domain_tls.waived:
            return NO_POLICY
        dane = domain_tls.dane
        if dane is None and domain_tls.dane_possible and self._dane is not None:
            dane = await self._dane.host_policy(domain_tls.domain, mx_host)
        policy = domain_tls.sts.policy if domain_tls.sts is not None else None
        return host_tls(domain_tls, mx_host, dane, decide(policy, mx_host))


def host_tls(
    domain_tls: DomainTls, mx_host: str, dane: DanePolicy | None, sts: Decision
) -> HostTls:
    """Pure: combine DANE, MTA-STS and REQUIRETLS for one host (DANE first, RFC 8461 §2)."""
    host = mx_host.lower().rstrip(".")
    mx_authenticated = domain_tls.mx_secure or (sts.enforced and sts.allowed)
    if dane is not None and dane.state is DaneState.TEMPFAIL:
        return HostTls(DANE, tempfail=f"DANE: {dane.reason}", dane=dane,
                       report=_tlsa_report(domain_tls.domain, dane))
    if dane is not None and dane.state is DaneState.REQUIRED:
        return HostTls(DANE, force_tls=True, dane=dane, mx_authenticated=mx_authenticated,
                       report=_tlsa_report(domain_tls.domain, dane))
    sts_policy = domain_tls.sts.policy if domain_tls.sts is not None else None
    if sts.mode is not None and sts_policy is not None:
        report = SessionResult(domain_tls.domain, POLICY_STS, _lines(sts_policy.text),
                               sts_policy.mx)
        if sts.enforced:
            return HostTls(MTA_STS, allowed=sts.allowed, force_tls=True, verify_cert=True,
                           check_cert_name=host, mx_authenticated=mx_authenticated,
                           report=report)
        # testing: delivered as without a policy; failures are only reported (§5).
        if not domain_tls.requiretls:
            return HostTls(NONE, mx_authenticated=mx_authenticated, report=report,
                           testing=True, mx_mismatch=sts.mx_mismatch)
    if domain_tls.requiretls:
        return HostTls(REQUIRETLS, force_tls=True, verify_cert=True, check_cert_name=host,
                       mx_authenticated=mx_authenticated)
    return HostTls(NONE, report=SessionResult(domain_tls.domain, POLICY_NONE))


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _tlsa_report(domain: str, dane: DanePolicy) -> SessionResult:
    return SessionResult(domain, POLICY_TLSA, tuple(r.text() for r in dane.records))


def preset_actions(actions: ServerActions, host: HostTls) -> ServerActions:
    """The Actions ServerDetails receives: what the policy demands, already set."""
    if not (host.force_tls or host.verify_cert or host.check_cert_name):
        return actions
    return dataclasses.replace(
        actions,
        try_tls=True,
        force_tls=actions.force_tls or host.force_tls,
        verify_cert=actions.verify_cert or host.verify_cert,
        check_cert_name=host.check_cert_name or actions.check_cert_name,
    )


def weakened(preset: ServerActions, returned: ServerActions) -> bool:
    """Did the script lower what the policy demanded? (`tls_policy_override`)"""
    return (
        (preset.try_tls and not returned.try_tls)
        or (preset.force_tls and not returned.force_tls)
        or (preset.verify_cert and not returned.verify_cert)
        or (bool(preset.check_cert_name) and returned.check_cert_name != preset.check_cert_name)
    )

