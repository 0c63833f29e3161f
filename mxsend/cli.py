"""The `mxsend` command line: build_parser() and main(argv) -> exit code. Nothing else.

Each subcommand lives in mxsend/commands/<name>.py as `run(args, config) -> int`. Bad
usage or config is one line naming the flag or key and exit 2 (64, EX_USAGE, for
`enqueue`, which sendmail callers expect), never a traceback (contract §2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mxsend import __version__
from mxsend.commands.queue_args import add_queue_actions
from mxsend.config import Config, config_path, load_config
from mxsend.errors import ConfigError

EX_USAGE = 64
EXIT_USAGE = 2


class UsageError(Exception):
    """Raised instead of argparse's exit so main() decides the exit code."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_config_flag(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before or after the subcommand (contract §2); the sub-parser's copy must
    # not overwrite a value given before the subcommand, hence SUPPRESS there.
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="config file (default $MXSEND_CONFIG, then /etc/mxsend/mxsend.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mxsend", description="Direct-MX outbound mail daemon.")
    parser.add_argument("--version", action="version", version=f"mxsend {__version__}")
    _add_config_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_flag(p, top=False)
        return p

    run = command("run", "run the delivery daemon in the foreground")
    run.add_argument("--once", action="store_true", help="deliver what is due now, then exit")

    enqueue = command("enqueue", "queue a message from stdin (sendmail-compatible)")
    enqueue.add_argument("-f", dest="sender", metavar="SENDER", help="envelope sender")
    enqueue.add_argument("-N", dest="notify", metavar="NOTIFY", help="DSN NOTIFY for every RCPT")
    enqueue.add_argument("-R", dest="ret", metavar="RET", help="DSN RET: full or hdrs")
    enqueue.add_argument("-V", dest="envid", metavar="ENVID", help="DSN ENVID")
    enqueue.add_argument("-t", dest="from_headers", action="store_true",
                         help="take recipients from To/Cc/Bcc (Bcc is removed)")
    enqueue.add_argument("-i", dest="ignore_dots", action="store_true",
                         help="a line with a single '.' does not end the message")
    enqueue.add_argument("-o", dest="sendmail_options", action="append", default=[],
                         metavar="OPTION", help="sendmail -oX options (-oi is -i; others ignored)")
    enqueue.add_argument("-F", dest="full_name", metavar="NAME", help="ignored (sendmail)")
    enqueue.add_argument("recipients", nargs="*", metavar="RCPT")

    queue = command("queue", "inspect and change the queue")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=_Parser)
    queue_sub.required = True
    add_queue_actions(queue_sub, lambda p: _add_config_flag(p, top=False))

    check = command("check-script", "compile the Lua script and show its decisions")
    check.add_argument("script", metavar="SCRIPT", nargs="?", help="default: script.path")
    check.add_argument("--message", metavar="FILE", help="a Batch SMTP spool file")
    check.add_argument("--server", metavar="HOST", help="server name for ServerDetails")
    check.add_argument("--domain", metavar="DOMAIN", help="recipient domain for ServerDetails")
    check.add_argument("--json", action="store_true", help="one JSON document")

    resolve = command("resolve", "show the delivery plan for a domain; sends nothing")
    resolve.add_argument("domain", metavar="DOMAIN")
    resolve.add_argument("--message", metavar="FILE", help="a spool file for ServerDetails")
    resolve.add_argument("--json", action="store_true", help="one JSON document")

    command("health", "exit 0 if a daemon's heartbeat in the spool is fresh (health checks)")

    batv = command("batv", "BATV prvs= signing and verification")
    batv_sub = batv.add_subparsers(dest="batv_command", metavar="ACTION", parser_class=_Parser)
    batv_sub.required = True
    for name, help_text in (("sign", "sign an address"), ("verify", "verify a prvs= address")):
        p = batv_sub.add_parser(name, help=help_text)
        p.add_argument("address", metavar="ADDRESS")
        _add_config_flag(p, top=False)

    dkim = command("dkim", "DKIM keys: make one, print the TXT record to publish")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", parser_class=_Parser)
    dkim_sub.required = True
    keygen = dkim_sub.add_parser("keygen", help="write a new key and print its TXT record data")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=None, help="RSA only (default 2048)")
    keygen.add_argument("--out", metavar="FILE", help="default DOMAIN.SELECTOR.pem")
    record = dkim_sub.add_parser("record", help="print the TXT record data for a key file")
    record.add_argument("key_file", metavar="KEY_FILE")
    for p in (keygen, record):
        _add_config_flag(p, top=False)
    return parser


_COMMAND_MODULES = {
    "run": "mxsend.commands.run",
    "enqueue": "mxsend.commands.enqueue",
    "queue": "mxsend.commands.queue",
    "check-script": "mxsend.commands.check_script",
    "resolve": "mxsend.commands.resolve",
    "batv": "mxsend.commands.batv",
    "health": "mxsend.commands.health",
    "dkim": "mxsend.commands.dkim",
}


def _is_enqueue(argv: Sequence[str]) -> bool:
    """Whether the subcommand (the first word that is not an option) is enqueue."""
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            next(words, None)  # its value, which may be any word
        elif not word.startswith("-"):
            return word == "enqueue"
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    usage_code = EX_USAGE if _is_enqueue(args_list) else EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return usage_code
    except SystemExit as exc:  # --help and --version have printed; main() returns codes
        return exc.code if isinstance(exc.code, int) else 0
    try:
        config: Config = load_config(config_path(args.config))
    except ConfigError as exc:
        print(f"mxsend: {exc}", file=sys.stderr)
        return usage_code
    module = importlib.import_module(_COMMAND_MODULES[args.command])
    try:
        code: int = module.run(args, config)
    except ConfigError as exc:
        print(f"mxsend: {exc}", file=sys.stderr)
        return usage_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
