"""Certificate checks (contract §4) on real trustme certificates; context caching."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mxsend.tls import (
    CertificateCheckFailed,
    certificate_names,
    check_certificate,
    client_context,
    name_matches,
    normalise_thumbprint,
    thumbprint_matches,
)


@pytest.fixture(scope="module")
def der() -> bytes:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx1.example.org", "*.mail.example.net", common_name="MX1.Example.Org")
    pem = leaf.cert_chain_pems[0].bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_certificate_names_cn_and_sans(der):
    assert certificate_names(der) == ["mx1.example.org", "mx1.example.org",
                                      "*.mail.example.net"]


@pytest.mark.parametrize(("pattern", "ok"), [
    ("mx1.example.org", True), ("MX1.EXAMPLE.ORG", True), ("*.example.org", True),
    ("mx?.example.org", True), ("mx??.example.org", False), ("*", True),
    ("in.mail.example.net", True),  # covered by the certificate's own wildcard
    ("a.b.mail.example.net", False),  # RFC 6125 §6.4.3: one label only
    ("mx2.example.org", False), ("[mx1].example.org", False), ("", True),
])
def test_name_matches(der, pattern, ok):
    assert name_matches(pattern, certificate_names(der)) is ok


def test_thumbprints(der):
    sha1 = hashlib.sha1(der).hexdigest()
    sha256 = hashlib.sha256(der).hexdigest()
    assert thumbprint_matches(sha1, der)
    assert thumbprint_matches(":".join(sha1[i:i + 2] for i in range(0, 40, 2)).upper(), der)
    assert thumbprint_matches(" ".join(sha256[i:i + 4] for i in range(0, 64, 4)), der)
    assert not thumbprint_matches(sha1[:-1] + ("0" if sha1[-1] != "0" else "1"), der)
    assert not thumbprint_matches("not hex", der)
    assert not thumbprint_matches(sha1[:38], der)  # neither 40 nor 64 digits
    assert normalise_thumbprint("AB:cd ef") == "abcdef"


def test_check_certificate(der):
    check_certificate(der, name="", thumbprint="")
    check_certificate(der, name="*.example.org", thumbprint=hashlib.sha1(der).hexdigest())
    with pytest.raises(CertificateCheckFailed, match="checkCertName"):
        check_certificate(der, name="other.example", thumbprint="")
    with pytest.raises(CertificateCheckFailed, match="thumbprint"):
        check_certificate(der, name="", thumbprint="00" * 20)
    with pytest.raises(CertificateCheckFailed, match="no certificate"):
        check_certificate(None, name="x", thumbprint="")


def test_contexts_are_cached_and_configured(tmp_path):
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    opportunistic = client_context(False, None)
    assert opportunistic is client_context(False, None)
    assert opportunistic.verify_mode == ssl.CERT_NONE and not opportunistic.check_hostname
    verifying = client_context(True, path)
    assert verifying is client_context(True, path)
    assert verifying.verify_mode == ssl.CERT_REQUIRED and not verifying.check_hostname
    assert len(verifying.get_ca_certs()) == 1
