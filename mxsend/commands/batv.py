"""`mxsend batv sign|verify ADDRESS`: BATV with `batv.key_file` (contract §2).

`verify` is for the receiving side's bounce check: exit 0 and the original address on
stdout when the tag is good, exit 1 and the reason on stderr when it is not.
"""

from __future__ import annotations

import argparse
import sys
import time

from mxsend.batv import BatvKey, load_key, sign, verify
from mxsend.config import Config


def run(args: argparse.Namespace, config: Config) -> int:
    key = BatvKey(load_key(config.batv.key_file))
    address: str = args.address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    now = time.time()
    if args.batv_command == "sign":
        if "@" not in address:
            print(f"mxsend: not an address: {address!r}", file=sys.stderr)
            return 2
        print(sign(address, key, now))
        return 0
    result = verify(address, key, now)
    if not result.valid:
        print(f"mxsend: {address}: {result.reason}", file=sys.stderr)
        return 1
    print(result.address)
    return 0
