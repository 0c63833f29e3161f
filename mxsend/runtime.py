"""What the daemon's parts share: the spool, the plan and what SIGHUP may replace."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mxsend.committer import Committer
from mxsend.config import Config
from mxsend.delivery import Deliverer
from mxsend.dkim import Signer
from mxsend.plan import DuePlan
from mxsend.policy import Policy
from mxsend.spool import Spool


@dataclass(slots=True)
class Runtime:
    """Each part reads `config`, `policy` and `deliverer` here at each use, so that a
    reload reaches them all at once; `claimed` holds the ids this daemon has claimed
    (a claimed id is not dispatched twice), `wake` rouses the scan loop."""

    config: Config
    spool: Spool
    committer: Committer
    plan: DuePlan = field(default_factory=DuePlan)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    claimed: set[str] = field(default_factory=set)
    policy: Policy | None = None
    deliverer: Deliverer | None = None
    signer: Signer = field(default_factory=Signer)  # DKIM keys; SIGHUP swaps them inside
