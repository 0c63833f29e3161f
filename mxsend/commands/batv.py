"""`mxsend batv`: not yet available (filled in by its own issue)."""

from __future__ import annotations

import argparse
import sys

from mxsend.config import Config


def run(args: argparse.Namespace, config: Config) -> int:
    print("mxsend: 'batv' is not yet available", file=sys.stderr)
    return 1
