"""`mxsend check-script [SCRIPT] [--message FILE] [--server HOST] [--domain D] [--json]`.

Compiles the script and, for a spool file, shows what CheckFile and ServerDetails
decide, without sending anything; also which VPOP3 8.8 hooks it defines and, for a
spool file, the envelope sender ModifyReturnPath gives the transaction (contract §9).
ReturnCodeHandler needs a server's reply, so only its presence is shown. Exit 0 when
the script compiled and ran without a script_error, 1 otherwise (a compile failure
prints the Lua error with its line).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mxsend.actions import LUA_NAME, FileActions, ServerActions, ServerParameters
from mxsend.config import Config
from mxsend.dkim import Signer, describe, split_message
from mxsend.envelope import domain_of, header_lines, parse_bsmtp
from mxsend.errors import DeliveryError, EnvelopeError
from mxsend.log import get_logger
from mxsend.luasandbox import compile_check
from mxsend.policy import (
    MODIFYRETURNPATH,
    RETURNCODEHANDLER,
    CheckFileRequest,
    Policy,
    return_path_request,
)
from mxsend.smtp_rules import choose_return_path


class _Collect(logging.Handler):
    """Keeps the script_error and script_log events of this run for the report."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if name:
            self.events.append({"event": name, **getattr(record, "fields", {})})
        else:
            self.events.append({"event": "log", "message": record.getMessage()})


def _rows(actions: object, defaults: object) -> list[tuple[str, object, bool]]:
    """(Lua name, value, changed from the default) for a FileActions/ServerActions."""
    rows: list[tuple[str, object, bool]] = []
    assert dataclasses.is_dataclass(actions) and dataclasses.is_dataclass(defaults)
    for field in dataclasses.fields(actions):
        value, default = getattr(actions, field.name), getattr(defaults, field.name)
        if dataclasses.is_dataclass(value):
            for sub, sub_value, changed in _rows(value, default):
                rows.append((f"{field.name}.{sub}", sub_value, changed))
        else:
            rows.append((LUA_NAME.get(field.name, field.name), value, value != default))
    return rows


def _table(title: str, rows: list[tuple[str, object, bool]]) -> list[str]:
    width = max(len(name) for name, _, _ in rows)
    lines = [title]
    for name, value, changed in rows:
        shown = json.dumps(value) if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        lines.append(f"  {'*' if changed else ' '} {name:<{width}}  {shown}")
    return lines


def run(args: argparse.Namespace, config: Config) -> int:
    script = Path(args.script) if args.script else config.script.path
    try:
        source = script.read_bytes()
    except OSError as exc:
        print(f"mxsend: {script}: {exc.strerror}", file=sys.stderr)
        return 1
    error = compile_check(source, f"@{script}")
    if error is not None:
        print(f"mxsend: {error}", file=sys.stderr)
        return 1

    message = None
    message_path, message_time = "", 0.0
    if args.message:
        try:
            message_path = os.path.abspath(args.message)
            message_time = os.stat(message_path).st_mtime
            message = parse_bsmtp(Path(args.message).read_bytes())
        except OSError as exc:
            print(f"mxsend: {args.message}: {exc.strerror}", file=sys.stderr)
            return 1
        except EnvelopeError as exc:
            print(f"mxsend: {args.message}: {exc}", file=sys.stderr)
            return 1

    collect = _Collect()
    logger = get_logger()
    saved_level = logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    config = dataclasses.replace(config, script=dataclasses.replace(config.script, path=script))
    try:
        report = asyncio.run(_decide(config, args, message, message_path, message_time))
    finally:
        logger.removeHandler(collect)
        logger.setLevel(saved_level)

    failed = any(e["event"] == "script_error" for e in collect.events)
    if args.json:
        plain = {k: v for k, v in report.items()
                 if k not in ("check_file_actions", "check_file_defaults",
                              "server_details_actions", "server_defaults")}
        doc: dict[str, Any] = {"script": str(script), "compiled": True, **plain,
                               "events": collect.events}
        print(json.dumps(doc, indent=2, default=str))
        return 1 if failed else 0
    print(f"script {script}: compiled")
    if "check_file" in report:
        print()
        print("\n".join(_table("CheckFile", _rows(report["check_file_actions"],
                                                   report["check_file_defaults"]))))
    if "dkim" in report:
        print()
        print("\n".join(_dkim_lines(report["dkim"])))
    if "server_details" in report:
        sd = report["server_details"]
        print()
        title = f"ServerDetails (server={sd['server']}, domain={sd['domain']})"
        print("\n".join(_table(title, _rows(report["server_details_actions"],
                                            report["server_defaults"]))))
    print()
    print("\n".join(_hook_lines(report["hooks"])))
    if collect.events:
        print()
        for item in collect.events:
            fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                              for k, v in item.items() if k not in ("event", "id"))
            print(f"  {item['event']} {fields}")
    if "check_file" in report or "server_details" in report:
        print("\n(* = changed by the script)")
    return 1 if failed else 0


