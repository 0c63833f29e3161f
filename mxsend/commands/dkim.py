"""`mxsend dkim keygen|record`: make a DKIM key and print the TXT data to publish (§7).

Both print only the TXT data on stdout, one line (`v=DKIM1; k=rsa; p=...`), the same
for the same key, so `$(mxsend dkim record KEY)` can go straight into a zone tool.
Everything else (the record's name, warnings) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mxsend.config import Config
from mxsend.dkim_keys import (
    DEFAULT_RSA_BITS,
    generate_key,
    read_key_file,
    txt_record,
    write_new_key,
)

EXIT_USAGE = 2
EXIT_FAILED = 1


def _keygen(args: argparse.Namespace) -> int:
    if args.type == "ed25519" and args.bits is not None:
        print("mxsend dkim keygen: --bits: only for --type rsa", file=sys.stderr)
        return EXIT_USAGE
    domain: str = args.domain.strip().rstrip(".").lower()
    selector: str = args.selector.strip().lower()
    try:
        key = generate_key(args.type, DEFAULT_RSA_BITS if args.bits is None else args.bits)
    except ValueError as exc:
        print(f"mxsend dkim keygen: --bits: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) if args.out else Path(f"{domain}.{selector}.pem")
    try:
        write_new_key(out, key)
    except FileExistsError:
        print(f"mxsend dkim keygen: {out}: exists; not overwritten", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"mxsend dkim keygen: {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}; publish this TXT record at {selector}._domainkey.{domain}",
          file=sys.stderr)
    print(txt_record(key))
    return 0


def _record(args: argparse.Namespace) -> int:
    path = Path(args.key_file)
    try:
        key, warning = read_key_file(path)
    except OSError as exc:
        print(f"mxsend dkim record: {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"mxsend dkim record: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if warning:
        print(f"mxsend dkim record: {path}: {warning}", file=sys.stderr)
    print(txt_record(key))
    return 0


def run(args: argparse.Namespace, config: Config) -> int:
    del config  # the key is named on the command line
    return _keygen(args) if args.dkim_command == "keygen" else _record(args)
