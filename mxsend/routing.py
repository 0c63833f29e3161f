"""VPOP3 8.8's hooks in one delivery (contract §9): which hosts, which sender, which reply.

`Routing` is the one object delivery.py asks about the script's hooks, one call each:

* `hosts()`: mxserverrules.lua's GetCheckCache (resolve afresh?) and GetOverrides (smart
  hosts instead of the MX records, or no delivery at all);
* `check_server()`: its CheckServer per MX host (allowed? held for some minutes?);
* `return_path()`: returnAddressModifier's sender, then ModifyReturnPath's;
* `reply_hook()`: ReturnCodeHandler for each server reply of one message.

What the answers mean is hooks.py's; the calls are policy.py's and server_rules.py's.
A script without a hook costs one dictionary look-up per message for it, no call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mxsend.actions import ServerActions
from mxsend.delivery_event import AttemptInfo
from mxsend.envelope import Message, Recipient
from mxsend.errors import DeliveryError, Phase, TemporaryFailure
from mxsend.hooks import ServerVerdict, SmartHost
from mxsend.policy import Policy, return_path_request
from mxsend.smtp_io import ReplyHook
from mxsend.smtp_rules import choose_return_path


@dataclass(frozen=True, slots=True)
class Route:
    """A smart host of GetOverrides with its addresses and port (contract §9)."""

    name: str
    addresses: tuple[str, ...]
    port: int


class HostLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def addresses(self) -> tuple[str, ...]: ...


class ResolverLike(Protocol):
    async def resolve(self, domain: str) -> Sequence[HostLike]: ...


class FreshResolver(Protocol):
    """mx.Resolver: what mxserverrules.lua's answers need of it."""

    async def resolve(self, domain: str, *, fresh: bool = False) -> Sequence[HostLike]: ...
    async def host_addresses(self, host: str, *, fresh: bool = False
                             ) -> tuple[str, ...]: ...


class Routing:
    """The script's VPOP3 8.8 hooks around one Deliverer; see the module doc."""

    def __init__(self, hooks: Policy, resolver: ResolverLike, port: int) -> None:
        self.hooks = hooks
        self._resolver = resolver
        self._port = port

    @property
    def ruled(self) -> bool:
        """mxserverrules.lua has a function to ask (read per message: it reloads)."""
        rules = self.hooks.rules
        return rules is not None and rules.active

    async def hosts(self, queue_id: str, domain: str, retries: int, size: int
                    ) -> Sequence[HostLike]:
        """The hosts mxserverrules.lua routes `domain` to: GetCheckCache, GetOverrides."""
        rules = self.hooks.rules
        assert rules is not None
        resolver: FreshResolver = self._resolver  # type: ignore[assignment]
        fresh = not await rules.check_cache(queue_id, domain, retries, size)
        overrides = await rules.overrides(queue_id, domain, retries, size)
        if not overrides.proceed:
            raise TemporaryFailure(
                f"{domain}: no MX and no address (GetOverrides said not to continue)",
                dsn="4.4.4", phase=Phase.DNS, host=domain)
        if not overrides.servers:
            return await resolver.resolve(domain, fresh=fresh)
        routes: list[HostLike] = []
        problem: DeliveryError | None = None
        for server in overrides.servers:
            try:
                routes.append(await self._route(resolver, server, fresh))
            except DeliveryError as exc:
                problem = exc
        if not routes and problem is not None:
            raise problem
        return routes

    async def _route(self, resolver: FreshResolver, server: SmartHost, fresh: bool) -> Route:
        """One smart host; smtp.allowed_destinations still applies when connecting."""
        port = server.port or self._port
        if server.literal:
            return Route(server.name, (server.host,), port)
        return Route(server.name, await resolver.host_addresses(server.host, fresh=fresh),
                     port)

    async def check_server(self, queue_id: str, domain: str, host: str, retries: int,
                           size: int) -> ServerVerdict:
        """CheckServer for one MX host; only asked when `ruled`."""
        rules = self.hooks.rules
        assert rules is not None
        return await rules.check_server(queue_id, domain, host, retries, size)

    async def return_path(self, queue_id: str, message: Message,
                          recipients: Sequence[Recipient], actions: ServerActions,
                          attempt: AttemptInfo | None) -> str:
        """returnAddressModifier's choice, then ModifyReturnPath's (contract §9)."""
        computed = choose_return_path(message.envelope.sender, actions)
        hooks = self.hooks
        if not hooks.defines("ModifyReturnPath"):
            return computed
        chosen = await hooks.modify_return_path(queue_id, return_path_request(
            message, [r.address for r in recipients], computed,
            attempt.created if attempt is not None else 0.0))
        return computed if chosen is None else chosen

    def reply_hook(self, queue_id: str) -> ReplyHook | None:
        """ReturnCodeHandler for this message's replies; None: the script has none."""
        hooks = self.hooks
        if not hooks.has_reply_hook:
            return None
        return functools.partial(hooks.return_code, queue_id)
