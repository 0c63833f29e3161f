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
from mxsend.hooks import Overrides, ServerVerdict, hold_minutes, smart_hosts
from mxsend.log import event
from mxsend.luavalues import FieldError, text_value, vpop3_flag
from mxsend.script_file import SCRIPT_ERROR, ScriptFile

GETCHECKCACHE = "GetCheckCache"
GETOVERRIDES = "GetOverrides"
CHECKSERVER = "CheckServer"
RULE_FUNCTIONS = (GETCHECKCACHE, GETOVERRIDES, CHECKSERVER)


class ListResult(str):
    """A Lua table returned by a hook: its array items joined by "\\n"."""

    __slots__ = ()


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
        if results is None or results[0] is None:
            return True
        return _flag(results[0], True)

    async def overrides(self, queue_id: str, domain: str, retries: int, size: int
                        ) -> Overrides:
        """GetOverrides: smart hosts instead of the MX, and whether to go on at all."""
        results = await self._ask(GETOVERRIDES, queue_id, domain, retries, size)
        if results is None:
            return Overrides()
        servers, proceed = results
        if proceed is False:  # only false itself: nil (one result) goes on
            return Overrides(proceed=False)
        if servers is None or servers is False:
            return Overrides()
        if not isinstance(servers, str):
            event(SCRIPT_ERROR, queue_id, function=GETOVERRIDES,
                  error=f"Servers is a {type(servers).__name__}, not a list or a string;"
                        " using the MX records")
            return Overrides()
        try:
            return Overrides(servers=smart_hosts(servers))
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
        allowed, hold = results
        return ServerVerdict(allowed=default if allowed is None else _flag(allowed, default),
                             hold_minutes=hold_minutes(hold))

    async def _ask(self, function: str, queue_id: str, domain: str, retries: int,
                   size: int, server: str = "", default: bool = True
                   ) -> tuple[object, object] | None:
        if not self.defines(function):
            return None
        values = await self.call(function, queue_id, (
            "rule", self.timeout, function.encode(), domain.encode(), retries, size,
            server.encode(), default))
        return None if values is None else hook_results(values)


def _flag(value: object, default: bool) -> bool:
    """A VPOP3 flag; something that is none (a table, "maybe") keeps the default."""
    try:
        return vpop3_flag(value)
    except FieldError:
        return default
