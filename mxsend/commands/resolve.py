"""`mxsend resolve DOMAIN [--message FILE] [--json]`: the delivery plan; sends nothing.

Prints the MX hosts in the order a delivery would try them (contract §5), each with its
addresses and what ServerDetails decides for it (contract §4), so an operator can see
what the daemon would do for a domain before any mail goes there. With `--message`, the
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


def format_text(domain: str, rows: Sequence[PlanRow], source: str) -> str:
    lines = [f"{domain}: {len(rows)} server(s) to try in this order; ServerDetails: {source}"]
    for number, row in enumerate(rows, 1):
        host = row.host
        kind = "  (implicit MX: no MX records, the domain's own address)" if host.implicit else ""
        lines.append(f"{number:2d}. {host.preference:5d}  {host.name}{kind}")
        lines.append(f"      addresses: {', '.join(host.addresses)}")
        lines.append(f"      connection: {row.params.connection}")
        table = actions_table(row.actions)
        timeouts = table.pop("timeouts")
        lines.append("      " + " ".join(f"{k}={_text_value(v)}" for k, v in table.items()))
        lines.append(
            "      timeouts: " + " ".join(f"{k}={_text_value(v)}" for k, v in timeouts.items())
        )
    return "\n".join(lines)


def format_json(domain: str, rows: Sequence[PlanRow], source: str) -> str:
    doc = {
        "domain": domain,
        "server_details_from": source,
        "hosts": [
            {
                "preference": row.host.preference,
                "name": row.host.name,
                "addresses": list(row.host.addresses),
                "implicit": row.host.implicit,
                "connection": row.params.connection,
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
) -> tuple[list[PlanRow], str]:
    resolved: list[MxHost] | None = None
    if config.script.server_rules_path is None:
        # DNS first: a failure is then one line, before the script says anything.
        resolved = await Resolver(config.dns).resolve(domain)
    policy = Policy(config)
    size = len(message.data) if message is not None else 0
    rules = policy.rules
    notes: list[str] = []
    try:
        hosts: list[MxHost] = []
        stopped = False
        if rules is not None and rules.active:
            overrides = await rules.overrides(queue_id, domain, 0, size)
            stopped = not overrides.proceed
            if stopped:
                notes.append("GetOverrides: Continue=false (deferred: no MX, no address)")
            elif overrides.servers:
                notes.append("GetOverrides: " + " ".join(
                    f"{s.name}:{s.port or config.smtp.port}" for s in overrides.servers))
                resolver = Resolver(config.dns)
                for server in overrides.servers:
                    addresses = ((server.host,) if server.literal
                                 else await resolver.host_addresses(server.host))
                    hosts.append(MxHost(server.name, 0, addresses))
        if not hosts and not stopped:
            hosts = resolved if resolved is not None else await Resolver(
                config.dns).resolve(domain)
        if rules is not None and rules.active:
            for host in hosts:
                verdict = await rules.check_server(queue_id, domain, host.name, 0, size)
                notes.append(f"CheckServer {host.name}: allowed={verdict.allowed}"
                             f" hold_minutes={verdict.hold_minutes:g}")
    except BaseException:
        policy.close()
        raise
    headers = header_lines(message.data) if message is not None else []
    rows: list[PlanRow] = []
    try:
        for connid, host in enumerate(hosts, 1):
            params = server_parameters(message, host, domain, config.smtp.port, connid)
            actions = await policy.server_details(queue_id, params, headers)
            rows.append(PlanRow(host, params, actions))
    finally:
        policy.close()
    if not policy.has_script:
        source = f"built-in defaults ({config.script.path} not found)"
    else:
        source = f"script {config.script.path}"
    if notes:
        source += "\nserver rules (" + str(config.script.server_rules_path) + "):\n  " + \
            "\n  ".join(notes)
    return rows, source


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
        rows, source = asyncio.run(_plan(config, domain, message, queue_id))
    except DeliveryError as exc:
        code = f" ({exc.dsn})" if exc.dsn else ""
        # mx.py's messages name the domain already.
        print(f"mxsend: resolve: {exc.message}{code}", file=sys.stderr)
        return EXIT_DNS
    output = format_json if args.json else format_text
    print(output(domain, rows, source))
    return EXIT_OK
