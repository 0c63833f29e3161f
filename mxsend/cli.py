"""The `mxsend` command line: build_parser() and main(argv) -> exit code. Nothing else.

Each subcommand lives in mxsend/commands/<name>.py as `run(args, config) -> int`. Bad
usage or config is one line naming the flag or key and exit 2 (64, EX_USAGE, for
`enqueue`, which sendmail callers expect), never a traceback (contract §2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mxsend import __version__
from mxsend.commands.queue_args import add_queue_actions
from mxsend.config import Config, config_path, load_config
from mxsend.errors import ConfigError

EX_USAGE = 64
EXIT_USAGE = 2
# 128 + SIGPIPE: what a shell reports for a tool ended by a closed pipe.
EXIT_BROKEN_PIPE = 141


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


ENQUEUE_HELP = "queue a message from stdin (sendmail-compatible)"


def _add_enqueue_arguments(p: argparse.ArgumentParser) -> None:
    """sendmail's command line (contract §10), as cron, PHP and MTAs call it."""
    p.add_argument("-f", "-r", dest="sender", metavar="SENDER",
                   help="envelope sender (-r is the old name); '<>' is the null sender")
    p.add_argument("-N", dest="notify", metavar="NOTIFY", help="DSN NOTIFY for every RCPT")
    p.add_argument("-R", dest="ret", metavar="RET", help="DSN RET: full or hdrs")
    p.add_argument("-V", dest="envid", metavar="ENVID", help="DSN ENVID")
    p.add_argument("-t", dest="from_headers", action="store_true",
                   help="take recipients from To/Cc/Bcc (Bcc is removed)")
    p.add_argument("-i", dest="ignore_dots", action="store_true",
                   help="a line with a single '.' does not end the message")
    p.add_argument("-o", dest="sendmail_options", action="append", default=[],
                   metavar="OPTION", help="sendmail -oX options (-oi is -i; others ignored)")
    p.add_argument("-B", dest="body_type", metavar="TYPE", help="7BIT or 8BITMIME")
    p.add_argument("-b", dest="mode", metavar="MODE", help="only -bm (deliver) is supported")
    p.add_argument("-e", dest="error_mode", metavar="MODE", help="ignored (sendmail -eX)")
    p.add_argument("-F", dest="full_name", metavar="NAME", help="ignored (sendmail)")
    p.add_argument("-v", dest="verbose", action="store_true", help="ignored (sendmail)")
    p.add_argument("-U", dest="user_submission", action="store_true",
                   help="ignored (sendmail)")
    p.add_argument("--require-tls", dest="require_tls", action="store_true",
                   help="REQUIRETLS (RFC 8689): TLS with a verified certificate on every hop")
    p.add_argument("recipients", nargs="*", metavar="RCPT")


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

    _add_enqueue_arguments(command("enqueue", ENQUEUE_HELP))

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

    tlsrpt = command("tlsrpt", "TLS-RPT reports")
    tlsrpt_sub = tlsrpt.add_subparsers(dest="tlsrpt_command", metavar="ACTION",
                                       parser_class=_Parser)
    tlsrpt_sub.required = True
    _add_config_flag(tlsrpt_sub.add_parser("send", help="end the period now and send the "
                                           "reports (contract §8)"), top=False)
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
    "tlsrpt": "mxsend.commands.tlsrpt",
}


def _enqueue_position(argv: Sequence[str]) -> int | None:
    """The index of the subcommand word if it is enqueue (the first non-option word)."""
    index = 0
    while index < len(argv):
        word = argv[index]
        if word in ("-c", "--config"):
            index += 1  # its value, which may be any word
        elif word == "--" or not word.startswith("-"):
            return index if word == "enqueue" else None
        index += 1
    return None


def _enqueue_parser() -> argparse.ArgumentParser:
    """The enqueue command's parser alone: building every subcommand's costs ~3 ms."""
    parser = _Parser(prog="mxsend enqueue", description=ENQUEUE_HELP)
    _add_config_flag(parser, top=True)
    _add_enqueue_arguments(parser)
    parser.set_defaults(command="enqueue")
    return parser


def _invoked_as_sendmail(argv0: str) -> bool:
    """Contract §10: a `sendmail` symlink to the mxsend script is `mxsend enqueue`."""
    return os.path.basename(argv0) == "sendmail"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flush here, not at exit: a closed pipe then surfaces as BrokenPipeError below.
        sys.stdout.flush()
    except BrokenPipeError:
        # `mxsend queue list | head`: the reader is gone. End quietly, as a tool killed
        # by SIGPIPE would, with nothing on stderr; the interpreter's final flush must go
        # somewhere, so stdout becomes /dev/null (the recipe of the `signal` docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    if argv is None:
        args_list = sys.argv[1:]
        if _invoked_as_sendmail(sys.argv[0]):
            args_list.insert(0, "enqueue")
    else:
        args_list = list(argv)
    position = _enqueue_position(args_list)
    usage_code = EX_USAGE if position is not None else EXIT_USAGE
    if position is not None:
        # The fast path of `enqueue` (cron jobs and web requests wait on it): its own
        # parser, and only its own module, which imports nothing of the daemon's.
        parser = _enqueue_parser()
        args_list = args_list[:position] + args_list[position + 1:]
    else:
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
