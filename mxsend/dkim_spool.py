"""DKIM in the daemon: signed once, recorded with the message's state, sent every time.

The signing itself is mxsend/dkim.py; this module is where the daemon's parts call it
(docs/dkim.md, "Integration"; contract §7):

- dispatch asks `domain_in` for CheckFile's `DKIMDomain` going in;
- the attempt calls `decide` before its first byte goes out: on the first attempt it
  signs, on the committer's thread, in the same operation as the state write that
  makes the signature durable, so every later attempt and every server gets the same
  bytes; `as_sent` puts the stored fields in front of the header.

Why the committer's thread and not an executor: the state write has to happen before
the attempt starts anyway, and the committer runs it on its own thread; signing inside
that operation costs no extra hand-off between threads (an executor would add one
hop there and one back for every message), and the event loop never does the CPU work
(docs/performance.md, "DKIM").

A message that no key signs (no key for its From: domain, or the script set
`DKIMDomain = ""`) gets its empty decision recorded with the attempt's own state write:
nothing different goes on the wire, so no extra write is needed before it starts. A
crash before that write decides again on the next attempt, which is what the contract
allows for signatures too (docs/spool.md).
"""

from __future__ import annotations

import dataclasses
import time

from mxsend.config import Config
from mxsend.dkim import Signer, split_message
from mxsend.dkim_keys import DkimKeyError
from mxsend.durable import Steps
from mxsend.envelope import Message
from mxsend.log import event, get_logger
from mxsend.queue_state import MessageState
from mxsend.runtime import Runtime
from mxsend.spool import Claim, Spool

SCRIPT_ERROR = "script_error"
CHECKFILE = "CheckFile"


def load_signer(config: Config, *, log_warnings: bool = True) -> Signer:
    """The keys at start; DkimKeyError (a ConfigError) names the key: exit 2."""
    signer, warnings = Signer.from_config(config.dkim.keys)
    if log_warnings:
        for warning in warnings:
            get_logger().warning("DKIM key %s", warning)
    return signer


def reload_signer(signer: Signer, config: Config) -> None:
    """SIGHUP: re-read every key (a rotated file counts too); on error keep the old ones."""
    try:
        warnings = signer.reload(config.dkim.keys)
    except DkimKeyError as exc:
        get_logger().error("SIGHUP: DKIM keys not reloaded, keeping the running ones: %s",
                           exc)
        return
    for warning in warnings:
        get_logger().warning("DKIM key %s", warning)


def decided_domain(label: str | None) -> str:
    """The `d=` of a stored label (`d=example.com s=s2026,...`), or "" if unsigned."""
    if not label:
        return ""
    first = label.split(",", 1)[0]
    return first.split(" ", 1)[0].removeprefix("d=")


def domain_in(signer: Signer, state: MessageState, data: bytes) -> str:
    """CheckFile's `DKIMDomain` in: the domain of the key(s) that sign(ed) this message.

    Once decided, the domain that signed ("" if none): a later attempt never signs again
    (contract §7), so that is what the script is told.
    """
    if state.dkim_fields is not None:
        return decided_domain(state.dkim)
    if not signer.keys:
        return ""
    return signer.dkim_domain(split_message(data)[0])


def as_sent(message: Message, state: MessageState) -> Message:
    """The message with its stored DKIM-Signature field(s) in front of the header."""
    if not state.dkim_fields:
        return message
    return dataclasses.replace(message, data=state.dkim_fields.encode("ascii") + message.data)


def sign_steps(spool: Spool, claim: Claim, state: MessageState, signer: Signer,
               data: bytes, dkim_domain: str, now: float) -> Steps[MessageState]:
    """Sign (CPU, on the thread that runs the steps), then write the state durably."""
    signed = signer.sign(data, dkim_domain, now)
    decided = dataclasses.replace(state, dkim_fields=signed.fields.decode("ascii"),
                                  dkim=signed.label)
    if signed.fields:
        yield from spool.update_steps(claim, decided)
    return decided


async def decide(rt: Runtime, claim: Claim, state: MessageState, message: Message,
                 dkim_domain: str) -> MessageState:
    """The state with its DKIM decision, durable before any byte goes out if signed.

    `dkim_domain` is CheckFile's `DKIMDomain` out. Already decided, or no keys: the
    state as it is (nothing signed, nothing written).
    """
    signer = rt.signer
    if state.dkim_fields is not None or not signer.keys:
        return state
    if dkim_domain and not signer.has_domain(dkim_domain):
        # The script's value was checked against the keys of the moment; a reload may
        # have removed that domain since. Sent unsigned, and said why.
        event(SCRIPT_ERROR, claim.id, function=CHECKFILE, error=(
            f"DKIMDomain: no [[dkim.key]] has the domain {dkim_domain!r} any more;"
            " sent unsigned"))
        return dataclasses.replace(state, dkim_fields="", dkim=None)
    if not signer.choose(split_message(message.data)[0], dkim_domain):
        # Nothing to sign: no hand-off, no write; the attempt's own write records it.
        return dataclasses.replace(state, dkim_fields="", dkim=None)
    return await rt.committer.run(sign_steps(rt.spool, claim, state, signer, message.data,
                                             dkim_domain, time.time()))
