"""`python -m mxsend` is the `mxsend` command."""

import sys

from mxsend.cli import main

sys.exit(main())
