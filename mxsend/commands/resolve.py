"""`mxsend resolve DOMAIN [--message FILE] [--json]`: the delivery plan; sends nothing.

Prints the MX hosts in the order a delivery would try them (contract §5), each with its
addresses and what ServerDetails decides for it (contract §4), so an operator can see
what the daemon would do for a domain before any mail goes there. With
`script.server_rules_path` (contract §9), GetOverrides' smart hosts (each on its own
port) replace the MX hosts, and each host shows CheckServer's verdict. With `--message`, the
script sees that spool file's envelope, size and header; without, an empty message from
the null sender.

Exit codes: 0 a plan was printed; 1 DNS said no (null MX, NXDOMAIN, SERVFAIL, timeout:
one line with the enhanced status code); 2 a bad --message file (cli.py handles the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxsend.actions import SERVER_FIELDS, TIMEOUT_FIELDS, ServerActions, ServerParameters
from mxsend.config import Config
from mxsend.envelope import Message, domain_of, header_lines, parse_bsmtp
from mxsend.errors import DeliveryError, EnvelopeError
from mxsend.hooks import ServerVerdict
from mxsend.log import setup_logging
from mxsend.mx import MxHost, Resolver
from mxsend.policy import Policy

EXIT_OK = 0
EXIT_DNS = 1
EXIT_USAGE = 2

@dataclass(frozen=True, slots=True)
class PlanRow:
    """One server of the plan and what ServerDetails decided for it."""

    host: MxHost
    params: ServerParameters
    actions: ServerActions
    verdict: ServerVerdict | None = None  # CheckServer's; None: no mxserverrules.lua


@dataclass(frozen=True, slots=True)
class RulesSummary:
    """What mxserverrules.lua's GetOverrides said for the domain."""

    path: str
    servers: tuple[str, ...] = ()  # "host:port" in order; (): the MX records
    proceed: bool = True  # Continue

    def lines(self) -> list[str]:
        lines = [f"server rules ({self.path})"]
        if not self.proceed:
            lines.append("  GetOverrides: Continue=false (deferred: no MX, no address)")
        elif self.servers:
            lines.append("  GetOverrides: " + " ".join(self.servers))
        return lines

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "overrides": list(self.servers),
                "continue": self.proceed}


def verdict_text(verdict: ServerVerdict) -> str:
    """CheckServer's verdict as the daemon acts on it (a hold wins over Allowed)."""
    if verdict.hold_minutes > 0:
        return f"hold {verdict.hold_minutes:g} minutes (not an attempt)"
    return "allowed" if verdict.allowed else "skipped"


