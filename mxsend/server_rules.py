"""`mxserverrules.lua`, VPOP3 8.8's second script (contract §9): routing per domain.

    GetCheckCache(Domain, Retries, Size)   -> true: cached DNS answers are fine;
                                              false: resolve afresh
    GetOverrides(Domain, Retries, Size)    -> Servers, Continue
    CheckServer(Domain, MXServer, Retries, Size, DefaultResult) -> Allowed, HoldMinutes

It runs in its own sandbox and worker with mxout.lua's limits, globals and reload
(script_file.ScriptFile). Every function is optional; a missing file is no error and
logs nothing. A call that fails (runtime error, timeout, a wrong type) is one
`script_error` and the answer of a script without the function: cached DNS, the MX
records, the server allowed, no hold. What the answers mean is in hooks.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from mxsend.config import Config
from mxsend.hooks import (
    ListResult,
    Overrides,
    ServerVerdict,
    read_overrides,
    read_verdict,
    use_cache,
)
from mxsend.log import event
from mxsend.luavalues import text_value
from mxsend.script_file import SCRIPT_ERROR, ScriptFile

GETCHECKCACHE = "GetCheckCache"
GETOVERRIDES = "GetOverrides"
CHECKSERVER = "CheckServer"
RULE_FUNCTIONS = (GETCHECKCACHE, GETOVERRIDES, CHECKSERVER)


def hook_results(values: Sequence[object]) -> tuple[object, object]:
    """The first two results of a hook call ((status, kind, value, kind, value) from the
    worker) as Python values: None, bool, float, str, or ListResult for a table."""
    out: list[object] = []
    for index in (1, 3):
        kind = text_value(values[index]) if len(values) > index else "nil"
        value = values[index + 1] if len(values) > index + 1 else None
        if kind == "string" and isinstance(value, bytes):
            out.append(value.decode("utf-8", errors="surrogateescape"))
        elif kind == "table" and isinstance(value, bytes):
            out.append(ListResult(value.decode("utf-8", errors="surrogateescape")))
        elif kind in ("number", "boolean"):
            out.append(value)
        else:
            out.append(None)
    return out[0], out[1]


class ServerRules(ScriptFile):
    """The operator's mxserverrules.lua, as the deliverer asks it."""

    def __init__(self, config: Config) -> None:
        assert config.script.server_rules_path is not None
        super().__init__(config, config.script.server_rules_path, functions=RULE_FUNCTIONS,
                         optional=frozenset(RULE_FUNCTIONS), log_missing=False)

    @classmethod
    def of(cls, config: Config) -> ServerRules | None:
        return cls(config) if config.script.server_rules_path is not None else None

    @property
    def active(self) -> bool:
        """Any of the three functions may be asked (no script: none is)."""
        return any(self.defines(name) for name in RULE_FUNCTIONS)

    async def check_cache(self, queue_id: str, domain: str, retries: int, size: int) -> bool:
        """GetCheckCache: True (the default) lets cached DNS answers be used."""
        results = await self._ask(GETCHECKCACHE, queue_id, domain, retries, size)
        return True if results is None else use_cache(results[0])

    async def overrides(self, queue_id: str, domain: str, retries: int, size: int
                        ) -> Overrides:
        """GetOverrides: smart hosts instead of the MX, and whether to go on at all."""
        results = await self._ask(GETOVERRIDES, queue_id, domain, retries, size)
        if results is None:
            return Overrides()
        try:
            return read_overrides(*results)
        except ValueError as exc:
            event(SCRIPT_ERROR, queue_id, function=GETOVERRIDES,
                  error=f"{exc}; using the MX records")
            return Overrides()

    async def check_server(self, queue_id: str, domain: str, server: str, retries: int,
                           size: int, default: bool = True) -> ServerVerdict:
        """CheckServer: may this server be used now, or hold the message for a while."""
        results = await self._ask(CHECKSERVER, queue_id, domain, retries, size, server,
                                  default)
        if results is None:
            return ServerVerdict(allowed=default)
        return read_verdict(*results, default)

    async def _ask(self, function: str, queue_id: str, domain: str, retries: int,
                   size: int, server: str = "", default: bool = True
                   ) -> tuple[object, object] | None:
        if not self.defines(function):
            return None
        values = await self.call(function, queue_id, (
            "rule", self.timeout, function.encode(), domain.encode(), retries, size,
            server.encode(), default))
        return None if values is None else hook_results(values)