def _hook_lines(hooks: dict[str, Any]) -> list[str]:
    """VPOP3 8.8's hooks in mxout.lua: defined or not, and ModifyReturnPath's answer."""
    lines = ["VPOP3 8.8 hooks"]
    reply = hooks[RETURNCODEHANDLER]
    lines.append(f"    {RETURNCODEHANDLER}: " + (
        "defined (asked about every server reply; a reply is needed to show more)"
        if reply["defined"] else "not defined (no call per reply)"))
    path = hooks[MODIFYRETURNPATH]
    if not path["defined"]:
        lines.append(f"    {MODIFYRETURNPATH}: not defined")
    elif "sender" not in path:
        lines.append(f"    {MODIFYRETURNPATH}: defined (give --message to see its answer)")
    else:
        computed = json.dumps(path["computed"])
        if path["error"]:
            answer = f"{path['error']}; MAIL FROM {json.dumps(path['sender'])}"
        elif path["result"] is None:
            answer = f"keeps it; MAIL FROM {computed}"
        else:
            answer = f"MAIL FROM {json.dumps(path['sender'])}"
        lines.append(f"    {MODIFYRETURNPATH}: ComputedMailFrom {computed} -> {answer}")
    return lines


def _dkim_lines(dkim: dict[str, Any]) -> list[str]:
    """Which key(s) will sign: domain, selector, algorithm; never the key itself."""
    lines = [f"DKIM (DKIMDomain in {json.dumps(dkim['domain_in'])}, "
             f"out {json.dumps(dkim['domain_out'])})"]
    for key in dkim["keys"]:
        lines.append(f"    signs with d={key['domain']} s={key['selector']} "
                     f"a={key['algorithm']}")
    if not dkim["keys"]:
        lines.append("    not signed")
    return lines


async def _decide(
    config: Config, args: argparse.Namespace, message: Any, path: str, mtime: float
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    # A key that cannot be used is a ConfigError naming it (exit 2), as for `run`.
    signer = Signer.from_config(config.dkim.keys)[0] if message is not None else Signer()
    policy = Policy(config)
    try:
        # Loaded first, so that which hooks this version defines is known.
        await policy.load()
        data = message.data if message else b""
        if message is not None:
            request = CheckFileRequest(
                queue_id=os.path.basename(path), filename=path, size=len(data),
                creation_time=mtime, retries=0, last_try_time=None,
                return_path=message.envelope.sender,
                recipients=tuple(r.address for r in message.envelope.recipients), data=data,
                dkim_domain=signer.dkim_domain(split_message(data)[0]),
            )
            actions = await policy.check_file(request, signer.domains)
            report["check_file"] = dataclasses.asdict(actions)
            report["check_file_actions"] = actions
            report["check_file_defaults"] = FileActions(dkim_domain=request.dkim_domain)
            keys = signer.choose(split_message(data)[0], actions.dkim_domain)
            report["dkim"] = {
                "domain_in": request.dkim_domain, "domain_out": actions.dkim_domain,
                "signs": describe(keys),
                "keys": [{"domain": k.domain, "selector": k.selector,
                          "algorithm": k.algorithm} for k in keys],
            }
        domain = args.domain or (
            message.envelope.recipients[0].domain if message is not None else None)
        if args.server or domain:
            server = args.server or domain or ""
            domain = domain or server
            params = ServerParameters(
                authsender=(message.envelope.auth or "") if message else "",
                originator=message.envelope.sender if message else "",
                server=server, domain=domain, length=len(data), connid=1,
                connection=f"{server}:{config.smtp.port}",
            )
            defaults = policy.default_server_actions()
            server_actions: ServerActions = await policy.server_details(
                "check-script", params, header_lines(data))
            report["server_details"] = {"server": server, "domain": domain,
                                        **dataclasses.asdict(server_actions)}
            report["server_details_actions"] = server_actions
            report["server_defaults"] = defaults
            if message is not None:
                report["hooks"] = {MODIFYRETURNPATH: await _return_path(
                    policy, message, domain, server_actions, mtime)}
        report.setdefault("hooks", {MODIFYRETURNPATH: {
            "defined": policy.defines(MODIFYRETURNPATH)}})
        report["hooks"][RETURNCODEHANDLER] = {"defined": policy.defines(RETURNCODEHANDLER)}
    finally:
        policy.close()
    if message is not None:
        report["message"] = {
            "sender": message.envelope.sender,
            "recipients": [r.address for r in message.envelope.recipients],
            "domains": sorted({domain_of(r.address) for r in message.envelope.recipients}),
        }
    return report


async def _return_path(policy: Policy, message: Any, domain: str, actions: ServerActions,
                       created: float) -> dict[str, Any]:
    """What the daemon would send as MAIL FROM to `domain`'s recipients: the sender after
    returnAddressModifier, then ModifyReturnPath's answer (before BATV signing)."""
    defined = policy.defines(MODIFYRETURNPATH)
    try:
        computed = choose_return_path(message.envelope.sender, actions)
    except DeliveryError as exc:
        # The daemon defers such a transaction before ModifyReturnPath is asked.
        return {"defined": defined, "computed": message.envelope.sender, "result": None,
                "sender": message.envelope.sender, "error": exc.message}
    result = None
    if defined:
        every = [r.address for r in message.envelope.recipients]
        recipients = [a for a in every if domain_of(a) == domain] or every
        result = await policy.modify_return_path("check-script", return_path_request(
            message, recipients, computed, created))
    return {"defined": defined, "computed": computed, "result": result,
            "sender": computed if result is None else result, "error": ""}