def verdict_json(verdict: ServerVerdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {"allowed": verdict.allowed, "hold_minutes": verdict.hold_minutes,
            "decision": verdict_text(verdict)}


# --- pure formatting ------------------------------------------------------------------


def actions_table(actions: ServerActions) -> dict[str, Any]:
    """ServerActions under the script's own key names, flags as VPOP3's 0/1."""
    table: dict[str, Any] = {}
    for attribute, key in SERVER_FIELDS:
        value = getattr(actions, attribute)
        table[key] = int(value) if isinstance(value, bool) else value
    table["timeouts"] = {key: getattr(actions.timeouts, key) for key in TIMEOUT_FIELDS}
    return table


def _text_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if not value or " " in value else value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_text(domain: str, rows: Sequence[PlanRow], source: str,
                rules: RulesSummary | None = None) -> str:
    lines = [f"{domain}: {len(rows)} server(s) to try in this order; ServerDetails: {source}"]
    if rules is not None:
        lines.extend(rules.lines())
    for number, row in enumerate(rows, 1):
        host = row.host
        kind = "  (implicit MX: no MX records, the domain's own address)" if host.implicit else ""
        lines.append(f"{number:2d}. {host.preference:5d}  {host.name}{kind}")
        lines.append(f"      addresses: {', '.join(host.addresses)}")
        lines.append(f"      connection: {row.params.connection}")
        if row.verdict is not None:
            lines.append(f"      CheckServer: {verdict_text(row.verdict)}")
        table = actions_table(row.actions)
        timeouts = table.pop("timeouts")
        lines.append("      " + " ".join(f"{k}={_text_value(v)}" for k, v in table.items()))
        lines.append(
            "      timeouts: " + " ".join(f"{k}={_text_value(v)}" for k, v in timeouts.items())
        )
    return "\n".join(lines)


def format_json(domain: str, rows: Sequence[PlanRow], source: str,
                rules: RulesSummary | None = None) -> str:
    doc = {
        "domain": domain,
        "server_details_from": source,
        "server_rules": rules.as_json() if rules is not None else None,
        "hosts": [
            {
                "preference": row.host.preference,
                "name": row.host.name,
                "addresses": list(row.host.addresses),
                "implicit": row.host.implicit,
                "connection": row.params.connection,
                "check_server": verdict_json(row.verdict),
                "server_details": actions_table(row.actions),
            }
            for row in rows
        ],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


def server_parameters(
    message: Message | None, host: MxHost, domain: str, port: int, connid: int
) -> ServerParameters:
    """The `Parameters` ServerDetails would get for the first address of `host`."""
    address = host.addresses[0] if host.addresses else ""
    envelope = message.envelope if message is not None else None
    return ServerParameters(
        authsender=(envelope.auth or "") if envelope else "",
        originator=envelope.sender if envelope else "",
        server=host.name,
        domain=domain,
        length=len(message.data) if message is not None else 0,
        connid=connid,
        connection=f"{host.name}[{address}]:{port}",
    )


# --- I/O ------------------------------------------------------------------------------


async def _plan(
    config: Config, domain: str, message: Message | None, queue_id: str
) -> tuple[list[PlanRow], str, RulesSummary | None]:
    resolved: list[MxHost] | None = None
    if config.script.server_rules_path is None:
        # DNS first: a failure is then one line, before the script says anything.
        resolved = await Resolver(config.dns).resolve(domain)
    policy = Policy(config)
    size = len(message.data) if message is not None else 0
    rules = policy.rules
    summary = RulesSummary(str(config.script.server_rules_path)) if rules else None
    try:
        # (host, port): a smart host has its own port, an MX host smtp.port.
        hosts: list[tuple[MxHost, int]] = []
        stopped = False
        if rules is not None and rules.active:
            overrides = await rules.overrides(queue_id, domain, 0, size)
            stopped = not overrides.proceed
            summary = RulesSummary(str(config.script.server_rules_path), tuple(
                f"{s.name}:{s.port or config.smtp.port}" for s in overrides.servers),
                overrides.proceed)
            if overrides.servers and not stopped:
                resolver = Resolver(config.dns)
                problem: DeliveryError | None = None
                for server in overrides.servers:
                    try:
                        addresses = ((server.host,) if server.literal
                                     else await resolver.host_addresses(server.host))
                    except DeliveryError as exc:
                        # As the daemon: a smart host that does not resolve is passed
                        # over; only when none does is it the domain's failure.
                        problem = exc
                        continue
                    hosts.append((MxHost(server.name, 0, addresses),
                                  server.port or config.smtp.port))
                if not hosts and problem is not None:
                    raise problem
        if not hosts and not stopped:
            hosts = [(host, config.smtp.port) for host in (
                resolved if resolved is not None else await Resolver(config.dns).resolve(
                    domain))]
        verdicts: list[ServerVerdict | None] = []
        for host, _ in hosts:
            verdicts.append(await rules.check_server(queue_id, domain, host.name, 0, size)
                            if rules is not None and rules.active else None)
    except BaseException:
        policy.close()
        raise
    headers = header_lines(message.data) if message is not None else []
    rows: list[PlanRow] = []
    try:
        for connid, ((host, port), verdict) in enumerate(zip(hosts, verdicts, strict=True),
                                                       1):
            params = server_parameters(message, host, domain, port, connid)
            actions = await policy.server_details(queue_id, params, headers)
            rows.append(PlanRow(host, params, actions, verdict))
    finally:
        policy.close()
    if not policy.has_script:
        source = f"built-in defaults ({config.script.path} not found)"
    else:
        source = f"script {config.script.path}"
    return rows, source, summary


def run(args: argparse.Namespace, config: Config) -> int:
    setup_logging(config.log.format, config.log.level)
    target: str = args.domain.strip()
    # An address is accepted too: its domain is what gets resolved.
    domain = domain_of(target) if "@" in target else target.lower().rstrip(".")
    message: Message | None = None
    queue_id = "resolve"
    if args.message:
        path = Path(args.message)
        try:
            message = parse_bsmtp(path.read_bytes())
        except OSError as exc:
            print(f"mxsend: --message {path}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        except EnvelopeError as exc:
            print(f"mxsend: --message {path}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        queue_id = path.name
    try:
        rows, source, rules = asyncio.run(_plan(config, domain, message, queue_id))
    except DeliveryError as exc:
        code = f" ({exc.dsn})" if exc.dsn else ""
        # mx.py's messages name the domain already.
        print(f"mxsend: resolve: {exc.message}{code}", file=sys.stderr)
        return EXIT_DNS
    output = format_json if args.json else format_text
    print(output(domain, rows, source, rules))
    return EXIT_OK
