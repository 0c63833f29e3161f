"""TLS for STARTTLS (RFC 3207): SSLContexts and the certificate checks of contract §4.

- `client_context(verify, ca_file)`: built once per (verify, ca_file) and cached, since
  building one (loading a CA bundle) costs far more than a whole loopback transaction.
  Host names are never checked by OpenSSL here: an MX host name is not authenticated by
  DNS (RFC 7672 §1.3), so `verifyCert` checks the chain only and `checkCertName` is the
  operator's explicit name check.
- `name_matches` / `thumbprint_matches`: pure checks on the DER certificate.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from functools import lru_cache
from pathlib import Path

from mxsend.errors import Phase, TemporaryFailure


class TlsFailure(TemporaryFailure):
    """Required TLS failed (forceTLS, a policy): nothing was sent on this connection.

    `result_type` is the RFC 8460 §4.3 result type for a TLS-RPT report.
    """

    def __init__(self, message: str, *, result_type: str, code: int | None = None,
                 host: str | None = None, dsn: str = "4.7.5") -> None:
        super().__init__(message, code=code, dsn=dsn, phase=Phase.STARTTLS, host=host)
        self.result_type = result_type


def handshake_result_type(exc: BaseException) -> str:
    """RFC 8460 §4.3 result type of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        # OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED (10) and ..._HOSTNAME_MISMATCH (62).
        if exc.verify_code == 10:
            return "certificate-expired"
        if exc.verify_code == 62:
            return "certificate-host-mismatch"
        return "certificate-not-trusted"
    return "validation-failure"


class CertificateCheckFailed(Exception):
    """A certificate did not pass checkCertName or checkCertThumbprint."""


@lru_cache(maxsize=16)
def client_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """A client context: chain verified against `ca_file` (or the system store) if asked."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    context.check_hostname = False
    if verify:
        context.verify_mode = ssl.CERT_REQUIRED
        if ca_file is not None:
            # Only the operator's bundle: a private CA must not be mixed with the store.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(ca_file))
    else:
        # Opportunistic TLS (RFC 7435 §3): encrypt even when the chain is unknown.
        context.verify_mode = ssl.CERT_NONE
    return context


def certificate_names(der: bytes) -> list[str]:
    """The subject CNs and the DNS subjectAltNames of a DER certificate, lower-cased."""
    # Imported on first use: only checkCertName needs it, and it is ~6 MB per daemon.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    names = [
        str(attr.value).lower()
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    names.extend(name.lower() for name in san.value.get_values_for_type(x509.DNSName))
    return names


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    parts = ["." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern.lower()]
    return re.compile("".join(parts), re.DOTALL)


def _cert_wildcard_covers(cert_name: str, host: str) -> bool:
    """RFC 6125 §6.4.3: `*.example.com` covers exactly one left-most label."""
    if not cert_name.startswith("*.") or "*" in host or "?" in host:
        return False
    label, dot, rest = host.partition(".")
    return bool(label and dot and rest == cert_name[2:])


def name_matches(pattern: str, names: list[str]) -> bool:
    """checkCertName: `*` and `?` wildcards, case-insensitive, against any name.

    A certificate's own wildcard name (`*.example.com`) also satisfies a plain pattern
    (`mx1.example.com`) that it covers, as any TLS client would accept it.
    """
    wanted = pattern.strip().lower()
    if not wanted:
        return True
    regex = _pattern(wanted)
    return any(regex.fullmatch(name) or _cert_wildcard_covers(name, wanted) for name in names)


def normalise_thumbprint(text: str) -> str:
    """Case, spaces and colons ignored: `AB:CD ef` -> `abcdef`."""
    return re.sub(r"[\s:]", "", text).lower()


def thumbprint_matches(pin: str, der: bytes) -> bool:
    """checkCertThumbprint: hex SHA-1 of the DER certificate, SHA-256 if 64 hex digits."""
    wanted = normalise_thumbprint(pin)
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", wanted):
        return False
    digest = hashlib.sha256 if len(wanted) == 64 else hashlib.sha1
    return digest(der).hexdigest() == wanted


def check_certificate(der: bytes | None, *, name: str, thumbprint: str) -> None:
    """Raise CertificateCheckFailed unless the certificate passes both checks asked for."""
    if not name and not thumbprint:
        return
    if not der:
        raise CertificateCheckFailed("the server presented no certificate")
    if thumbprint and not thumbprint_matches(thumbprint, der):
        raise CertificateCheckFailed("certificate thumbprint does not match checkCertThumbprint")
    if name:
        names = certificate_names(der)
        if not name_matches(name, names):
            shown = ", ".join(names[:5]) or "none"
            raise CertificateCheckFailed(
                f"certificate names ({shown}) do not match checkCertName {name!r}"
            )
