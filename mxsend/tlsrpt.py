"""TLS-RPT (RFC 8460), the pure parts: session results, aggregation, the JSON report,
gzip, the `rua` of `_smtp._tls.<domain>`, and the report message.

The durable per-domain store and the HTTPS POST are in tlsrpt_store.py.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import unquote, urlsplit

# RFC 8460 §4.3 policy types and result types.
POLICY_STS = "sts"
POLICY_TLSA = "tlsa"
POLICY_NONE = "no-policy-found"
RESULT_TYPES = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
})
MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 §6.4
TXT_PREFIX = "_smtp._tls."


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed session's details (RFC 8460 §4.3 failure-details)."""

    result_type: str
    receiving_mx_hostname: str = ""
    receiving_ip: str = ""
    sending_mta_ip: str = ""
    failure_reason_code: str = ""


@dataclass(frozen=True, slots=True)
class SessionResult:
    """The outcome of one TLS negotiation (or refusal) towards a policy domain."""

    policy_domain: str
    policy_type: str  # POLICY_STS, POLICY_TLSA or POLICY_NONE
    policy_string: tuple[str, ...] = ()  # the policy's lines / TLSA records
    mx_host: tuple[str, ...] = ()  # sts: the policy's mx patterns
    failure: Failure | None = None  # None: the session succeeded

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "d": self.policy_domain, "t": self.policy_type,
            "p": list(self.policy_string), "m": list(self.mx_host),
        }
        if self.failure is not None:
            f = self.failure
            record["f"] = [f.result_type, f.receiving_mx_hostname, f.receiving_ip,
                           f.sending_mta_ip, f.failure_reason_code]
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> SessionResult:
        failure = None
        if "f" in record:
            result_type, mx, ip, source, code = (str(x) for x in record["f"])
            failure = Failure(result_type, mx, ip, source, code)
        return cls(str(record["d"]), str(record["t"]), tuple(map(str, record["p"])),
                   tuple(map(str, record["m"])), failure)


def aggregate(results: Iterable[SessionResult]) -> list[dict[str, Any]]:
    """RFC 8460 §4.4 `policies`: one entry per distinct policy, counts summed."""
    policies: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
    failures: dict[tuple[Any, ...], dict[str, Any]] = {}
    for result in results:
        key = (result.policy_domain, result.policy_type, result.policy_string, result.mx_host)
        entry = policies.get(key)
        if entry is None:
            policy: dict[str, Any] = {
                "policy-type": result.policy_type,
                "policy-domain": result.policy_domain,
            }
            if result.policy_string:
                policy["policy-string"] = list(result.policy_string)
            if result.mx_host:
                policy["mx-host"] = list(result.mx_host)
            entry = policies[key] = {
                "policy": policy,
                "summary": {"total-successful-session-count": 0,
                            "total-failure-session-count": 0},
                "failure-details": [],
            }
        if result.failure is None:
            entry["summary"]["total-successful-session-count"] += 1
            continue
        entry["summary"]["total-failure-session-count"] += 1
        f = result.failure
        detail_key = (key, f)
        detail = failures.get(detail_key)
        if detail is None:
            detail = {"result-type": f.result_type, "failed-session-count": 0}
            for name, value in (("sending-mta-ip", f.sending_mta_ip),
                                ("receiving-mx-hostname", f.receiving_mx_hostname),
                                ("receiving-ip", f.receiving_ip),
                                ("failure-reason-code", f.failure_reason_code)):
                if value:
                    detail[name] = value
            failures[detail_key] = detail
            entry["failure-details"].append(detail)
        detail["failed-session-count"] += 1
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    return list(policies.values())


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    results: Iterable[SessionResult],
    *,
    organization: str,
    contact: str,
    start: datetime,
    end: datetime,
    report_id: str | None = None,
) -> dict[str, Any]:
    """The RFC 8460 §4.4 JSON report object."""
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _utc(start), "end-datetime": _utc(end)},
        "contact-info": contact,
        "report-id": report_id or f"{_utc(start)}_{uuid.uuid4().hex}@{organization}",
        "policies": aggregate(results),
    }


def gzip_report(report: Mapping[str, Any]) -> bytes:
    """The report as gzip'd UTF-8 JSON (RFC 8460 §5.2); mtime 0 for reproducible bytes."""
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


# --- discovery: TXT _smtp._tls.<domain> (RFC 8460 §3) ------------------------------------

_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")


def parse_rua(records: Sequence[str]) -> tuple[str, ...]:
    """The report URIs of the one `v=TLSRPTv1` record, mailto: and https: only.

    Records not starting with `v=TLSRPTv1` are ignored; more than one, or none, means
    no reporting (RFC 8460 §3). URIs are separated by commas (a comma inside a URI is
    %2C-encoded).
    """
    candidates = [r for r in records if re.match(r"v=TLSRPTv1[ \t]*;", r)]
    if len(candidates) != 1:
        return ()
    uris: list[str] = []
    for field in _FIELD_DELIM.split(candidates[0].strip())[1:]:
        name, eq, value = field.partition("=")
        if name != "rua" or not eq:
            continue
        for uri in value.split(","):
            uri = uri.strip()
            scheme = uri.split(":", 1)[0].lower()
            usable = (scheme == "mailto" and "@" in uri) or (
                scheme == "https" and bool(urlsplit(uri).hostname)
            )
            if usable:
                uris.append(uri)
        break  # the first rua= field only
    return tuple(uris)


def mailto_address(uri: str) -> str:
    """`mailto:tlsrpt@example.com?subject=x` -> `tlsrpt@example.com`."""
    return unquote(uri.split(":", 1)[1].split("?", 1)[0])


def report_filename(submitter: str, domain: str, start: datetime, end: datetime,
                    unique: str) -> str:
    """RFC 8460 §5.1: `submitter!policy-domain!begin!end!unique-id.json.gz`."""
    return (f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}!"
            f"{unique}.json.gz")


def report_message(
    *,
    report: Mapping[str, Any],
    compressed: bytes,
    policy_domain: str,
    submitter: str,
    sender: str,
    recipient: str,
    now: datetime,
) -> bytes:
    """The RFC 8460 §5.3 email: multipart/report; report-type="tlsrpt" with the report.

    `TLS-Required: No` (RFC 8689 §5): a report about TLS failures must still get there.
    """
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = (f"Report Domain: {policy_domain} Submitter: {submitter} "
                          f"Report-ID: <{report['report-id']}>")
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message["TLS-Report-Domain"] = policy_domain
    message["TLS-Report-Submitter"] = submitter
    message["TLS-Required"] = "No"
    message.set_content(
        f"This is an aggregate TLS report from {submitter} for {policy_domain} "
        "(RFC 8460).\n"
    )
    start = datetime.fromisoformat(report["date-range"]["start-datetime"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(report["date-range"]["end-datetime"].replace("Z", "+00:00"))
    unique = re.sub(r"[^A-Za-z0-9]", "", str(report["report-id"]))[:40]
    message.add_attachment(
        compressed, maintype="application", subtype="tlsrpt+gzip",
        filename=report_filename(submitter, policy_domain, start, end, unique),
    )
    # make_mixed() by add_attachment; RFC 8460 §5.3 wants multipart/report.
    message.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    message.set_boundary(f"tlsrpt-{uuid.uuid4().hex}")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
